"""The two pixel paths: how a decoded frame becomes the uint8 frame the model sees.

One job: resize decoded FFmpeg frames to their planned sizes (and to the small Slow-Fast
comparison size), in one of two modes.

- "exact" (the default) does what Keye's released processor does (read from its code:
  `processing_keye_vl_1_5.py` and `keye_vl_utils/vision_process.py` 1.5.2). Video frames are
  decoded to RGB at the source size, then resized by
  `torch.nn.functional.interpolate(uint8 (N, 3, H, W), size, mode="bilinear", antialias=True)`.
  The input is uint8, so the output is uint8 with torch's own rounding; Keye only calls
  `.float()` on the result. Slow frames, fast frames and the Slow-Fast comparison thumbnails are
  all made this way. Images follow `keye_vl_utils.fetch_image`:
  `PIL.Image.resize((w, h))`, whose default filter is bicubic. `pil_bicubic_resize` computes
  Pillow's fixed-point algorithm in numpy, so Pillow is not needed. The issue describes the
  processor as "torch bilinear with antialias"; the code agrees for video frames and thumbnails.
  The processor also has an optional fused C++ operator (`keye_vl_utils.BicubicVideoProcessor`,
  `ENABLE_FUSION_PROCESSOR_OP=1`) that resizes video frames bicubically. It is only used where
  that extension is built, so the Python path is the reference here. RGB comes from FFmpeg's
  converter at the source size (`VideoFrame.to_ndarray(format="rgb24")`), which is the reference
  the tests use. Keye decodes with decord, another FFmpeg front end.
- "fast" is FFmpeg's scaler (swscale), the pre-exact behaviour kept as a faster option: bicubic for
  frames, bilinear for thumbnails. For 8-bit 4:2:0 video it scales the Y, U and V planes, and the
  RGB frame is FFmpeg's conversion of those planes (`yuv.yuv420_to_rgb`). So the YUV wire format
  carries exactly the planes the RGB answer was made from. Other pixel formats (RGB PNGs, 4:4:4,
  10-bit) are scaled straight to RGB.

Both modes give frames of the planned sizes, so plans (sizes, tokens) agree. Slow/fast types can
differ where a similarity lies near the threshold, because the thumbnails differ.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from io_server import yuv
from io_server.media import Yuv420Frame

if TYPE_CHECKING:
    import av

RESIZE_MODES = ("exact", "fast")
"""Names of the pixel paths; "exact" is the default everywhere."""
DEFAULT_RESIZE = "exact"

FAST_FRAME_INTERPOLATION = "BICUBIC"
"""FFmpeg (swscale) filter of the fast path's frames."""
FAST_THUMBNAIL_INTERPOLATION = "BILINEAR"
"""FFmpeg (swscale) filter of the fast path's Slow-Fast thumbnails."""


def check_mode(mode: str) -> str:
    """`mode` if it names a pixel path, else ValueError naming the choices."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r} is not one of {list(RESIZE_MODES)}")
    return mode


# ---------------------------------------------------------------------------------------------
# Exact: torch (video) and Pillow's algorithm (images)


def source_rgb(frame: av.VideoFrame, threads: int = 1) -> np.ndarray:
    """The frame as (H, W, 3) uint8 RGB at its source size (FFmpeg's converter)."""
    return frame.to_ndarray(format="rgb24", threads=threads)


def torch_bilinear_aa(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`interpolate(uint8, size, mode="bilinear", antialias=True)` of an (H, W, 3) uint8 array,
    as Keye's processor calls it; returns a C-contiguous (h, w, 3) uint8 array."""
    import torch

    x = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)
    y = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True)
    return np.ascontiguousarray(y[0].permute(1, 2, 0).numpy())


def _pil_bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel (a = -0.5), evaluated in the same order as Pillow."""
    a = -0.5
    x = np.abs(x)
    inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    outer = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


_PIL_PRECISION_BITS = 32 - 8 - 2


def _pil_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(first input index (out,), int64 fixed-point weights (out, k)) of one Pillow pass."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    ss = 1.0 / filterscale
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - xmin
    taps = np.arange(ksize)
    weights = _pil_bicubic((taps[None, :] + xmin[:, None] - center[:, None] + 0.5) * ss)
    weights = np.where(taps[None, :] < count[:, None], weights, 0.0)
    total = np.zeros(out_size)
    for j in range(ksize):  # summed in order, as Pillow does (pairwise sums round differently)
        total = total + weights[:, j]
    weights = weights / np.where(total == 0.0, 1.0, total)[:, None]
    fixed = weights * float(1 << _PIL_PRECISION_BITS)
    fixed = np.where(weights < 0, np.trunc(fixed - 0.5), np.trunc(fixed + 0.5))
    return xmin, fixed.astype(np.int64)


_PIL_BLOCK_VALUES = 1 << 20
"""int32 values per work block of a Pillow pass (4 MiB buffers, whatever the image size)."""


def _pil_pass(src: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One Pillow pass along `axis` of an (H, W, 3) uint8 array, in int32 like Pillow's `int`
    accumulators (its 22-bit precision leaves them room: no partial sum overflows). Works in
    blocks of the other axis, so its memory stays small for large images."""
    rows = src if axis == 0 else src.transpose(1, 0, 2)  # the pass runs along axis 0 of `rows`
    in_size, across = rows.shape[0], rows.shape[1]
    xmin, kk = _pil_coefficients(in_size, out_size)
    kk32 = kk.astype(np.int32)
    taps = [(np.minimum(xmin + j, in_size - 1), kk32[:, j][:, None, None])
            for j in range(kk.shape[1]) if kk32[:, j].any()]
    out = np.empty((out_size, across, 3), dtype=np.uint8)
    block = max(1, _PIL_BLOCK_VALUES // (3 * out_size))
    for lo in range(0, across, block):
        part = np.ascontiguousarray(rows[:, lo:lo + block])
        acc = np.full((out_size, part.shape[1], 3), 1 << (_PIL_PRECISION_BITS - 1),
                      dtype=np.int32)
        tap = np.empty_like(acc)
        for index, weights in taps:
            np.multiply(part[index], weights, out=tap)
            acc += tap
        np.right_shift(acc, _PIL_PRECISION_BITS, out=acc)
        np.clip(acc, 0, 255, out=acc)
        out[:, lo:lo + block] = acc
    return out if axis == 0 else np.ascontiguousarray(out.transpose(1, 0, 2))


def pil_bicubic_resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`PIL.Image.fromarray(rgb).resize((w, h))` (bicubic, the default filter) in numpy.

    Pillow's separable fixed-point resampler: 22 fractional bits, each pass rounded and clipped to
    8 bits, a pass skipped when its side does not change. Like Pillow 12 and later, it runs the
    vertical pass first when the height shrinks by more than twice as many pixels as the width
    (`H - h > 2 (W - w)`), else the horizontal pass first. Pillow 11 and older always ran the
    horizontal pass first; the order changes the rounding of the intermediate image, so older
    Pillows differ by a few levels on such resizes. `size` is (h, w); returns a C-contiguous
    (h, w, 3) uint8 array, equal to Pillow 13.0's output (tests/test_keye_pixels.py).
    """
    h, w = size
    in_h, in_w = rgb.shape[:2]
    vertical_first = in_h - h > 0 and in_h - h > 2 * (in_w - w)
    out = rgb
    for axis in ((0, 1) if vertical_first else (1, 0)):
        target = h if axis == 0 else w
        if target != rgb.shape[axis]:
            out = _pil_pass(out, target, axis=axis)
    return np.ascontiguousarray(out) if out is not rgb else rgb.copy()


# ---------------------------------------------------------------------------------------------
# Fast: FFmpeg's scaler


def is_planar_420(frame: av.VideoFrame) -> bool:
    """Whether the decoded frame is 8-bit 4:2:0 planes (what the fast path scales as YUV)."""
    return frame.format.name in yuv.PLANAR_420


def fast_yuv(frame: av.VideoFrame, size: tuple[int, int], threads: int = 1) -> tuple[
        av.VideoFrame, Yuv420Frame]:
    """A 4:2:0 frame's planes scaled to `size` (h, w, both even) by swscale's bicubic filter,
    as (the scaled FFmpeg frame, its planes)."""
    h, w = size
    scaled = frame.reformat(width=w, height=h, format=frame.format.name,
                            interpolation=FAST_FRAME_INTERPOLATION, threads=threads)
    planes = yuv.from_av(scaled, yuv.matrix_of(frame.colorspace),
                         yuv.is_full_range(frame.color_range, frame.format.name))
    return scaled, planes


def fast_rgb(frame: av.VideoFrame, size: tuple[int, int], threads: int = 1) -> np.ndarray:
    """The fast path's RGB frame at `size`: FFmpeg's conversion of the scaled 4:2:0 planes, or
    swscale's bicubic scaling straight to RGB for other pixel formats."""
    h, w = size
    if is_planar_420(frame) and h % 2 == 0 and w % 2 == 0:
        return yuv.yuv420_to_rgb(fast_yuv(frame, size, threads)[1])
    return np.ascontiguousarray(frame.to_ndarray(
        width=w, height=h, format="rgb24", interpolation=FAST_FRAME_INTERPOLATION,
        threads=threads))


# ---------------------------------------------------------------------------------------------
# What the backends call


def thumbnail(frame: av.VideoFrame, size: tuple[int, int], mode: str,
              threads: int = 1) -> np.ndarray:
    """The (h, w, 3) uint8 RGB frame the Slow-Fast comparison uses."""
    if mode == "exact":
        return torch_bilinear_aa(source_rgb(frame, threads), size)
    h, w = size
    return frame.to_ndarray(width=w, height=h, format="rgb24",
                            interpolation=FAST_THUMBNAIL_INTERPOLATION, threads=threads)


def video_frame(frame: av.VideoFrame, size: tuple[int, int], mode: str, threads: int = 1,
                keep_yuv: bool = False) -> np.ndarray | Yuv420Frame:
    """A sampled video frame at its planned `size`: uint8 RGB (h, w, 3), or with `keep_yuv`
    (fast mode only) the `Yuv420Frame` its RGB is made from, when the source is 4:2:0."""
    if mode == "exact":
        return torch_bilinear_aa(source_rgb(frame, threads), size)
    if keep_yuv and is_planar_420(frame):
        return fast_yuv(frame, size, threads)[1]
    return fast_rgb(frame, size, threads)


def image_frame(frame: av.VideoFrame, size: tuple[int, int], mode: str, threads: int = 1,
                keep_yuv: bool = False) -> np.ndarray | Yuv420Frame:
    """An image at its planned `size` (exact: Pillow's bicubic; fast: as `video_frame`)."""
    if mode == "exact":
        return pil_bicubic_resize(source_rgb(frame, threads), size)
    return video_frame(frame, size, mode, threads, keep_yuv)
