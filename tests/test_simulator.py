"""The 1F1B timeline replay against closed forms and an independent longest-path computation."""

from __future__ import annotations

import numpy as np
import pytest

from hetero_parallel.simulator import (
    one_f_one_b_order,
    predict_baseline_step,
    predict_hetero_step,
    simulate_1f1b,
    stage_times,
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


# --- a plan on a cluster --------------------------------------------------------------------------
def test_report_step_by_hand():
    from hetero_parallel.balancer import MediaSpec, SampleSpec, plan_by_position, plan_global_batch
    from hetero_parallel.cost_model import CostModel
    from hetero_parallel.simulator import ClusterShape, report_step

    # llm(L) = L seconds, vit(P) = P seconds (P = 4 x tokens), no quadratic terms.
    cost = CostModel(vit_linear=1.0, vit_quadratic=0.0, llm_linear=1.0, llm_quadratic=0.0)
    samples = [SampleSpec(0, 8, (MediaSpec((2,)),)), SampleSpec(1, 10), SampleSpec(2, 6),
               SampleSpec(3, 2, (MediaSpec((1, 1)),))]
    cluster = ClusterShape(gpus=4, tp=1, pp=2)  # 2 replicas of 2 stages
    batch = plan_global_batch(samples, cost, num_replicas=2, num_microbatches=2, num_vit_ranks=4)
    rep = report_step(batch, cost, cluster)
    # LLM work 10 + 10 + 6 + 4 = 30; ViT: sample 0's image 8, sample 3's two frames 4 + 4.
    assert rep.ideal_s == pytest.approx((30 + 16) / 4)
    # Sample 0: its image (8) then its 10 tokens through both stages at TP 1.
    assert rep.critical_path_s == pytest.approx(18.0)
    assert rep.vit_s == pytest.approx(max(batch.vit_report.loads))
    f, b = stage_times(batch.microbatch_costs, 2)
    assert rep.llm_s == pytest.approx(max(simulate_1f1b(f[r], b[r]).makespan for r in range(2)))
    assert rep.step_s == pytest.approx(rep.vit_s + rep.llm_s)
    assert rep.efficiency == pytest.approx(rep.ideal_s / rep.step_s)
    assert rep.bound_s == max(rep.ideal_s, rep.critical_path_s) <= rep.step_s
    # LLaVA: the ViT work of each micro-batch joins stage 0 (TP-sharded; tp = 1 here).
    base = plan_by_position(samples, cost, num_replicas=2, num_microbatches=2,
                            replica_vit_ranks=[[0], [2]])
    llava = report_step(base, cost, cluster, layout="vit_on_first_stage")
    f, b = stage_times(base.microbatch_costs, 2)
    vit_mb = np.array([[8.0, 0.0], [0.0, 8.0]])  # samples 0 | 1 and 2 | 3 by position
    f[:, 0] += vit_mb / 3
    b[:, 0] += 2 * vit_mb / 3
    assert llava.step_s == pytest.approx(max(simulate_1f1b(f[r], b[r]).makespan
                                             for r in range(2)))
    assert llava.ideal_s == pytest.approx(rep.ideal_s) and llava.vit_s == 0.0
    with pytest.raises(ValueError, match=r"the plan has 2 replicas, the cluster has dp = "
                                         r"gpus\(8\) / \(tp\(1\) \* pp\(2\)\) = 4"):
        report_step(batch, cost, ClusterShape(gpus=8, pp=2))


def test_split_frames_keep_the_ideal():
    from hetero_parallel.balancer import MediaSpec, SampleSpec, plan_global_batch
    from hetero_parallel.cost_model import CostModel
    from hetero_parallel.simulator import ClusterShape, report_step

    cost = CostModel.from_model_shapes(flops_per_second=4e14)
    samples = [SampleSpec(i, 50, (MediaSpec((20_480 if i == 0 else 300,)),)) for i in range(16)]
    cluster = ClusterShape(gpus=8, tp=2, pp=2)
    kw = dict(num_replicas=2, num_microbatches=2, num_vit_ranks=8)
    whole = report_step(plan_global_batch(samples, cost, **kw), cost, cluster)
    split = report_step(plan_global_batch(samples, cost, split_vit_items=True, **kw), cost,
                        cluster)
    assert split.ideal_s == pytest.approx(whole.ideal_s, rel=1e-12)
    assert split.vit_s < whole.vit_s / 3
