"""Timeline simulator for one training step: ViT phases and megatron's 1F1B pipeline schedule.

Given per-micro-batch, per-stage forward and backward times (from a `CostModel`), it replays the
non-interleaved 1F1B schedule event by event (each stage runs its operations in megatron's order;
an operation starts when its stage is free and its inputs have arrived) and reports the makespan
and each stage's idle fraction. Two placements are modelled:

- *heterogeneous*: every rank first runs its share of the ViT forward (balanced over all ViT
  ranks), then the LLM pipeline, then the ViT backward; the token exchange costs ``route_s``
  each way.
- *baseline* (Megatron's LLaVA layout): the ViT runs inside pipeline stage 0, so each micro-batch's
  ViT forward/backward time is added to stage 0's forward/backward of that micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Timeline:
    makespan: float
    """Seconds from the first operation to the last."""
    busy: tuple[float, ...]
    """Busy seconds per stage."""

    @property
    def idle_fraction(self) -> tuple[float, ...]:
        if self.makespan <= 0:
            return tuple(0.0 for _ in self.busy)
        return tuple(1.0 - b / self.makespan for b in self.busy)


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


def simulate_1f1b(forward_s: np.ndarray, backward_s: np.ndarray, *, p2p_s: float = 0.0) -> Timeline:
    """Replay 1F1B for ``forward_s[stage, mb]`` / ``backward_s[stage, mb]`` (seconds).

    Dependencies: F(s, m) needs F(s-1, m) (+ ``p2p_s``); B(s, m) needs F(s, m) and B(s+1, m)
    (+ ``p2p_s``). Raises if the order would deadlock (it cannot for valid inputs).
    """
    forward_s = np.asarray(forward_s, dtype=np.float64)
    backward_s = np.asarray(backward_s, dtype=np.float64)
    if forward_s.shape != backward_s.shape or forward_s.ndim != 2:
        raise ValueError(f"forward and backward times must both be [stages, microbatches], got "
                         f"{forward_s.shape} and {backward_s.shape}")
    pp, m = forward_s.shape
    orders = [one_f_one_b_order(pp, s, m) for s in range(pp)]
    done_f = np.full((pp, m), np.nan)
    done_b = np.full((pp, m), np.nan)
    position = [0] * pp
    free = [0.0] * pp
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for s in range(pp):
            while position[s] < len(orders[s]):
                kind, mb = orders[s][position[s]]
                if kind == "F":
                    dep = 0.0 if s == 0 else done_f[s - 1, mb] + p2p_s
                    ready = dep if s == 0 or not np.isnan(done_f[s - 1, mb]) else None
                    duration = forward_s[s, mb]
                else:
                    own = done_f[s, mb]
                    nxt = own if s == pp - 1 else done_b[s + 1, mb] + p2p_s
                    ready = None if np.isnan(own) or np.isnan(nxt) else max(own, nxt)
                    duration = backward_s[s, mb]
                if ready is None:
                    break
                start = max(free[s], ready)
                free[s] = start + duration
                (done_f if kind == "F" else done_b)[s, mb] = free[s]
                position[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("1F1B replay deadlocked")
    busy = tuple(float(forward_s[s].sum() + backward_s[s].sum()) for s in range(pp))
    return Timeline(makespan=max(free), busy=busy)


@dataclass(frozen=True)
class StepPrediction:
    step_s: float
    pipeline: Timeline
    """The slowest replica's pipeline."""
    vit_forward_s: float
    vit_backward_s: float


def predict_hetero_step(llm_fwd: np.ndarray, llm_bwd: np.ndarray, vit_rank_seconds: np.ndarray,
                        *, route_s: float = 0.0, p2p_s: float = 0.0,
                        vit_forward_fraction: float = 1 / 3) -> StepPrediction:
    """``llm_fwd[replica, stage, mb]``; ``vit_rank_seconds[r]`` is ViT forward+backward of rank r.

    The ViT phases are synchronous across ranks (the exchange is a collective), so each costs
    the slowest ViT rank's share.
    """
    timelines = [simulate_1f1b(f, b, p2p_s=p2p_s) for f, b in zip(llm_fwd, llm_bwd, strict=True)]
    slowest = max(timelines, key=lambda t: t.makespan)
    vit = float(np.max(vit_rank_seconds)) if np.size(vit_rank_seconds) else 0.0
    vit_f, vit_b = vit * vit_forward_fraction, vit * (1 - vit_forward_fraction)
    return StepPrediction(vit_f + route_s + slowest.makespan + route_s + vit_b, slowest,
                          vit_f, vit_b)


def predict_baseline_step(llm_fwd: np.ndarray, llm_bwd: np.ndarray, vit_mb_seconds: np.ndarray,
                          *, p2p_s: float = 0.0, vit_forward_fraction: float = 1 / 3
                          ) -> StepPrediction:
    """ViT inside stage 0: ``vit_mb_seconds[replica, mb]`` (forward+backward) joins stage 0."""
    llm_fwd = np.array(llm_fwd, dtype=np.float64)
    llm_bwd = np.array(llm_bwd, dtype=np.float64)
    llm_fwd[:, 0, :] += vit_mb_seconds * vit_forward_fraction
    llm_bwd[:, 0, :] += vit_mb_seconds * (1 - vit_forward_fraction)
    timelines = [simulate_1f1b(f, b, p2p_s=p2p_s) for f, b in zip(llm_fwd, llm_bwd, strict=True)]
    slowest = max(timelines, key=lambda t: t.makespan)
    return StepPrediction(slowest.makespan, slowest, 0.0, 0.0)
