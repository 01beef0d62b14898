"""A single-process reference for the heterogeneous step and the step itself on a `ParallelPlan`,
on tiny Keye-like batches (`hetero_parallel.synthetic`: text, variable-size images, Slow-Fast
videos) with the tiny test models (`tests.tiny_models`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from hetero_parallel import ParallelPlan, initialize, teardown
from hetero_parallel.cost_model import CostModel
from hetero_parallel.layout import MicroBatch, lay_out_positions, make_microbatch
from hetero_parallel.megatron_state import gather_full_state, load_full_state
from hetero_parallel.step import StepOptions
from hetero_parallel.step_plan import StepConfig, StepPlan, check_microbatches, plan_step
from hetero_parallel.synthetic import PAD_VISUAL, ToySample, build_sample, mixed_samples
from hetero_parallel.trainer import HeteroTrainer, OptimizerConfig
from tests.tiny_models import (
    VOCAB,
    TinyVisionEncoder,
    build_gpt,
    build_gpt_chunks,
    gpt_config,
    toy_mrope_positions,
)

LR = 0.1
COST = CostModel(vit_linear=1.0, vit_quadratic=0.01, llm_linear=1.0, llm_quadratic=0.001)


def make_samples(seed: int, count: int = 12, giant: int = 0) -> list[ToySample]:
    """``count`` mixed samples, plus (with ``giant``) one sample whose single image has ``giant``
    tokens: costly enough for the balancer to split it over ViT ranks."""
    samples = mixed_samples(seed, count, VOCAB)
    if giant:
        g = torch.Generator().manual_seed(seed + 1000)
        samples.append(build_sample(count, [[giant]], 6, VOCAB, g))
    return samples


def total_loss_tokens(samples: list[ToySample]) -> int:
    return sum(s.num_loss_tokens for s in samples)


@dataclass
class Result:
    loss: float
    grads: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]


def _positions(layout, mrope: bool) -> torch.Tensor:
    if mrope:
        return torch.from_numpy(toy_mrope_positions(layout))
    return torch.arange(layout.seq_len)


def initial_weights(init_seed: int = 0) -> dict:
    """``{"vision": state dict, "llm": single-model state}``; needs megatron's parallel state with
    TP=1 (see `standalone_initial_weights`)."""
    torch.manual_seed(init_seed)
    vision = TinyVisionEncoder()
    llm = build_gpt(gpt_config())
    return {"vision": {k: v.clone() for k, v in vision.state_dict().items()},
            "llm": {n: p.detach().clone() for n, p in llm.named_parameters()}}


def standalone_initial_weights(init_seed: int = 0) -> dict:
    """`initial_weights` before any layout is initialised (collective over the world)."""
    groups = initialize(ParallelPlan(world_size=dist.get_world_size()), backend="gloo", seed=1)
    try:
        return initial_weights(init_seed)
    finally:
        teardown(groups)


def sample_logps(vision, llm, samples: list[ToySample], mrope: bool = False
                 ) -> list[torch.Tensor]:
    """Each sample's summed ``log p`` of its loss-carrying tokens, one sample at a time through
    the whole model (differentiable)."""
    out = []
    for s in samples:
        visual = vision([f for frames in s.frames for f in frames])
        ids = s.tokens[None, :]
        positions = _positions(s.layout, mrope)[..., None, :]
        emb = llm.embedding(input_ids=ids, position_ids=positions)  # [S, 1, H]
        slots = torch.from_numpy(s.layout.visual_positions())
        if slots.numel():
            emb = emb.index_put((slots, torch.zeros_like(slots)), visual)
        labels = torch.cat([s.tokens[1:], s.tokens[:1]])[None, :]
        loss = llm(ids, positions, None, decoder_input=emb, labels=labels)[0]
        mask = torch.cat([s.is_target[1:], torch.tensor([False])]).float()
        out.append(-(loss * mask).sum())
    return out


def reference_logps(samples: list[ToySample], init_seed: int = 0) -> tuple[dict, dict]:
    """(`initial_weights`, sample id -> its log-prob) from the single model, without gradients
    (collective over the world, like `standalone_initial_weights`)."""
    groups = initialize(ParallelPlan(world_size=dist.get_world_size()), backend="gloo", seed=1)
    try:
        initial = initial_weights(init_seed)
        vision = TinyVisionEncoder()
        vision.load_state_dict(initial["vision"])
        llm = build_gpt(gpt_config())
        load_full_state([llm], initial["llm"])
        with torch.no_grad():
            logps = sample_logps(vision, llm, samples)
        return initial, {s.sample_id: v.item() for s, v in zip(samples, logps, strict=True)}
    finally:
        teardown(groups)


def reference(samples: list[ToySample], init_seed: int = 0, lr: float = LR,
              mrope: bool = False, loss_fn=None) -> tuple[dict, Result]:
    """Single model (ViT + projector + TP=1/PP=1 LLM), whole batch, one SGD step, on this rank.
    The loss is the mean token loss, or ``loss_fn(per-sample log-probs)``."""
    groups = initialize(ParallelPlan(world_size=dist.get_world_size()), backend="gloo", seed=1)
    try:
        initial = initial_weights(init_seed)
        vision = TinyVisionEncoder()
        vision.load_state_dict(initial["vision"])
        llm = build_gpt(gpt_config(mrope=mrope))
        load_full_state([llm], initial["llm"])
        logps = sample_logps(vision, llm, samples, mrope)
        if loss_fn is None:
            mean = -torch.stack(logps).sum() / total_loss_tokens(samples)
        else:
            mean = loss_fn(logps)
        mean.backward()
        params = [(f"vision.{k}", p) for k, p in vision.named_parameters()]
        params += [(f"llm.{k}", p) for k, p in llm.named_parameters()]
        grads = {k: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                 for k, p in params}
        for k, p in params:
            p.data -= lr * grads[k]
        after = {f"vision.{k}": p.detach().clone() for k, p in vision.named_parameters()}
        after |= {f"llm.{k}": p.detach().clone() for k, p in llm.named_parameters()}
        return initial, Result(mean.item(), grads, after)
    finally:
        teardown(groups)


def step_config(num_microbatches: int, baseline: bool = False, *, packed: bool = True,
                split: bool = False) -> StepConfig:
    return StepConfig(num_microbatches=num_microbatches, frames_per_chunk=2,
                      placement="by_position" if baseline else "balanced", packed=packed,
                      split_vit_items=split)


@dataclass
class ToyStep:
    """A `hetero_parallel.trainer.StepInput` built from in-memory samples."""

    plan: StepPlan
    vision_frames: list[torch.Tensor]
    microbatches: list[MicroBatch] | None
    total_loss_tokens: int
    position_ids: list[torch.Tensor] | None = None
    pairs: dict[int, int] = field(default_factory=dict)
    reference_logps: dict[int, float] | None = None


def toy_step(plan: ParallelPlan, rank: int, samples: list[ToySample], config: StepConfig,
             mrope: bool = False) -> ToyStep:
    """What the dataloader would hand ``rank``: its step plan, ViT frames and micro-batches."""
    step = plan_step(plan, rank, [s.layout for s in samples], COST, config)
    by_id = {s.sample_id: s for s in samples}
    frames: list[torch.Tensor] = []
    vit_index = plan.vit_index(rank)
    if vit_index is not None:
        for ch in step.batch.chunks_for_vit_rank(vit_index):
            frames.extend(by_id[ch.sample_id].frames[ch.media_index][ch.frame_start:ch.frame_stop])
    microbatches = None
    positions = [[_positions(by_id[s].layout, mrope) for s in mb.sample_ids]
                 for mb in step.shapes]
    if plan.data_role(rank).needs_tokens:
        microbatches = [
            make_microbatch([by_id[s].tokens for s in mb.sample_ids],
                            [by_id[s].is_target for s in mb.sample_ids], mb, position_ids=pos)
            for mb, pos in zip(step.shapes, positions, strict=True)
        ]
        check_microbatches(step, microbatches, {PAD_VISUAL})
    laid_out = [lay_out_positions(mb, pos) for mb, pos in zip(step.shapes, positions,
                                                               strict=True)]
    return ToyStep(step, frames, microbatches, total_loss_tokens(samples), laid_out)


def build_trainer(groups, initial: dict, optim: OptimizerConfig | None = None,
                  options: StepOptions | None = None, mrope: bool = False,
                  objective=None) -> HeteroTrainer:
    """The tiny model on ``groups.plan`` from ``initial`` weights, in a `HeteroTrainer`."""
    plan = groups.plan
    vision = None
    if plan.vit_index(groups.rank) is not None:
        vision = TinyVisionEncoder()
        vision.load_state_dict(initial["vision"])
    chunks = build_gpt_chunks(gpt_config(plan, mrope=mrope))
    load_full_state(chunks, initial["llm"])
    return HeteroTrainer(groups, vision=vision, llm_chunks=chunks,
                         optim=optim or OptimizerConfig(optimizer="sgd", lr=LR),
                         step_options=options, objective=objective)


def hetero_step(plan: ParallelPlan, samples: list[ToySample], initial: dict, config: StepConfig,
                options: StepOptions | None = None, mrope: bool = False, objective=None,
                **step_fields) -> tuple[Result, dict[str, float]]:
    """One SGD step of the heterogeneous placement through `HeteroTrainer`; gathers this rank's
    view of the gradients and weights (LLM unsharded over TP, ViT if it hosts a replica).
    ``step_fields`` (``pairs``, ``reference_logps``) go to the step's data."""
    groups = initialize(plan, backend="gloo", seed=1)
    try:
        trainer = build_trainer(groups, initial, options=options, mrope=mrope,
                                objective=objective)
        data = toy_step(plan, groups.rank, samples, config, mrope)
        for k, v in step_fields.items():
            setattr(data, k, v)
        out = trainer.step(data)
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
