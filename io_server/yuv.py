"""YUV 4:2:0 planes and their conversion to RGB: what the YUV wire format leaves to the consumer.

One job: move 8-bit 4:2:0 frames (`media.Yuv420Frame`) between FFmpeg frames, bytes and RGB.

Two converters give the same pixels:
- `yuv420_to_rgb` runs FFmpeg's own converter (through PyAV) on the CPU. The server makes its RGB
  answer of the fast path with it, and the client converts YUV replies with it, so a client on
  the CPU gets the server's RGB pixels bit for bit.
- `yuv420_to_rgb_torch` computes the same thing with torch integer ops, on a GPU or the CPU.
  Its arithmetic is a model of FFmpeg's x86 converter, fitted by comparing outputs: inputs scaled
  by 8, coefficients in 13-bit fixed point, each product rounded down to whole levels
  (`(a * b) >> 16`), summed, clamped to 0..255. On x86-64 it equals `yuv420_to_rgb` exactly
  (tests/test_io_yuv.py checks every (U, V) pair); FFmpeg builds for other CPUs may round
  differently by one level.

Each chroma sample covers its 2 x 2 pixels. The matrix and range come from the frame
(`matrix_of`, `is_full_range`): BT.601 unless the stream says otherwise, as FFmpeg assumes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from io_server.media import COLOR_MATRICES, Yuv420Frame

if TYPE_CHECKING:
    import av
    import torch

# AVColorSpace values (libavutil/pixfmt.h) -> the matrix FFmpeg's scaler uses for them; anything
# else (unspecified, BT.470BG, SMPTE 170M, ...) is BT.601, FFmpeg's default.
_AVCOL_SPC_TO_MATRIX = {1: "bt709", 4: "fcc", 7: "smpte240m", 9: "bt2020", 10: "bt2020"}
_AVCOL_RANGE_JPEG = 2
_SWS_COLORSPACE = {"bt601": "ITU601", "bt709": "ITU709", "bt2020": "BT2020",
                   "smpte240m": "SMPTE240M", "fcc": "FCC"}
"""Our matrix names -> PyAV's `Colorspace` names (FFmpeg's SWS_CS_*)."""

PLANAR_420 = ("yuv420p", "yuvj420p")
"""FFmpeg pixel formats whose frames are 8-bit 4:2:0 planes (what the YUV wire format carries)."""


def matrix_of(colorspace: int) -> str:
    """The YCbCr matrix name for an FFmpeg frame's `colorspace` (BT.601 unless tagged)."""
    return _AVCOL_SPC_TO_MATRIX.get(int(colorspace), "bt601")


def is_full_range(color_range: int, pix_fmt: str) -> bool:
    """Whether a frame's luma spans 0..255 (JPEG range; the yuvj formats always do)."""
    return int(color_range) == _AVCOL_RANGE_JPEG or pix_fmt.startswith("yuvj")


def from_av(frame: av.VideoFrame, matrix: str, full_range: bool) -> Yuv420Frame:
    """The planes of a yuv420p/yuvj420p `frame` with even sides (copied out of FFmpeg)."""
    h, w = frame.height, frame.width
    flat = frame.to_ndarray()  # (h * 3 / 2, w): Y rows, then U, then V
    return unpack(flat.reshape(-1), h, w, matrix, full_range)


def yuv420_to_rgb(frame: Yuv420Frame) -> np.ndarray:
    """The (H, W, 3) uint8 RGB array of `frame`, by FFmpeg's converter (CPU)."""
    import av

    h, w = frame.y.shape
    fmt = "yuvj420p" if frame.full_range else "yuv420p"
    planes = np.concatenate([frame.y.reshape(-1), frame.u.reshape(-1), frame.v.reshape(-1)])
    vf = av.VideoFrame.from_ndarray(planes.reshape(h * 3 // 2, w), format=fmt)
    return np.ascontiguousarray(vf.to_ndarray(
        format="rgb24", src_colorspace=_SWS_COLORSPACE[frame.matrix],
        src_color_range="JPEG" if frame.full_range else "MPEG", threads=1))


def _q13(x: float) -> int:
    return int(np.floor(x * 8192.0 + 0.5))


def coefficients(matrix: str, full_range: bool) -> tuple[int, int, int, int, int, int]:
    """(y_offset, y, v->r, u->g, v->g, u->b): the 13-bit fixed-point constants of the
    conversion (green's are negative)."""
    kr, kb = COLOR_MATRICES[matrix]
    kg = 1.0 - kr - kb
    ky, kc, y0 = (1.0, 1.0, 0) if full_range else (255.0 / 219.0, 255.0 / 224.0, 16)
    return (y0, _q13(ky), _q13(2 * (1 - kr) * kc), -_q13(2 * (1 - kb) * kb / kg * kc),
            -_q13(2 * (1 - kr) * kr / kg * kc), _q13(2 * (1 - kb) * kc))


def yuv420_to_rgb_torch(frame: Yuv420Frame, device: str | torch.device | None = None
                        ) -> torch.Tensor:
    """The (H, W, 3) uint8 RGB tensor of `frame`, computed on `device` (default: CPU) with the
    integer model of FFmpeg's converter described in the module docstring."""
    import torch

    y0, cy, r_v, g_u, g_v, b_u = coefficients(frame.matrix, frame.full_range)
    h, w = frame.y.shape

    def load(plane: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(plane)).to(device=device, dtype=torch.int32)

    y = ((load(frame.y) - y0) * 8 * cy) >> 16
    u, v = (load(frame.u) - 128) * 8, (load(frame.v) - 128) * 8
    chroma = torch.stack([(v * r_v) >> 16, ((u * g_u) >> 16) + ((v * g_v) >> 16), (u * b_u) >> 16],
                         dim=-1)  # (h/2, w/2, 3)
    rgb = y.view(h // 2, 2, w // 2, 2, 1) + chroma[:, None, :, None, :]
    return rgb.clamp_(0, 255).to(torch.uint8).view(h, w, 3)


def pack(frame: Yuv420Frame) -> bytes:
    """The planes as the wire carries them: Y, then U, then V, each row-major."""
    return b"".join(np.ascontiguousarray(p).tobytes() for p in (frame.y, frame.u, frame.v))


def unpack(data: bytes | memoryview | np.ndarray, height: int, width: int, matrix: str,
           full_range: bool) -> Yuv420Frame:
    """The inverse of `pack` for a `height x width` frame (views into `data`, no copy).

    Raises:
        ValueError: `data` does not hold exactly `height * width * 3 / 2` bytes.
    """
    buf = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    n_y, n_c = height * width, (height // 2) * (width // 2)
    if height % 2 or width % 2 or buf.size != n_y + 2 * n_c:
        raise ValueError(f"{buf.size} bytes are not the YUV 4:2:0 planes of a {height}x{width} "
                         f"frame ({n_y + 2 * n_c} bytes, even sides)")
    return Yuv420Frame(y=buf[:n_y].reshape(height, width),
                       u=buf[n_y:n_y + n_c].reshape(height // 2, width // 2),
                       v=buf[n_y + n_c:].reshape(height // 2, width // 2),
                       matrix=matrix, full_range=full_range)
