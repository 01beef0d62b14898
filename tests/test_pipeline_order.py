"""The interleaved 1F1B replay (against megatron's own schedule table, a closed form and an
independent longest-path computation) and pipeline-aware micro-batches (against fixed counts and
brute force)."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from hetero_parallel.balancer import PipelineSchedule, SampleSpec, plan_global_batch
from hetero_parallel.cost_model import CostModel
from hetero_parallel.simulator import (
    interleaved_order,
    pipeline_times,
    simulate_1f1b,
    simulate_interleaved,
    stage_times,
)
from hetero_parallel.workload import KeyeWorkload

FLOPS = CostModel.from_model_shapes(flops_per_second=4e14)
CASES = [(2, 4, 2, None), (4, 8, 2, None), (4, 4, 3, None), (2, 6, 3, None), (3, 9, 2, None),
         (4, 12, 2, 6), (4, 10, 3, 6), (2, 5, 4, 3)]


def megatron_order(pp: int, stage: int, m: int, vpp: int, g: int | None):
    """The order megatron-core's interleaved schedule runs, from its own schedule table and
    warm-up count: warm-up forwards, then one forward and one backward, then the backwards."""
    from megatron.core.pipeline_parallel.schedules import (
        get_pp_rank_microbatches,
        get_schedule_table,
    )

    class Group:
        def size(self):
            return pp

        def rank(self):
            return stage

    class Comm:
        pp_group = Group()
        virtual_pipeline_model_parallel_size = vpp

    g = pp if g is None else g
    total, _, warmup, remaining = get_pp_rank_microbatches(m, vpp, g, p2p_communicator=Comm())
    table = get_schedule_table(m, vpp, g)
    fwd = [("F", c, mb) for mb, c in table]
    bwd = [("B", vpp - 1 - c, mb) for mb, c in table]
    ops = fwd[:warmup]
    for i in range(remaining):
        ops += [fwd[warmup + i], bwd[i]]
    return ops + bwd[remaining:]


@pytest.mark.parametrize(("pp", "m", "vpp", "g"), CASES)
def test_interleaved_order_is_megatrons(pp, m, vpp, g):
    for stage in range(pp):
        assert interleaved_order(pp, stage, m, vpp, g) == megatron_order(pp, stage, m, vpp, g)


@pytest.mark.parametrize(("pp", "m", "vpp", "g"),
                         [c for c in CASES if c[3] is None or c[1] % c[3] == 0])  # full groups
def test_interleaved_uniform_closed_form(pp, m, vpp, g):
    f, b = 1.0, 2.0
    t = simulate_interleaved(np.full((pp * vpp, m), f), np.full((pp * vpp, m), b),
                             num_stages=pp, group_size=g)
    # Megatron's interleaved bubble: (pp - 1) chunk-steps of f + b.
    assert t.makespan == pytest.approx((m * vpp + pp - 1) * (f + b))
    assert t.busy == pytest.approx((m * vpp * (f + b),) * pp)


def longest_path(fwd: np.ndarray, bwd: np.ndarray, pp: int, g, p2p: float) -> float:
    """Finish time of the DAG of data dependencies plus each stage's op order (recursive)."""
    v_total, m = fwd.shape
    vpp = v_total // pp
    preds = {}
    for s in range(pp):
        order = interleaved_order(pp, s, m, vpp, g)
        for i, (kind, c, mb) in enumerate(order):
            v = c * pp + s
            p = []
            if i:
                k0, c0, mb0 = order[i - 1]
                p.append(((k0, c0 * pp + s, mb0), 0.0))
            if kind == "F" and v > 0:
                p.append((("F", v - 1, mb), p2p))
            if kind == "B":
                p.append((("F", v, mb), 0.0))
                if v < v_total - 1:
                    p.append((("B", v + 1, mb), p2p))
            preds[(kind, v, mb)] = p
    finish = {}

    def visit(node):
        if node not in finish:
            kind, v, mb = node
            start = max((visit(n) + lag for n, lag in preds[node]), default=0.0)
            finish[node] = start + (fwd if kind == "F" else bwd)[v, mb]
        return finish[node]

    return max(visit(n) for n in preds)


def test_interleaved_matches_longest_path_on_random_times():
    rng = np.random.default_rng(0)
    for pp, m, vpp, g in CASES * 3:
        fwd = rng.uniform(0.1, 3.0, (pp * vpp, m))
        bwd = rng.uniform(0.1, 6.0, (pp * vpp, m))
        p2p = float(rng.uniform(0, 0.5))
        got = simulate_interleaved(fwd, bwd, num_stages=pp, p2p_s=p2p, group_size=g).makespan
        assert got == pytest.approx(longest_path(fwd, bwd, pp, g, p2p))


def test_batched_replay_equals_one_at_a_time():
    rng = np.random.default_rng(1)
    fwd = rng.uniform(0.1, 2.0, (3, 5, 8, 8))
    bwd = 2 * fwd
    spans, busy = pipeline_times(fwd, bwd, num_stages=4)
    for i, j in itertools.product(range(3), range(5)):
        t = simulate_interleaved(fwd[i, j], bwd[i, j], num_stages=4)
        assert spans[i, j] == t.makespan and tuple(busy[i, j]) == t.busy
    spans, _ = pipeline_times(fwd[..., :4, :], bwd[..., :4, :])
    assert spans[2, 3] == simulate_1f1b(fwd[2, 3, :4], bwd[2, 3, :4]).makespan


def test_megatron_constraints_are_refused():
    with pytest.raises(ValueError, match=r"group_size\(2\) must be in \[num_stages\(4\)"):
        interleaved_order(4, 0, 8, 2, 2)
    with pytest.raises(ValueError, match=r"num_microbatches\(6\) % group_size\(4\) = 2 must be 0 "
                                         r"or >= num_stages\(4\)"):
        interleaved_order(4, 0, 6, 2)
    with pytest.raises(ValueError, match=r"num_stages\(3\) must divide the 8 virtual stages"):
        pipeline_times(np.ones((8, 4)), np.ones((8, 4)), num_stages=3)


# --- pipeline-aware micro-batches ----------------------------------------------------------------
def slowest(plan, schedule: PipelineSchedule) -> float:
    return float(schedule.makespans(plan.microbatch_costs).max())


@pytest.mark.parametrize("vpp", [1, 2])
def test_pipeline_aware_beats_every_fixed_count(vpp):
    samples = KeyeWorkload().sample(256, seed=11)
    schedule = PipelineSchedule(num_stages=4, num_chunks=vpp, tp=4)
    kwargs = dict(num_replicas=4, num_vit_ranks=64, equal_samples_per_replica=True)
    plan = plan_global_batch(samples, FLOPS, num_microbatches=32, pipeline=schedule, **kwargs)
    assert plan.num_microbatches in schedule.candidates(32) == [4, 8, 16, 32]
    best_fixed = min(slowest(plan_global_batch(samples, FLOPS, num_microbatches=m, **kwargs),
                             schedule) for m in schedule.candidates(32))
    assert slowest(plan, schedule) <= best_fixed
    # The usual constraints still hold.
    counts = np.zeros((4, plan.num_microbatches), dtype=np.int64)
    np.add.at(counts, (plan.replica, plan.microbatch), 1)
    assert counts.min() >= 1 and (counts.sum(axis=1) == 64).all()
    shuffled = list(samples)
    random.Random(0).shuffle(shuffled)
    again = plan_global_batch(shuffled, FLOPS, num_microbatches=32, pipeline=schedule, **kwargs)
    assert again.digest() == plan.digest()


def brute_force(costs: list[float], counts: list[int], schedule: PipelineSchedule) -> float:
    """The best makespan over every count, partition into ordered non-empty micro-batches."""
    best = float("inf")
    n = len(costs)
    for m in counts:
        for labels in itertools.product(range(m), repeat=n):
            if len(set(labels)) < m or labels[0] != 0:
                continue  # empty micro-batch, or a relabelling (orders are tried below)
            mb = np.zeros(m)
            np.add.at(mb, list(labels), costs)
            orders = np.asarray(list(itertools.permutations(mb)))
            best = min(best, float(schedule.makespans(orders).min()))
    return best


def test_pipeline_aware_near_brute_force_on_small_batches():
    rng = random.Random(3)
    schedule = PipelineSchedule(num_stages=2, microbatch_counts=(2, 3, 4))
    ratios = []
    for _ in range(6):
        samples = [SampleSpec(i, rng.choice((100, 2_000, 8_000, 30_000, 60_000)))
                   for i in range(6)]
        plan = plan_global_batch(samples, FLOPS, num_replicas=1, num_microbatches=4,
                                 num_vit_ranks=1, pipeline=schedule)
        costs = [float(FLOPS.llm_cost(s.num_tokens)) for s in samples]
        best = brute_force(costs, [2, 3, 4], schedule)
        ours = slowest(plan, schedule)
        assert ours >= best * (1 - 1e-12)
        ratios.append(ours / best)
    assert max(ratios) < 1.05, ratios


def test_stage_times_split_the_work():
    fwd, bwd = stage_times(np.array([[6.0, 12.0]]), num_stages=2, num_chunks=3, tp=2)
    assert fwd.shape == (1, 6, 2)
    assert fwd[0, :, 0] == pytest.approx([6.0 / 12 / 3] * 6)
    assert bwd[0, :, 1] == pytest.approx([12.0 / 12 * 2 / 3] * 6)
