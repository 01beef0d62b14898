"""Synthetic Keye-like multimodal workload: ``SampleSpec``s with realistic token counts.

A sample is text-only, an image sample (1-4 images) or a video sample (one video), drawn i.i.d.
with the probabilities of ``KeyeWorkload``. Sizes are lognormal (``median * exp(sigma * N(0, 1))``)
and clipped to the bounds Keye-VL-1.5 uses:

- images: 4..20,480 LLM tokens each (28x28 pixels per token);
- videos: sampled at ``fps`` frames per second, at most ``max_frames`` frames; each frame after
  the first is *slow* with probability ``slow_frame_probability`` (a scene change: similarity to
  the last slow frame under the threshold), else *fast*. Slow frames get ``t`` tokens, fast frames
  ``max(int(fast_token_ratio * t), min_frame_tokens)``, where ``t`` is the largest value in
  ``[min_frame_tokens, native]`` whose total fits ``video_token_budget`` (the released
  ``keye-vl-utils`` search; ``native`` is the frame's own size clipped to 48..768 tokens). With
  ``max_frames = 1365`` the floor of 48 tokens per frame always fits 65,536 tokens.
- text: a prompt/answer length per sample, plus ``tokens_per_frame_marker`` text tokens per video
  frame (``<|frame|>`` and its timestamp) and two more per fast frame (``<|fast_start|>``,
  ``<|fast_end|>``), plus ``tokens_per_image_marker`` per image.

Defaults give total tokens per sample of p50 ~2K, p90 ~38K, p99 ~67K (``python -m
hetero_parallel.workload`` prints them), close to the Keye-like mix in FACTS.md (p50 ~2K, p90 ~38K,
p99 ~64K; p99 here is a video at the 65,536-token budget plus its frame markers). Everything is a
pure function of ``(config, num_samples, seed, first_id)`` (numpy ``Generator`` on PCG64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hetero_parallel.balancer import MediaSpec, SampleSpec


@dataclass(frozen=True, kw_only=True)
class KeyeWorkload:
    """Parameters of the synthetic workload (defaults: a Keye-VL-1.5-like pre-training mix)."""

    text_only_fraction: float = 0.25
    image_fraction: float = 0.45
    video_fraction: float = 0.30
    text_only_tokens_median: float = 800.0
    """Median length of a text-only sample."""
    text_only_tokens_sigma: float = 1.0
    max_text_only_tokens: int = 16_384
    prompt_tokens_median: float = 150.0
    """Median text (prompt + answer) of an image or video sample."""
    prompt_tokens_sigma: float = 1.0
    max_prompt_tokens: int = 4_096
    images_per_sample_weights: tuple[float, ...] = (0.6, 0.2, 0.1, 0.1)
    """Relative probability of 1, 2, 3, 4 ... images in an image sample."""
    image_tokens_median: float = 700.0
    image_tokens_sigma: float = 1.0
    min_image_tokens: int = 4
    max_image_tokens: int = 20_480
    tokens_per_image_marker: int = 2
    video_seconds_median: float = 45.0
    video_seconds_sigma: float = 0.6
    fps: float = 2.0
    max_frames: int = 1_365
    native_frame_tokens_median: float = 700.0
    """Median frame size at its own resolution, before the Slow-Fast budget (clipped 48..768)."""
    native_frame_tokens_sigma: float = 0.5
    min_frame_tokens: int = 48
    max_frame_tokens: int = 768
    slow_frame_probability: float = 0.3
    fast_token_ratio: float = 0.3
    video_token_budget: int = 65_536
    tokens_per_frame_marker: int = 4

    def __post_init__(self) -> None:
        fractions = (self.text_only_fraction, self.image_fraction, self.video_fraction)
        if min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-9):
            raise ValueError(
                f"text_only_fraction, image_fraction, video_fraction must be >= 0 and sum to 1, "
                f"got {fractions}"
            )
        if not self.images_per_sample_weights or min(self.images_per_sample_weights) < 0 \
                or sum(self.images_per_sample_weights) <= 0:
            raise ValueError(
                f"images_per_sample_weights must be non-negative with a positive sum, got "
                f"{self.images_per_sample_weights}"
            )
        if not 1 <= self.min_image_tokens <= self.max_image_tokens:
            raise ValueError(f"need 1 <= min_image_tokens({self.min_image_tokens}) <= "
                             f"max_image_tokens({self.max_image_tokens})")
        if not 1 <= self.min_frame_tokens <= self.max_frame_tokens:
            raise ValueError(f"need 1 <= min_frame_tokens({self.min_frame_tokens}) <= "
                             f"max_frame_tokens({self.max_frame_tokens})")
        if self.max_frames * self.min_frame_tokens > self.video_token_budget:
            raise ValueError(
                f"max_frames({self.max_frames}) * min_frame_tokens({self.min_frame_tokens}) = "
                f"{self.max_frames * self.min_frame_tokens} exceeds video_token_budget"
                f"({self.video_token_budget}): a long video could not fit"
            )
        if not 0 <= self.slow_frame_probability <= 1 or not 0 < self.fast_token_ratio <= 1:
            raise ValueError(
                f"need 0 <= slow_frame_probability({self.slow_frame_probability}) <= 1 and "
                f"0 < fast_token_ratio({self.fast_token_ratio}) <= 1"
            )
        if self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")

    def sample(self, num_samples: int, *, seed: int, first_id: int = 0) -> tuple[SampleSpec, ...]:
        """``num_samples`` samples, ids ``first_id, first_id + 1, ...``; same seed, same output."""
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        rng = np.random.default_rng(seed)
        kinds = rng.choice(3, size=num_samples, p=[self.text_only_fraction, self.image_fraction,
                                                   self.video_fraction])
        out = []
        for i, kind in enumerate(kinds.tolist()):
            sample_id = first_id + i
            if kind == 0:
                text = self._lognormal_int(rng, self.text_only_tokens_median,
                                           self.text_only_tokens_sigma, 1,
                                           self.max_text_only_tokens)
                out.append(SampleSpec(sample_id, text))
            elif kind == 1:
                out.append(self._image_sample(rng, sample_id))
            else:
                out.append(self._video_sample(rng, sample_id))
        return tuple(out)

    def _prompt(self, rng: np.random.Generator) -> int:
        return self._lognormal_int(rng, self.prompt_tokens_median, self.prompt_tokens_sigma, 1,
                                   self.max_prompt_tokens)

    def _image_sample(self, rng: np.random.Generator, sample_id: int) -> SampleSpec:
        weights = np.asarray(self.images_per_sample_weights, dtype=np.float64)
        count = 1 + int(rng.choice(len(weights), p=weights / weights.sum()))
        sizes = np.clip(
            np.rint(self.image_tokens_median * np.exp(self.image_tokens_sigma
                                                      * rng.standard_normal(count))),
            self.min_image_tokens, self.max_image_tokens,
        ).astype(np.int64)
        media = tuple(MediaSpec((int(s),)) for s in sizes)
        text = self._prompt(rng) + count * self.tokens_per_image_marker
        return SampleSpec(sample_id, text, media)

    def _video_sample(self, rng: np.random.Generator, sample_id: int) -> SampleSpec:
        seconds = self.video_seconds_median * math.exp(self.video_seconds_sigma
                                                       * rng.standard_normal())
        frames = min(max(1, round(seconds * self.fps)), self.max_frames)
        native = self._lognormal_int(rng, self.native_frame_tokens_median,
                                     self.native_frame_tokens_sigma, self.min_frame_tokens,
                                     self.max_frame_tokens)
        slow = rng.random(frames) < self.slow_frame_probability
        slow[0] = True
        n_slow = int(slow.sum())
        n_fast = frames - n_slow
        t = self._slow_frame_tokens(n_slow, n_fast, native)
        fast_tokens = self._fast_tokens(t)
        tokens = np.where(slow, t, fast_tokens)
        text = self._prompt(rng) + frames * self.tokens_per_frame_marker + 2 * n_fast
        return SampleSpec(sample_id, text, (MediaSpec(tuple(tokens.tolist())),))

    def _fast_tokens(self, slow_tokens: int) -> int:
        return max(int(self.fast_token_ratio * slow_tokens), self.min_frame_tokens)

    def _slow_frame_tokens(self, n_slow: int, n_fast: int, native: int) -> int:
        """Largest ``t`` in ``[min_frame_tokens, native]`` with the video's total within budget."""
        def total(t: int) -> int:
            return n_slow * t + n_fast * self._fast_tokens(t)

        lo, hi = self.min_frame_tokens, native
        if total(hi) <= self.video_token_budget:
            return hi
        while lo < hi:  # invariant: total(lo) fits, total(hi + 1) does not
            mid = (lo + hi + 1) // 2
            if total(mid) <= self.video_token_budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    @staticmethod
    def _lognormal_int(rng: np.random.Generator, median: float, sigma: float, lo: int,
                       hi: int) -> int:
        value = round(median * math.exp(sigma * rng.standard_normal()))
        return min(max(value, lo), hi)


def token_percentiles(samples: tuple[SampleSpec, ...],
                      percentiles: tuple[float, ...] = (50, 90, 99)) -> dict[float, float]:
    """Percentiles of total LLM tokens per sample."""
    tokens = np.fromiter((s.num_tokens for s in samples), dtype=np.int64, count=len(samples))
    return {p: float(np.percentile(tokens, p)) for p in percentiles}


if __name__ == "__main__":
    batch = KeyeWorkload().sample(20_000, seed=0)
    pct = token_percentiles(batch, (10, 25, 50, 75, 90, 95, 99))
    print("tokens per sample: " + ", ".join(f"p{p:g}={v:,.0f}" for p, v in pct.items()))
