"""Splitting giant ViT items: pieces cover each frame once on distinct ranks, costs and piece counts
against direct formulas and a brute-force count, placement against a plain heap loop, and the ViT
phase approaching its lower bound with max-size images."""

from __future__ import annotations

import heapq
import random

import numpy as np
import pytest

from hetero_parallel.balancer import MediaSpec, SampleSpec, plan_global_batch
from hetero_parallel.cost_model import CostModel
from hetero_parallel.workload import KeyeWorkload

FLOPS = CostModel.from_model_shapes(flops_per_second=4e14)
# vit(P) = P + P^2/100 + 5, exchange 0.5 per patch: round numbers for the hand-made case.
ROUND = CostModel(vit_linear=1.0, vit_quadratic=0.01, vit_constant=5.0, llm_linear=1.0,
                  llm_quadratic=0.0, vit_exchange=0.5)


def random_batch(rng: random.Random, n: int) -> list[SampleSpec]:
    """Text, images from 1 to 20,480 tokens and Slow-Fast-like videos, ids shuffled."""
    out = []
    for sid in rng.sample(range(10 * n), n):
        kind = rng.random()
        media = ()
        if kind < 0.5:
            media = tuple(MediaSpec((int(min(20_480, 4 + rng.paretovariate(0.7) * 200)),))
                          for _ in range(rng.randint(1, 3)))
        elif kind < 0.8:
            frames = rng.randint(1, 40)
            media = (MediaSpec(tuple(rng.choice((48, 230, 768)) for _ in range(frames))),)
        out.append(SampleSpec(sid, rng.randint(1, 300), media))
    return out


def frame_tokens(samples: list[SampleSpec]) -> dict[tuple[int, int], tuple[int, ...]]:
    return {(s.sample_id, m): md.tokens_per_frame for s in samples for m, md in enumerate(s.media)}


def reference_ranks(cost: np.ndarray, group: np.ndarray, ranks: int) -> list[int]:
    """Grouped LPT as plainly as possible: units (a chunk, or a split frame's pieces) by
    decreasing cost (a group: its largest piece), ties by first chunk; a chunk to the least-loaded
    rank, a group's pieces (largest first, ties by index) each to the least-loaded rank the group
    has not used yet."""
    units: dict[object, list[int]] = {}
    for k, g in enumerate(group.tolist()):
        units.setdefault(("g", g) if g >= 0 else ("c", k), []).append(k)
    order = sorted(units.values(), key=lambda ks: (-max(cost[k] for k in ks), min(ks)))
    heap = [(0.0, r) for r in range(ranks)]
    out = [-1] * cost.size
    for ks in order:
        ks = sorted(ks, key=lambda k: (-cost[k], k))
        taken = [heapq.heappop(heap) for _ in ks]
        for k, (load, r) in zip(ks, taken, strict=True):
            out[k] = r
            heapq.heappush(heap, (load + float(cost[k]), r))
    return out


def brute_force_pieces(tokens: int, cost: CostModel, threshold: float, ranks: int) -> int:
    """The fewest k whose equal slices cost at most ``threshold``, else the k (up to the limit)
    with the cheapest slice; 1 if no k beats the whole frame."""
    p = tokens * cost.patches_per_token
    limit = min(ranks, tokens)
    slice_cost = {k: float(cost.vit_piece_cost(p / k, p)) for k in range(1, limit + 1)}
    fits = [k for k in slice_cost if slice_cost[k] <= threshold]
    if fits:
        return fits[0]
    return min(slice_cost, key=lambda k: (slice_cost[k], k))


@pytest.mark.parametrize("seed", range(12))
def test_pieces_cover_frames_once_on_distinct_ranks(seed):
    rng = random.Random(seed)
    samples = random_batch(rng, rng.randint(8, 40))
    ranks = rng.choice((2, 3, 8, 16))
    share = rng.choice((0.5, 1.0, 2.0))
    kwargs = dict(num_replicas=2, num_microbatches=2, num_vit_ranks=ranks, frames_per_chunk=4)
    plan = plan_global_batch(samples, FLOPS, split_vit_items=True, split_share=share, **kwargs)
    whole = plan_global_batch(samples, FLOPS, **kwargs)
    frames = frame_tokens(samples)
    threshold = share * float(whole.chunk_cost.sum()) / ranks

    # Every sample's chunks, in order, are its media's frames, each frame's tokens exactly once.
    for s in samples:
        got = {m: [] for m in range(s.num_media)}
        for c in plan.chunks_for_sample(s.sample_id):
            toks = frames[(s.sample_id, c.media_index)]
            if c.token_start or c.token_stop != sum(toks[c.frame_start:c.frame_stop]):
                assert c.frame_stop == c.frame_start + 1  # a piece is one frame's slice
            got[c.media_index].append((c.frame_start, c.frame_stop, c.token_start, c.token_stop))
        for m, pieces in got.items():
            toks = frames[(s.sample_id, m)]
            frame, token = 0, 0
            for start, stop, t0, t1 in pieces:
                assert (start, t0) == (frame, token)
                if t1 == sum(toks[start:stop]) and t0 == 0:
                    frame, token = stop, 0
                elif t1 == toks[start]:
                    frame, token = start + 1, 0
                else:
                    token = t1
            assert (frame, token) == (len(toks), 0)
    assert int(plan.chunk_tokens.sum()) == sum(sum(t) for t in frames.values())

    # Split groups: contiguous slices, distinct ranks, k from the brute-force count.
    for g in plan.split_groups():
        k = len(g.vit_ranks)
        assert 2 <= k <= ranks and len(set(g.vit_ranks)) == k
        assert g.token_bounds[0] == 0 and g.token_bounds[-1] == g.frame_tokens
        assert all(a < b for a, b in zip(g.token_bounds, g.token_bounds[1:], strict=False))
        assert g.frame_tokens == frames[(g.sample_id, g.media_index)][g.frame]
        assert k == brute_force_pieces(g.frame_tokens, FLOPS, threshold, ranks)
        assert [plan.media_chunks[i].vit_rank for i in g.chunks] == list(g.vit_ranks)

    # Which items split: exactly the whole frames over the threshold; and each chunk's cost.
    split_frames = {(g.sample_id, g.media_index, g.frame) for g in plan.split_groups()}
    for k, c in enumerate(plan.media_chunks):
        toks = frames[(c.sample_id, c.media_index)][c.frame_start:c.frame_stop]
        p = FLOPS.patches_per_token
        if (c.sample_id, c.media_index, c.frame_start) in split_frames:
            want = FLOPS.vit_piece_cost(p * c.num_tokens, p * toks[0])
        else:
            want = float(np.sum(FLOPS.vit_cost_of_tokens(np.asarray(toks))))
            assert want <= threshold or len(toks) == 1
            if len(toks) == 1 and want > threshold:
                assert brute_force_pieces(toks[0], FLOPS, threshold, ranks) == 1
        assert plan.chunk_cost[k] == pytest.approx(want, rel=1e-12)

    # Placement: the grouped LPT written plainly.
    assert plan.chunk_vit_rank.tolist() == reference_ranks(plan.chunk_cost,
                                                           plan.chunk_split_group, ranks)
    loads = np.zeros(ranks)
    np.add.at(loads, plan.chunk_vit_rank, plan.chunk_cost)
    assert plan.vit_report.loads == pytest.approx(loads.tolist(), rel=1e-12)

    # Deterministic whatever the input order.
    rng.shuffle(samples)
    again = plan_global_batch(samples, FLOPS, split_vit_items=True, split_share=share, **kwargs)
    assert again.digest() == plan.digest()


def test_hand_made_split():
    # Image of 50 tokens (200 patches): vit = 200 + 400 + 5 = 605; four 10-token images:
    # 40 + 16 + 5 = 61 each. Total 849 over 3 ranks: fair share 283. A slice of P/k patches
    # costs (200 + 400 - 100) / k + 5 + 100 = 500 / k + 105: k = 3 gives 271.7 <= 283.
    samples = [SampleSpec(0, 1, (MediaSpec((50,)),))] + [
        SampleSpec(i, 1, (MediaSpec((10,)),)) for i in range(1, 5)]
    plan = plan_global_batch(samples, ROUND, num_replicas=1, num_microbatches=1,
                             num_vit_ranks=3, split_vit_items=True)
    (group,) = plan.split_groups()
    assert group.token_bounds == (0, 16, 33, 50)
    # Slices of 64, 68, 68 patches: s + 2s + 5 + 0.5 (200 - s) = 2.5 s + 105.
    pieces = [plan.media_chunks[i] for i in group.chunks]
    assert [plan.chunk_cost[i] for i in group.chunks] == pytest.approx([265.0, 275.0, 275.0])
    # Largest piece first (ties: token order) to ranks 0, 1, 2: pieces 1, 2, 0. Then the
    # 61-cost images, each to the least-loaded rank: 2 (265 -> 326), 0 (275 -> 336),
    # 1 (275 -> 336), 2 (326 -> 387).
    assert [c.vit_rank for c in pieces] == [2, 0, 1]
    assert [c.vit_rank for c in plan.media_chunks[3:]] == [2, 0, 1, 2]
    assert plan.vit_report.loads == pytest.approx((336.0, 336.0, 387.0))


def test_max_size_images_reach_the_lower_bound():
    samples = list(KeyeWorkload().sample(60, seed=5))
    samples += [SampleSpec(1000 + i, 30, (MediaSpec((20_480,)),)) for i in range(4)]
    kwargs = dict(num_replicas=4, num_microbatches=2, num_vit_ranks=16)
    whole = plan_global_batch(samples, FLOPS, **kwargs)
    split = plan_global_batch(samples, FLOPS, split_vit_items=True, **kwargs)
    ideal = whole.vit_report.total / 16  # the same frames, whole, perfectly spread
    assert whole.vit_report.max / ideal > 2.0  # a max-size image alone sets the phase
    assert split.vit_report.max_over_lower_bound < 1.01
    assert split.vit_report.max / ideal < 1.08  # what is left is the K/V exchange
    assert len(split.split_groups()) == 4


def test_off_by_default_and_bad_share():
    samples = [SampleSpec(0, 1, (MediaSpec((20_480,)),)), SampleSpec(1, 5, (MediaSpec((4, 4)),))]
    plan = plan_global_batch(samples, FLOPS, num_replicas=1, num_microbatches=1, num_vit_ranks=4)
    assert plan.split_groups() == ()
    assert plan.chunk_token_start.tolist() == [0, 0]
    assert plan.chunk_token_stop.tolist() == plan.chunk_tokens.tolist() == [20_480, 8]
    with pytest.raises(ValueError, match="split_share must be a finite number > 0, got 0"):
        plan_global_batch(samples, FLOPS, num_replicas=1, num_microbatches=1, num_vit_ranks=4,
                          split_vit_items=True, split_share=0)
