"""The YUV 4:2:0 wire format (`io_server.yuv`, `io_server.wire`): the torch converter against
FFmpeg's own converter on every (U, V) pair, the wire round trip, and the fast path's RGB answer
made from exactly the planes the YUV format carries. No processes: the server-level check is in
tests/test_io_client.py."""

from __future__ import annotations

import os
import platform

import av
import numpy as np
import pytest
import torch
import zstandard

from io_server import synthetic, wire, yuv
from io_server.backends import PyAVBackend
from io_server.client import to_torch
from io_server.media import COLOR_MATRICES, InvalidRequestError, Yuv420Frame
from io_server.proto import io_server_pb2 as pb2

X86 = platform.machine() in ("x86_64", "AMD64")


def _all_chroma_frame(matrix: str, full_range: bool) -> Yuv420Frame:
    """512 x 512: every (U, V) pair once (one per 2 x 2 block), random luma."""
    u = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 256, axis=1)
    v = np.repeat(np.arange(256, dtype=np.uint8)[None, :], 256, axis=0)
    y = np.random.default_rng(0).integers(0, 256, (512, 512), dtype=np.uint8)
    return Yuv420Frame(y=y, u=u, v=v, matrix=matrix, full_range=full_range)


def _float_reference(frame: Yuv420Frame) -> np.ndarray:
    """The BT.601/709 formula in float64, nearest chroma, rounded."""
    kr, kb = COLOR_MATRICES[frame.matrix]
    kg = 1 - kr - kb
    ky, kc, y0 = (1.0, 1.0, 0) if frame.full_range else (255 / 219, 255 / 224, 16)
    y = (frame.y.astype(np.float64) - y0) * ky
    cb = (frame.u.repeat(2, 0).repeat(2, 1) - 128.0) * kc
    cr = (frame.v.repeat(2, 0).repeat(2, 1) - 128.0) * kc
    rgb = np.stack([y + 2 * (1 - kr) * cr, y - 2 * (1 - kb) * kb / kg * cb
                    - 2 * (1 - kr) * kr / kg * cr, y + 2 * (1 - kb) * cb], -1)
    return np.clip(np.floor(rgb + 0.5), 0, 255)


@pytest.mark.parametrize("full_range", [False, True], ids=["limited", "full"])
@pytest.mark.parametrize("matrix", sorted(COLOR_MATRICES))
def test_torch_converter_equals_ffmpegs_on_every_chroma_pair(matrix: str,
                                                             full_range: bool) -> None:
    frame = _all_chroma_frame(matrix, full_range)
    ffmpeg = yuv.yuv420_to_rgb(frame).astype(np.int16)
    ours = yuv.yuv420_to_rgb_torch(frame).numpy().astype(np.int16)
    diff = np.abs(ours - ffmpeg)
    if X86 and matrix != "fcc":
        assert diff.max() == 0, f"{matrix}: {int((diff > 0).sum())} pixels differ"
    else:  # FFmpeg rounds its FCC table (and other CPUs' converters) a little differently
        assert diff.max() <= 1 and diff.mean() < 0.01
    # Both truncate where the formula rounds: within 3 levels of it, about 0.4-0.7 on average.
    gap = np.abs(ours - _float_reference(frame))
    assert gap.max() <= 3 and gap.mean() < 1.0


def test_planes_round_trip_through_the_wire() -> None:
    rng = np.random.default_rng(1)
    frame = Yuv420Frame(y=rng.integers(0, 256, (56, 84), dtype=np.uint8),
                        u=rng.integers(0, 256, (28, 42), dtype=np.uint8),
                        v=rng.integers(0, 256, (28, 42), dtype=np.uint8), matrix="bt709",
                        full_range=True)
    dctx = zstandard.ZstdDecompressor()
    plan = type("P", (), {"heights": (56,), "widths": (84,), "timestamps": (0.0,),
                          "is_fast": (False,)})()
    for compression in (pb2.COMPRESSION_ZSTD, pb2.COMPRESSION_NONE):
        (enc,) = wire.encode_frames([frame], compression, zstandard.ZstdCompressor(level=3))
        assert enc.raw_size == 56 * 84 * 3 // 2  # half of RGB's 56 * 84 * 3
        info = wire.frame_info(plan, 0, enc, compression)
        assert info.pixel_format == pb2.PIXEL_FORMAT_YUV420P and info.color_matrix == "bt709"
        back = wire.decode_frame(info, enc.data, dctx)
        assert isinstance(back, Yuv420Frame) and back.full_range and back.matrix == "bt709"
        for a, b in ((back.y, frame.y), (back.u, frame.u), (back.v, frame.v)):
            np.testing.assert_array_equal(a, b)
        assert back.y.flags.writeable
    with pytest.raises(ValueError, match="not the YUV 4:2:0 planes"):
        yuv.unpack(b"\0" * 100, 56, 84, "bt601", False)
    with pytest.raises(ValueError, match="even sides"):
        Yuv420Frame(y=np.zeros((3, 4), np.uint8), u=np.zeros((1, 2), np.uint8),
                    v=np.zeros((1, 2), np.uint8))


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("yuv")
    return {
        "420": synthetic.write_video(str(root / "a.mp4"), width=208, height=144, seconds=3.0,
                                     fps=10.0, seed=41, scene_cuts=(1.5,)).path,
        "444": synthetic.write_video(str(root / "b.mp4"), width=151, height=97, seconds=2.0,
                                     fps=10.0, seed=42, pix_fmt="yuv444p").path,
        "png": synthetic.write_image(str(root / "c.png"), 90, 70, seed=43),
    }


def test_fast_path_rgb_is_made_from_the_planes_the_wire_carries(clips: dict[str, str]) -> None:
    backend = PyAVBackend(threads=1, resize="fast")
    path = clips["420"]
    plan = backend.probe(path)
    rgb = backend.decode(path, plan=plan).frames
    planes = backend.decode(path, plan=plan, keep_yuv=True)
    assert all(isinstance(f, Yuv420Frame) for f in planes.frames)
    torch_rgb = to_torch(planes)  # the GPU converter, run on the CPU here
    for ours, p, t in zip(rgb, planes.frames, torch_rgb, strict=True):
        np.testing.assert_array_equal(yuv.yuv420_to_rgb(p), ours)
        if X86:
            np.testing.assert_array_equal(t.numpy(), ours)
        assert p.nbytes * 2 == ours.nbytes  # 4:2:0 is exactly half of RGB before zstd
    # The planes are FFmpeg's bicubic scaling of the decoded planes, independently redone here.
    with av.open(path) as container:
        src = [f for i, f in enumerate(container.decode(video=0)) if i in plan.frame_indices]
    for frame, p, h, w in zip(src, planes.frames, plan.heights, plan.widths, strict=True):
        scaled = frame.reformat(width=w, height=h, interpolation="BICUBIC").to_ndarray()
        np.testing.assert_array_equal(scaled[:h], p.y)
    # Sources that are not 4:2:0 (4:4:4 video, RGB PNG) stay RGB: 4:2:0 would lose colour.
    for key in ("444", "png"):
        kept = backend.decode(clips[key], keep_yuv=True).frames
        assert all(isinstance(f, np.ndarray) for f in kept)


def test_yuv_with_the_exact_path_is_refused_with_the_reason(clips: dict[str, str]) -> None:
    with pytest.raises(InvalidRequestError, match="resize 'fast'"):
        PyAVBackend().decode(clips["420"], keep_yuv=True)
    assert os.path.exists(clips["420"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.gpu
def test_gpu_conversion_equals_the_server_rgb(clips: dict[str, str]) -> None:
    backend = PyAVBackend(threads=1, resize="fast")
    media = backend.decode(clips["420"], keep_yuv=True)
    for p, t in zip(media.frames, to_torch(media, device="cuda"), strict=True):
        assert t.is_cuda
        np.testing.assert_array_equal(t.cpu().numpy(), yuv.yuv420_to_rgb(p))
