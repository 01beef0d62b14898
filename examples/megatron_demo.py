"""Placement + real megatron-core training steps on 4 CPU ranks: the foundation demo.

Builds a `ParallelPlan` (LLM TP=2 x PP=2, ViT data parallel over all 4 ranks), creates the process
groups with `hetero_parallel.initialize`, and trains a small Qwen3-style megatron `GPTModel` for a
few steps with megatron's 1F1B schedule, DDP and optimizer, on a learnable synthetic task (each
sequence counts upward from a random start, modulo the vocabulary). Rank 0 prints the plan, each
rank's role, and the loss per step.

Run (CPU, gloo):
    python -m torch.distributed.run --standalone --nproc-per-node 4 -m examples.megatron_demo
    python -m torch.distributed.run --standalone --nproc-per-node 4 -m examples.megatron_demo \\
        --tp 1 --pp 4 --steps 10
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from examples.keye_vl.llm import TINY, build_llm_chunks, lm_forward_step, transformer_config
from hetero_parallel import ParallelPlan, default_backend, initialize, teardown
from hetero_parallel.cpu_compat import cpu_compat


def counting_batch(
    step: int, batch: int, seq: int, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences ``s, s+1, s+2, ...`` (mod vocab): the next token is always predictable."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    tokens = (start + torch.arange(seq + 1)) % vocab
    return tokens[:, :-1], tokens[:, 1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    backend = default_backend()
    dist.init_process_group(backend)
    world = dist.get_world_size()
    plan = ParallelPlan(world_size=world, tp=args.tp, pp=args.pp)
    with cpu_compat():
        groups = initialize(plan, backend=backend, seed=1234)
        rank = dist.get_rank()
        if rank == 0:
            print(plan.describe(), flush=True)
        dist.barrier()
        role = plan.data_role(rank)
        c = plan.coords(rank)
        print(
            f"rank {rank}: tp={c.tp} pp={c.pp} dp={c.dp} vit={c.vit} "
            f"loads_pixels={role.loads_pixels} loads_tokens={role.loads_tokens}",
            flush=True,
        )
        dist.barrier()

        # Plain megatron schedules with a mean loss per micro-batch.
        config = transformer_config(TINY, plan, calculate_per_token_loss=False,
                                    variable_seq_lengths=False)
        torch.manual_seed(0)
        chunks = build_llm_chunks(TINY, config)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
        model = [DistributedDataParallel(config, ddp_config, m) for m in chunks]
        config.finalize_model_grads_func = finalize_model_grads
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=args.lr, clip_grad=0.0,
                            use_distributed_optimizer=False),
            model,
        )
        per_replica = args.global_batch // plan.dp
        num_micro = per_replica // args.micro_batch
        forward_backward = get_forward_backward_func()
        for step in range(args.steps):
            start = time.perf_counter()
            inputs, labels = counting_batch(step, args.global_batch, args.seq, TINY.vocab_size)
            mine = slice(c.dp * per_replica, (c.dp + 1) * per_replica)
            micro = [
                (inputs[mine][i::num_micro], labels[mine][i::num_micro]) for i in range(num_micro)
            ]
            for m in model:
                m.zero_grad_buffer()
            optimizer.zero_grad()
            losses = forward_backward(
                forward_step_func=lm_forward_step, data_iterator=iter(micro), model=model[0],
                num_microbatches=num_micro, seq_length=args.seq,
                micro_batch_size=args.micro_batch, forward_only=False,
            )
            optimizer.step()
            loss = torch.zeros(1)
            if ps.is_pipeline_last_stage():
                loss[0] = torch.stack([d["loss"] for d in losses]).mean()
            dist.all_reduce(loss)  # only last-stage ranks contribute
            loss /= plan.tp * plan.cp * plan.dp
            if rank == 0:
                elapsed = time.perf_counter() - start
                print(f"step {step:3d}  loss {loss.item():.4f}  {elapsed * 1e3:.0f} ms", flush=True)
        teardown(groups, destroy_world=True)


if __name__ == "__main__":
    main()
