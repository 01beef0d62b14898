"""Timeline simulator for one training step: ViT phases and megatron's pipeline schedules.

**Pipelines.** Given per-micro-batch forward and backward times of every (virtual) pipeline stage,
it replays megatron-core's schedule: the non-interleaved 1F1B (`one_f_one_b_order`) or the
interleaved 1F1B with ``vpp`` model chunks per stage (`interleaved_order`: megatron's warm-up
count and micro-batch groups). Each stage runs its operations in that order; an operation starts
when its stage is free and its inputs have arrived (the previous virtual stage's forward, plus
``p2p_s``; the next virtual stage's backward, plus ``p2p_s``). The schedule is a fixed DAG, so
`pipeline_times` evaluates it once in a topological order for a whole batch of replicas at once
(numpy over the leading axes); an order that would deadlock raises.

**Steps.** Two placements are modelled from arrays (`predict_hetero_step`,
`predict_baseline_step`):

- *heterogeneous*: every rank first runs its share of the ViT forward (balanced over all ViT
  ranks), then the LLM pipeline, then the ViT backward; the token exchange costs ``route_s``
  each way;
- *baseline* (Megatron's LLaVA layout): the ViT runs inside pipeline stage 0, so each
  micro-batch's ViT forward/backward time is added to stage 0's forward/backward of it.

**Limits.** `report_step` turns a balancer plan (`hetero_parallel.balancer.BatchPlan`) on a
cluster (`ClusterShape`: GPUs, TP, PP, VPP, links) into a `StepReport`: the predicted step time,
the *ideal* time (all ViT + LLM work divided by the GPUs: no placement of divisible work can beat
it), the *unsplittable critical path* (the longest chain of work that cannot be spread: a
sample's largest ViT item, then the sample through every pipeline stage at TP speed) and the
efficiency ``ideal / step``. Costs are seconds of one GPU (`CostModel`); TP divides a stage's
work by ``tp`` (ideal scaling: the cost model's rate is per GPU).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from hetero_parallel.balancer import BatchPlan
    from hetero_parallel.cost_model import CostModel

_FORWARD_SHARE = 1 / 3
"""Forward share of forward + backward work (backward = 2x forward)."""


@dataclass(frozen=True)
class Timeline:
    makespan: float
    """Seconds from the first operation to the last."""
    busy: tuple[float, ...]
    """Busy seconds per (physical) stage."""

    @property
    def idle_fraction(self) -> tuple[float, ...]:
        if self.makespan <= 0:
            return tuple(0.0 for _ in self.busy)
        return tuple(1.0 - b / self.makespan for b in self.busy)


# --- schedules ----------------------------------------------------------------------------------
def one_f_one_b_order(num_stages: int, stage: int, num_microbatches: int) -> list[tuple[str, int]]:
    """megatron's non-interleaved 1F1B order of operations on ``stage``: ("F"|"B", micro-batch)."""
    warmup = min(num_stages - stage - 1, num_microbatches)
    ops = [("F", m) for m in range(warmup)]
    f, b = warmup, 0
    while f < num_microbatches:
        ops.append(("F", f))
        f += 1
        ops.append(("B", b))
        b += 1
    ops.extend(("B", m) for m in range(b, num_microbatches))
    return ops


def interleaved_order(num_stages: int, stage: int, num_microbatches: int, num_chunks: int,
                      group_size: int | None = None) -> list[tuple[str, int, int]]:
    """megatron's interleaved 1F1B order on ``stage``: ("F"|"B", model chunk, micro-batch).

    Virtual micro-batch ``k`` runs chunk ``(k // g) % vpp`` (reversed for the backward) of
    micro-batch ``(k // (g * vpp)) * g + k % g`` for groups of ``g = group_size`` (default
    ``num_stages``; the last group takes the remainder). Warm-up: ``2 * (pp - stage - 1) +
    (vpp - 1) * g`` forwards (all of them if that is not fewer), then one forward and one
    backward alternately, then the remaining backwards. Same checks as megatron:
    ``pp <= g <= num_microbatches`` and a last group of 0 or at least ``pp`` micro-batches.
    """
    pp, m, vpp = num_stages, num_microbatches, num_chunks
    g = pp if group_size is None else group_size
    if vpp < 2 or pp < 2:
        raise ValueError(f"the interleaved schedule needs num_chunks >= 2 and num_stages >= 2, "
                         f"got num_chunks={vpp}, num_stages={pp}")
    if not pp <= g <= m:
        raise ValueError(f"interleaved schedule: group_size({g}) must be in [num_stages({pp}), "
                         f"num_microbatches({m})]")
    if 0 < m % g < pp:
        raise ValueError(f"interleaved schedule: num_microbatches({m}) % group_size({g}) = "
                         f"{m % g} must be 0 or >= num_stages({pp})")
    table: list[tuple[int, int]] = []  # virtual id -> (micro-batch, chunk)
    for lo in range(0, m, g):
        hi = m if lo + g >= m else lo + g
        table.extend((mb, c) for c in range(vpp) for mb in range(lo, hi))
    total = m * vpp
    warmup = min(2 * (pp - stage - 1) + (vpp - 1) * g, total)
    forward = [("F", c, mb) for mb, c in table]
    backward = [("B", vpp - 1 - c, mb) for mb, c in table]
    ops = forward[:warmup]
    for i in range(total - warmup):
        ops.append(forward[warmup + i])
        ops.append(backward[i])
    ops.extend(backward[total - warmup:])
    return ops


@dataclass(frozen=True)
class _Schedule:
    """A pipeline schedule as a DAG in topological order. Op ``i``: ``kind[i]`` (0 forward,
    1 backward) of virtual stage ``vstage[i]`` and micro-batch ``mb[i]``, on ``stage[i]``;
    ``prev[i]`` the op before it on its stage, ``deps[i]`` its inputs (op, over a link?)."""

    stage: np.ndarray
    vstage: np.ndarray
    mb: np.ndarray
    kind: np.ndarray
    prev: tuple[int, ...]
    deps: tuple[tuple[tuple[int, bool], ...], ...]


@functools.lru_cache(maxsize=256)
def _schedule(num_stages: int, num_microbatches: int, num_chunks: int,
              group_size: int | None) -> _Schedule:
    pp, m, vpp = num_stages, num_microbatches, num_chunks
    v_total = pp * vpp
    ops: list[tuple[int, int, int, int]] = []  # (stage, kind, vstage, mb)
    index: dict[tuple[int, int, int], int] = {}  # (kind, vstage, mb) -> op
    prev_of: list[int] = []
    for s in range(pp):
        order = ([(k, 0, mb) for k, mb in one_f_one_b_order(pp, s, m)] if vpp == 1
                 else interleaved_order(pp, s, m, vpp, group_size))
        last = -1
        for k, c, mb in order:
            kind = 0 if k == "F" else 1
            op = len(ops)
            ops.append((s, kind, c * pp + s, mb))
            index[(kind, c * pp + s, mb)] = op
            prev_of.append(last)
            last = op
    deps: list[tuple[tuple[int, bool], ...]] = []
    for _, kind, v, mb in ops:
        d = []
        if kind == 0 and v > 0:
            d.append((index[(0, v - 1, mb)], True))
        if kind == 1:
            d.append((index[(0, v, mb)], False))
            if v < v_total - 1:
                d.append((index[(1, v + 1, mb)], True))
        deps.append(tuple(d))
    # Kahn's algorithm: a topological order exists iff the schedule cannot deadlock.
    n = len(ops)
    succ: list[list[int]] = [[] for _ in range(n)]
    indegree = [0] * n
    for i in range(n):
        for j in ([prev_of[i]] if prev_of[i] >= 0 else []) + [d for d, _ in deps[i]]:
            succ[j].append(i)
            indegree[i] += 1
    ready = [i for i in range(n) if indegree[i] == 0]
    topo = []
    while ready:
        i = ready.pop()
        topo.append(i)
        for j in succ[i]:
            indegree[j] -= 1
            if indegree[j] == 0:
                ready.append(j)
    if len(topo) != n:
        raise RuntimeError(f"pipeline schedule pp={pp} m={m} vpp={vpp} would deadlock")
    rank = {op: k for k, op in enumerate(topo)}
    arr = np.asarray([ops[i] for i in topo], dtype=np.int64).reshape(n, 4)
    return _Schedule(
        stage=arr[:, 0], kind=arr[:, 1], vstage=arr[:, 2], mb=arr[:, 3],
        prev=tuple(rank[prev_of[i]] if prev_of[i] >= 0 else -1 for i in topo),
        deps=tuple(tuple((rank[d], link) for d, link in deps[i]) for i in topo),
    )


def pipeline_times(forward_s: np.ndarray, backward_s: np.ndarray, *, num_stages: int | None = None,
                   p2p_s: float = 0.0, group_size: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(makespan[...], busy[..., stage])`` of megatron's schedule for ``forward_s[..., V, m]``
    and ``backward_s[..., V, m]`` (seconds per virtual stage and micro-batch; leading axes are
    independent pipelines, e.g. replicas).

    ``V = num_stages * vpp`` virtual stages, virtual stage ``c * num_stages + s`` being model
    chunk ``c`` of stage ``s`` (megatron's layout); ``num_stages`` defaults to ``V`` (1F1B).
    """
    fwd = np.asarray(forward_s, dtype=np.float64)
    bwd = np.asarray(backward_s, dtype=np.float64)
    if fwd.shape != bwd.shape or fwd.ndim < 2:
        raise ValueError(f"forward and backward times must both be [..., stages, microbatches], "
                         f"got {fwd.shape} and {bwd.shape}")
    v_total, m = fwd.shape[-2:]
    pp = v_total if num_stages is None else num_stages
    if pp < 1 or v_total % pp:
        raise ValueError(f"num_stages({pp}) must divide the {v_total} virtual stages")
    sched = _schedule(pp, m, v_total // pp, group_size)
    lead = fwd.shape[:-2]
    dur = np.stack([fwd, bwd])  # [2, ..., V, m]
    durations = [dur[k, ..., v, b] for k, v, b in zip(sched.kind.tolist(), sched.vstage.tolist(),
                                                      sched.mb.tolist(), strict=True)]
    finish: list[np.ndarray] = []
    zero = np.zeros(lead)
    for i, d in enumerate(durations):
        p = sched.prev[i]
        start = finish[p] if p >= 0 else zero
        for dep, link in sched.deps[i]:
            start = np.maximum(start, finish[dep] + p2p_s if link else finish[dep])
        finish.append(start + d)
    makespan = np.max(np.stack(finish), axis=0) if finish else zero
    busy = (fwd + bwd).sum(axis=-1).reshape(*lead, v_total // pp, pp).sum(axis=-2)
    return makespan, busy


def simulate_1f1b(forward_s: np.ndarray, backward_s: np.ndarray, *, p2p_s: float = 0.0) -> Timeline:
    """Replay 1F1B for ``forward_s[stage, mb]`` / ``backward_s[stage, mb]`` (seconds).

    Dependencies: F(s, m) needs F(s-1, m) (+ ``p2p_s``); B(s, m) needs F(s, m) and B(s+1, m)
    (+ ``p2p_s``).
    """
    forward_s = np.asarray(forward_s, dtype=np.float64)
    backward_s = np.asarray(backward_s, dtype=np.float64)
    if forward_s.shape != backward_s.shape or forward_s.ndim != 2:
        raise ValueError(f"forward and backward times must both be [stages, microbatches], got "
                         f"{forward_s.shape} and {backward_s.shape}")
    makespan, busy = pipeline_times(forward_s, backward_s, p2p_s=p2p_s)
    return Timeline(makespan=float(makespan), busy=tuple(busy.tolist()))


def simulate_interleaved(forward_s: np.ndarray, backward_s: np.ndarray, *, num_stages: int,
                         p2p_s: float = 0.0, group_size: int | None = None) -> Timeline:
    """Replay megatron's interleaved 1F1B for ``forward_s[virtual stage, mb]`` (virtual stage
    ``c * num_stages + s``: chunk ``c`` of stage ``s``); ``busy`` is per physical stage."""
    forward_s = np.asarray(forward_s, dtype=np.float64)
    backward_s = np.asarray(backward_s, dtype=np.float64)
    if forward_s.shape != backward_s.shape or forward_s.ndim != 2:
        raise ValueError(f"forward and backward times must both be [virtual stages, "
                         f"microbatches], got {forward_s.shape} and {backward_s.shape}")
    makespan, busy = pipeline_times(forward_s, backward_s, num_stages=num_stages, p2p_s=p2p_s,
                                    group_size=group_size)
    return Timeline(makespan=float(makespan), busy=tuple(busy.tolist()))


def stage_times(microbatch_costs: np.ndarray, num_stages: int, num_chunks: int = 1,
                tp: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Forward and backward seconds ``[..., V, m]`` of micro-batches whose whole-model cost (one
    GPU, forward + backward) is ``microbatch_costs[..., m]``: split evenly over ``V = num_stages
    * num_chunks`` virtual stages and ``tp`` tensor-parallel GPUs, one third forward."""
    c = np.asarray(microbatch_costs, dtype=np.float64)
    per = c[..., None, :] / (num_stages * num_chunks * tp)
    per = np.repeat(per, num_stages * num_chunks, axis=-2)
    return per * _FORWARD_SHARE, per * (1 - _FORWARD_SHARE)


# --- whole steps from arrays ---------------------------------------------------------------------
@dataclass(frozen=True)
class StepPrediction:
    step_s: float
    pipeline: Timeline
    """The slowest replica's pipeline."""
    vit_forward_s: float
    vit_backward_s: float


def _slowest(llm_fwd: np.ndarray, llm_bwd: np.ndarray, p2p_s: float, num_stages: int | None,
             group_size: int | None = None) -> Timeline:
    makespan, busy = pipeline_times(llm_fwd, llm_bwd, num_stages=num_stages, p2p_s=p2p_s,
                                    group_size=group_size)
    r = int(np.argmax(makespan))
    return Timeline(makespan=float(makespan[r]), busy=tuple(busy[r].tolist()))


def predict_hetero_step(llm_fwd: np.ndarray, llm_bwd: np.ndarray, vit_rank_seconds: np.ndarray,
                        *, route_s: float = 0.0, p2p_s: float = 0.0,
                        vit_forward_fraction: float = _FORWARD_SHARE,
                        num_stages: int | None = None) -> StepPrediction:
    """``llm_fwd[replica, stage, mb]`` (``[replica, V, mb]`` with ``num_stages`` for the
    interleaved schedule); ``vit_rank_seconds[r]`` is ViT forward+backward of rank r.

    The ViT phases are synchronous across ranks (the exchange is a collective), so each costs
    the slowest ViT rank's share.
    """
    slowest = _slowest(llm_fwd, llm_bwd, p2p_s, num_stages)
    vit = float(np.max(vit_rank_seconds)) if np.size(vit_rank_seconds) else 0.0
    vit_f, vit_b = vit * vit_forward_fraction, vit * (1 - vit_forward_fraction)
    return StepPrediction(vit_f + route_s + slowest.makespan + route_s + vit_b, slowest,
                          vit_f, vit_b)


def predict_baseline_step(llm_fwd: np.ndarray, llm_bwd: np.ndarray, vit_mb_seconds: np.ndarray,
                          *, p2p_s: float = 0.0, vit_forward_fraction: float = _FORWARD_SHARE,
                          num_stages: int | None = None) -> StepPrediction:
    """ViT inside stage 0: ``vit_mb_seconds[replica, mb]`` (forward+backward) joins stage 0
    (virtual stage 0, the first chunk of stage 0, when interleaved)."""
    llm_fwd = np.array(llm_fwd, dtype=np.float64)
    llm_bwd = np.array(llm_bwd, dtype=np.float64)
    llm_fwd[:, 0, :] += vit_mb_seconds * vit_forward_fraction
    llm_bwd[:, 0, :] += vit_mb_seconds * (1 - vit_forward_fraction)
    slowest = _slowest(llm_fwd, llm_bwd, p2p_s, num_stages)
    return StepPrediction(slowest.makespan, slowest, 0.0, 0.0)


# --- a plan on a cluster: predicted step, ideal, critical path ---------------------------------
@dataclass(frozen=True, kw_only=True)
class ClusterShape:
    """The cluster a plan runs on, for `report_step`."""

    gpus: int
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    """Model chunks per pipeline stage (interleaved 1F1B when > 1)."""
    route_bytes_per_token: int = 0
    """Bytes of one visual token sent from its ViT rank to its LLM rank (hidden x dtype size)."""
    route_bytes_per_second: float = 25e9
    """All-to-all bandwidth per GPU for the ViT -> LLM exchange."""
    p2p_s: float = 0.0
    """Latency added to every pipeline send."""

    def __post_init__(self) -> None:
        for name in ("gpus", "tp", "pp", "vpp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ClusterShape.{name} must be an int >= 1, got {v!r}")
        if self.gpus % (self.tp * self.pp):
            raise ValueError(f"ClusterShape: tp({self.tp}) * pp({self.pp}) = "
                             f"{self.tp * self.pp} does not divide gpus({self.gpus})")
        if self.vpp > 1 and self.pp < 2:
            raise ValueError(f"ClusterShape: vpp({self.vpp}) > 1 needs pp >= 2, got pp={self.pp}")

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)


@dataclass(frozen=True)
class StepReport:
    """One plan's predicted step against the limits (seconds)."""

    step_s: float
    vit_s: float
    """ViT forward + backward phases (hetero); 0 when the ViT runs inside the pipeline."""
    llm_s: float
    """The slowest replica's pipeline."""
    route_s: float
    """Both directions of the ViT -> LLM exchange."""
    ideal_s: float
    """All ViT and LLM work divided by the GPUs (split frames counted whole)."""
    critical_path_s: float
    """The longest unsplittable chain: a sample's largest ViT item + the sample's LLM work
    through every stage at TP speed."""
    idle_fraction: tuple[float, ...]
    """Idle share of each stage of the slowest pipeline."""

    @property
    def efficiency(self) -> float:
        return self.ideal_s / self.step_s if self.step_s > 0 else 1.0

    @property
    def bound_s(self) -> float:
        """No placement of these items can finish sooner."""
        return max(self.ideal_s, self.critical_path_s)


Layout = Literal["hetero", "vit_on_first_stage"]


def split_overhead(batch: BatchPlan, cost_model: CostModel) -> float:
    """Seconds the plan's split frames cost beyond the same frames whole: per frame split ``k``
    ways, ``(k - 1) * (c_v + x_v * P)`` (the pieces' constants and K/V exchange). The ideal
    time counts every frame whole, so that plans with and without splitting share one ideal."""
    out = 0.0
    c, x = cost_model.vit_constant, cost_model.vit_exchange
    for g in batch.split_groups():
        k = len(g.vit_ranks)
        out += (k - 1) * (c + x * g.frame_tokens * cost_model.patches_per_token)
    return out


def report_step(batch: BatchPlan, cost_model: CostModel, cluster: ClusterShape, *,
                layout: Layout = "hetero", group_size: int | None = None) -> StepReport:
    """Predict one step of ``batch`` on ``cluster`` and compare it with the limits.

    ``layout="hetero"``: the plan's ViT ranks are GPUs (``batch.num_vit_ranks`` of them, at most
    ``cluster.gpus``) running a ViT phase before and after the pipeline, with the visual tokens
    routed both ways (the busiest GPU's tokens over ``route_bytes_per_second``).
    ``layout="vit_on_first_stage"`` (Megatron's LLaVA layout): each micro-batch's ViT work runs
    inside the first stage, TP-sharded over its ``tp`` GPUs; no routing.
    """
    if batch.num_replicas != cluster.dp:
        raise ValueError(f"the plan has {batch.num_replicas} replicas, the cluster has "
                         f"dp = gpus({cluster.gpus}) / (tp({cluster.tp}) * pp({cluster.pp})) = "
                         f"{cluster.dp}")
    tp, pp, vpp = cluster.tp, cluster.pp, cluster.vpp
    fwd, bwd = stage_times(batch.microbatch_costs, pp, vpp, tp)
    chunk_cost = batch.chunk_cost
    llm_total = float(batch.microbatch_costs.sum())
    vit_total = float(chunk_cost.sum()) - split_overhead(batch, cost_model)
    sample_pos = np.searchsorted(batch.sample_ids, batch.chunk_sample_id)
    vit_s = route_s = 0.0
    if layout == "hetero":
        if batch.num_vit_ranks > cluster.gpus:
            raise ValueError(f"the plan has {batch.num_vit_ranks} ViT ranks, more than the "
                             f"cluster's {cluster.gpus} GPUs")
        vit = np.zeros(batch.num_vit_ranks)
        np.add.at(vit, batch.chunk_vit_rank, chunk_cost)
        vit_s = float(vit.max()) if vit.size else 0.0
        if cluster.route_bytes_per_token and batch.chunk_tokens.size:
            sent = np.zeros(batch.num_vit_ranks)
            np.add.at(sent, batch.chunk_vit_rank, batch.chunk_tokens)
            route_s = 2 * float(sent.max()) * cluster.route_bytes_per_token \
                / cluster.route_bytes_per_second
    elif layout == "vit_on_first_stage":
        vit_mb = np.zeros((batch.num_replicas, batch.num_microbatches))
        np.add.at(vit_mb, (batch.replica[sample_pos], batch.microbatch[sample_pos]), chunk_cost)
        fwd[:, 0, :] += vit_mb / tp * _FORWARD_SHARE  # stage_times' arrays are fresh
        bwd[:, 0, :] += vit_mb / tp * (1 - _FORWARD_SHARE)
    else:
        raise ValueError(f"layout must be 'hetero' or 'vit_on_first_stage', got {layout!r}")
    pipeline = _slowest(fwd, bwd, cluster.p2p_s, pp, group_size)
    llm_cost = np.asarray(cost_model.llm_cost(batch.sample_tokens), dtype=np.float64)
    largest_vit = np.zeros(batch.sample_ids.size)
    np.maximum.at(largest_vit, sample_pos, chunk_cost)
    if layout == "vit_on_first_stage":
        largest_vit /= tp
    critical = float(np.max(largest_vit + llm_cost / tp)) if llm_cost.size else 0.0
    return StepReport(
        step_s=vit_s + route_s + pipeline.makespan, vit_s=vit_s, llm_s=pipeline.makespan,
        route_s=route_s, ideal_s=(vit_total + llm_total) / cluster.gpus,
        critical_path_s=critical, idle_fraction=pipeline.idle_fraction,
    )
