"""What travels between the I/O server and its clients, in both directions.

One job: convert between the Python contracts of `io_server.media` and the messages of
`io_server/proto/io_server.proto` — frame plans, zstd-encoded frames, errors (a `MediaError`
subclass <-> a gRPC status code plus trailing metadata naming the class, the file and the
reason), and the frame-range check both the daemon and the in-process path apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import zstandard

from io_server.media import (
    PIXELS_PER_TOKEN_SIDE,
    AccessDeniedError,
    CorruptMediaError,
    FramePlan,
    InvalidRequestError,
    MediaError,
    MediaKind,
    MediaNotFoundError,
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

_KIND_TO_PB = {MediaKind.IMAGE: pb2.MEDIA_KIND_IMAGE, MediaKind.VIDEO: pb2.MEDIA_KIND_VIDEO}
_KIND_FROM_PB = {v: k for k, v in _KIND_TO_PB.items()}

COMPRESSIONS: dict[str, int] = {"zstd": pb2.COMPRESSION_ZSTD, "none": pb2.COMPRESSION_NONE}
"""Compression name (client argument, `--compression`) -> proto enum value."""


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


def frame_info(plan: FramePlan, index: int, encoded_size: int, compression: int) -> pb2.FrameInfo:
    """Header of sampled frame `index` of `plan` (uint8 RGB, HxWx3)."""
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
        raw_size=h * w * 3,
        encoded_size=encoded_size,
        compression=compression,
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
    """One sampled frame as it travels: `data` is zstd (or raw) bytes of HxWx3 uint8."""

    height: int
    width: int
    data: bytes

    @property
    def raw_size(self) -> int:
        return self.height * self.width * 3


def encode_frames(frames: Sequence[np.ndarray], compression: int,
                  compressor: zstandard.ZstdCompressor | None) -> tuple[EncodedFrame, ...]:
    """Encodes uint8 HxWx3 frames, each as one independent zstd frame (or raw bytes)."""
    out = []
    for frame in frames:
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"frame must be uint8 HxWx3, got {frame.dtype} {frame.shape}")
        contiguous = np.ascontiguousarray(frame)
        if compression == pb2.COMPRESSION_ZSTD:
            assert compressor is not None
            data = compressor.compress(contiguous)
        else:
            data = contiguous.tobytes()
        out.append(EncodedFrame(frame.shape[0], frame.shape[1], data))
    return tuple(out)


def decode_frame(info: pb2.FrameInfo, data: bytes,
                 decompressor: zstandard.ZstdDecompressor) -> np.ndarray:
    """Rebuilds a writable uint8 array of shape (info.height, info.width, info.channels).

    Raises:
        ValueError: when the bytes do not hold exactly `info.raw_size` bytes of pixels.
    """
    shape = (info.height, info.width, info.channels)
    raw_size = info.height * info.width * info.channels
    if raw_size != info.raw_size or len(data) != info.encoded_size:
        raise ValueError(
            f"frame header {shape} raw_size={info.raw_size} encoded_size={info.encoded_size} "
            f"does not match {len(data)} bytes received")
    out = np.empty(shape, dtype=np.uint8)
    if info.compression == pb2.COMPRESSION_NONE:
        out.reshape(-1)[:] = np.frombuffer(data, dtype=np.uint8)
        return out
    view = memoryview(out).cast("B")
    filled = 0
    with decompressor.stream_reader(data) as reader:
        while filled < raw_size:
            n = reader.readinto(view[filled:])
            if not n:
                break
            filled += n
        extra = reader.read(1)
    if filled != raw_size or extra:
        raise ValueError(f"zstd frame decompressed to the wrong size (expected {raw_size} bytes)")
    return out


# ---------------------------------------------------------------------------------------------
# Errors


def error_status(err: MediaError) -> tuple[grpc.StatusCode, tuple[tuple[str, str], ...]]:
    """The status code and trailing metadata the server sends for `err`."""
    code = grpc.StatusCode.INVALID_ARGUMENT
    for cls in type(err).__mro__:
        if cls in ERROR_CODES:
            code = ERROR_CODES[cls]
            break
    name = next((c.__name__ for c in type(err).__mro__ if c.__name__ in _ERRORS_BY_NAME),
                MediaError.__name__)
    # Metadata values must be printable ASCII; escape anything else.
    meta = (
        (META_TYPE, name),
        (META_PATH, err.path.encode("ascii", "backslashreplace").decode()),
        (META_REASON, err.reason.encode("ascii", "backslashreplace").decode()[:4000]),
    )
    return code, meta


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
