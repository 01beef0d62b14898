"""What travels between the I/O server and its clients, in both directions.

One job: convert between the Python contracts of `io_server.media` and the messages of
`io_server/proto/io_server.proto` — frame plans, zstd-encoded frames (RGB arrays or YUV 4:2:0
planes), errors (a `MediaError` subclass <-> a gRPC status code plus trailing metadata naming the
class, the file and the reason, all escaped to printable ASCII and bounded in length, whatever the
client sent), and the frame-range check both the daemon and the in-process path apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import zstandard

from io_server import paths, yuv
from io_server.media import (
    PIXELS_PER_TOKEN_SIDE,
    AccessDeniedError,
    CorruptMediaError,
    FramePlan,
    InvalidRequestError,
    MediaError,
    MediaKind,
    MediaNotFoundError,
    Yuv420Frame,
)
from io_server.proto import io_server_pb2 as pb2

MAX_FRAME_RANGE = 1 << 20
"""No plan has more sampled frames than this; larger bounds are rejected before any decoding."""

ERROR_CODES: dict[type[MediaError], grpc.StatusCode] = {
    MediaNotFoundError: grpc.StatusCode.NOT_FOUND,
    CorruptMediaError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    AccessDeniedError: grpc.StatusCode.PERMISSION_DENIED,
}
"""`MediaError` subclass -> the gRPC status the server answers with."""

_ERRORS_BY_NAME: dict[str, type[MediaError]] = {cls.__name__: cls for cls in ERROR_CODES}
_ERRORS_BY_CODE: dict[grpc.StatusCode, type[MediaError]] = {
    grpc.StatusCode.NOT_FOUND: MediaNotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.PERMISSION_DENIED: AccessDeniedError,
}

META_TYPE = "io-error-type"
META_PATH = "io-error-path"
META_REASON = "io-error-reason"
BUSY_TYPE = "ServerBusy"
"""`META_TYPE` of a RESOURCE_EXHAUSTED refusal: the server is at --max-in-flight."""
META_PATH_CHARS = 300
"""Longest `io-error-path` value (client paths are shown shortened)."""
META_REASON_CHARS = 1000
"""Longest `io-error-reason` value; status details are bounded the same way."""

_KIND_TO_PB = {MediaKind.IMAGE: pb2.MEDIA_KIND_IMAGE, MediaKind.VIDEO: pb2.MEDIA_KIND_VIDEO}
_KIND_FROM_PB = {v: k for k, v in _KIND_TO_PB.items()}

COMPRESSIONS: dict[str, int] = {"zstd": pb2.COMPRESSION_ZSTD, "none": pb2.COMPRESSION_NONE}
"""Compression name (client argument, `--compression`) -> proto enum value."""

PIXEL_FORMATS: dict[str, int] = {"rgb24": pb2.PIXEL_FORMAT_RGB24,
                                 "yuv420p": pb2.PIXEL_FORMAT_YUV420P}
"""Pixel format name (client argument) -> proto enum value."""


# ---------------------------------------------------------------------------------------------
# Frame plans


def plan_to_proto(plan: FramePlan, path: str | None = None) -> pb2.FramePlan:
    """`plan` as a message; `path` (default `plan.path`) replaces the path it names."""
    return pb2.FramePlan(
        path=plan.path if path is None else path,
        kind=_KIND_TO_PB[plan.kind],
        source_width=plan.source_width,
        source_height=plan.source_height,
        source_fps=plan.source_fps,
        duration_s=plan.duration_s,
        num_source_frames=plan.num_source_frames,
        frame_indices=plan.frame_indices,
        timestamps=plan.timestamps,
        is_fast=plan.is_fast,
        heights=plan.heights,
        widths=plan.widths,
        tokens=plan.tokens,
    )


def plan_from_proto(msg: pb2.FramePlan) -> FramePlan:
    if msg.kind not in _KIND_FROM_PB:
        raise ValueError(f"frame plan of {msg.path!r} has unknown media kind {msg.kind}")
    return FramePlan(
        path=msg.path,
        kind=_KIND_FROM_PB[msg.kind],
        source_width=msg.source_width,
        source_height=msg.source_height,
        source_fps=msg.source_fps,
        duration_s=msg.duration_s,
        num_source_frames=msg.num_source_frames,
        frame_indices=tuple(msg.frame_indices),
        timestamps=tuple(msg.timestamps),
        is_fast=tuple(msg.is_fast),
        heights=tuple(msg.heights),
        widths=tuple(msg.widths),
    )


def frame_info(plan: FramePlan, index: int, frame: EncodedFrame,
               compression: int) -> pb2.FrameInfo:
    """Header of sampled frame `index` of `plan`, carried as `frame`."""
    h, w = plan.heights[index], plan.widths[index]
    side = PIXELS_PER_TOKEN_SIDE
    return pb2.FrameInfo(
        height=h,
        width=w,
        channels=3,
        timestamp_s=plan.timestamps[index],
        is_fast=plan.is_fast[index],
        grid_h=h // side,
        grid_w=w // side,
        tokens=(h // side) * (w // side),
        raw_size=frame.raw_size,
        encoded_size=len(frame.data),
        compression=compression,
        pixel_format=frame.pixel_format,
        color_matrix=frame.matrix,
        full_range=frame.full_range,
    )


# ---------------------------------------------------------------------------------------------
# Frame ranges


def check_frame_range(path: str, frame_start: int, frame_stop: int | None,
                      num_frames: int | None = None) -> tuple[int, int | None]:
    """Validates a requested range `[frame_start, frame_stop)` of sampled frames.

    With `num_frames` (the plan's frame count) the range must lie inside the plan and the
    resolved `(start, stop)` is returned; without it only the plan-independent checks run
    (non-negative, ordered, below `MAX_FRAME_RANGE`) and `stop` may stay `None`.

    Raises:
        InvalidRequestError: naming the path and every number involved.
    """
    if frame_start < 0 or (frame_stop is not None and frame_stop < 0):
        raise InvalidRequestError(
            path, f"frame range [{frame_start}, {frame_stop}) has a negative bound")
    if frame_stop is not None and frame_stop < frame_start:
        raise InvalidRequestError(
            path, f"frame range [{frame_start}, {frame_stop}) ends before it starts")
    if frame_start > MAX_FRAME_RANGE or (frame_stop is not None and frame_stop > MAX_FRAME_RANGE):
        raise InvalidRequestError(
            path, f"frame range [{frame_start}, {frame_stop}) exceeds the largest possible plan "
                  f"({MAX_FRAME_RANGE} frames)")
    if num_frames is None:
        return frame_start, frame_stop
    stop = num_frames if frame_stop is None else frame_stop
    if stop > num_frames or frame_start > stop:
        raise InvalidRequestError(
            path, f"frame range [{frame_start}, {stop}) is outside the plan's {num_frames} "
                  "sampled frames")
    return frame_start, stop


# ---------------------------------------------------------------------------------------------
# Frames


@dataclass(frozen=True)
class EncodedFrame:
    """One sampled frame as it travels: `data` is zstd (or raw) bytes of H x W x 3 uint8 RGB, or
    of the Y, U, V planes (`pixel_format` YUV420P, with their matrix and range)."""

    height: int
    width: int
    data: bytes
    pixel_format: int = pb2.PIXEL_FORMAT_RGB24
    matrix: str = ""
    full_range: bool = False

    @property
    def raw_size(self) -> int:
        if self.pixel_format == pb2.PIXEL_FORMAT_YUV420P:
            return self.height * self.width * 3 // 2
        return self.height * self.width * 3


def encode_frames(frames: Sequence[np.ndarray | Yuv420Frame], compression: int,
                  compressor: zstandard.ZstdCompressor | None) -> tuple[EncodedFrame, ...]:
    """Encodes uint8 H x W x 3 frames or `Yuv420Frame`s, each as one independent zstd frame (or
    raw bytes)."""
    out = []
    for frame in frames:
        if isinstance(frame, Yuv420Frame):
            raw: bytes | np.ndarray = yuv.pack(frame)
            h, w = frame.y.shape
            extra = {"pixel_format": pb2.PIXEL_FORMAT_YUV420P, "matrix": frame.matrix,
                     "full_range": frame.full_range}
        else:
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                raise ValueError(f"frame must be uint8 HxWx3, got {frame.dtype} {frame.shape}")
            raw = np.ascontiguousarray(frame)
            h, w = frame.shape[:2]
            extra = {}
        if compression == pb2.COMPRESSION_ZSTD:
            assert compressor is not None
            data = compressor.compress(raw)
        else:
            data = raw if isinstance(raw, bytes) else raw.tobytes()
        out.append(EncodedFrame(h, w, data, **extra))
    return tuple(out)


def decode_frame(info: pb2.FrameInfo, data: bytes,
                 decompressor: zstandard.ZstdDecompressor) -> np.ndarray | Yuv420Frame:
    """Rebuilds a frame from its header and bytes: a writable uint8 (height, width, 3) RGB array,
    or a `Yuv420Frame` (views of one writable buffer) for YUV420P.

    Raises:
        ValueError: the bytes do not hold exactly the header's `raw_size` bytes of pixels, or the
            header is inconsistent (unknown pixel format or colour matrix, odd YUV sides).
    """
    is_yuv = info.pixel_format == pb2.PIXEL_FORMAT_YUV420P
    if info.pixel_format not in PIXEL_FORMATS.values():
        raise ValueError(f"frame header has unknown pixel format {info.pixel_format}")
    if info.height <= 0 or info.width <= 0:
        raise ValueError(f"frame header has size {info.height}x{info.width}")
    raw_size = info.height * info.width * 3 // (2 if is_yuv else 1)
    if raw_size != info.raw_size or len(data) != info.encoded_size:
        raise ValueError(
            f"frame header {info.height}x{info.width} format {info.pixel_format} "
            f"raw_size={info.raw_size} encoded_size={info.encoded_size} does not match "
            f"{len(data)} bytes received")
    flat = np.empty(raw_size, dtype=np.uint8)
    if info.compression == pb2.COMPRESSION_NONE:
        flat[:] = np.frombuffer(data, dtype=np.uint8)
    else:
        view = memoryview(flat).cast("B")
        filled = 0
        with decompressor.stream_reader(data) as reader:
            while filled < raw_size:
                n = reader.readinto(view[filled:])
                if not n:
                    break
                filled += n
            extra = reader.read(1)
        if filled != raw_size or extra:
            raise ValueError(
                f"zstd frame decompressed to the wrong size (expected {raw_size} bytes)")
    if is_yuv:
        return yuv.unpack(flat, info.height, info.width, info.color_matrix or "bt601",
                          info.full_range)
    return flat.reshape(info.height, info.width, 3)


# ---------------------------------------------------------------------------------------------
# Errors


def error_status(err: MediaError) -> tuple[grpc.StatusCode, tuple[tuple[str, str], ...]]:
    """The status code and trailing metadata the server sends for `err`: printable ASCII, at
    most `META_PATH_CHARS` / `META_REASON_CHARS` characters (so no client text can make gRPC
    refuse the trailers as invalid or oversized)."""
    code = grpc.StatusCode.INVALID_ARGUMENT
    for cls in type(err).__mro__:
        if cls in ERROR_CODES:
            code = ERROR_CODES[cls]
            break
    name = next((c.__name__ for c in type(err).__mro__ if c.__name__ in _ERRORS_BY_NAME),
                MediaError.__name__)
    meta = (
        (META_TYPE, name),
        (META_PATH, paths.display(err.path, META_PATH_CHARS)),
        (META_REASON, paths.display(err.reason, META_REASON_CHARS)),
    )
    return code, meta


def busy_status(path: str, reason: str) -> tuple[tuple[str, str], ...]:
    """Trailing metadata of a RESOURCE_EXHAUSTED refusal (the server is at its limit)."""
    return ((META_TYPE, BUSY_TYPE), (META_PATH, paths.display(path, META_PATH_CHARS)),
            (META_REASON, paths.display(reason, META_REASON_CHARS)))


def error_from_status(code: grpc.StatusCode, details: str,
                      metadata: Sequence[tuple[str, str | bytes]] | None,
                      path: str) -> MediaError | None:
    """The `MediaError` a failed call stands for, or `None` when it is not a media error.

    Uses the class, path and reason the server put in the trailing metadata; falls back on the
    status code and the details string for servers that sent none.
    """
    meta = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in (metadata or ())}
    cls = _ERRORS_BY_NAME.get(meta.get(META_TYPE, ""))
    if cls is None:
        cls = _ERRORS_BY_CODE.get(code)
    if cls is None:
        return None
    return cls(path, meta.get(META_REASON, details or code.name))
