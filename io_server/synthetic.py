"""Deterministic synthetic test media: real encoded video and image files.

Used by the tests, the benchmarks and the example's data generator. Every file is a pure function
of its arguments (the seed included): frames are drawn with numpy from a seeded generator and
encoded single-threaded, so the same call writes the same pixels (and, for a given FFmpeg build,
the same bytes).

Video content is built for Keye-VL-1.5's Slow-Fast classification: each *scene* is a random
mosaic of coloured cells (from three colour families far apart in HSV) that pans slowly, plus one
small light square that moves fast. Within a scene consecutive frames are near-identical at the
28-px patch level (so sampled frames after the first are "fast"); a scene cut replaces the whole
layout (so the first sampled frame of each scene is "slow"). `SyntheticVideo.scene_starts`
records where the cuts are.

Options add what real footage has and the pixel tests need: a fade to black (`fade_out`, whose
black frames make Keye's similarity NaN), per-frame noise (`noise`), and odd frame sizes (with
`pix_fmt="yuv444p"`, which has no chroma subsampling and so no even-size rule).

Containers follow the file suffix (`.mp4`, `.mkv`, `.webm`, ...); codecs are
`"h264"` (libx264, preset ultrafast), `"hevc"` (libx265, preset ultrafast) and `"vp9"` (libvpx-vp9,
realtime), 8-bit yuv420p by default.

Example:
    >>> v = write_video("/tmp/a.mp4", width=320, height=240, seconds=4, fps=10, seed=1)
    >>> v.num_frames, v.scene_starts
    (40, (0, 20))
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

CODECS: dict[str, tuple[str, dict[str, str]]] = {
    "h264": ("libx264", {"preset": "ultrafast", "crf": "16", "threads": "1"}),
    "hevc": (
        "libx265",
        {"preset": "ultrafast", "crf": "16",
         "x265-params": "log-level=none:pools=none:frame-threads=1"},
    ),
    "vp9": ("libvpx-vp9", {"deadline": "realtime", "cpu-used": "8", "crf": "16", "b": "0",
                           "threads": "1", "row-mt": "0"}),
}
"""Codec name -> (FFmpeg encoder, encoder options). Options are chosen for speed and determinism."""

IMAGE_CODECS: dict[str, tuple[str, str, str]] = {
    ".png": ("png", "rgb24", "image2"),
    ".jpg": ("mjpeg", "yuvj420p", "image2"),
    ".jpeg": ("mjpeg", "yuvj420p", "image2"),
    ".webp": ("libwebp", "yuv420p", "webp"),
}
"""Image suffix -> (encoder, pixel format, muxer)."""

_FAMILIES = (
    ((150, 175), (30, 60), (50, 80)),
    ((0, 25), (200, 255), (40, 90)),
    ((0, 20), (0, 25), (170, 240)),
)
"""Colour families as OpenCV-style HSV ranges (H in [0, 180), S and V in [0, 255]): hue-dominant
dark pinks, saturation-dominant dark reds/browns, value-dominant light greys. Patches of different
families have HSV cosine < 0.5, of the same family > 0.9, so a scene cut (new random mosaic) leaves
well under 90% of patches similar, and slow drift within a scene leaves well over."""


@dataclass(frozen=True)
class SyntheticVideo:
    """What `write_video` wrote."""

    path: str
    width: int
    height: int
    fps: float
    num_frames: int
    codec: str
    scene_starts: tuple[int, ...]
    """Source frame index of the first frame of each scene (always starts with 0)."""


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """OpenCV-style uint8 HSV (H in [0, 180)) -> uint8 RGB, float arithmetic."""
    h = hsv[..., 0].astype(np.float64) * 2.0
    s = hsv[..., 1].astype(np.float64) / 255.0
    v = hsv[..., 2].astype(np.float64)
    c = v * s
    x = c * (1 - np.abs((h / 60.0) % 2 - 1))
    m = v - c
    sector = (h // 60).astype(np.int64) % 6
    zeros = np.zeros_like(c)
    table = [(c, x, zeros), (x, c, zeros), (zeros, c, x), (zeros, x, c), (x, zeros, c),
             (c, zeros, x)]
    out = np.zeros(hsv.shape, dtype=np.float64)
    for k, (r, g, b) in enumerate(table):
        sel = sector == k
        out[..., 0] = np.where(sel, r, out[..., 0])
        out[..., 1] = np.where(sel, g, out[..., 1])
        out[..., 2] = np.where(sel, b, out[..., 2])
    return np.clip(np.rint(out + m[..., None]), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class _Scene:
    canvas: np.ndarray
    """Mosaic larger than the frame; frames are crops of it (a slow pan)."""
    pan: tuple[float, float]
    """Pan velocity (dy, dx) in pixels per second."""
    square: tuple[float, float, int, float, float]
    """Small fast square: (y, x, side, vy, vx)."""


def _mosaic(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A random mosaic of rectangular cells, each filled from a random colour family."""
    cell = max(8, min(width, height) // 5)
    rows = -(-height // cell) + 1
    cols = -(-width // cell) + 1
    fam = rng.integers(0, len(_FAMILIES), size=(rows, cols))
    hsv = np.zeros((rows, cols, 3), dtype=np.uint8)
    for k, ranges in enumerate(_FAMILIES):
        sel = fam == k
        for ch, (lo, hi) in enumerate(ranges):
            hsv[..., ch] = np.where(sel, rng.integers(lo, hi + 1, size=(rows, cols)), hsv[..., ch])
    rgb = _hsv_to_rgb(hsv)
    # Jittered cell edges so the mosaic does not align with 28-px patches.
    ys = np.sort(rng.integers(0, rows * cell, size=rows - 1))
    xs = np.sort(rng.integers(0, cols * cell, size=cols - 1))
    row_counts = np.diff(np.concatenate([[0], ys, [rows * cell]]))
    col_counts = np.diff(np.concatenate([[0], xs, [cols * cell]]))
    mosaic = np.repeat(np.repeat(rgb, row_counts, axis=0), col_counts, axis=1)
    return mosaic[:height, :width]


def _make_scene(rng: np.random.Generator, width: int, height: int, motion: float,
                duration: float = 0.0) -> _Scene:
    """Random scene of `duration` seconds: a mosaic panning at `motion` short sides per second,
    plus a small square crossing a third of the frame per second."""
    short = min(width, height)
    speed = motion * short
    angle = rng.uniform(0, 2 * np.pi)
    pan = (speed * np.sin(angle), speed * np.cos(angle))
    margin = int(np.ceil(abs(speed) * duration)) + 2  # the pan never reaches an edge
    canvas = _mosaic(rng, width + 2 * margin, height + 2 * margin)
    side = max(2, short // 20)
    angle = rng.uniform(0, 2 * np.pi)
    fast = 0.33 * short
    square = (float(rng.uniform(0, height - side)), float(rng.uniform(0, width - side)), side,
              fast * np.sin(angle), fast * np.cos(angle))
    return _Scene(canvas=canvas, pan=pan, square=square)


def _bounce(pos: float, span: float) -> float:
    """Position `pos` reflected into [0, span] (objects bounce off the edges)."""
    if span <= 0:
        return 0.0
    period = 2 * span
    p = pos % period
    return p if p <= span else period - p


def _render(scene: _Scene, width: int, height: int, t: float) -> np.ndarray:
    ch, cw = scene.canvas.shape[:2]
    my, mx = (ch - height) // 2, (cw - width) // 2
    y0 = int(round(_bounce(my + scene.pan[0] * t, ch - height)))
    x0 = int(round(_bounce(mx + scene.pan[1] * t, cw - width)))
    frame = scene.canvas[y0 : y0 + height, x0 : x0 + width].copy()
    y, x, side, vy, vx = scene.square
    sy = int(round(_bounce(y + vy * t, height - side)))
    sx = int(round(_bounce(x + vx * t, width - side)))
    frame[sy : sy + side, sx : sx + side] = 235
    return frame


def _rate(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


def write_video(
    path: str | os.PathLike[str],
    *,
    width: int = 320,
    height: int = 240,
    seconds: float = 4.0,
    fps: float = 10.0,
    codec: str = "h264",
    seed: int = 0,
    scene_cuts: Sequence[float] | None = None,
    motion: float = 0.01,
    gop: int | None = None,
    fade_out: tuple[float, float] | None = None,
    noise: float = 0.0,
    pix_fmt: str = "yuv420p",
) -> SyntheticVideo:
    """Write a deterministic test video and return what was written.

    Args:
        path: output file; its suffix picks the container (`.mp4`, `.mkv`, `.webm`, ...).
        width, height: frame size in pixels (even numbers, as yuv420p requires).
        seconds, fps: duration and frame rate; the file has `round(seconds * fps)` frames.
        codec: one of `CODECS` ("h264", "hevc", "vp9").
        seed: seeds every random choice (layouts, colours, velocities).
        scene_cuts: times in seconds at which a new scene starts; `None` means one cut every
            2 s. Times outside (0, seconds) are ignored.
        motion: pan speed of the mosaic, as a fraction of the short side per second.
        gop: maximum keyframe interval in frames (`None`: the encoder's default, 250 for x264).
        fade_out: (start, end) in seconds: the picture darkens linearly from `start` and is
            black (all zeros) from `end` on.
        noise: standard deviation of seeded Gaussian noise added to every pixel of every frame
            (uint8 levels; 0 = none).
        pix_fmt: "yuv420p" (even sides only) or "yuv444p" (any sides, H.264/HEVC).

    Returns:
        `SyntheticVideo` with the frame count and the source frame index where each scene starts.
    """
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r} is not one of {sorted(CODECS)}")
    if pix_fmt not in ("yuv420p", "yuv444p"):
        raise ValueError(f"pix_fmt {pix_fmt!r} is not 'yuv420p' or 'yuv444p'")
    if width < 16 or height < 16 or (pix_fmt == "yuv420p" and (width % 2 or height % 2)):
        raise ValueError(f"width({width}) and height({height}) must be >= 16 (and even for "
                         f"yuv420p)")
    if fade_out is not None and not 0 <= fade_out[0] < fade_out[1]:
        raise ValueError(f"fade_out {fade_out} must be (start, end) with 0 <= start < end")
    if noise < 0:
        raise ValueError(f"noise({noise}) must be >= 0")
    num_frames = int(round(seconds * fps))
    if num_frames < 1:
        raise ValueError(f"seconds({seconds}) * fps({fps}) gives no frame")
    if scene_cuts is None:
        scene_cuts = [2.0 * k for k in range(1, int(math.ceil(seconds / 2.0)))]
    starts = sorted({0} | {int(round(c * fps)) for c in scene_cuts if 0 < c < seconds})
    starts = [s for s in starts if s < num_frames]

    rng = np.random.default_rng(seed)
    ends = [*starts[1:], num_frames]
    scenes = [_make_scene(rng, width, height, motion, (e - s) / fps)
              for s, e in zip(starts, ends, strict=True)]
    encoder, options = CODECS[codec]
    rate = _rate(fps)
    with av.open(os.fspath(path), mode="w", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(encoder, rate=rate, options=dict(options))
        stream.width = width
        stream.height = height
        stream.pix_fmt = pix_fmt
        stream.codec_context.time_base = 1 / rate
        if gop is not None:
            stream.codec_context.gop_size = gop
        noise_rng = np.random.default_rng([seed, 1])
        scene = -1
        for i in range(num_frames):
            while scene + 1 < len(starts) and starts[scene + 1] <= i:
                scene += 1
            t = (i - starts[scene]) / fps
            pixels = _render(scenes[scene], width, height, t)
            if noise > 0:
                jitter = noise_rng.normal(0.0, noise, size=pixels.shape)
                pixels = np.clip(np.rint(pixels + jitter), 0, 255).astype(np.uint8)
            if fade_out is not None and i / fps > fade_out[0]:
                gain = max(0.0, 1.0 - (i / fps - fade_out[0]) / (fade_out[1] - fade_out[0]))
                pixels = np.rint(pixels * gain).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, "rgb24")
            frame.pts = i
            frame.time_base = 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return SyntheticVideo(
        path=os.fspath(path), width=width, height=height, fps=float(fps), num_frames=num_frames,
        codec=codec, scene_starts=tuple(starts),
    )


def image_pixels(width: int, height: int, seed: int) -> np.ndarray:
    """The uint8 RGB array `write_image` encodes: a random mosaic with a small square."""
    rng = np.random.default_rng(seed)
    return _render(_make_scene(rng, width, height, 0.0), width, height, 0.0)


def write_image(path: str | os.PathLike[str], width: int, height: int, seed: int = 0) -> str:
    """Write a deterministic test image; the suffix picks the format (`IMAGE_CODECS`).

    Returns the path written.
    """
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in IMAGE_CODECS:
        raise ValueError(f"image suffix {suffix!r} is not one of {sorted(IMAGE_CODECS)}")
    encoder, pix_fmt, muxer = IMAGE_CODECS[suffix]
    frame = av.VideoFrame.from_ndarray(image_pixels(width, height, seed), "rgb24")
    options = {"update": "1"} if muxer == "image2" else {}
    with av.open(os.fspath(path), mode="w", format=muxer, options=options) as container:
        stream = container.add_stream(encoder, rate=1)
        stream.width = width
        stream.height = height
        stream.pix_fmt = pix_fmt
        frame = frame.reformat(format=pix_fmt)
        frame.pts = 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return os.fspath(path)


def write_truncated(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                    keep_fraction: float = 0.4) -> str:
    """Copy the first `keep_fraction` of `src`'s bytes to `dst` (a truncated download)."""
    if not 0.0 <= keep_fraction < 1.0:
        raise ValueError(f"keep_fraction({keep_fraction}) must be in [0, 1)")
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data[: int(len(data) * keep_fraction)])
    return os.fspath(dst)


def write_garbage(path: str | os.PathLike[str], nbytes: int = 4096, seed: int = 0) -> str:
    """Write `nbytes` of seeded random bytes: a file no demuxer recognises."""
    data = np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(data)
    return os.fspath(path)


def write_corrupted(src: str | os.PathLike[str], dst: str | os.PathLike[str], seed: int = 0,
                    start_fraction: float = 0.3) -> str:
    """Copy `src` to `dst` with every byte after `start_fraction` of the file replaced by noise.

    The container header survives (the file opens) but the coded frames are garbage.
    """
    with open(src, "rb") as f:
        data = bytearray(f.read())
    start = int(len(data) * start_fraction)
    noise = np.random.default_rng(seed).integers(0, 256, size=len(data) - start, dtype=np.uint8)
    data[start:] = noise.tobytes()
    with open(dst, "wb") as f:
        f.write(bytes(data))
    return os.fspath(dst)


def write_png_zeros(path: str | os.PathLike[str], width: int, height: int, *, bit_depth: int = 8,
                    color_type: int = 2, rows: int | None = None) -> str:
    """Write a PNG of all-zero pixels declaring `width` x `height` (an image bomb when large: a
    16000 x 16000 RGB file is about 750 KB and decodes to 768 MB).

    Args:
        bit_depth: 8 or 16 bits per sample.
        color_type: 2 (RGB) or 6 (RGBA).
        rows: how many rows to actually encode (default: all). Fewer rows make a tiny file whose
            header still declares the full size (decoding it fails after the header).
    """
    if color_type not in (2, 6) or bit_depth not in (8, 16):
        raise ValueError(f"color_type({color_type}) must be 2 or 6 and bit_depth({bit_depth}) "
                         "8 or 16")
    samples = 3 if color_type == 2 else 4
    row = b"\x00" * (1 + width * samples * bit_depth // 8)  # filter byte 0, then the samples
    compressor = zlib.compressobj(1)
    data = [compressor.compress(row) for _ in range(height if rows is None else rows)]
    data.append(compressor.flush())

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(data))
                + chunk(b"IEND", b""))
    return os.fspath(path)
