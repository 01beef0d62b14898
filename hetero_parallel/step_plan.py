"""The step plan: everything one rank needs to know about one global step, from one pure function.

`plan_step` takes the parallel layout, this rank, the global batch's `SampleLayout`s, the cost
model and the `StepConfig`, and returns a `StepPlan`: the balancer's placement (`BatchPlan`), this
rank's routing table, its replica's micro-batch shapes and the sequence-length divisor they are
padded to. Every rank computes it independently and gets the same placement (no communication);
the dataloader does it in its prefetch thread and hands the trainer the result.

There is exactly one padding rule: micro-batch lengths are multiples of
``ParallelPlan.seq_len_divisor`` (or of a multiple of it, ``StepConfig.pad_to_multiple_of``), and
the routing table and the micro-batch shapes are both derived here from that one number.
`check_microbatches` verifies, once per step, that the materialised micro-batches agree with the
table: every slot lands on a visual placeholder token, and every placeholder gets a slot.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from hetero_parallel.balancer import (
    DEFAULT_FRAMES_PER_CHUNK,
    BatchPlan,
    PipelineSchedule,
    plan_by_position,
    plan_global_batch,
)
from hetero_parallel.cost_model import CostModel
from hetero_parallel.layout import MicroBatch, MicroBatchShape, SampleLayout, row_places
from hetero_parallel.layout import microbatch_shapes as _microbatch_shapes
from hetero_parallel.plan import ParallelPlan
from hetero_parallel.routing_table import RoutingTable, build_routing

Placement = Literal["balanced", "by_position"]


@dataclass(frozen=True, kw_only=True, slots=True)
class StepConfig:
    """How a global batch is split into work (the same on every rank)."""

    num_microbatches: int = 1
    """Micro-batches per LLM replica per step."""
    max_tokens_per_microbatch: int | None = None
    """Token cap per micro-batch (None: no cap)."""
    equal_samples_per_replica: bool = False
    """Give every LLM replica the same number of samples."""
    frames_per_chunk: int = DEFAULT_FRAMES_PER_CHUNK
    """Consecutive video frames per ViT work item."""
    pad_to_multiple_of: int | None = None
    """Micro-batch length multiple; None: ``ParallelPlan.seq_len_divisor``. Any other value must
    be a multiple of it (e.g. 64 for kernel-friendly shapes)."""
    placement: Placement = "balanced"
    """"balanced": the cost-model balancer over all ViT ranks; "by_position": Megatron's LLaVA
    layout (contiguous split by position, ViT work on each replica's own first-stage ranks), the
    baseline."""
    pipeline_aware: bool = False
    """Choose each step's micro-batch count (up to ``num_microbatches``), token budgets and order
    by simulating the pipeline (`hetero_parallel.balancer.PipelineSchedule`): the count then
    varies from step to step."""
    split_vit_items: bool = False
    """Split an image or frame whose ViT cost exceeds a fair share over several ViT ranks
    (sequence-parallel ViT attention, `hetero_parallel.vit_split`); the ViT must support it."""
    packed: bool = True
    """Pack each micro-batch's samples into one row (THD, ``cu_seqlens``; padding only for
    divisibility) instead of one padded row per sample. Needs an attention that takes packed
    sequences: TransformerEngine on GPUs, `hetero_parallel.cpu_layers` on CPUs (megatron's
    local attention on a GPU without TE does not)."""

    def __post_init__(self) -> None:
        for name in ("num_microbatches", "frames_per_chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"StepConfig.{name} must be an int >= 1, got {v!r}")
        for name in ("max_tokens_per_microbatch", "pad_to_multiple_of"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"StepConfig.{name} must be None or an int >= 1, got {v!r}")
        for name in ("packed", "split_vit_items", "pipeline_aware"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"StepConfig.{name} must be a bool, got "
                                 f"{getattr(self, name)!r}")
        if self.placement not in ("balanced", "by_position"):
            raise ValueError(f"StepConfig.placement must be 'balanced' or 'by_position', got "
                             f"{self.placement!r}")

    def divisor(self, plan: ParallelPlan) -> int:
        """The micro-batch length multiple for ``plan`` (``ValueError`` if it breaks the plan's
        own divisibility rule)."""
        base = plan.seq_len_divisor
        if self.pad_to_multiple_of is None:
            return base
        if self.pad_to_multiple_of % base:
            raise ValueError(f"StepConfig.pad_to_multiple_of({self.pad_to_multiple_of}) is not a "
                             f"multiple of the plan's seq_len_divisor({base}) ({plan.describe()})")
        return self.pad_to_multiple_of


@dataclass(frozen=True, eq=False)
class StepPlan:
    """One global step as rank ``rank`` sees it (see the module docstring)."""

    plan: ParallelPlan
    rank: int
    batch: BatchPlan
    """The balancer's placement of every sample and media chunk (identical on every rank)."""
    layouts: Mapping[int, SampleLayout]
    """Every sample of the global batch, by sample id."""
    table: RoutingTable
    """This rank's part of the visual-token exchange."""
    all_shapes: tuple[tuple[MicroBatchShape, ...], ...]
    """Every replica's micro-batch shapes in pipeline order (``all_shapes[replica]``)."""
    divisor: int
    """Every micro-batch row's length is a multiple of it."""

    @property
    def replica(self) -> int:
        return self.plan.coords(self.rank).dp

    @property
    def shapes(self) -> tuple[MicroBatchShape, ...]:
        """This rank's LLM replica's micro-batch shapes in pipeline order."""
        return self.all_shapes[self.replica]

    @property
    def num_microbatches(self) -> int:
        return self.batch.num_microbatches


def plan_batch(plan: ParallelPlan, layouts: Sequence[SampleLayout], cost_model: CostModel,
               config: StepConfig) -> BatchPlan:
    """The balancer's (or the baseline's) placement of one global batch on ``plan``."""
    specs = [layout.spec() for layout in layouts]
    if config.placement == "by_position":
        return plan_by_position(
            specs, cost_model, num_replicas=plan.dp, num_microbatches=config.num_microbatches,
            replica_vit_ranks=[plan.replica_vit_indices(d) for d in range(plan.dp)],
            frames_per_chunk=config.frames_per_chunk)
    return plan_global_batch(
        specs, cost_model, num_replicas=plan.dp, num_microbatches=config.num_microbatches,
        num_vit_ranks=plan.vit_dp, max_tokens_per_microbatch=config.max_tokens_per_microbatch,
        equal_samples_per_replica=config.equal_samples_per_replica,
        frames_per_chunk=config.frames_per_chunk, split_vit_items=config.split_vit_items,
        pipeline=PipelineSchedule(num_stages=plan.pp, num_chunks=plan.vpp or 1, tp=plan.tp)
        if config.pipeline_aware else None)


def plan_step(plan: ParallelPlan, rank: int, layouts: Sequence[SampleLayout],
              cost_model: CostModel, config: StepConfig, *,
              batch: BatchPlan | None = None) -> StepPlan:
    """Everything about one global step for ``rank``. Pure: same inputs, same plan, on any rank.

    ``batch`` reuses a placement computed before (it must be ``plan_batch`` of the same inputs);
    ranks of one process (tests, simulations) share it that way.
    """
    divisor = config.divisor(plan)
    by_id = {layout.sample_id: layout for layout in layouts}
    if len(by_id) != len(layouts):
        raise ValueError("the global batch has duplicate sample ids")
    if batch is None:
        batch = plan_batch(plan, layouts, cost_model, config)
    if config.placement == "by_position":
        baseline = plan.with_vit_on_first_stage()
        if baseline.vit_ranks != plan.vit_ranks:
            raise ValueError(f"placement 'by_position' needs the ViT on exactly the first-stage "
                             f"ranks {baseline.vit_ranks}, but the plan has ViT ranks "
                             f"{plan.vit_ranks} (use ParallelPlan.with_vit_on_first_stage())")
    all_shapes = tuple(
        _microbatch_shapes(batch, by_id, d, divisor, packed=config.packed,
                           sample_divisor=plan.sample_len_divisor)
        for d in range(plan.dp))
    table = build_routing(plan, batch, by_id, rank, shapes=all_shapes)
    return StepPlan(plan=plan, rank=rank, batch=batch, layouts=by_id, table=table,
                    all_shapes=all_shapes, divisor=divisor)


def check_microbatches(step: StepPlan, microbatches: Sequence[MicroBatch],
                       visual_token_ids: Collection[int]) -> None:
    """Raise ``ValueError`` unless ``microbatches`` match the plan's shapes and routing table.

    On a first-stage rank, every routed slot must sit on a visual placeholder (one of
    ``visual_token_ids``) of its micro-batch row, and every placeholder this rank holds (after the
    CP and SP splits) must be a slot. Elsewhere only the shapes are checked. Cost: one pass over
    the micro-batch tokens.
    """
    plan, table = step.plan, step.table
    if len(microbatches) != len(step.shapes):
        raise ValueError(f"rank {step.rank}: {len(microbatches)} micro-batches, the step plan "
                         f"has {len(step.shapes)}")
    for j, (mb, shape) in enumerate(zip(microbatches, step.shapes, strict=True)):
        want = (shape.rows, shape.seq_len)
        if tuple(mb.input_ids.shape) != want:
            raise ValueError(f"rank {step.rank}: micro-batch {j} has shape "
                             f"{tuple(mb.input_ids.shape)}, the step plan says {want} "
                             f"({'packed' if shape.packed else 'padded'}; samples "
                             f"{shape.sample_ids}, divisor {step.divisor})")
    c = plan.coords(step.rank)
    if c.pp != 0:
        return
    visual = np.asarray(sorted(visual_token_ids), dtype=np.int64)
    offsets = table.microbatch_slot_offsets
    for j, (mb, shape) in enumerate(zip(microbatches, step.shapes, strict=True)):
        ids = mb.input_ids.numpy()
        lo, hi = int(offsets[j]), int(offsets[j + 1])
        rows, pos = table.slot_row[lo:hi], table.slot_sequence_position[lo:hi]
        on_visual = np.isin(ids[rows, pos], visual)
        if not on_visual.all():
            k = int(np.flatnonzero(~on_visual)[0])
            raise ValueError(
                f"rank {step.rank}: micro-batch {j} slot {k} (row {int(rows[k])}, position "
                f"{int(pos[k])}) holds token {int(ids[rows[k], pos[k]])}, not a visual "
                f"placeholder {visual.tolist()}: the routing table and the micro-batch disagree")
        _, p_all = np.nonzero(np.isin(ids, visual))
        owner, local = row_places(shape, p_all, plan.cp)
        mine = owner == c.cp
        if plan.sequence_parallel:
            mine &= local // (shape.seq_len // plan.cp // plan.tp) == c.tp
        expected = int(mine.sum())
        if expected != hi - lo:
            raise ValueError(
                f"rank {step.rank}: micro-batch {j} holds {expected} visual placeholders on this "
                f"rank's share (CP rank {c.cp}) but the routing table fills {hi - lo} slots")
