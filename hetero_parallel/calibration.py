"""Online calibration: measured phase times from every rank refit the cost model every K steps.

After each step every rank contributes what it measured (`OnlineCalibrator.observe`, collective):
its ViT forward+backward seconds with the patch counts it encoded, and, on TP-0/CP-0 ranks, each
micro-batch's forward seconds on its pipeline stage. The records are all-gathered, so every rank
holds the same list of `PhaseMeasurement`s:

- ViT: one record per ViT rank and step (its items' patches, slices of split frames with their
  whole frame's size);
- LLM: one record per replica, micro-batch and step: ``3 x`` the sum over the pipeline stages of
  the micro-batch's forward seconds (a stage's backward costs about twice its forward) against the
  micro-batch's samples' token counts (its padded rows when not packed).

Every ``every`` steps the current model is refitted to the last ``window`` steps of records,
regularised towards the prior (the FLOPs model) with `CostModel.refit`, which is deterministic:
every rank computes bit-identical coefficients. The calibrator's state (the current model and the
buffered records) goes into the checkpoint, so a resumed run refits, and so places, exactly as the
uninterrupted one. `predicted_step_seconds` gives the model's prediction of a step, to log next to
the measured time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.distributed as dist

from hetero_parallel.balancer import MediaChunk
from hetero_parallel.cost_model import CostModel, PhaseMeasurement
from hetero_parallel.step_plan import StepPlan

LLM_PASSES = 3
"""Forward + backward of a pipeline stage, in units of its forward (backward ~ 2 x forward)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CalibrationConfig:
    """When and how the cost model is refitted."""

    every: int = 0
    """Refit every this many steps (0: never)."""
    window: int = 0
    """Steps of records each refit uses (0: ``every``)."""
    strength: float = 0.05
    """Weight of the prior in the fit (`CostModel.refit`)."""
    skip_first: int = 1
    """Steps whose times are not recorded (warm-up: allocator, compilation)."""

    def __post_init__(self) -> None:
        for name in ("every", "window", "skip_first"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"CalibrationConfig.{name} must be an int >= 0, got {v!r}")
        if not isinstance(self.strength, int | float) or not self.strength > 0:
            raise ValueError(f"CalibrationConfig.strength must be > 0, got {self.strength!r}")


def local_record(step: StepPlan, timings: dict[str, float],
                 llm_forward_s: Sequence[float]) -> dict[str, Any]:
    """What this rank measured in ``step`` (small, JSON-able): its ViT items (in LLM tokens)
    and seconds, and on a TP-0/CP-0 rank its stage's per-micro-batch forward seconds."""
    plan, rank = step.plan, step.rank
    c = plan.coords(rank)
    record: dict[str, Any] = {}
    vit = plan.vit_index(rank)
    if vit is not None:
        sizes, frames = [], []
        for _, piece, frame in _frame_pieces(step, step.batch.chunks_for_vit_rank(vit)):
            sizes.append(piece)
            frames.append(frame)
        seconds = timings.get("vit_forward", 0.0) + timings.get("vit_backward", 0.0)
        record["vit"] = (sizes, frames, seconds)
    if c.tp == 0 and c.cp == 0:
        record["llm"] = (c.dp, c.pp, list(llm_forward_s))
    return record


def measurements_of_step(step: StepPlan, records: Sequence[dict[str, Any]],
                         patches_per_token: int = 4) -> list[PhaseMeasurement]:
    """The step's `PhaseMeasurement`s from every rank's record (index = rank)."""
    out: list[PhaseMeasurement] = []
    for rec in records:
        if "vit" in rec:
            sizes, frames, seconds = rec["vit"]
            if sizes:
                out.append(PhaseMeasurement(
                    "vit", tuple(s * patches_per_token for s in sizes), float(seconds),
                    tuple(f * patches_per_token for f in frames)
                    if any(s != f for s, f in zip(sizes, frames, strict=True)) else ()))
    per_mb: dict[tuple[int, int], float] = {}
    for rec in records:
        if "llm" in rec:
            replica, _, forward = rec["llm"]
            for j, sec in enumerate(forward):
                per_mb[(replica, j)] = per_mb.get((replica, j), 0.0) + sec
    for (replica, j), seconds in sorted(per_mb.items()):
        shape = step.all_shapes[replica][j]
        if not shape.sample_ids:
            continue
        sizes = shape.sample_lengths if shape.packed else (shape.seq_len,) * shape.rows
        out.append(PhaseMeasurement("llm", tuple(sizes), LLM_PASSES * seconds))
    return out


def predicted_step_seconds(step: StepPlan, cost: CostModel, num_chunks: int = 1) -> float:
    """The step time ``cost`` predicts for ``step``'s placement: the slowest ViT rank (forward
    and backward) plus the slowest replica's pipeline (1F1B, or interleaved with
    ``num_chunks``)."""
    from hetero_parallel.simulator import predict_hetero_step, stage_times

    plan = step.plan
    loads = np.zeros(plan.vit_dp)
    for vit_rank, piece, frame in _frame_pieces(step, step.batch.media_chunks):
        loads[vit_rank] += cost.vit_piece_cost(piece * cost.patches_per_token,
                                               frame * cost.patches_per_token)
    mb_costs = np.zeros((plan.dp, step.batch.num_microbatches))
    for d in range(plan.dp):
        for j, shape in enumerate(step.all_shapes[d]):
            sizes = shape.sample_lengths if shape.packed else (shape.seq_len,) * shape.rows
            mb_costs[d, j] = float(np.sum(cost.llm_cost(np.asarray(sizes)))) if sizes else 0.0
    fwd, bwd = stage_times(mb_costs, plan.pp, num_chunks)
    prediction = predict_hetero_step(fwd, bwd, loads, num_stages=plan.pp)
    return float(prediction.step_s)


def _frame_pieces(step: StepPlan, chunks: Iterable[MediaChunk]) -> Iterator[tuple[int, int, int]]:
    """``(ViT rank, tokens, whole frame's tokens)`` of each frame, or slice of a split frame, of
    ``chunks`` in order (a chunk covers tokens ``[token_start, token_stop)`` of its frames laid
    end to end)."""
    for ch in chunks:
        toks = step.layouts[ch.sample_id].frame_tokens[ch.media_index]
        for f, _, n in ch.frame_slices(toks):
            yield ch.vit_rank, n, toks[f]


class OnlineCalibrator:
    """See the module docstring. ``prior``: the model refits are pulled towards (e.g. the FLOPs
    model); ``current``: the model in use now (default ``prior``)."""

    def __init__(self, config: CalibrationConfig, prior: CostModel,
                 current: CostModel | None = None) -> None:
        self.config = config
        self.prior = prior
        self.current = current or prior
        self._steps: list[list[PhaseMeasurement]] = []
        self.observed = 0

    def observe(self, step: StepPlan, timings: dict[str, float],
                llm_forward_s: Sequence[float]) -> CostModel | None:
        """Record this step (collective over the world); returns the refitted model when this
        step completes a calibration period, else None."""
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local_record(step, timings, llm_forward_s))
        return self.observe_records(step, gathered)

    def observe_records(self, step: StepPlan, records: Sequence[dict[str, Any]]
                        ) -> CostModel | None:
        """`observe` given every rank's `local_record` (index = rank): pure."""
        index = self.observed
        self.observed += 1
        if index < self.config.skip_first or not self.config.every:
            return None
        self._steps.append(measurements_of_step(step, records, self.current.patches_per_token))
        window = self.config.window or self.config.every
        self._steps = self._steps[-window:]
        if self.observed % self.config.every:
            return None
        records = [m for step_records in self._steps for m in step_records]
        self.current = self.current.refit(records, prior=self.prior,
                                          strength=self.config.strength)
        return self.current

    # -- checkpoint part -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current.to_json(), "observed": self.observed,
                "steps": json.dumps([[(m.phase, list(m.sizes), m.seconds, list(m.frame_sizes))
                                      for m in records] for records in self._steps])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current = CostModel.from_json(state["current"])
        observed = state["observed"]
        if isinstance(observed, bool) or not isinstance(observed, int) or observed < 0:
            raise ValueError(f"calibration state 'observed' must be an int >= 0, "
                             f"got {observed!r}")
        self.observed = observed
        self._steps = [[PhaseMeasurement(phase, tuple(sizes), float(seconds), tuple(frames))
                        for phase, sizes, seconds, frames in records]
                       for records in json.loads(state["steps"])]
