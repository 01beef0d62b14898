"""A single-process reference for the heterogeneous step and the step itself on a `ParallelPlan`,
on tiny Keye-like batches (`examples.keye_vl.toy_batch`: text, variable-size images, Slow-Fast
videos)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from examples.keye_vl.config import MODELS
from examples.keye_vl.llm import TINY, build_llm, gather_full_state, transformer_config
from examples.keye_vl.toy_batch import ToySample, mixed_samples
from examples.keye_vl.trainer import KeyeTrainer, OptimConfig, replica_microbatch_shapes
from examples.keye_vl.vision import TINY_VISION, VisionEncoder
from hetero_parallel import ParallelPlan, initialize, teardown
from hetero_parallel.balancer import BatchPlan, plan_by_position, plan_global_batch
from hetero_parallel.cost_model import CostModel
from hetero_parallel.step import StepOptions, make_microbatch

LR = 0.1
COST = CostModel(vit_linear=1.0, vit_quadratic=0.01, llm_linear=1.0, llm_quadratic=0.001)


def make_samples(seed: int, count: int = 12) -> list[ToySample]:
    return mixed_samples(seed, count, TINY.vocab_size)


def total_loss_tokens(samples: list[ToySample]) -> int:
    return sum(s.num_loss_tokens for s in samples)


@dataclass
class Result:
    loss: float
    grads: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]


def reference(samples: list[ToySample], init_seed: int = 0) -> tuple[dict, Result]:
    """Single model (ViT + projector + TP=1/PP=1 LLM), whole batch, one SGD step, on this rank."""
    groups = initialize(ParallelPlan(world_size=dist.get_world_size()), backend="gloo", seed=1)
    try:
        torch.manual_seed(init_seed)
        vision = VisionEncoder(TINY_VISION)
        llm = build_llm(TINY, transformer_config(TINY))
        initial = {"vision": {k: v.clone() for k, v in vision.state_dict().items()},
                   "llm": {n: p.detach().clone() for n, p in llm.named_parameters()}}
        total = torch.zeros(())
        for s in samples:
            visual = vision([f for frames in s.frames for f in frames])
            ids = s.tokens[None, :]
            positions = torch.arange(ids.shape[1])[None, :]
            emb = llm.embedding(input_ids=ids, position_ids=positions)  # [S, 1, H]
            slots = torch.tensor([p + t for poss, toks in zip(s.layout.frame_positions,
                                                               s.layout.frame_tokens, strict=True)
                                  for p, n in zip(poss, toks, strict=True) for t in range(n)],
                                 dtype=torch.long)
            if slots.numel():
                emb = emb.index_put((slots, torch.zeros_like(slots)), visual)
            labels = torch.cat([s.tokens[1:], s.tokens[:1]])[None, :]
            loss = llm(ids, positions, None, decoder_input=emb, labels=labels)[0]
            mask = torch.cat([s.is_target[1:], torch.tensor([False])]).float()
            total = total + (loss * mask).sum()
        n = total_loss_tokens(samples)
        mean = total / n
        mean.backward()
        grads = {f"vision.{k}": p.grad.clone() for k, p in vision.named_parameters()}
        grads |= {f"llm.{k}": p.grad.clone() for k, p in llm.named_parameters()}
        for p in list(vision.parameters()) + list(llm.parameters()):
            p.data -= LR * p.grad
        after = {f"vision.{k}": p.detach().clone() for k, p in vision.named_parameters()}
        after |= {f"llm.{k}": p.detach().clone() for k, p in llm.named_parameters()}
        return initial, Result(mean.item(), grads, after)
    finally:
        teardown(groups)


def plan_batch(samples: list[ToySample], plan: ParallelPlan, num_microbatches: int,
               baseline: bool = False) -> BatchPlan:
    """Balanced plan, or with ``baseline`` the position split with the ViT on stage 0 (``plan``
    must then be ``with_vit_on_first_stage()``)."""
    specs = [s.layout.spec() for s in samples]
    if baseline:
        return plan_by_position(
            specs, COST, num_replicas=plan.dp, num_microbatches=num_microbatches,
            replica_vit_ranks=[plan.replica_vit_indices(d) for d in range(plan.dp)],
            frames_per_chunk=2)
    return plan_global_batch(specs, COST, num_replicas=plan.dp,
                             num_microbatches=num_microbatches, num_vit_ranks=plan.vit_dp,
                             frames_per_chunk=2)


def hetero_step(plan: ParallelPlan, samples: list[ToySample], initial: dict, batch: BatchPlan,
                options: StepOptions | None = None) -> tuple[Result, dict[str, float]]:
    """One SGD step of the heterogeneous placement through `KeyeTrainer`; gathers this rank's
    view of the gradients and weights (LLM unsharded over TP, ViT if it hosts a replica)."""
    groups = initialize(plan, backend="gloo", seed=1)
    try:
        trainer = KeyeTrainer.build(groups, MODELS["tiny"], initial_state=initial,
                                    optim=OptimConfig(optimizer="sgd", lr=LR))
        layouts = {s.sample_id: s.layout for s in samples}
        frames, microbatches = step_inputs(groups, samples, batch)
        out = trainer.step(batch, layouts, frames, microbatches, total_loss_tokens(samples),
                           options)
        llm = trainer.llm
        grads = {f"llm.{k}": v for k, v in gather_full_state(llm, grads=True).items()}
        after = {f"llm.{k}": v for k, v in gather_full_state(llm).items()}
        if trainer.vision is not None:
            vision = trainer.vision
            grads |= {f"vision.{k}": p.grad.clone() for k, p in vision.named_parameters()}
            after |= {f"vision.{k}": p.detach().clone() for k, p in vision.named_parameters()}
        return Result(out.loss, grads, after), out.timings
    finally:
        teardown(groups)


def step_inputs(groups, samples: list[ToySample], batch: BatchPlan):
    """What the dataloader would hand this rank: its ViT frames and its replica's micro-batches."""
    plan, rank = groups.plan, groups.rank
    by_id = {s.sample_id: s for s in samples}
    frames: list[torch.Tensor] = []
    vit_index = plan.vit_index(rank)
    if vit_index is not None:
        for ch in batch.chunks_for_vit_rank(vit_index):
            frames.extend(by_id[ch.sample_id].frames[ch.media_index][ch.frame_start:ch.frame_stop])
    microbatches = None
    if plan.data_role(rank).needs_tokens:
        layouts = {s.sample_id: s.layout for s in samples}
        microbatches = [
            make_microbatch([by_id[s].tokens for s in mb.sample_ids],
                            [by_id[s].is_target for s in mb.sample_ids], mb.seq_len)
            for mb in replica_microbatch_shapes(groups, batch, layouts)
        ]
    return frames, microbatches
