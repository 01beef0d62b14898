"""Keye-VL-1.5 media processing as pure functions: frame sampling, `smart_resize`, Slow-Fast
classification, token budgets and the per-frame prompt layout. No decoding happens here (see
`io_server.backends`).

The released preset reproduces `keye-vl-utils` 1.5.2 (`keye_vl_utils/vision_process.py`) number for
number; tests/test_keye_processing.py checks it against that package (or its recorded outputs).
Behaviour of the released code that a reader might not expect, kept on purpose for parity:
- the number of sampled frames is `int(num_frames / source_fps * min(fps, source_fps))`, capped at
  `max_frames`, with no rounding to an even count; indices are `round(linspace(0, N-1, n))` computed
  in float32 with round-half-to-even (what `torch.linspace(...).round()` gives);
- the similarity of two frames is the fraction of similar 28x28 HSV patches among the patches that
  are not near-zero in *both* frames (two black patches are left out, not counted as similar); if
  every patch is near-zero in both (a fade to black), the fraction is 0/0 = NaN, and a frame is
  slow only when its similarity is `< threshold`, which NaN is not: such a frame is fast. The
  fraction is a float32, so a fraction exactly at the threshold (e.g. 90 of 100 patches) falls just
  below it: slow;
- timestamps are float32 (`torch.FloatTensor([(1 / fps) * i ...])` there), and the prompt prints
  them with "%.1f": at 60 fps source frame 171 is 2.8499999 s, printed "2.8" (float64 would print
  "2.9");
- the release preset's budget search returns the *smallest* per-slow-frame token count whose cost
  exceeds the budget (or the maximum when none does), so the planned total can exceed the budget by
  about one token per frame. `slow_token_cap` documents the exact rule. The paper preset does not
  copy this: it takes the largest count whose frames fit (`fitting_token_cap`);
- `video_min_tokens` (48) bounds the token *caps*; `smart_resize` floors both sides to multiples of
  28 under a cap, so a frame under a 48-token cap can get fewer tokens (e.g. 45).

One deviation: a video shorter than one sampling period yields one frame (`keye-vl-utils` yields
zero frames and then fails).

Sizes are (height, width) in pixels; one LLM token covers `factor x factor` = 28 x 28 px.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from io_server.media import PIXELS_PER_TOKEN_SIDE, FramePlan, MediaKind

FRAME_TOKEN = "<|frame|>"
FAST_START_TOKEN = "<|fast_start|>"
FAST_END_TOKEN = "<|fast_end|>"
VIDEO_PAD_TOKEN = "<|video_pad|>"


@dataclass(frozen=True, kw_only=True)
class KeyePreset:
    """Every constant of Keye-VL-1.5's image and video processing.

    Token counts are LLM tokens (one per `factor x factor` pixels).
    """

    name: str
    fps: float = 2.0
    """Target sampling rate; the effective rate is `min(fps, source_fps)`."""
    max_frames: int = 1365
    """Cap on sampled frames per video (release: int(65,536 / 48) = 1,365)."""
    video_min_tokens: int = 48
    """Floor of the slow and fast token caps (and of `smart_resize`'s minimum area)."""
    video_max_tokens: int = 768
    """Ceiling on tokens of a slow video frame."""
    video_token_budget: int = 65_536
    """Total token budget of one video that the slow-frame binary search targets."""
    fast_token_ratio: float = 0.3
    """A fast frame gets this fraction of the realised slow-frame tokens (floor: the minimum)."""
    similarity_threshold: float = 0.9
    """A frame is fast when its similarity to the latest slow frame is at least this."""
    similarity_max_tokens: int = 256
    """Frames are downscaled to at most this many tokens before the similarity test."""
    patch_cosine_threshold: float = 0.7
    """Two 28x28 HSV patches are similar when their cosine exceeds this."""
    image_min_tokens: int = 4
    image_max_tokens: int = 20_480
    factor: int = PIXELS_PER_TOKEN_SIDE
    """Side of one token in pixels; every resized side is a multiple of it."""
    max_aspect_ratio: float = 200.0
    """`smart_resize` rejects media whose long side exceeds this multiple of the short side."""
    budget_search: str = "keye-vl-utils"
    """How the per-slow-frame token cap is chosen: "keye-vl-utils" (its binary search, which can
    settle one step over the budget: `slow_token_cap`) or "largest-fit" (the largest cap whose
    frames, at their real sizes, fit in the budget: `fitting_token_cap`)."""

    def __post_init__(self) -> None:
        if self.budget_search not in BUDGET_SEARCHES:
            raise ValueError(f"preset {self.name!r}: budget_search {self.budget_search!r} is not "
                             f"one of {list(BUDGET_SEARCHES)}")
        if not self.fps > 0:
            raise ValueError(f"preset {self.name!r}: fps({self.fps}) must be > 0")
        if self.max_frames < 1:
            raise ValueError(f"preset {self.name!r}: max_frames({self.max_frames}) must be >= 1")
        if not 1 <= self.video_min_tokens <= self.video_max_tokens:
            raise ValueError(
                f"preset {self.name!r}: need 1 <= video_min_tokens({self.video_min_tokens}) "
                f"<= video_max_tokens({self.video_max_tokens})"
            )
        if not 1 <= self.image_min_tokens <= self.image_max_tokens:
            raise ValueError(
                f"preset {self.name!r}: need 1 <= image_min_tokens({self.image_min_tokens}) "
                f"<= image_max_tokens({self.image_max_tokens})"
            )
        if self.video_token_budget < self.video_min_tokens:
            raise ValueError(
                f"preset {self.name!r}: video_token_budget({self.video_token_budget}) < "
                f"video_min_tokens({self.video_min_tokens})"
            )
        if not 0.0 < self.fast_token_ratio <= 1.0:
            raise ValueError(
                f"preset {self.name!r}: fast_token_ratio({self.fast_token_ratio}) not in (0, 1]"
            )
        if self.similarity_max_tokens < 1 or self.factor < 1:
            raise ValueError(
                f"preset {self.name!r}: similarity_max_tokens({self.similarity_max_tokens}) and "
                f"factor({self.factor}) must be >= 1"
            )

    @property
    def token_pixels(self) -> int:
        """Pixels covered by one token (28 * 28 = 784)."""
        return self.factor * self.factor


BUDGET_SEARCHES = ("keye-vl-utils", "largest-fit")
"""Allowed values of `KeyePreset.budget_search`."""

RELEASE_PRESET = KeyePreset(name="release")
"""`keye-vl-utils` 1.5.2: similarity threshold 0.9, budget 65,536 tokens per video."""

PAPER_PRESET = KeyePreset(name="paper", similarity_threshold=0.95, video_token_budget=75_000,
                          budget_search="largest-fit")
"""Keye-VL-1.5 technical report (arXiv 2509.01563): similarity 95%, budget 75,000 tokens, and its
"search for the per-slow-frame token count under a total budget" taken at its word: the largest
count whose frames fit, never over the budget (`fitting_token_cap`). Every other constant as
released (the frame cap stays 1,365 rather than int(75,000 / 48))."""

DEFAULT_PRESET = RELEASE_PRESET
"""The released code's preset: it is what the released Keye-VL-1.5 checkpoints were used with, so
training data processed with it matches what the model sees at inference."""

PRESETS: dict[str, KeyePreset] = {p.name: p for p in (RELEASE_PRESET, PAPER_PRESET)}


def get_preset(name: str) -> KeyePreset:
    """The preset called `name` ("release" or "paper")."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown Keye preset {name!r}; known: {sorted(PRESETS)}") from None


# --------------------------------------------------------------------------------------------
# smart_resize


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = PIXELS_PER_TOKEN_SIDE,
    min_pixels: int | float,
    max_pixels: int | float,
    max_aspect_ratio: float = 200.0,
) -> tuple[int, int]:
    """Resized (height, width): both multiples of `factor`, aspect ratio kept as well as possible.

    Rounds each side to the nearest multiple of `factor` (half to even); if that area exceeds
    `max_pixels`, scales both sides down by `sqrt(area / max_pixels)` and floors to multiples of
    `factor`; if it is below `min_pixels`, scales up and ceils. Sides are at least `factor`.

    Guarantees (for inputs within `max_aspect_ratio`): `h % factor == w % factor == 0`; `h * w <=
    max_pixels` whenever `max_pixels >= factor**2`; `h * w >= min_pixels` when the result was scaled
    up (the down-scaled branch wins when both bounds cannot hold).

    Raises:
        ValueError: a side is not positive, or the aspect ratio exceeds `max_aspect_ratio`.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"height({height}) and width({width}) must be positive")
    if max(height, width) / min(height, width) > max_aspect_ratio:
        raise ValueError(
            f"aspect ratio {max(height, width) / min(height, width):.1f} of {height}x{width} "
            f"exceeds {max_aspect_ratio}"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return max(h_bar, factor), max(w_bar, factor)


def image_size(height: int, width: int, preset: KeyePreset = DEFAULT_PRESET) -> tuple[int, int]:
    """Resized (height, width) of an image: `image_min_tokens..image_max_tokens` tokens."""
    px = preset.token_pixels
    return smart_resize(
        height, width, factor=preset.factor, min_pixels=preset.image_min_tokens * px,
        max_pixels=preset.image_max_tokens * px, max_aspect_ratio=preset.max_aspect_ratio,
    )


def similarity_size(
    height: int, width: int, preset: KeyePreset = DEFAULT_PRESET
) -> tuple[int, int]:
    """(height, width) at which frames are compared for Slow-Fast: at most
    `similarity_max_tokens` tokens (the video minimum applies as the lower bound)."""
    px = preset.token_pixels
    return smart_resize(
        height, width, factor=preset.factor, min_pixels=preset.video_min_tokens * px,
        max_pixels=preset.similarity_max_tokens * px, max_aspect_ratio=preset.max_aspect_ratio,
    )


# --------------------------------------------------------------------------------------------
# Frame sampling


def num_sampled_frames(
    num_frames: int, source_fps: float, preset: KeyePreset = DEFAULT_PRESET
) -> int:
    """How many frames are sampled: `int(num_frames / source_fps * min(fps, source_fps))` capped
    at `preset.max_frames`, and at least 1 for a non-empty video."""
    if num_frames < 0:
        raise ValueError(f"num_frames({num_frames}) must be >= 0")
    if not source_fps > 0:
        raise ValueError(f"source_fps({source_fps}) must be > 0")
    if num_frames == 0:
        return 0
    fps = min(preset.fps, source_fps)
    n = min(int(num_frames / source_fps * fps), preset.max_frames)
    return max(n, 1)


def linspace_round(stop: int, n: int) -> np.ndarray:
    """`torch.linspace(0, stop, n).round().long()` without torch: float32, round half to even.

    torch's CPU kernel computes element `i` as `step * i + 0` for `i < n // 2` and
    `stop - step * (n - 1 - i)` above, with `step = float32(stop / (n - 1))`, each a fused
    multiply-add (one rounding to float32). Here the multiply-add is exact in float64 (a 24-bit
    step times an index below 2^24, plus an integer below 2^24) and then rounded once to float32,
    which reproduces it bit for bit (tests/test_keye_processing.py checks it against torch).
    """
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    if not 0 <= stop < 1 << 24:
        raise ValueError(f"stop({stop}) must be in [0, 2^24)")
    step = np.float64(np.float32(np.float32(stop) / np.float32(n - 1)))
    i = np.arange(n, dtype=np.float64)
    half = n // 2
    values = np.where(i < half, step * i, np.float64(stop) - step * (n - 1 - i))
    return np.rint(values.astype(np.float32)).astype(np.int64)


def sample_frame_indices(
    num_frames: int, source_fps: float, preset: KeyePreset = DEFAULT_PRESET
) -> tuple[int, ...]:
    """Indices (into the source stream, ascending, first = 0, last = num_frames - 1) of the
    sampled frames: `num_sampled_frames` of them spread uniformly."""
    n = num_sampled_frames(num_frames, source_fps, preset)
    return tuple(int(i) for i in linspace_round(num_frames - 1, n))


def frame_timestamps(frame_indices: Sequence[int], source_fps: float) -> tuple[float, ...]:
    """Timestamp in seconds of each sampled frame: `(1 / source_fps) * index` computed in float64
    and rounded to float32, as `keye-vl-utils` does (a constant frame rate; its timestamps are a
    `torch.FloatTensor`). The values are float32 numbers held in Python floats, so "%.1f" prints
    what Keye's prompt prints (see `format_timestamp`)."""
    step = 1.0 / source_fps
    stamps = np.asarray([step * i for i in frame_indices], dtype=np.float64).astype(np.float32)
    return tuple(float(t) for t in stamps)


def format_timestamp(seconds: float) -> str:
    """A frame's timestamp as the prompt prints it: "%.1f" of the float32 value."""
    return f"{float(np.float32(seconds)):.1f}"


# --------------------------------------------------------------------------------------------
# Slow-Fast classification

_HSV_SHIFT = 12
_SDIV = np.array([0] + [round((255 << _HSV_SHIFT) / i) for i in range(1, 256)], dtype=np.int32)
_HDIV180 = np.array([0] + [round((180 << _HSV_SHIFT) / (6.0 * i)) for i in range(1, 256)],
                    dtype=np.int32)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) -> uint8 HSV with H in [0, 180), S and V in [0, 255].

    The integer arithmetic of OpenCV's `cvtColor(..., COLOR_RGB2HSV)` for 8-bit images
    (12-bit fixed-point reciprocal tables, round half up), so results match it exactly (checked
    on all 2^24 colours in tests/test_keye_processing.py).
    """
    if rgb.dtype != np.uint8 or rgb.shape[-1] != 3:
        raise ValueError(f"expected uint8 (..., 3) RGB, got {rgb.dtype} {rgb.shape}")
    r8, g8, b8 = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v8 = np.maximum(np.maximum(r8, g8), b8)
    diff = (v8 - np.minimum(np.minimum(r8, g8), b8)).astype(np.int32)
    r, g, b = r8.astype(np.int32), g8.astype(np.int32), b8.astype(np.int32)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * np.take(_SDIV, v8) + half) >> _HSV_SHIFT
    h = np.where(v8 == r8, g - b, np.where(v8 == g8, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * np.take(_HDIV180, diff) + half) >> _HSV_SHIFT
    h += np.where(h < 0, 180, 0).astype(np.int32)
    out = np.empty(rgb.shape, dtype=np.uint8)
    out[..., 0] = h
    out[..., 1] = s
    out[..., 2] = v8
    return out


@dataclass(frozen=True)
class PatchVectors:
    """A frame's `patch x patch` HSV patches as unit vectors (float32), for `frame_similarity`."""

    unit: np.ndarray
    """(num_patches, 3 * patch * patch) patch vectors divided by (norm + 1e-8)."""
    near_zero: np.ndarray
    """(num_patches,) bool: the patch's norm (+ 1e-8) is below 0.01 (an all-black patch)."""
    grid: tuple[int, int]


def patch_vectors(hsv: np.ndarray, patch: int = PIXELS_PER_TOKEN_SIDE) -> PatchVectors:
    """Cut an (H, W, C) frame (H, W multiples of `patch`) into flattened, normalised patches."""
    if hsv.ndim != 3:
        raise ValueError(f"expected an (H, W, C) frame, got shape {hsv.shape}")
    height, width, ch = hsv.shape
    if height % patch or width % patch:
        raise ValueError(f"frame {height}x{width} is not a multiple of patch {patch}")
    gh, gw = height // patch, width // patch
    p = hsv.astype(np.float32).reshape(gh, patch, gw, patch, ch)
    p = p.transpose(0, 2, 4, 1, 3).reshape(gh * gw, ch * patch * patch)
    norm = np.sqrt(np.einsum("ij,ij->i", p, p, dtype=np.float32)) + np.float32(1e-8)
    return PatchVectors(unit=p / norm[:, None], near_zero=norm < 0.01, grid=(gh, gw))


def patch_similarity(a: PatchVectors, b: PatchVectors, cosine_threshold: float = 0.7) -> float:
    """`frame_similarity` of two frames already cut by `patch_vectors` (NaN when every patch is
    near-zero in both)."""
    if a.grid != b.grid:
        raise ValueError(f"patch grids differ: {a.grid} vs {b.grid}")
    cos = np.einsum("ij,ij->i", a.unit, b.unit, dtype=np.float32)
    keep = ~(a.near_zero & b.near_zero)
    n = int(np.count_nonzero(keep))
    if n == 0:
        return math.nan  # keye-vl-utils: the mean of no patches
    similar = int(np.count_nonzero(cos[keep] > cosine_threshold))
    # float32 like keye-vl-utils' torch mean: 9/10 gives 0.8999999762, below a 0.9 threshold.
    return float(np.float32(similar) / np.float32(n))


def frame_similarity(
    a_hsv: np.ndarray, b_hsv: np.ndarray, *, patch: int = PIXELS_PER_TOKEN_SIDE,
    cosine_threshold: float = 0.7,
) -> float:
    """Fraction of `patch x patch` patches whose HSV vectors have cosine > `cosine_threshold`.

    Both inputs are (H, W, 3) HSV arrays of the same shape, H and W multiples of `patch`. Patches
    whose vectors are near zero (norm < 0.01) in both frames are left out; if all are (two black
    frames), returns NaN, as `keye-vl-utils` does (`is_fast_frame` then calls the frame fast).
    Computed in float32 with the same epsilon (1e-8 added to norms) as `keye-vl-utils`, and the
    fraction is rounded to float32 as there: a fraction of exactly 0.9 returns 0.8999999762, so
    it counts as *below* a 0.9 threshold (likewise 0.95).
    """
    if a_hsv.shape != b_hsv.shape:
        raise ValueError(f"frames differ in shape: {a_hsv.shape} vs {b_hsv.shape}")
    return patch_similarity(patch_vectors(a_hsv, patch), patch_vectors(b_hsv, patch),
                            cosine_threshold)


def is_fast_frame(similarity: float, threshold: float) -> bool:
    """Keye's rule: a frame is slow when its similarity to the latest slow frame is below the
    threshold, else fast; a NaN similarity (two black frames) is not below it: fast."""
    return not similarity < threshold


def slow_fast_trace(
    lowres_frames: Sequence[np.ndarray], preset: KeyePreset = DEFAULT_PRESET
) -> tuple[tuple[bool, ...], tuple[float, ...]]:
    """(is_fast, similarity) per frame. Frame 0 is slow (similarity reported as 1.0); each later
    frame is compared with the latest slow frame (`is_fast_frame`).

    `lowres_frames` are uint8 RGB arrays already at `similarity_size` (all the same shape).
    """
    if not lowres_frames:
        return (), ()
    is_fast = [False]
    sims = [1.0]
    key = patch_vectors(rgb_to_hsv(lowres_frames[0]), preset.factor)
    for frame in lowres_frames[1:]:
        vectors = patch_vectors(rgb_to_hsv(frame), preset.factor)
        sim = patch_similarity(key, vectors, preset.patch_cosine_threshold)
        sims.append(sim)
        fast = is_fast_frame(sim, preset.similarity_threshold)
        is_fast.append(fast)
        if not fast:
            key = vectors
    return tuple(is_fast), tuple(sims)


def classify_slow_fast(
    lowres_frames: Sequence[np.ndarray], preset: KeyePreset = DEFAULT_PRESET
) -> tuple[bool, ...]:
    """`is_fast` per sampled frame (see `slow_fast_trace`)."""
    return slow_fast_trace(lowres_frames, preset)[0]


# --------------------------------------------------------------------------------------------
# Token budget


def fast_tokens(slow_tokens: int | float, preset: KeyePreset = DEFAULT_PRESET) -> int:
    """Token cap of a fast frame given a slow frame's tokens: `max(int(ratio * t), min)`."""
    return max(int(preset.fast_token_ratio * slow_tokens), preset.video_min_tokens)


def video_cost(tokens_per_slow: int, n_slow: int, n_fast: int,
               preset: KeyePreset = DEFAULT_PRESET) -> int:
    """Estimated tokens of a video: `n_slow * t + n_fast * fast_tokens(t)`."""
    return n_slow * tokens_per_slow + n_fast * fast_tokens(tokens_per_slow, preset)


def slow_token_cap(n_slow: int, n_fast: int, preset: KeyePreset = DEFAULT_PRESET) -> int:
    """Per-slow-frame token cap of `keye-vl-utils`' binary search over `[video_min_tokens,
    video_max_tokens]` (the release preset's rule).

    Exact rule (that of `keye-vl-utils` 1.5.2): the smallest `t` in `[min, max)` with
    `video_cost(t) > video_token_budget`, or `max` when no such `t` exists. `video_cost` is
    non-decreasing in `t`, so the binary search finds it in O(log(max - min)) steps. The result is
    one step *over* the budget whenever the budget binds (e.g. 104 slow frames: 722 tokens, 75,088
    of 75,000); `fitting_token_cap` is the rule that never is.
    """
    lo, hi = preset.video_min_tokens, preset.video_max_tokens
    while lo < hi:
        mid = (lo + hi) // 2
        if video_cost(mid, n_slow, n_fast, preset) > preset.video_token_budget:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass(frozen=True)
class VideoSizes:
    """Resized sizes of a video's frames: one for slow frames, one for fast frames."""

    slow_token_cap: int
    slow: tuple[int, int]
    """(height, width) of slow frames."""
    fast: tuple[int, int]
    """(height, width) of fast frames."""

    def total_tokens(self, n_slow: int, n_fast: int, factor: int = PIXELS_PER_TOKEN_SIDE) -> int:
        """LLM tokens of `n_slow` slow and `n_fast` fast frames at these sizes."""
        side2 = factor * factor
        return (n_slow * (self.slow[0] * self.slow[1] // side2)
                + n_fast * (self.fast[0] * self.fast[1] // side2))


def sizes_for_cap(height: int, width: int, cap: int,
                  preset: KeyePreset = DEFAULT_PRESET) -> VideoSizes:
    """Slow and fast sizes of a `height x width` video under a per-slow-frame cap of `cap` tokens.

    Slow frames: `smart_resize` with at most `cap` tokens; fast frames: at most
    `max(int(realised slow tokens * fast_token_ratio), video_min_tokens)` tokens; both at least
    `video_min_tokens` (`smart_resize`'s lower bound).
    """
    px = preset.token_pixels
    min_pixels = preset.video_min_tokens * px
    slow = smart_resize(height, width, factor=preset.factor, min_pixels=min_pixels,
                        max_pixels=cap * px, max_aspect_ratio=preset.max_aspect_ratio)
    realised = slow[0] * slow[1] / px
    fast_max = max(int(realised * preset.fast_token_ratio) * px, min_pixels)
    fast = smart_resize(height, width, factor=preset.factor, min_pixels=min_pixels,
                        max_pixels=fast_max, max_aspect_ratio=preset.max_aspect_ratio)
    return VideoSizes(slow_token_cap=cap, slow=slow, fast=fast)


def _smart_resize_caps(height: int, width: int, factor: int, min_pixels: int,
                      max_pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`smart_resize` of one size under many `max_pixels` at once (same float64 operations in
    the same order, so the same results bit for bit; the aspect ratio is checked by the caller)."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    beta = np.sqrt((height * width) / max_pixels)
    h_down = np.floor(height / beta / factor) * factor
    w_down = np.floor(width / beta / factor) * factor
    shrink = h_bar * w_bar > max_pixels  # the rounded size is over the cap: scale down
    if h_bar * w_bar < min_pixels:  # under the floor (where not over the cap): scale up
        up = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * up / factor) * factor
        w_bar = math.ceil(width * up / factor) * factor
    hs = np.where(shrink, h_down, h_bar).astype(np.int64)
    ws = np.where(shrink, w_down, w_bar).astype(np.int64)
    return np.maximum(hs, factor), np.maximum(ws, factor)


def fitting_token_cap(height: int, width: int, n_slow: int, n_fast: int,
                      preset: KeyePreset = PAPER_PRESET) -> int:
    """The largest per-slow-frame cap `t` in `[video_min_tokens, video_max_tokens]` whose frames,
    at the sizes `sizes_for_cap` gives them, total at most `video_token_budget` tokens.

    The real sizes decide, not the `video_cost` estimate: a cap whose estimate is over the budget
    still fits when `smart_resize` rounds the frames below it. The real total is not monotone in
    `t` when a side is below 28 px (the 28-px floor can lift a frame above its cap), so instead of
    a bisection every cap is evaluated, vectorised (721 caps, about 0.1 ms).

    Raises:
        ValueError: not even `video_min_tokens` fits (possible only far beyond the presets'
            frame cap, or for sides below 28 px); the message names every number.
    """
    if max(height, width) / min(height, width) > preset.max_aspect_ratio:
        smart_resize(height, width, min_pixels=1, max_pixels=1,
                     max_aspect_ratio=preset.max_aspect_ratio)  # raises, naming the ratio
    px, factor = preset.token_pixels, preset.factor
    min_pixels = preset.video_min_tokens * px
    caps = np.arange(preset.video_max_tokens, preset.video_min_tokens - 1, -1, dtype=np.int64)
    sh, sw = _smart_resize_caps(height, width, factor, min_pixels, caps * px)
    slow_tokens = sh * sw // px
    fast_max = np.maximum((slow_tokens.astype(np.float64) * preset.fast_token_ratio)
                          .astype(np.int64) * px, min_pixels)
    fh, fw = _smart_resize_caps(height, width, factor, min_pixels, fast_max)
    totals = n_slow * slow_tokens + n_fast * (fh * fw // px)
    fits = np.flatnonzero(totals <= preset.video_token_budget)
    if fits.size:
        return int(caps[fits[0]])
    low = sizes_for_cap(height, width, preset.video_min_tokens, preset)
    raise ValueError(
        f"preset {preset.name!r}: {n_slow} slow + {n_fast} fast frames of {height}x{width} need "
        f"{low.total_tokens(n_slow, n_fast, preset.factor)} tokens at the smallest cap "
        f"({preset.video_min_tokens} tokens per slow frame: {low.slow[0]}x{low.slow[1]} slow, "
        f"{low.fast[0]}x{low.fast[1]} fast), over the budget of {preset.video_token_budget}")


def video_frame_sizes(height: int, width: int, n_slow: int, n_fast: int,
                      preset: KeyePreset = DEFAULT_PRESET) -> VideoSizes:
    """Slow and fast frame sizes of a `height x width` video with `n_slow`/`n_fast` frames.

    The per-slow-frame cap comes from the preset's `budget_search` (`slow_token_cap` for
    "keye-vl-utils", `fitting_token_cap` for "largest-fit"); sizes follow `sizes_for_cap`.
    """
    if preset.budget_search == "largest-fit":
        cap = fitting_token_cap(height, width, n_slow, n_fast, preset)
    else:
        cap = slow_token_cap(n_slow, n_fast, preset)
    return sizes_for_cap(height, width, cap, preset)


def allocate_frame_sizes(
    height: int, width: int, is_fast: Sequence[bool], preset: KeyePreset = DEFAULT_PRESET
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(heights, widths) of every sampled frame, given the Slow-Fast classification."""
    n_fast = sum(bool(f) for f in is_fast)
    sizes = video_frame_sizes(height, width, len(is_fast) - n_fast, n_fast, preset)
    hw = [sizes.fast if f else sizes.slow for f in is_fast]
    return tuple(h for h, _ in hw), tuple(w for _, w in hw)


# --------------------------------------------------------------------------------------------
# Plans


def image_plan(
    path: str, width: int, height: int, preset: KeyePreset = DEFAULT_PRESET
) -> FramePlan:
    """The plan of an image: one slow frame at `image_size`."""
    h, w = image_size(height, width, preset)
    return FramePlan(
        path=path, kind=MediaKind.IMAGE, source_width=width, source_height=height,
        source_fps=0.0, duration_s=0.0, num_source_frames=1, frame_indices=(0,),
        timestamps=(0.0,), is_fast=(False,), heights=(h,), widths=(w,),
    )


def video_plan(
    path: str, *, width: int, height: int, source_fps: float, num_source_frames: int,
    duration_s: float, frame_indices: Sequence[int], is_fast: Sequence[bool],
    preset: KeyePreset = DEFAULT_PRESET,
) -> FramePlan:
    """The plan of a video from its metadata, sampled indices and Slow-Fast classification."""
    if len(frame_indices) != len(is_fast):
        raise ValueError(f"{len(frame_indices)} frame indices but {len(is_fast)} is_fast flags")
    heights, widths = allocate_frame_sizes(height, width, is_fast, preset)
    return FramePlan(
        path=path, kind=MediaKind.VIDEO, source_width=width, source_height=height,
        source_fps=float(source_fps), duration_s=float(duration_s),
        num_source_frames=num_source_frames, frame_indices=tuple(int(i) for i in frame_indices),
        timestamps=frame_timestamps(frame_indices, source_fps),
        is_fast=tuple(bool(f) for f in is_fast), heights=heights, widths=widths,
    )


# --------------------------------------------------------------------------------------------
# Prompt layout


@dataclass(frozen=True)
class FramePrompt:
    """The special-token layout of one video frame in the LLM prompt."""

    timestamp: str
    """Absolute timestamp, formatted "%.1f" (seconds) from its float32 value."""
    is_fast: bool
    num_pad_tokens: int
    """Number of `<|video_pad|>` tokens: the frame's LLM tokens (h * w / 28^2)."""

    def pieces(self) -> list[str]:
        """The frame's prompt as a list of strings, e.g. for a fast frame:
        `["<|frame|>", "1.5", "<|fast_start|>", "<|video_pad|>" * n, "<|fast_end|>"]`."""
        out = [FRAME_TOKEN, self.timestamp]
        if self.is_fast:
            out.append(FAST_START_TOKEN)
        out.append(VIDEO_PAD_TOKEN * self.num_pad_tokens)
        if self.is_fast:
            out.append(FAST_END_TOKEN)
        return out


def video_prompt_tokens(plan: FramePlan) -> tuple[FramePrompt, ...]:
    """Per-frame prompt layout of a video plan: `<|frame|>`, the timestamp, then the frame's
    `<|video_pad|>` tokens, wrapped in `<|fast_start|>` / `<|fast_end|>` on fast frames.

    The tokenizer lives elsewhere; `"".join(p for f in layout for p in f.pieces())` is the text.
    """
    return tuple(
        FramePrompt(timestamp=format_timestamp(ts), is_fast=fast, num_pad_tokens=tok)
        for ts, fast, tok in zip(plan.timestamps, plan.is_fast, plan.tokens, strict=True)
    )
