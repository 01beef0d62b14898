"""The 1F1B timeline replay against closed forms and an independent longest-path computation."""

from __future__ import annotations

import numpy as np
import pytest

from hetero_parallel.simulator import (
    one_f_one_b_order,
    predict_baseline_step,
    predict_hetero_step,
    simulate_1f1b,
)


@pytest.mark.parametrize(("pp", "m"), [(1, 4), (2, 2), (4, 8), (4, 4), (3, 7)])
def test_uniform_pipeline_closed_form(pp, m):
    f, b = 1.0, 2.0
    t = simulate_1f1b(np.full((pp, m), f), np.full((pp, m), b))
    assert t.makespan == pytest.approx((m + pp - 1) * (f + b))
    # Bubble fraction of 1F1B: (pp - 1) / (m + pp - 1) on every stage.
    for idle in t.idle_fraction:
        assert idle == pytest.approx((pp - 1) / (m + pp - 1))


def _longest_path(fwd: np.ndarray, bwd: np.ndarray, p2p: float) -> float:
    """Finish time of the DAG whose edges are the data dependencies plus each stage's op order."""
    pp, m = fwd.shape
    finish: dict[tuple[str, int, int], float] = {}
    orders = [one_f_one_b_order(pp, s, m) for s in range(pp)]
    preds: dict[tuple[str, int, int], list[tuple[tuple[str, int, int], float]]] = {}
    for s, order in enumerate(orders):
        for i, (kind, mb) in enumerate(order):
            node = (kind, s, mb)
            p = []
            if i:
                p.append(((order[i - 1][0], s, order[i - 1][1]), 0.0))
            if kind == "F" and s > 0:
                p.append((("F", s - 1, mb), p2p))
            if kind == "B":
                p.append((("F", s, mb), 0.0))
                if s < pp - 1:
                    p.append((("B", s + 1, mb), p2p))
            preds[node] = p

    def visit(node):
        if node not in finish:
            kind, s, mb = node
            start = max((visit(n) + lag for n, lag in preds[node]), default=0.0)
            finish[node] = start + (fwd if kind == "F" else bwd)[s, mb]
        return finish[node]

    return max(visit(n) for n in preds)


def test_matches_longest_path_on_random_times():
    rng = np.random.default_rng(0)
    for _ in range(30):
        pp, m = int(rng.integers(1, 6)), int(rng.integers(1, 10))
        fwd = rng.uniform(0.1, 3.0, (pp, m))
        bwd = rng.uniform(0.1, 6.0, (pp, m))
        p2p = float(rng.uniform(0, 0.5))
        assert simulate_1f1b(fwd, bwd, p2p_s=p2p).makespan == pytest.approx(
            _longest_path(fwd, bwd, p2p))


def test_vit_on_stage_zero_slows_the_whole_pipeline():
    pp, m, replicas = 4, 8, 2
    fwd = np.ones((replicas, pp, m))
    bwd = 2 * np.ones((replicas, pp, m))
    vit_per_mb = np.full((replicas, m), 1.5)
    base = predict_baseline_step(fwd, bwd, vit_per_mb)
    # Same ViT work spread over all pp * replicas ranks instead.
    vit_ranks = np.full(pp * replicas, vit_per_mb.sum() / (pp * replicas))
    hetero = predict_hetero_step(fwd, bwd, vit_ranks)
    assert hetero.step_s < base.step_s
    assert base.pipeline.idle_fraction[0] < min(base.pipeline.idle_fraction[1:])


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"\[stages, microbatches\]"):
        simulate_1f1b(np.ones((2, 3)), np.ones((3, 2)))
