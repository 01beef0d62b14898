"""Decoding backends: turn a media file into a Keye-VL-1.5 `FramePlan` and its pixels.

Two backends share one contract (`DecodeBackend`):
- `PyAVBackend` ("pyav", the default): FFmpeg on the CPU through PyAV (H.264, HEVC, VP9, AV1 where
  the build has it; images through FFmpeg's image demuxers: PNG, JPEG, WebP, BMP, ...).
- `DaliBackend` ("dali"): NVIDIA DALI's GPU video decoder (NVDEC). It plans with PyAV (so plans are
  identical) and decodes pixels on the GPU. Needs `pip install hetero-mm-train[gpu]` and a GPU.

Contract:
- `probe(path)` returns the full plan without pixels. It decodes the sampled frames and shrinks
  them to the small Slow-Fast comparison size (`keye.similarity_size`) with the backend's pixel
  path (`io_server.resize`: "exact" = Keye's torch bilinear-antialias, "fast" = FFmpeg's scaler).
- `decode(path, frame_start, frame_stop, plan)` returns C-contiguous uint8 RGB (H, W, 3) frames of
  the sampled frames `[frame_start, frame_stop)` at their planned sizes, made by the same pixel
  path ("exact" equals Keye's released processor; see `io_server.resize`). With
  `keep_yuv=True` (fast path only) 4:2:0 sources come back as `Yuv420Frame` planes instead.
- Limits, checked before FFmpeg allocates anything: a path must pass `paths.check_path` (no
  control characters, under PATH_MAX bytes); a frame may have at most `max_pixels` pixels, read
  from the image header (`imagesize.declared_size`) or the container, and enforced again inside
  FFmpeg's decoder (its `max_pixels` option), so an image bomb is refused with its real size.
- Frame `i` of a video is the `i`-th frame in presentation order. Both calls first demux the
  stream (no decoding) to list every frame's pts and the keyframes: the frame count is the number
  of video packets (what the container records, for MP4), and decoding seeks to the keyframe
  before a wanted frame when that skips more than `SEEK_MIN_GAP` frames (frame ranges in the
  middle of a long video, sparse sampling of high-fps video with short GOPs). Streams without
  usable pts are decoded sequentially from the start.
- Errors are `io_server.media` errors naming the file: `MediaNotFoundError` (no such file),
  `CorruptMediaError` (FFmpeg's reason: truncated, corrupt, no video stream),
  `InvalidRequestError` (frame range outside the plan, a plan of another file, an aspect ratio
  beyond 200:1, a plan whose frame count no longer matches the file, a symlink loop, a frame over
  `max_pixels`, a bad path). Running out of memory raises `MemoryError` (the daemon's workers
  turn it into an error naming their memory limit). Decoding a corrupt file
  stops at FFmpeg's first error; nothing loops forever. A stream whose packets end well before
  the duration its container declares (a truncated WebM/MKV) is corrupt. Decoders that conceal
  errors (e.g. MJPEG on a damaged JPEG) may return damaged pixels without an error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

import av
import numpy as np

from io_server import imagesize, keye, paths
from io_server import resize as resize_mod
from io_server.keye import DEFAULT_PRESET, KeyePreset
from io_server.media import (
    CorruptMediaError,
    DecodedMedia,
    FramePlan,
    InvalidRequestError,
    MediaError,
    MediaKind,
    Yuv420Frame,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 1 << 26
"""Largest source frame decoded by default: 67,108,864 pixels (8192 x 8192). A 16-bit RGBA frame
of that size takes 512 MiB in FFmpeg; anything larger is refused before decoding."""

MAX_SOURCE_FRAMES = 50_000_000
"""A container claiming more frames than this is treated as corrupt (never plan absurd work)."""

_IMAGE_FORMATS = ("image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe",
                  "jpegls_pipe", "j2k_pipe", "qoi_pipe", "pgm_pipe", "ppm_pipe", "pam_pipe")


@runtime_checkable
class DecodeBackend(Protocol):
    """What the I/O server needs from a decoder."""

    name: str

    def probe(self, path: str, preset: KeyePreset = DEFAULT_PRESET) -> FramePlan:
        """Metadata and the full frame plan of `path`, without pixels."""
        ...

    def decode(
        self,
        path: str,
        preset: KeyePreset = DEFAULT_PRESET,
        frame_start: int = 0,
        frame_stop: int | None = None,
        plan: FramePlan | None = None,
        keep_yuv: bool = False,
    ) -> DecodedMedia:
        """Pixels of sampled frames `[frame_start, frame_stop)` (all when `frame_stop` is None).

        `plan` (from `probe` of the same file and preset) skips re-planning. `keep_yuv` asks for
        `Yuv420Frame` planes where the backend has them (RGB arrays elsewhere).
        """
        ...


# --------------------------------------------------------------------------------------------
# Shared helpers


def _frame_size_error(path: str, width: int, height: int, max_pixels: int, where: str
                      ) -> InvalidRequestError:
    return InvalidRequestError(
        path, f"{where} declares a {width}x{height} frame = {width * height:,} pixels, over the "
              f"limit of {max_pixels:,} pixels (--max-pixels); refused before decoding")


def _sniffed_size(path: str) -> tuple[int, int] | None:
    """(width, height) declared by an image header, or None (not an image we can read)."""
    try:
        with open(path, "rb") as f:
            return imagesize.declared_size(f.read(imagesize.SNIFF_BYTES))
    except OSError:
        return None


def _open(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> av.container.InputContainer:
    paths.check_file(path)
    declared = _sniffed_size(path)
    if declared is not None and declared[0] * declared[1] > max_pixels:
        raise _frame_size_error(path, declared[0], declared[1], max_pixels, "the image header")
    # FFmpeg decodes frames while probing a file: its own pixel limit covers what we cannot sniff.
    limit = [{"max_pixels": str(max_pixels)}] * 8
    try:
        # "file:" keeps FFmpeg from reading a protocol ("concat:", "http:") out of the name.
        return av.open("file:" + os.path.abspath(path), mode="r", metadata_errors="ignore",
                       stream_options=limit)
    except MemoryError:
        raise
    except av.FFmpegError as e:
        raise CorruptMediaError(path, f"cannot open: {e}") from e
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CorruptMediaError(path, f"cannot open: {e}") from e


def _is_image(container: av.container.InputContainer) -> bool:
    names = container.format.name.split(",")
    return any(n in _IMAGE_FORMATS for n in names)


def _video_stream(path: str, container: av.container.InputContainer,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> av.video.VideoStream:
    if not container.streams.video:
        raise CorruptMediaError(path, "no video stream")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0:
        declared = _sniffed_size(path)
        if declared is not None and declared[0] * declared[1] > max_pixels:
            raise _frame_size_error(path, declared[0], declared[1], max_pixels, "the header")
        raise CorruptMediaError(
            path, f"invalid frame size {width}x{height}: FFmpeg could not read the frame size "
                  f"(a corrupt header, or a frame over its limit of {max_pixels:,} pixels)")
    if width * height > max_pixels:
        raise _frame_size_error(path, width, height, max_pixels, "the stream")
    return stream


def _source_fps(stream: av.video.VideoStream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return float(rate)
    return 0.0


def _declared_duration_s(container: av.container.InputContainer,
                         stream: av.video.VideoStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


@dataclass(frozen=True)
class _StreamIndex:
    """Presentation timestamps of a video stream's frames, from demuxing (no decoding)."""

    pts: np.ndarray
    """pts of every frame in presentation order (int64, stream time base); frame i <-> pts[i]."""
    keyframe_pts: np.ndarray
    """Sorted pts of the keyframes (where decoding can start after a seek)."""
    end_s: float
    """End of the last packet in seconds."""

    @property
    def num_frames(self) -> int:
        return len(self.pts)

    @property
    def seekable(self) -> bool:
        """Frames map to unique pts, so they can be found after a seek."""
        return len(self.pts) > 0 and bool(np.all(np.diff(self.pts) > 0))


def _index_stream(path: str, container: av.container.InputContainer,
                  stream: av.video.VideoStream, fps: float) -> _StreamIndex:
    """Demux every packet of `stream` (cheap: no decoding), then seek back to the start.

    A stream that ends well before the duration the container declares is truncated (or
    corrupt past that point): `CorruptMediaError`.
    """
    pts: list[int] = []
    keys: list[int] = []
    n = 0
    end_s = 0.0
    try:
        for packet in container.demux(stream):
            if packet.size <= 0:
                continue
            n += 1
            if n > MAX_SOURCE_FRAMES:
                raise CorruptMediaError(path, f"more than {MAX_SOURCE_FRAMES} video packets")
            if packet.pts is None:
                continue
            pts.append(int(packet.pts))
            if packet.is_keyframe:
                keys.append(int(packet.pts))
            if packet.time_base is not None:
                end_s = max(end_s, float((packet.pts + (packet.duration or 0)) * packet.time_base))
        container.seek(0, stream=stream)
    except MemoryError:
        raise
    except av.FFmpegError as e:
        raise CorruptMediaError(path, f"demuxing failed after {n} packets: {e}") from e
    if n == 0:
        raise CorruptMediaError(path, "no video frames")
    declared = _declared_duration_s(container, stream)
    if len(pts) == n and declared is not None and end_s < 0.9 * declared - 2.0 / fps:
        raise CorruptMediaError(
            path, f"truncated: the container declares {declared:.2f} s but its video packets "
            f"end at {end_s:.2f} s ({n} packets)"
        )
    if len(pts) != n:  # packets without pts: frames can only be counted in decode order
        return _StreamIndex(pts=np.arange(n, dtype=np.int64), keyframe_pts=np.zeros(0, np.int64),
                            end_s=end_s)
    return _StreamIndex(pts=np.sort(np.asarray(pts, dtype=np.int64)),
                        keyframe_pts=np.sort(np.asarray(keys, dtype=np.int64)), end_s=end_s)


def _duration_s(container: av.container.InputContainer, stream: av.video.VideoStream,
                num_frames: int, fps: float) -> float:
    declared = _declared_duration_s(container, stream)
    if declared is not None:
        return declared
    return num_frames / fps if fps > 0 else 0.0


SEEK_MIN_GAP = 48
"""Seek forward only when it skips more than this many frames (a seek flushes the decoder)."""


def _decode_frames(
    path: str, container: av.container.InputContainer, stream: av.video.VideoStream,
    index: _StreamIndex, wanted: Sequence[int],
) -> Iterator[tuple[int, av.VideoFrame]]:
    """Yield `(position in wanted, frame)` for each source frame index in ascending `wanted`.

    Frames are identified by their pts (`index`). When the next wanted frame lies behind a
    keyframe more than `SEEK_MIN_GAP` frames ahead of the decoder, seeks to that keyframe
    instead of decoding the frames in between; without usable pts it decodes sequentially.
    """
    if not wanted:
        return
    if not index.seekable or len(index.keyframe_pts) == 0:
        yield from _decode_sequential(path, container, stream, wanted)
        return
    targets = index.pts[np.asarray(wanted, dtype=np.int64)]

    def keyframe_before(target: int) -> int:
        k = int(np.searchsorted(index.keyframe_pts, target, side="right")) - 1
        return int(index.keyframe_pts[max(k, 0)])

    def frames_between(a: int, b: int) -> int:
        return int(np.searchsorted(index.pts, b) - np.searchsorted(index.pts, a))

    pos = 0
    last_pts: int | None = None
    gen: Iterator[av.VideoFrame] | None = None
    try:
        while pos < len(targets):
            kf = keyframe_before(int(targets[pos]))
            if gen is None or (last_pts is not None
                               and frames_between(last_pts, kf) > SEEK_MIN_GAP):
                if kf > index.pts[0]:
                    container.seek(kf, stream=stream, backward=True, any_frame=False)
                gen = container.decode(stream)
            reseek = False
            for frame in gen:
                if frame.pts is None:
                    raise CorruptMediaError(path, "decoded a frame without a timestamp")
                fpts = int(frame.pts)
                if fpts > targets[pos]:
                    raise CorruptMediaError(
                        path, f"frame {wanted[pos]} (pts {int(targets[pos])}) was not decoded; "
                        f"the decoder went on to pts {fpts}"
                    )
                last_pts = fpts
                advanced = False
                while pos < len(targets) and fpts == targets[pos]:
                    yield pos, frame
                    pos += 1
                    advanced = True
                if pos == len(targets):
                    return
                if advanced and frames_between(
                        fpts, keyframe_before(int(targets[pos]))) > SEEK_MIN_GAP:
                    reseek = True  # abandoning `gen` is safe: the seek flushes the decoder
                    break
            if not reseek:
                raise CorruptMediaError(
                    path, f"stream ended before frame {wanted[pos]} (pts {int(targets[pos])})"
                )
    except MemoryError:
        raise
    except av.FFmpegError as e:
        raise CorruptMediaError(path, f"decoding failed near frame {wanted[pos]}: {e}") from e


def _decode_sequential(
    path: str, container: av.container.InputContainer, stream: av.video.VideoStream,
    wanted: Sequence[int],
) -> Iterator[tuple[int, av.VideoFrame]]:
    """`_decode_frames` by counting decoded frames from the start (no timestamps needed)."""
    pos = 0
    index = 0
    try:
        for frame in container.decode(stream):
            while pos < len(wanted) and wanted[pos] == index:
                yield pos, frame
                pos += 1
            if pos == len(wanted):
                return
            index += 1
    except MemoryError:
        raise
    except av.FFmpegError as e:
        raise CorruptMediaError(path, f"decoding failed at frame {index}: {e}") from e
    raise CorruptMediaError(
        path, f"stream ended after {index} frames; frame {wanted[pos]} was expected"
    )


def _plan_matches(plan: FramePlan, path: str) -> None:
    if plan.path != path:
        raise InvalidRequestError(path, f"the plan given is for {plan.path!r}")


def _resolve(backend: DecodeBackend, path, preset: KeyePreset, frame_start: int,
             frame_stop: int | None, plan: FramePlan | None) -> tuple[str, FramePlan, int, int]:
    """The shared start of every ``decode``: the plan (probed, or checked against the file) and
    the validated frame range."""
    path = os.fspath(path)
    if plan is None:
        plan = backend.probe(path, preset)
    else:
        _plan_matches(plan, path)
    start, stop = _check_range(path, plan, frame_start, frame_stop)
    return path, plan, start, stop


def _check_range(path: str, plan: FramePlan, frame_start: int,
                 frame_stop: int | None) -> tuple[int, int]:
    stop = plan.num_frames if frame_stop is None else frame_stop
    if not 0 <= frame_start <= stop <= plan.num_frames:
        raise InvalidRequestError(
            path, f"frame range [{frame_start}, {stop}) is outside [0, {plan.num_frames}]"
        )
    return frame_start, stop


# --------------------------------------------------------------------------------------------
# PyAV


class PyAVBackend:
    """CPU decoding with PyAV (FFmpeg).

    Args:
        threads: FFmpeg's decoder (and scaler) thread count; 0 = FFmpeg's automatic choice.
            Frame and slice threading are both enabled.
        resize: the pixel path, "exact" (Keye's released processor, the default) or "fast"
            (FFmpeg's scaler); see `io_server.resize`.
        max_pixels: largest source frame (width x height) this backend decodes.
    """

    name = "pyav"

    def __init__(self, threads: int = 0, resize: str = resize_mod.DEFAULT_RESIZE,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if threads < 0:
            raise ValueError(f"threads({threads}) must be >= 0")
        if max_pixels < 1:
            raise ValueError(f"max_pixels({max_pixels}) must be >= 1")
        self.threads = threads
        self.resize = resize_mod.check_mode(resize)
        self.max_pixels = max_pixels

    def _setup(self, stream: av.video.VideoStream) -> None:
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = self.threads
        stream.codec_context.options = {"max_pixels": str(self.max_pixels)}

    def probe(self, path: str, preset: KeyePreset = DEFAULT_PRESET) -> FramePlan:
        return self.probe_with_similarities(path, preset)[0]

    def probe_with_similarities(self, path: str, preset: KeyePreset = DEFAULT_PRESET
                                ) -> tuple[FramePlan, tuple[float, ...]]:
        """`probe`, and each sampled frame's similarity to the latest slow frame before it
        (`keye.slow_fast_trace`: 1.0 for the first, NaN between black frames; () for images)."""
        path = os.fspath(path)
        with _open(path, self.max_pixels) as container:
            stream = _video_stream(path, container, self.max_pixels)
            width, height = stream.codec_context.width, stream.codec_context.height
            if _is_image(container):
                return _guard(path, lambda: keye.image_plan(path, width, height, preset)), ()
            fps = _source_fps(stream)
            if fps <= 0:
                raise CorruptMediaError(path, "no frame rate")
            index = _index_stream(path, container, stream, fps)
            num = index.num_frames
            indices = keye.sample_frame_indices(num, fps, preset)
            size = _guard(path, lambda: keye.similarity_size(height, width, preset))
            self._setup(stream)
            lowres: list[np.ndarray] = [np.empty(0)] * len(indices)
            for pos, frame in _decode_frames(path, container, stream, index, indices):
                lowres[pos] = resize_mod.thumbnail(frame, size, self.resize, self.threads)
            is_fast, similarities = keye.slow_fast_trace(lowres, preset)
            duration = _duration_s(container, stream, num, fps)
            plan = _guard(path, lambda: keye.video_plan(
                path, width=width, height=height, source_fps=fps, num_source_frames=num,
                duration_s=duration, frame_indices=indices, is_fast=is_fast, preset=preset,
            ))
            return plan, similarities

    def decode(
        self,
        path: str,
        preset: KeyePreset = DEFAULT_PRESET,
        frame_start: int = 0,
        frame_stop: int | None = None,
        plan: FramePlan | None = None,
        keep_yuv: bool = False,
    ) -> DecodedMedia:
        if keep_yuv and self.resize == "exact":
            raise InvalidRequestError(
                os.fspath(path), "the YUV 4:2:0 wire format carries the planes of the fast "
                "path; the exact path resizes RGB frames, which 4:2:0 cannot carry without "
                "losing half the colour resolution: ask for resize 'fast', or for RGB")
        path, plan, start, stop = _resolve(self, path, preset, frame_start, frame_stop, plan)
        wanted = plan.frame_indices[start:stop]
        frames: list[np.ndarray | Yuv420Frame] = [np.empty(0)] * len(wanted)
        make = resize_mod.image_frame if plan.kind is MediaKind.IMAGE else resize_mod.video_frame
        with _open(path, self.max_pixels) as container:
            stream = _video_stream(path, container, self.max_pixels)
            self._setup(stream)
            index = (_index_stream(path, container, stream, plan.source_fps)
                     if plan.kind is MediaKind.VIDEO and wanted else None)
            if index is not None and index.num_frames != plan.num_source_frames:
                raise InvalidRequestError(
                    path, f"the plan has {plan.num_source_frames} source frames but the file has "
                    f"{index.num_frames}: the file changed since it was probed"
                )
            frames_iter = (_decode_frames(path, container, stream, index, wanted)
                           if index is not None else _decode_sequential(path, container, stream,
                                                                        wanted))
            for pos, frame in frames_iter:
                j = start + pos
                frames[pos] = make(frame, (plan.heights[j], plan.widths[j]), self.resize,
                                   self.threads, keep_yuv)
        return DecodedMedia(plan=plan, frame_start=start, frame_stop=stop, frames=tuple(frames))


_T = TypeVar("_T")


def _guard(path: str, fn: Callable[[], _T]) -> _T:
    """Run a planning step, turning its ValueError (e.g. aspect ratio) into InvalidRequestError."""
    try:
        return fn()
    except MediaError:
        raise
    except ValueError as e:
        raise InvalidRequestError(path, str(e)) from e


# --------------------------------------------------------------------------------------------
# DALI (GPU)


def least_utilised_gpu() -> int:
    """Index of the GPU with the lowest utilisation (then the most free memory), via pynvml.

    Raises:
        RuntimeError: pynvml cannot initialise or sees no GPU.
    """
    try:
        import pynvml
    except ImportError as e:  # nvidia-ml-py is a core dependency; be explicit anyway
        raise ImportError("pynvml is missing: pip install nvidia-ml-py") from e
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        raise RuntimeError(f"no NVIDIA GPU usable: NVML failed to initialise ({e})") from e
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            raise RuntimeError("no NVIDIA GPU found by NVML")
        best: tuple[int, int, int] | None = None
        for i in range(count):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
            free = pynvml.nvmlDeviceGetMemoryInfo(handle).free
            key = (util, -free, i)
            if best is None or key < best:
                best = key
        assert best is not None
        logger.info("decoding on GPU %d of %d: the least utilised (%d%% busy, %d MiB free)",
                    best[2], count, best[0], -best[1] // 2**20)
        return best[2]
    finally:
        pynvml.nvmlShutdown()


class DaliBackend:
    """GPU decoding with NVIDIA DALI (NVDEC). Plans come from PyAV (with the same `resize` mode),
    so they are identical to `PyAVBackend`'s; pixels are decoded on the GPU and resized there with
    a cubic filter (antialiased when shrinking): a fast path of its own, close to, not equal to,
    either PyAV path. Images go through PyAV. `device_id` defaults to the least utilised GPU
    (`least_utilised_gpu`). `keep_yuv` is ignored: frames come back as RGB."""

    name = "dali"

    def __init__(self, device_id: int | None = None, resize: str = resize_mod.DEFAULT_RESIZE,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        try:
            from nvidia.dali import fn, pipeline_def, types  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "the DALI backend needs nvidia-dali: pip install hetero-mm-train[gpu]"
            ) from e
        self.device_id = least_utilised_gpu() if device_id is None else device_id
        self.resize = resize_mod.check_mode(resize)
        self.max_pixels = max_pixels
        self._planner = PyAVBackend(resize=resize, max_pixels=max_pixels)

    def probe(self, path: str, preset: KeyePreset = DEFAULT_PRESET) -> FramePlan:
        return self._planner.probe(path, preset)

    def decode(
        self,
        path: str,
        preset: KeyePreset = DEFAULT_PRESET,
        frame_start: int = 0,
        frame_stop: int | None = None,
        plan: FramePlan | None = None,
        keep_yuv: bool = False,
    ) -> DecodedMedia:
        path, plan, start, stop = _resolve(self, path, preset, frame_start, frame_stop, plan)
        if plan.kind is MediaKind.IMAGE or start == stop:
            # Images (and empty ranges) gain nothing from NVDEC.
            return self._planner.decode(path, preset, start, stop, plan)
        frames = _dali_decode(path, self.device_id, plan, start, stop)
        return DecodedMedia(plan=plan, frame_start=start, frame_stop=stop, frames=frames)


def _dali_decode(path: str, device_id: int, plan: FramePlan, start: int,
                 stop: int) -> tuple[np.ndarray, ...]:
    """Decode source frames `plan.frame_indices[start:stop]` with NVDEC on GPU `device_id` and
    resize them there (cubic, antialiased) to their planned sizes.

    Uses `fn.decoders.video` (DALI 2.x) or `fn.experimental.decoders.video` (1.x) with the
    `frames` argument. Not exercised by CI (no GPU there); tests/test_backends.py runs it where
    DALI and a GPU exist.
    """
    from nvidia.dali import fn, pipeline_def, types

    wanted = [int(i) for i in plan.frame_indices[start:stop]]
    sizes = sorted({(plan.heights[j], plan.widths[j]) for j in range(start, stop)})
    with open(path, "rb") as f:
        encoded = np.frombuffer(f.read(), dtype=np.uint8)
    decoders = getattr(fn, "decoders", None)
    video_decoder = getattr(decoders, "video", None) or fn.experimental.decoders.video

    @pipeline_def(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1)
    def pipe() -> tuple[object, ...]:  # a DALI graph: returns DataNodes
        data = fn.external_source(source=[[encoded]], batch=True, dtype=types.UINT8,
                                  cycle=False, device="cpu")
        video = video_decoder(data, device="mixed", frames=wanted)
        return tuple(
            fn.resize(video, resize_x=w, resize_y=h, interp_type=types.INTERP_CUBIC,
                      antialias=True)
            for h, w in sizes
        )

    p = pipe()
    try:
        p.build()
        outputs = p.run()
    except RuntimeError as e:
        raise CorruptMediaError(path, f"DALI decoding failed: {e}") from e
    by_size = {hw: np.asarray(out.as_cpu().at(0)) for hw, out in zip(sizes, outputs, strict=True)}
    result = []
    for pos in range(len(wanted)):
        hw = (plan.heights[start + pos], plan.widths[start + pos])
        frames = by_size[hw]
        if frames.shape[0] != len(wanted):
            raise CorruptMediaError(
                path, f"DALI returned {frames.shape[0]} frames, expected {len(wanted)}"
            )
        result.append(np.ascontiguousarray(frames[pos]))
    return tuple(result)


def get_backend(name: str = "pyav", *, threads: int = 0, resize: str = resize_mod.DEFAULT_RESIZE,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodeBackend:
    """The backend called `name`: "pyav" (CPU, default) or "dali" (GPU), with the pixel path
    `resize` and the frame limit `max_pixels` (`threads` applies to "pyav").

    Raises:
        ValueError: unknown name.
        ImportError: "dali" without nvidia-dali installed (names the extra to install).
        RuntimeError: "dali" on a host without a usable NVIDIA GPU.
    """
    if name == "pyav":
        return PyAVBackend(threads=threads, resize=resize, max_pixels=max_pixels)
    if name == "dali":
        return DaliBackend(resize=resize, max_pixels=max_pixels)
    raise ValueError(f"unknown decode backend {name!r}; choose 'pyav' or 'dali'")
