"""Groups in the balancer: the samples of a group share one replica and one micro-batch.

References: brute force over every assignment of the groups (whether a placement exists), the
plain constrained LPT over groups (`reference_llm_placement`, the plan whenever that greedy
succeeds), and the same batch without groups (the ViT placement does not change).
"""

from __future__ import annotations

import random

import numpy as np
import pytest

import hetero_parallel.balancer as balancer
from hetero_parallel.balancer import (
    MediaSpec,
    PipelineSchedule,
    SampleSpec,
    plan_by_position,
    plan_global_batch,
    plan_loongforge_style,
)
from hetero_parallel.cost_model import CostModel
from hetero_parallel.workload import KeyeWorkload
from tests.test_balancer import partition_of, reference_llm_placement
from tests.test_balancer_feasibility import brute_force_fits, check_plan

# llm(L) = L + L^2/1000, vit(P) = P: costs easy to check by hand.
SIMPLE = CostModel(vit_linear=1.0, vit_quadratic=0.0, llm_linear=1.0, llm_quadratic=1e-3)
FLOPS = CostModel.from_model_shapes(flops_per_second=4e14)


def ungrouped(samples: list[SampleSpec]) -> list[SampleSpec]:
    return [SampleSpec(s.sample_id, s.text_tokens, s.media) for s in samples]


def units_of(samples: list[SampleSpec]) -> list[list[SampleSpec]]:
    """The groups of a batch (a sample without a group id alone), in order of first id."""
    out: dict = {}
    for s in sorted(samples, key=lambda s: s.sample_id):
        out.setdefault(("s", s.sample_id) if s.group is None else ("g", s.group), []).append(s)
    return list(out.values())


def random_batch(rng: random.Random, num_units: int, token_choices) -> list[SampleSpec]:
    """``num_units`` groups of 1-3 samples, each of a total drawn from ``token_choices``."""
    return batch_of(rng, [rng.choice(token_choices) for _ in range(num_units)])


def batch_of(rng: random.Random, unit_tokens: list[int]) -> list[SampleSpec]:
    """One group of 1-3 samples (some without a group id) for each total in ``unit_tokens``,
    shuffled; some members carry media, others none (as the rejected answer of a pair whose
    prompt the chosen one holds)."""
    samples, sid = [], rng.randint(0, 5)
    for g, total in enumerate(unit_tokens):
        size = min(total, rng.choice([1, 1, 2, 2, 3]))
        group = None if size == 1 and rng.random() < 0.7 else 10 * g + rng.randint(0, 9)
        cuts = sorted(rng.sample(range(1, total), size - 1))
        for t in (b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)):
            media = ()
            if t >= 8 and rng.random() < 0.4:
                frames = [rng.randint(1, t // 4) for _ in range(rng.randint(1, 3))]
                media = (MediaSpec(tuple(frames)),)
            samples.append(SampleSpec(sid, t - sum(frames) if media else t, media, group=group))
            sid += rng.randint(1, 3)
    rng.shuffle(samples)
    return samples


def planted(rng: random.Random, bins: int, cap: int, most: int) -> list[int]:
    """Unit totals that fill ``bins`` micro-batches to exactly ``cap`` (at most ``most`` units),
    shuffled: tight enough that the greedy often fails where a placement exists."""
    per_bin = [1] * bins
    for _ in range(rng.randint(0, most - bins)):
        per_bin[rng.randrange(bins)] += 1
    totals = []
    for k in per_bin:
        cuts = sorted(rng.sample(range(1, cap), k - 1))
        totals += [b - a for a, b in zip([0, *cuts], [*cuts, cap], strict=True)]
    rng.shuffle(totals)
    return totals


# --- hand-made ------------------------------------------------------------------------------------
def test_pairs_move_as_one_by_hand():
    # Units and costs (L + L^2/1000): sample 4 alone 2000; group 3 = {2, 3: 400 tokens each}
    # 560 + 560 = 1120; group 7 = {0: 500, 1: 100} 750 + 110 = 860; 5 alone 240; 6 alone 110.
    # LPT over 2 replicas: 4 -> r0, g3 -> r1, g7 -> r1 (1980), 5 -> r1 (2220), 6 -> r0 (2110).
    # Inside r1: g3 and g7 open the micro-batches, 5 joins g7 (1100). Lightest first.
    samples = [SampleSpec(0, 500, group=7), SampleSpec(1, 100, group=7),
               SampleSpec(2, 400, group=3), SampleSpec(3, 400, group=3), SampleSpec(4, 1000),
               SampleSpec(5, 200), SampleSpec(6, 100)]
    kwargs = dict(num_replicas=2, num_microbatches=2, num_vit_ranks=1,
                  max_tokens_per_microbatch=1000)
    plan = plan_global_batch(samples[::-1], SIMPLE, **kwargs)
    assert plan.microbatches == (((6,), (4,)), ((0, 1, 5), (2, 3)))
    assert plan.microbatch_costs.tolist() == [[110.0, 2000.0], [1100.0, 1120.0]]
    assert plan.sample_group.tolist() == [7, 7, 3, 3, -1, -1, -1]
    # Without the groups the pair {0, 1} is split: the constraint is what keeps it together.
    free = plan_global_batch(ungrouped(samples), SIMPLE, **kwargs)
    assert free.placement(0) != free.placement(1)
    assert plan.digest() != free.digest()


def test_the_report_counts_a_group_as_one_item():
    # Group 4 = {0, 1: 1000 tokens each} costs 4000; the fair share is 4220 / 2 = 2110.
    samples = [SampleSpec(0, 1000, group=4), SampleSpec(1, 1000, group=4), SampleSpec(2, 100),
               SampleSpec(3, 100)]
    plan = plan_global_batch(samples, SIMPLE, num_replicas=2, num_microbatches=1,
                             num_vit_ranks=1)
    assert plan.microbatches == (((0, 1),), ((2, 3),))
    assert plan.llm_report.largest_item == 4000.0
    assert plan.llm_report.outliers == ((0, 4000.0),)
    assert plan.llm_report.max_over_lower_bound == 1.0


def test_a_group_over_the_cap_is_named():
    samples = [SampleSpec(0, 100), SampleSpec(3, 450, group=5), SampleSpec(8, 300, group=5),
               SampleSpec(9, 100, group=6), SampleSpec(11, 20, (MediaSpec((16, 16)),), group=6)]
    with pytest.raises(ValueError, match=r"^group 5 \(samples 3, 8 with 450 \+ 300 = 750 tokens\) "
                                         r"is over max_tokens_per_microbatch\(700\): a group's "
                                         r"samples share one micro-batch \(1 group\(s\) over the "
                                         r"cap\)$"):
        plan_global_batch(samples, SIMPLE, num_replicas=1, num_microbatches=2, num_vit_ranks=1,
                          max_tokens_per_microbatch=700)
    big = [SampleSpec(i, 10, group=1) for i in range(20)] + [SampleSpec(20, 5)]
    with pytest.raises(ValueError, match=r"group 1 \(20 samples: 0, 1, .*, 15, \.\.\. with 10 \+ "
                                         r".* \+ 10 \+ \.\.\. = 200 tokens\) is over "
                                         r"max_tokens_per_microbatch\(150\)"):
        plan_global_batch(big, SIMPLE, num_replicas=1, num_microbatches=1, num_vit_ranks=1,
                          max_tokens_per_microbatch=150)


def test_equal_counts_that_groups_cannot_meet_are_refused():
    pairs = [SampleSpec(i, 10, group=i // 2) for i in range(6)]
    with pytest.raises(ValueError, match=r"every group has a multiple of 2 samples, so no replica "
                                         r"can get 3 \(6 samples over num_replicas\(2\)\)"):
        plan_global_batch(pairs, SIMPLE, num_replicas=2, num_microbatches=1, num_vit_ranks=1,
                          equal_samples_per_replica=True)
    four = [SampleSpec(i, 10, group=0 if i < 4 else None) for i in range(6)]
    with pytest.raises(ValueError, match=r"group 0 \(samples 0, 1, 2, 3 with 10 \+ 10 \+ 10 \+ 10 "
                                         r"= 40 tokens\) holds 4 samples, more than the 3 each of "
                                         r"num_replicas\(2\) gets"):
        plan_global_batch(four, SIMPLE, num_replicas=2, num_microbatches=1, num_vit_ranks=1,
                          equal_samples_per_replica=True)
    with pytest.raises(ValueError, match=r"6 samples in 3 groups cannot fill num_replicas\(2\) \* "
                                         r"num_microbatches\(2\) = 4 micro-batches"):
        plan_global_batch(pairs, SIMPLE, num_replicas=2, num_microbatches=2, num_vit_ranks=1)
    with pytest.raises(ValueError, match=r"sample 3: group must be None or an int in "
                                         r"\[0, 2\*\*63\), got -1"):
        SampleSpec(3, 10, group=-1)


def test_equal_counts_stuck_greedy_is_searched():
    # Units by cost: group 0 {0: 1000, 1: 900} 3710; 2: 1200 alone 2640; 3: 1100 alone 2310;
    # group 1 {4, 5: 100 each} 220. Equal counts: 3 samples per replica. The greedy puts group 0
    # on r0, 2 and 3 on r1, and then the pair fits nowhere; {0, 1, 3} | {2, 4, 5} does.
    samples = [SampleSpec(0, 1000, group=0), SampleSpec(1, 900, group=0), SampleSpec(2, 1200),
               SampleSpec(3, 1100), SampleSpec(4, 100, group=1), SampleSpec(5, 100, group=1)]
    with pytest.raises(ValueError):
        reference_llm_placement(samples, SIMPLE, 2, 1, None, True)
    assert brute_force_fits([1900, 1200, 1100, 200], 2, 1, None, True, sizes=[2, 1, 1, 2])
    for cap in (None, 3000):
        plan = plan_global_batch(samples, SIMPLE, num_replicas=2, num_microbatches=1,
                                 num_vit_ranks=1, equal_samples_per_replica=True,
                                 max_tokens_per_microbatch=cap)
        check_plan(plan, samples, 2, 1, cap, True)
    # With room for neither arrangement under the cap ({0, 1, 3} holds 3000 tokens), refused.
    with pytest.raises(ValueError, match=r"no placement exists for 6 samples in 4 groups \(4400 "
                                         r"tokens, largest group 1900\) in num_replicas\(2\) x "
                                         r"num_microbatches\(1\) micro-batches of at most "
                                         r"max_tokens_per_microbatch\(2999\) tokens with 3 "
                                         r"samples per replica"):
        plan_global_batch(samples, SIMPLE, num_replicas=2, num_microbatches=1, num_vit_ranks=1,
                          equal_samples_per_replica=True, max_tokens_per_microbatch=2999)


# --- random instances against brute force and the reference greedy -------------------------------
def test_random_groups_against_brute_force_and_reference():
    rng = random.Random(16)
    seen = {"greedy placed": 0, "search placed": 0, "refused": 0, "rejected upfront": 0}
    for _ in range(400):
        replicas, microbatches = rng.choice([(1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1),
                                             (2, 3), (1, 4)])
        bins = replicas * microbatches
        most = 6 if bins > 4 else 7
        if rng.random() < 0.5:
            samples = random_batch(rng, rng.randint(bins - (rng.random() < 0.25), most),
                                   [50, 100, 200, 300, 400, 500, 700])
            totals = [sum(s.num_tokens for s in u) for u in units_of(samples)]
            cap = rng.choice([None, max(totals)] + [
                max(max(totals), int(sum(totals) / bins * slack)) for slack in (1, 1.1)])
        else:
            cap = rng.choice([600, 1000])
            samples = batch_of(rng, planted(rng, bins, cap, most))
        units = units_of(samples)
        unit_tokens = [sum(s.num_tokens for s in u) for u in units]
        sizes = [len(u) for u in units]
        equal = replicas > 1 and rng.random() < 0.6 and len(samples) % replicas == 0
        kwargs = dict(num_replicas=replicas, num_microbatches=microbatches, num_vit_ranks=3,
                      max_tokens_per_microbatch=cap, equal_samples_per_replica=equal,
                      frames_per_chunk=2)
        if len(units) < bins:
            with pytest.raises(ValueError, match="cannot fill"):
                plan_global_batch(samples, SIMPLE, **kwargs)
            seen["rejected upfront"] += 1
            continue
        fits = brute_force_fits(unit_tokens, replicas, microbatches, cap, equal, sizes)
        try:
            plan = plan_global_batch(samples, SIMPLE, **kwargs)
        except ValueError as exc:
            assert not fits, f"brute force places {unit_tokens, sizes, kwargs}, refused: {exc}"
            assert "no placement exists" in str(exc) or "no replica can get" in str(exc) \
                or "more than the" in str(exc), exc
            seen["refused"] += 1
            continue
        assert fits
        check_plan(plan, samples, replicas, microbatches, cap, equal)
        try:
            want = reference_llm_placement(samples, SIMPLE, replicas, microbatches, cap, equal)
        except ValueError:
            seen["search placed"] += 1
        else:
            assert partition_of(plan) == want  # when the greedy succeeds, its plan is kept
            seen["greedy placed"] += 1
        # The ViT placement ignores groups; the shuffled batch gives the same plan.
        free = plan_global_batch(ungrouped(samples), SIMPLE, num_replicas=replicas,
                                 num_microbatches=1, num_vit_ranks=3, frames_per_chunk=2)
        assert plan.media_chunks == free.media_chunks
        assert plan.vit_report == free.vit_report
        shuffled = list(samples)
        rng.shuffle(shuffled)
        assert plan_global_batch(shuffled, SIMPLE, **kwargs).digest() == plan.digest()
    assert min(seen.values()) >= 10, seen


def test_larger_random_groups_follow_the_reference_greedy():
    # Sizes where brute force is out of reach: the greedy's plan (the fast numpy path and the
    # heap loops) equals the plain reference, and every constraint holds.
    rng = random.Random(7)
    for _ in range(40):
        replicas, microbatches = rng.randint(1, 6), rng.randint(1, 4)
        samples = random_batch(rng, rng.randint(replicas * microbatches, 40),
                               [30, 200, 900, 2000, 4000])
        equal = rng.random() < 0.5 and len(samples) % replicas == 0
        cap = rng.choice([None, 40_000])
        kwargs = dict(num_replicas=replicas, num_microbatches=microbatches, num_vit_ranks=2,
                      max_tokens_per_microbatch=cap, equal_samples_per_replica=equal)
        try:
            want = reference_llm_placement(samples, FLOPS, replicas, microbatches, cap, equal)
        except ValueError:
            want = None
        try:
            plan = plan_global_batch(samples, FLOPS, **kwargs)
        except ValueError as exc:
            assert want is None, exc
            continue
        check_plan(plan, samples, replicas, microbatches, cap, equal)
        if want is not None:
            assert partition_of(plan) == want


def test_equal_counts_with_mixed_groups_at_scale():
    # Pairs of short answers among long single samples, equal counts: in cost order the pairs
    # come last and find only odd rooms left (the plain greedy is stuck, and the bounded search
    # gives up at this size); the retry with the largest groups first places them.
    rng = random.Random(0)
    samples, g = [], 0
    while len(samples) < 256:
        i = len(samples)
        if rng.random() < 0.5 and i + 2 <= 256:
            samples += [SampleSpec(i, rng.randint(50, 300), group=g),
                        SampleSpec(i + 1, rng.randint(50, 300), group=g)]
            g += 1
        else:
            samples.append(SampleSpec(i, rng.randint(1000, 60_000)))
    with pytest.raises(ValueError):
        reference_llm_placement(samples, FLOPS, 8, 4, None, True)
    for cap in (None, 200_000):
        plan = plan_global_batch(samples, FLOPS, num_replicas=8, num_microbatches=4,
                                 num_vit_ranks=1, equal_samples_per_replica=True,
                                 max_tokens_per_microbatch=cap)
        check_plan(plan, samples, 8, 4, cap, True)
        assert plan.llm_report.max_over_lower_bound < 1.02


def test_keye_batch_of_pairs_at_scale():
    # 2,048 Keye-like samples as 1,024 preference pairs, the chosen answer carrying the media,
    # over 64 replicas x 4 micro-batches with equal counts and a cap.
    base = KeyeWorkload().sample(2048, seed=3)
    samples = [SampleSpec(s.sample_id, s.text_tokens, s.media if i % 2 == 0 else (),
                          group=s.sample_id // 2) for i, s in enumerate(base)]
    kwargs = dict(num_replicas=64, num_microbatches=4, num_vit_ranks=256,
                  max_tokens_per_microbatch=160_000, equal_samples_per_replica=True)
    plan = plan_global_batch(samples, FLOPS, **kwargs)
    check_plan(plan, samples, 64, 4, 160_000, True)
    assert plan.llm_report.max_over_lower_bound < 1.05
    assert plan_global_batch(samples[::-1], FLOPS, **kwargs).digest() == plan.digest()


# --- the pipeline option and the baselines -------------------------------------------------------
def test_pipeline_schedule_keeps_groups_together():
    rng = random.Random(5)
    for _ in range(20):
        replicas = rng.randint(1, 3)
        samples = random_batch(rng, rng.randint(8 * replicas, 12 * replicas),
                               [100, 500, 2000, 6000])
        pipeline = PipelineSchedule(num_stages=rng.choice([2, 4]),
                                    num_chunks=rng.choice([1, 2]))
        kwargs = dict(num_replicas=replicas, num_microbatches=8, num_vit_ranks=2,
                      max_tokens_per_microbatch=rng.choice([None, 20_000]), pipeline=pipeline)
        plan = plan_global_batch(samples, FLOPS, **kwargs)
        check_plan(plan, samples, replicas, plan.num_microbatches,
                   kwargs["max_tokens_per_microbatch"], False)
        rng.shuffle(samples)
        assert plan_global_batch(samples, FLOPS, **kwargs).digest() == plan.digest()


def test_by_position_moves_the_cut_past_a_group():
    # Groups {1, 6} and {2, 3}; a group sits at its smallest id, so the order is 0, 1, 6, 2, 3,
    # 4, 5, 7. The replica cut after 4 samples falls inside {2, 3} and moves past it; replica
    # 0's micro-batch cut (after 3 of its 5 samples) falls on a group boundary.
    samples = [SampleSpec(i, 10 + i, group={1: 9, 6: 9, 2: 2, 3: 2}.get(i)) for i in range(8)]
    plan = plan_by_position(samples, SIMPLE, num_replicas=2, num_microbatches=2,
                            replica_vit_ranks=[[0], [1]])
    assert plan.microbatches == (((0, 1, 6), (2, 3)), ((4, 5), (7,)))
    check_plan(plan, samples, 2, 2, None, False)


@pytest.mark.parametrize("seed", range(3))
def test_baselines_keep_groups_together(seed):
    rng = random.Random(seed)
    for _ in range(30):
        replicas, microbatches = rng.randint(1, 4), rng.randint(1, 4)
        samples = random_batch(rng, rng.randint(replicas * microbatches, 30),
                               [100, 500, 2000])
        units = units_of(samples)
        by_pos = plan_by_position(samples, SIMPLE, num_replicas=replicas,
                                  num_microbatches=microbatches,
                                  replica_vit_ranks=[[r] for r in range(replicas)])
        check_plan(by_pos, samples, replicas, microbatches, None, False)
        # Contiguous runs of groups in position order (a group at its smallest id).
        slot = [by_pos.placement(u[0].sample_id) for u in units]
        assert slot == sorted(slot)
        lf = plan_loongforge_style(samples, SIMPLE, num_replicas=replicas,
                                   num_microbatches=microbatches, num_vit_ranks=2)
        check_plan(lf, samples, replicas, microbatches, None, False)
        mbs = [lf.placement(u[0].sample_id)[1] for u in units]
        assert mbs == sorted(mbs)  # global micro-batches are runs of groups by position


def test_position_split_rules():
    rng = random.Random(2)
    for _ in range(500):
        parts, least = rng.randint(1, 5), rng.randint(1, 3)
        sizes = np.asarray([rng.choice([1, 1, 2, 5]) for _ in range(rng.randint(parts * least,
                                                                                  20))])
        part = balancer._position_split(sizes, sizes.size, parts, least)
        assert part.tolist() == sorted(part.tolist())
        runs = np.bincount(part, minlength=parts)
        assert (runs >= least).all()
        # Each cut is the first group boundary at or after the plain cut over the samples,
        # unless that would leave a run before it, or the runs after it, too few groups.
        plain = np.bincount(balancer._contiguous_split(int(sizes.sum()), parts), minlength=parts)
        before = np.concatenate(([0], np.cumsum(sizes)))
        for k in range(1, parts):
            cut, target = int(runs[:k].sum()), int(plain[:k].sum())
            at_least = before[cut] >= target or runs[k - 1] == least
            at_most = before[cut - 1] < target or runs[k - 1] == least \
                or runs[k:].sum() == least * (parts - k)
            assert (at_least or runs[k:].sum() == least * (parts - k)) and at_most
        ones = np.ones(sizes.size, dtype=np.int64)
        if sizes.size >= parts:
            assert balancer._position_split(ones, sizes.size, parts).tolist() == \
                balancer._contiguous_split(sizes.size, parts).tolist()
