"""Shared pieces of the multi-process megatron-core tests: batches, a single-model reference and
one training step through megatron's schedules, DDP and optimizer on a `ParallelPlan`.

All functions run inside a rank of `tests.distributed.DistributedPool` with `cpu_compat()` active.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from hetero_parallel import ParallelPlan, initialize, teardown
from hetero_parallel.megatron_state import gather_full_state, load_full_state
from tests.tiny_models import VOCAB, build_gpt, build_gpt_chunks, gpt_config

SEQ = 32
GLOBAL_BATCH = 8
LR = 0.1
"""SGD learning rate: large enough that one step moves every parameter visibly."""
MOMENTUM = 0.9


def global_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def mean_loss_config(plan: ParallelPlan | None = None):
    """The tiny GPT with megatron's usual per-micro-batch mean loss (plain megatron schedules, not
    the heterogeneous step's per-token loss)."""
    return gpt_config(plan, calculate_per_token_loss=False, variable_seq_lengths=False)


def lm_forward_step(data_iterator, model):
    """megatron ``forward_step_func``: next-token prediction with a mean token loss."""
    inputs, labels = next(data_iterator)
    position_ids = torch.arange(inputs.shape[1]).expand_as(inputs)
    output = model(inputs, position_ids, None, labels=labels)

    def loss_func(per_token_loss):
        loss = per_token_loss.float().mean()
        # Cloned: the schedule divides the returned loss in place by the micro-batch count.
        return loss, {"loss": loss.detach().clone()}

    return output, loss_func


def _optimizer_config():
    from megatron.core.optimizer import OptimizerConfig

    # SGD rather than Adam for exactness checks: Adam's first step is lr * g / (|g| + eps), which
    # turns a 1e-7 difference in a near-zero gradient into a full-size difference in the update.
    return OptimizerConfig(
        optimizer="sgd", lr=LR, sgd_momentum=MOMENTUM, weight_decay=0.0, clip_grad=0.0,
        bf16=False, fp16=False, use_distributed_optimizer=False,
    )


@dataclass
class Reference:
    initial: dict[str, torch.Tensor]
    loss: float
    grads: dict[str, torch.Tensor]
    after_step: dict[str, torch.Tensor]


def single_model_reference(batch, init_seed: int = 0) -> Reference:
    """TP=1, PP=1 model on the whole batch, one SGD step: computed locally on this rank.

    Builds its own megatron state (tp=pp=1) and tears it down again.
    """
    groups = initialize(ParallelPlan(world_size=dist.get_world_size()), backend="gloo", seed=1)
    try:
        torch.manual_seed(init_seed)
        model = build_gpt(mean_loss_config())
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        inputs, labels = batch
        position_ids = torch.arange(inputs.shape[1]).expand_as(inputs)
        loss = model(inputs, position_ids, None, labels=labels).float().mean()
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        opt.step()
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        return Reference(initial, loss.item(), grads, after)
    finally:
        teardown(groups)


@dataclass
class StepResult:
    loss: float
    grads: dict[str, torch.Tensor]
    after_step: dict[str, torch.Tensor]


def megatron_train_step(
    plan: ParallelPlan, batch, initial: dict[str, torch.Tensor], *, num_microbatches: int,
) -> StepResult:
    """One training step of ``initial`` on ``batch`` with megatron's schedule, DDP and optimizer.

    Every rank returns the global mean loss (broadcast from the last stage and averaged over the
    data-parallel replicas), its stage's gradients (DP-reduced) and parameters after the step,
    gathered over TP and named as in the single model.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    groups = initialize(plan, backend="gloo", seed=1)
    try:
        config = mean_loss_config(plan)
        chunks = build_gpt_chunks(config)
        load_full_state(chunks, initial)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
        )
        model = [
            DistributedDataParallel(config, ddp_config, c, disable_bucketing=True) for c in chunks
        ]
        config.finalize_model_grads_func = finalize_model_grads
        optimizer = get_megatron_optimizer(_optimizer_config(), model)

        inputs, labels = batch
        per_replica = inputs.shape[0] // plan.dp
        dp_rank = ps.get_data_parallel_rank()
        shard = slice(dp_rank * per_replica, (dp_rank + 1) * per_replica)
        mbs = per_replica // num_microbatches
        micro = [
            (inputs[shard][i * mbs:(i + 1) * mbs], labels[shard][i * mbs:(i + 1) * mbs])
            for i in range(num_microbatches)
        ]
        iterators = [iter(micro) for _ in model] if plan.vpp else iter(micro)
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=lm_forward_step,
            data_iterator=iterators,
            model=model if plan.vpp else model[0],
            num_microbatches=num_microbatches,
            seq_length=inputs.shape[1],
            micro_batch_size=mbs,
            forward_only=False,
        )
        grads = gather_full_state(model, grads=True)
        ok, _, _ = optimizer.step()
        assert ok, "optimizer step was skipped"
        after = gather_full_state(model)

        loss = torch.zeros(1)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            loss[0] = torch.stack([d["loss"] for d in losses]).mean()
        last = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(loss, src=last, group=ps.get_pipeline_model_parallel_group())
        dist.all_reduce(loss, group=ps.get_data_parallel_group())
        return StepResult(loss.item() / plan.dp, grads, after)
    finally:
        teardown(groups)


def max_rel_diff(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor: max |got - ref| / max(|ref|) over the names in ``got``."""
    out = {}
    for name, value in got.items():
        r = ref[name]
        if value.shape != r.shape:
            out[name] = float("inf")
            continue
        scale = r.abs().max().clamp_min(1e-12)
        out[name] = ((value - r).abs().max() / scale).item()
    return out
