"""Synthetic workload: determinism, Keye bounds, Slow-Fast allocation, the FACTS.md percentiles."""

from __future__ import annotations

import numpy as np
import pytest

from hetero_parallel.workload import KeyeWorkload, token_percentiles

WORKLOAD = KeyeWorkload()


@pytest.fixture(scope="module")
def batch():
    return WORKLOAD.sample(6000, seed=3)


def test_same_seed_same_samples_and_ids():
    a = WORKLOAD.sample(300, seed=11, first_id=1000)
    assert a == WORKLOAD.sample(300, seed=11, first_id=1000)
    assert a != WORKLOAD.sample(300, seed=12, first_id=1000)
    assert [s.sample_id for s in a] == list(range(1000, 1300))


def test_mix_matches_the_configured_fractions(batch):
    n = len(batch)
    text = sum(1 for s in batch if not s.media)
    multi_frame = sum(1 for s in batch if s.media and s.media[0].num_frames > 1)
    # Binomial: 5 standard deviations. Videos of one frame (<= 0.5 s) are rare enough to ignore.
    for observed, p in ((text, WORKLOAD.text_only_fraction),
                        (multi_frame, WORKLOAD.video_fraction)):
        assert abs(observed - n * p) < 5 * (n * p * (1 - p)) ** 0.5


def test_sizes_respect_keye_bounds(batch):
    for s in batch:
        frames = [m.num_frames for m in s.media]
        if frames and frames[0] > 1:  # a video sample: one video
            (video,) = s.media
            tokens = video.tokens_per_frame
            assert video.num_frames <= WORKLOAD.max_frames
            assert sum(tokens) <= WORKLOAD.video_token_budget
            slow = tokens[0]  # the first frame is always slow
            fast = max(int(WORKLOAD.fast_token_ratio * slow), WORKLOAD.min_frame_tokens)
            assert WORKLOAD.min_frame_tokens <= slow <= WORKLOAD.max_frame_tokens
            assert set(tokens) <= {slow, fast}
            n_fast = sum(1 for t in tokens if t != slow) if fast != slow else None
            if n_fast is not None:
                assert s.text_tokens >= video.num_frames * WORKLOAD.tokens_per_frame_marker + \
                    2 * n_fast + 1
        elif frames:
            assert 1 <= len(s.media) <= len(WORKLOAD.images_per_sample_weights)
            for m in s.media:
                assert WORKLOAD.min_image_tokens <= m.num_tokens <= WORKLOAD.max_image_tokens
        else:
            assert 1 <= s.text_tokens <= WORKLOAD.max_text_only_tokens


@pytest.mark.parametrize(("n_slow", "n_fast", "native"), [
    (1, 0, 768), (30, 70, 768), (200, 400, 700), (400, 965, 768), (1365, 0, 768), (50, 50, 100),
])
def test_slow_frame_tokens_is_the_largest_that_fits(n_slow, n_fast, native):
    def total(t):
        return n_slow * t + n_fast * max(int(0.3 * t), 48)

    fits = [t for t in range(48, native + 1) if total(t) <= 65_536]
    assert WORKLOAD._slow_frame_tokens(n_slow, n_fast, native) == max(fits)


def test_percentiles_match_facts(batch):
    # FACTS.md: tokens p50 ~2K, p90 ~38K, p99 ~64K on the Keye-like mix.
    pct = token_percentiles(batch)
    assert 1_500 <= pct[50] <= 3_000
    assert 30_000 <= pct[90] <= 45_000
    assert 60_000 <= pct[99] <= 72_000


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match=r"sum to 1, got \(0.5, 0.45, 0.3\)"):
        KeyeWorkload(text_only_fraction=0.5)
    with pytest.raises(ValueError, match=r"max_frames\(2000\) \* min_frame_tokens\(48\) = 96000 "
                                         r"exceeds video_token_budget\(65536\)"):
        KeyeWorkload(max_frames=2000)
    with pytest.raises(ValueError, match="num_samples must be >= 0, got -1"):
        WORKLOAD.sample(-1, seed=0)


def test_sample_lengths_add_up(batch):
    tokens = np.array([s.num_tokens for s in batch])
    rebuilt = np.array([s.text_tokens + sum(sum(m.tokens_per_frame) for m in s.media)
                        for s in batch])
    assert (tokens == rebuilt).all()
