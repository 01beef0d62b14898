"""The token cap: the balancer places every batch that fits, and refuses only what cannot fit.

The reference is brute force: every assignment of the samples to the micro-batches, checked
against the cap, non-empty micro-batches and equal samples per replica.
"""

from __future__ import annotations

import functools
import itertools
import random

import numpy as np
import pytest

import hetero_parallel.balancer as balancer
from hetero_parallel.balancer import SampleSpec, plan_global_batch
from hetero_parallel.cost_model import CostModel
from tests.test_balancer import reference_llm_placement

SIMPLE = CostModel(vit_linear=1.0, vit_quadratic=0.0, llm_linear=1.0, llm_quadratic=1e-3)
FLOPS = CostModel.from_model_shapes(flops_per_second=4e14)


def brute_force_fits(tokens: list[int], replicas: int, microbatches: int, cap: int | None,
                     equal: bool, sizes: list[int] | None = None) -> bool:
    """Whether any assignment of the units (samples, or groups of ``sizes`` samples with
    ``tokens`` in all) to replicas x micro-batches meets every constraint (all assignments at
    once, as numpy rows)."""
    bins = replicas * microbatches
    rows = _assignments(bins, len(tokens))
    t = np.asarray(tokens, dtype=np.int64)
    k = np.ones(len(tokens), dtype=np.int64) if sizes is None else np.asarray(sizes)
    ok = np.ones(len(rows), dtype=bool)
    count = np.empty((len(rows), bins), dtype=np.int64)
    for b in range(bins):
        here = rows == b
        if cap is not None:
            ok &= here @ t <= cap
        ok &= here.any(axis=1)
        count[:, b] = here @ k
    if equal:
        per_replica = count.reshape(-1, replicas, microbatches).sum(axis=2)
        ok &= (per_replica == int(k.sum()) // replicas).all(axis=1)
    return bool(ok.any())


@functools.cache
def _assignments(bins: int, n: int) -> np.ndarray:
    return np.array(list(itertools.product(range(bins), repeat=n)), dtype=np.int8)


def check_plan(plan, samples, replicas, microbatches, cap, equal) -> None:
    """Every constraint of a plan, from its public views: each micro-batch non-empty and under
    the cap, equal counts when asked, every sample placed once, the samples of a group in one
    micro-batch."""
    tokens = {s.sample_id: s.num_tokens for s in samples}
    placed = []
    where = {}
    for r in range(replicas):
        mbs = plan.samples_for_replica(r)
        assert len(mbs) == microbatches and all(mbs), "every micro-batch gets a sample"
        assert cap is None or all(sum(tokens[i] for i in mb) <= cap for mb in mbs), "token cap"
        if equal:
            assert sum(map(len, mbs)) == len(samples) // replicas
        placed += [i for mb in mbs for i in mb]
        where.update({i: (r, j) for j, mb in enumerate(mbs) for i in mb})
    assert sorted(placed) == sorted(tokens)
    for s in samples:
        assert plan.placement(s.sample_id) == where[s.sample_id]
        if s.group is not None:
            assert all(where[o.sample_id] == where[s.sample_id] for o in samples
                       if o.group == s.group), f"group {s.group} split"


def test_the_issue_example_is_placed():
    # The greedy puts 500 | 400, then 300 with 400 (least loaded), 200 with 500, and the last
    # 200 fits nowhere; [500, 300] | [400, 200, 200] fits.
    samples = [SampleSpec(i, t) for i, t in enumerate([500, 400, 300, 200, 200])]
    kwargs = dict(num_replicas=1, num_microbatches=2, num_vit_ranks=1,
                  max_tokens_per_microbatch=800)
    with pytest.raises(ValueError):
        reference_llm_placement(samples, SIMPLE, 1, 2, 800, False)
    plan = plan_global_batch(samples, SIMPLE, **kwargs)
    check_plan(plan, samples, 1, 2, 800, False)
    assert sorted(plan.microbatches[0]) == [(0, 2), (1, 3, 4)]


def _small_batch(rng: random.Random):
    """Half random batches with a cap near the mean micro-batch (many fit, many cannot), half
    planted ones: micro-batches filled to the cap by construction and shuffled (they fit, and
    are tight enough that the greedy often fails on them)."""
    replicas, microbatches = rng.choice([(1, 2), (1, 3), (2, 1), (2, 2), (1, 4), (3, 1), (2, 3)])
    bins = replicas * microbatches
    equal = replicas > 1 and rng.random() < 0.4
    limit = 7 if bins <= 4 else 6
    if rng.random() < 0.5:
        n = rng.randint(max(bins, limit - 2), limit)
        n -= n % replicas if equal else 0
        tokens = [rng.randrange(100, 800, 100) if rng.random() < 0.6 else rng.randint(50, 800)
                  for _ in range(n)]
        slack = rng.choice([1.0, 1.05, 1.1, 1.15])
        cap = max(max(tokens), int(sum(tokens) / bins * slack))
    else:
        cap = rng.choice([800, 1000])
        per_bin = [1] * bins
        for _ in range(rng.randint(0, limit - bins)):
            per_bin[rng.randrange(bins)] += 1
        if equal:  # same number of samples in each replica
            per_bin = [per_bin[0] for _ in range(bins)] if microbatches == 1 else per_bin
            counts = [sum(per_bin[r * microbatches:(r + 1) * microbatches])
                      for r in range(replicas)]
            equal = len(set(counts)) == 1
        tokens = []
        for k in per_bin:
            cuts = sorted(rng.sample(range(1, cap), k - 1))
            tokens += [b - a for a, b in zip([0, *cuts], [*cuts, cap], strict=True)]
        rng.shuffle(tokens)
    return tokens, replicas, microbatches, cap, equal


def test_places_whatever_brute_force_places_and_refuses_only_the_impossible():
    rng = random.Random(13)
    seen = {"greedy placed": 0, "search placed": 0, "bound refused": 0, "search refused": 0}
    for _ in range(500):
        tokens, replicas, microbatches, cap, equal = _small_batch(rng)
        samples = [SampleSpec(i, t) for i, t in enumerate(tokens)]
        fits = brute_force_fits(tokens, replicas, microbatches, cap, equal)
        try:
            reference_llm_placement(samples, SIMPLE, replicas, microbatches, cap, equal)
            greedy = True
        except ValueError:
            greedy = False
        try:
            plan = plan_global_batch(samples, SIMPLE, num_replicas=replicas,
                                     num_microbatches=microbatches, num_vit_ranks=1,
                                     max_tokens_per_microbatch=cap,
                                     equal_samples_per_replica=equal)
        except ValueError as exc:
            where = (tokens, replicas, microbatches, cap, equal)
            assert not fits, f"brute force places {where} but the balancer refuses: {exc}"
            assert "no placement exists" in str(exc), exc  # small batches: never gave up
            assert f"max_tokens_per_microbatch({cap})" in str(exc)
            seen["search refused" if "exhaustive search" in str(exc) else "bound refused"] += 1
            continue
        assert fits
        check_plan(plan, samples, replicas, microbatches, cap, equal)
        seen["greedy placed" if greedy else "search placed"] += 1
    assert min(seen.values()) >= 10, seen


def _planted(replicas: int, microbatches: int, per_bin: int, fill: float, seed: int,
             cap: int = 8000) -> list[SampleSpec]:
    """A batch that fits by construction: every micro-batch's ``fill * cap`` tokens cut at
    random into ``per_bin`` samples, then all shuffled."""
    rng = random.Random(seed)
    tokens = []
    for _ in range(replicas * microbatches):
        cuts = sorted(rng.sample(range(1, int(cap * fill)), per_bin - 1))
        tokens += [b - a for a, b in zip([0, *cuts], [*cuts, int(cap * fill)], strict=True)]
    rng.shuffle(tokens)
    return [SampleSpec(i, t) for i, t in enumerate(tokens)]


@pytest.mark.parametrize("equal", [False, True])
def test_an_exact_fit_too_hard_to_find_gives_up_explicitly(equal):
    # 16 micro-batches each filled exactly to the cap by 3 samples: a placement exists, but
    # neither the greedy, nor the bounded search, nor best-fit packing finds it.
    samples = _planted(4, 4, 3, 1.0, seed=0)
    with pytest.raises(ValueError):
        reference_llm_placement(samples, FLOPS, 4, 4, 8000, equal)
    with pytest.raises(ValueError) as excinfo:
        plan_global_batch(samples, FLOPS, num_replicas=4, num_microbatches=4, num_vit_ranks=1,
                          max_tokens_per_microbatch=8000, equal_samples_per_replica=equal)
    message = str(excinfo.value)
    assert message.startswith("gave up placing 48 samples (128000 tokens, largest ")
    assert "num_replicas(4) x num_microbatches(4)" in message
    assert "max_tokens_per_microbatch(8000)" in message
    assert f"limit of {balancer.SEARCH_BUDGET} steps" in message
    assert "may still exist (lower bound: 16 micro-batches of 16)" in message
    assert ("12 samples per replica" in message) == equal
    assert ("best-fit packing found no room" in message) != equal


@pytest.mark.parametrize(("replicas", "microbatches", "per_bin", "fill", "seed"),
                         [(64, 8, 4, 0.99, 0), (16, 4, 3, 0.985, 1), (128, 4, 3, 0.985, 2)])
def test_large_tight_batches_are_placed_deterministically(replicas, microbatches, per_bin, fill,
                                                          seed):
    # Micro-batches 98.5-99% full by construction: the greedy fails, the bounded search cannot
    # finish for thousands of samples, and best-fit packing places them.
    samples = _planted(replicas, microbatches, per_bin, fill, seed)
    kwargs = dict(num_replicas=replicas, num_microbatches=microbatches, num_vit_ranks=8,
                  max_tokens_per_microbatch=8000)
    with pytest.raises(ValueError):
        reference_llm_placement(samples, FLOPS, replicas, microbatches, 8000, False)
    plan = plan_global_batch(samples, FLOPS, **kwargs)
    check_plan(plan, samples, replicas, microbatches, 8000, False)
    assert plan.llm_report.max_over_lower_bound < 1.05
    shuffled = list(samples)
    random.Random(seed).shuffle(shuffled)
    assert plan_global_batch(shuffled, FLOPS, **kwargs).digest() == plan.digest()


def test_bin_packing_bound_matches_brute_force_on_small_sets():
    # The bound never exceeds the true minimum number of micro-batches (brute force).
    rng = random.Random(3)
    tight = 0
    for _ in range(300):
        cap = rng.choice([10, 12, 15])
        tokens = [rng.randint(1, cap) for _ in range(rng.randint(1, 6))]
        need = balancer._bins_needed(np.asarray(tokens), cap)
        fewest = next(b for b in range(1, len(tokens) + 1)
                      if _packs(tokens, b, cap))
        assert need <= fewest, (tokens, cap)
        tight += need == fewest
    assert tight > 250  # and it is usually exact on such small sets


def _packs(tokens: list[int], bins: int, cap: int) -> bool:
    """Whether ``tokens`` fit in ``bins`` bins of ``cap`` (empty bins allowed)."""
    for rows in itertools.product(range(bins), repeat=len(tokens)):
        used = [0] * bins
        for b, t in zip(rows, tokens, strict=True):
            used[b] += t
        if max(used) <= cap:
            return True
    return False
