"""Data contracts shared by the Keye media processor, the decoding backends, the gRPC server
and the client.

A media item is one image or one video file. Processing it follows Keye-VL-1.5: sample frames,
classify them as slow or fast, pick each frame's resized size (multiples of 28 px; one LLM token
covers 28 x 28 px), then decode and resize. `FramePlan` is everything but the pixels (what `Probe`
returns and what a dataset index stores); `DecodedMedia` adds the uint8 pixels of a range of the
sampled frames (what `Decode` returns): RGB arrays, or `Yuv420Frame` planes when a caller asked to
keep the YUV 4:2:0 wire format (`io_server.yuv` converts them).

Invariants:
- all per-frame tuples of a `FramePlan` have length `num_frames`;
- `heights[i] % 28 == 0 and widths[i] % 28 == 0`, and `tokens[i] == heights[i] * widths[i] // 784`;
- an image is a plan with one frame, `is_fast == (False,)` and `timestamps == (0.0,)`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

PIXELS_PER_TOKEN_SIDE = 28
"""One LLM token covers 28 x 28 px (2 x 2 ViT patches of 14 px)."""


class MediaKind(enum.Enum):
    IMAGE = "image"
    VIDEO = "video"


@dataclass(frozen=True)
class FramePlan:
    """The processed form of one media item, without pixels."""

    path: str
    kind: MediaKind
    source_width: int
    source_height: int
    source_fps: float
    """Frames per second of the source video; 0.0 for images."""
    duration_s: float
    """Duration of the source video in seconds; 0.0 for images."""
    num_source_frames: int
    frame_indices: tuple[int, ...]
    """Index of each sampled frame in the source stream."""
    timestamps: tuple[float, ...]
    """Presentation time of each sampled frame in seconds."""
    is_fast: tuple[bool, ...]
    heights: tuple[int, ...]
    """Resized height in pixels of each sampled frame (a multiple of 28)."""
    widths: tuple[int, ...]

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)

    @property
    def tokens(self) -> tuple[int, ...]:
        """LLM tokens of each sampled frame (h * w / 28^2)."""
        side2 = PIXELS_PER_TOKEN_SIDE * PIXELS_PER_TOKEN_SIDE
        return tuple(h * w // side2 for h, w in zip(self.heights, self.widths, strict=True))

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)

    @property
    def num_fast(self) -> int:
        return sum(self.is_fast)


COLOR_MATRICES: dict[str, tuple[float, float]] = {
    "bt601": (0.299, 0.114),
    "bt709": (0.2126, 0.0722),
    "bt2020": (0.2627, 0.0593),
    "smpte240m": (0.212, 0.087),
    "fcc": (0.30, 0.11),
}
"""YCbCr matrix name -> (Kr, Kb) luma weights of red and blue (Kg = 1 - Kr - Kb)."""


@dataclass(frozen=True)
class Yuv420Frame:
    """One frame as 8-bit YUV 4:2:0 planes (what the YUV wire format carries).

    `y` is (H, W) uint8, `u` and `v` are (H/2, W/2) uint8 (H and W even); `matrix` names the YCbCr
    matrix (`COLOR_MATRICES`) and `full_range` says whether Y spans 0..255 (JPEG) rather than
    16..235 (MPEG). `io_server.yuv.yuv420_to_rgb` turns it into the RGB frame.
    """

    y: np.ndarray
    u: np.ndarray
    v: np.ndarray
    matrix: str = "bt601"
    full_range: bool = False

    def __post_init__(self) -> None:
        h, w = self.y.shape
        if h % 2 or w % 2:
            raise ValueError(f"YUV 4:2:0 needs even sides, got {h}x{w}")
        for name, plane in (("u", self.u), ("v", self.v)):
            if plane.shape != (h // 2, w // 2):
                raise ValueError(f"{name} plane is {plane.shape}, expected {(h // 2, w // 2)} "
                                 f"for a {h}x{w} frame")
        if any(p.dtype != np.uint8 for p in (self.y, self.u, self.v)):
            raise ValueError("YUV planes must be uint8")
        if self.matrix not in COLOR_MATRICES:
            raise ValueError(f"unknown colour matrix {self.matrix!r}; known: "
                             f"{sorted(COLOR_MATRICES)}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, 3): the shape of the RGB frame it stands for."""
        return (self.y.shape[0], self.y.shape[1], 3)

    @property
    def nbytes(self) -> int:
        """Bytes of the three planes: H * W * 3 / 2, half of RGB."""
        return self.y.nbytes + self.u.nbytes + self.v.nbytes


@dataclass(frozen=True)
class DecodedMedia:
    """Pixels of sampled frames `[frame_start, frame_stop)` of `plan`.

    `frames[i]` is the uint8 RGB array of shape `(plan.heights[j], plan.widths[j], 3)` for
    `j = frame_start + i`, or its `Yuv420Frame` when the caller asked to keep YUV planes.
    """

    plan: FramePlan
    frame_start: int
    frame_stop: int
    frames: tuple[np.ndarray | Yuv420Frame, ...]


class MediaError(Exception):
    """A media item that cannot be served. `path` names the file, `reason` says why.

    The gRPC server maps the subclasses to status codes (see `io_server.server`).
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class MediaNotFoundError(MediaError):
    """The file does not exist (gRPC NOT_FOUND)."""


class CorruptMediaError(MediaError):
    """The file exists but cannot be decoded: truncated, corrupt, no video stream.

    gRPC INVALID_ARGUMENT.
    """


class InvalidRequestError(MediaError):
    """The request itself is impossible: a frame range outside the plan, absurd sizes.

    gRPC INVALID_ARGUMENT.
    """


class AccessDeniedError(MediaError):
    """The path resolves outside the server's allowed roots (PERMISSION_DENIED)."""
