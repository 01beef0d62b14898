"""Pure checks against hostile input (`io_server.paths`, `io_server.imagesize`) and the same
refusals on the in-process path (`IOClient()` with no server). The daemon's side is
tests/test_io_hardening.py."""

from __future__ import annotations

import os
import struct

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from io_server import imagesize, paths, synthetic
from io_server.backends import PyAVBackend
from io_server.client import IOClient
from io_server.media import InvalidRequestError, MediaNotFoundError


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=3000), limit=st.integers(20, 400))
def test_display_is_short_printable_ascii(text: str, limit: int) -> None:
    shown = paths.display(text, limit)
    assert shown.isascii() and shown.isprintable()
    assert len(shown) <= limit + 40
    if text.isascii() and text.isprintable() and len(text) <= limit:
        assert shown == text  # ordinary text is shown as it is


@pytest.mark.parametrize("path,needle", [
    ("", "empty"),
    ("a\x00b", "U+0000"),
    ("clip.mp4\nINFO forged", "U+000A"),
    ("x\x1b[2J", "U+001B"),
    ("x\x85y", "U+0085"),
    ("a\u2029b", "U+2029"),
    ("/d/" + "x" * 4093, "4096 bytes long, over the limit of 4095"),
    ("/d/" + "é" * 2047, "4097 bytes long"),
    ("/d/" + "n" * 256 + "/f", "256 bytes long, over NAME_MAX"),
])
def test_check_path_names_the_problem(path: str, needle: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        paths.check_path(path)
    assert needle in info.value.reason
    assert len(info.value.path) <= paths.DISPLAY_CHARS + 40  # the path is shown shortened


def test_check_path_accepts_ordinary_paths() -> None:
    for path in ("/data/clip.mp4", "rel/a b/ünïcode.mp4", "/d/" + "x" * 255, "y/" * 2047 + "y"):
        paths.check_path(path)


def test_declared_sizes_of_real_and_forged_headers(tmp_path) -> None:
    pixels = synthetic.image_pixels(150, 110, 3)
    for suffix in (".png", ".jpg", ".webp"):
        path = synthetic.write_image(str(tmp_path / f"i{suffix}"), 150, 110, seed=3)
        with open(path, "rb") as f:
            assert imagesize.declared_size(f.read(imagesize.SNIFF_BYTES)) == (150, 110), suffix
    for codec, suffix, muxer in (("gif", ".gif", "gif"), ("bmp", ".bmp", "image2"),
                                 ("qoi", ".qoi", "image2")):
        path = str(tmp_path / f"j{suffix}")
        with av.open(path, "w", format=muxer) as container:
            stream = container.add_stream(codec, rate=1)
            stream.width, stream.height = 150, 110
            stream.pix_fmt = {"gif": "rgb8", "bmp": "bgr24", "qoi": "rgb24"}[codec]
            frame = av.VideoFrame.from_ndarray(pixels, "rgb24").reformat(format=stream.pix_fmt)
            container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        with open(path, "rb") as f:
            assert imagesize.declared_size(f.read(imagesize.SNIFF_BYTES)) == (150, 110), codec
    bomb = synthetic.write_png_zeros(str(tmp_path / "b.png"), 30000, 20000, rows=1)
    with open(bomb, "rb") as f:
        assert imagesize.declared_size(f.read(64)) == (30000, 20000)
    vp8x = b"RIFF\0\0\0\0WEBPVP8X" + b"\0" * 8 + (29999).to_bytes(3, "little") \
        + (19999).to_bytes(3, "little")
    assert imagesize.declared_size(vp8x) == (30000, 20000)
    jpeg = b"\xff\xd8\xff\xe0" + struct.pack(">H", 4) + b"\0\0" + b"\xff\xc0" \
        + struct.pack(">HBHH", 17, 8, 20000, 30000)
    assert imagesize.declared_size(jpeg) == (30000, 20000)
    assert imagesize.declared_size(b"not an image at all") is None
    assert imagesize.declared_size(b"\xff\xd8\xff\xe0\x00") is None  # truncated


def test_the_in_process_path_refuses_the_same_inputs(tmp_path) -> None:
    root = tmp_path
    bomb = synthetic.write_png_zeros(str(root / "bomb.png"), 16000, 16000, rows=2)
    os.symlink(root / "loop", root / "loop")
    clip = synthetic.write_video(str(root / "c.mp4"), width=64, height=48, seconds=1.0, fps=4,
                                 seed=1).path
    with IOClient() as client:
        with pytest.raises(InvalidRequestError, match="16000x16000 frame = 256,000,000 pixels"):
            client.decode(bomb)
        with pytest.raises(InvalidRequestError, match="symlink loop"):
            client.probe(str(root / "loop"))
        with pytest.raises(InvalidRequestError, match="control character U\\+000A"):
            client.decode(clip + "\nx")
        with pytest.raises(MediaNotFoundError):
            client.decode(str(root / "missing.mp4"))
        assert len(client.decode(clip).frames) == 2
    small = PyAVBackend(max_pixels=64 * 48 - 1)
    with pytest.raises(InvalidRequestError, match="the stream declares a 64x48 frame"):
        small.probe(clip)
    assert np.asarray(PyAVBackend(max_pixels=64 * 48).decode(clip).frames[0]).ndim == 3
