"""Decoding backends (`io_server.backends`): pixels of both paths against an independent PyAV
decode (exact: PyAV RGB + torch's antialiased bilinear resize; fast: FFmpeg's scaler), frame
ranges, codecs, images, errors, and the DALI backend (skipped without DALI and a GPU)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from io_server import keye, synthetic
from io_server.backends import PyAVBackend, get_backend
from io_server.keye import PAPER_PRESET
from io_server.media import (
    CorruptMediaError,
    FramePlan,
    InvalidRequestError,
    MediaError,
    MediaKind,
    MediaNotFoundError,
)

CLIPS = {
    "h264": (".mp4", {"width": 320, "height": 240, "seconds": 5.0, "fps": 12.0, "seed": 21,
                      "scene_cuts": (2.0,)}),
    "hevc": (".mkv", {"width": 256, "height": 144, "seconds": 4.0, "fps": 15.0, "seed": 22,
                      "scene_cuts": (1.5,)}),
    "vp9": (".webm", {"width": 208, "height": 160, "seconds": 4.0, "fps": 10.0, "seed": 23,
                      "scene_cuts": (3.0,)}),
}


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("backend_media")
    out = {}
    for codec, (suffix, kwargs) in CLIPS.items():
        out[codec] = synthetic.write_video(str(d / f"{codec}{suffix}"), codec=codec,
                                           **kwargs).path
    for suffix in (".png", ".jpg", ".webp"):
        out[suffix] = synthetic.write_image(str(d / f"img{suffix}"), 150, 110, seed=24)
    out["truncated"] = synthetic.write_truncated(out["h264"], str(d / "truncated.mp4"), 0.5)
    out["truncated_webm"] = synthetic.write_truncated(out["vp9"], str(d / "truncated.webm"), 0.5)
    out["garbage"] = synthetic.write_garbage(str(d / "garbage.mp4"), 8192, seed=1)
    out["corrupted"] = synthetic.write_corrupted(out["vp9"], str(d / "corrupted.webm"), seed=2)
    out["empty"] = str(d / "empty.mp4")
    open(out["empty"], "wb").close()
    out["audio"] = _write_audio(str(d / "audio.wav"))
    # Sparse sampling (2 of 120 fps) and a keyframe every 10 frames: decoding seeks.
    out["seek"] = synthetic.write_video(str(d / "seek.mp4"), width=160, height=96, seconds=8.0,
                                        fps=120.0, seed=25, gop=10, scene_cuts=(3.0, 5.5)).path
    return out


def _write_audio(path: str) -> str:
    """A WAV file: a real container with no video stream."""
    with av.open(path, "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        samples = (np.sin(np.arange(8000) / 10.0) * 8000).astype(np.int16)[None, :]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 8000
        frame.time_base = Fraction(1, 8000)
        frame.pts = 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def _torch_resize(rgb: np.ndarray, h: int, w: int) -> np.ndarray:
    """Keye's processor's resize: uint8 NCHW through torch's antialiased bilinear interpolate."""
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    y = torch.nn.functional.interpolate(x, [h, w], mode="bilinear", antialias=True)
    return y[0].permute(1, 2, 0).numpy()


def _reference_frames(path: str, plan: FramePlan, mode: str = "exact") -> list[np.ndarray]:
    """Independent decode: every frame in order, keep the planned indices, resize each to its
    planned size. exact: PyAV RGB at the source size + torch (videos); fast: FFmpeg's bicubic
    scaler on the 4:2:0 planes, then FFmpeg's conversion (other formats: scaled to RGB)."""
    wanted = {idx: j for j, idx in enumerate(plan.frame_indices)}
    out: list[np.ndarray | None] = [None] * plan.num_frames
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                j = wanted[i]
                h, w = plan.heights[j], plan.widths[j]
                if mode == "exact":
                    out[j] = _torch_resize(frame.to_ndarray(format="rgb24"), h, w)
                elif frame.format.name in ("yuv420p", "yuvj420p"):
                    out[j] = frame.reformat(width=w, height=h, format=frame.format.name,
                                            interpolation="BICUBIC").to_ndarray(format="rgb24")
                else:
                    out[j] = frame.to_ndarray(width=w, height=h, format="rgb24",
                                              interpolation="BICUBIC")
    assert all(f is not None for f in out)
    return [f for f in out if f is not None]


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("codec", list(CLIPS))
def test_decode_equals_independent_pyav_decode(codec: str, mode: str,
                                               media: dict[str, str]) -> None:
    path = media[codec]
    backend = get_backend("pyav", resize=mode)
    plan = backend.probe(path)
    suffix, kwargs = CLIPS[codec]
    assert plan.kind is MediaKind.VIDEO
    assert (plan.source_width, plan.source_height) == (kwargs["width"], kwargs["height"])
    assert plan.num_source_frames == round(kwargs["seconds"] * kwargs["fps"])
    assert plan.source_fps == pytest.approx(kwargs["fps"])
    assert plan.duration_s == pytest.approx(kwargs["seconds"], abs=0.15)
    assert plan.num_frames == int(kwargs["seconds"] * 2)  # 2 fps sampling
    assert 0 < plan.num_fast < plan.num_frames
    decoded = backend.decode(path, plan=plan)
    assert (decoded.frame_start, decoded.frame_stop) == (0, plan.num_frames)
    reference = _reference_frames(path, plan, mode)
    for j, (ours, ref) in enumerate(zip(decoded.frames, reference, strict=True)):
        assert ours.dtype == np.uint8 and ours.shape == (plan.heights[j], plan.widths[j], 3)
        assert ours.flags.c_contiguous
        np.testing.assert_array_equal(ours, ref)
    # The synthetic content survives encoding and scaling: close to the rendered source.
    assert float(np.mean([f.mean() for f in decoded.frames])) > 30


@pytest.mark.parametrize("codec", list(CLIPS))
def test_frame_ranges_concatenate_to_the_full_decode(codec: str, media: dict[str, str]) -> None:
    backend = PyAVBackend(threads=1)
    plan = backend.probe(media[codec])
    full = backend.decode(media[codec], plan=plan).frames
    n = plan.num_frames
    bounds = [0, 1, n // 2, n - 1, n]
    parts: list[np.ndarray] = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        chunk = backend.decode(media[codec], frame_start=a, frame_stop=b, plan=plan)
        assert (chunk.frame_start, chunk.frame_stop, len(chunk.frames)) == (a, b, b - a)
        parts.extend(chunk.frames)
    assert len(parts) == n
    for x, y in zip(parts, full, strict=True):
        np.testing.assert_array_equal(x, y)
    empty = backend.decode(media[codec], frame_start=2, frame_stop=2, plan=plan)
    assert empty.frames == ()


@pytest.mark.parametrize("threads", [1, 0])
def test_seeking_decode_equals_sequential_decode(threads: int, media: dict[str, str]) -> None:
    """Keyframes every 10 frames, samples every 60: the backend seeks between sampled frames
    (and to the first frame of a range); the reference decodes every frame in order."""
    path = media["seek"]
    backend = PyAVBackend(threads=threads)
    plan = backend.probe(path)
    assert plan.num_source_frames == 960 and plan.num_frames == 16
    reference = _reference_frames(path, plan)
    full = backend.decode(path, plan=plan).frames
    for ours, ref in zip(full, reference, strict=True):
        np.testing.assert_array_equal(ours, ref)
    for a, b in [(5, 6), (7, 12), (15, 16)]:
        chunk = backend.decode(path, frame_start=a, frame_stop=b, plan=plan).frames
        for ours, ref in zip(chunk, reference[a:b], strict=True):
            np.testing.assert_array_equal(ours, ref)
    # The Slow-Fast classification from the seeking probe equals one from a sequential decode.
    sh, sw = keye.similarity_size(plan.source_height, plan.source_width)
    wanted = set(plan.frame_indices)
    with av.open(path) as container:
        lowres = [_torch_resize(f.to_ndarray(format="rgb24"), sh, sw)
                  for i, f in enumerate(container.decode(video=0)) if i in wanted]
    assert keye.classify_slow_fast(lowres) == plan.is_fast
    assert plan.is_fast.count(False) == 3  # one slow frame per scene


def test_decode_without_plan_replans_identically(media: dict[str, str]) -> None:
    backend = PyAVBackend()
    plan = backend.probe(media["h264"])
    decoded = backend.decode(media["h264"], frame_start=3, frame_stop=6)
    assert decoded.plan == plan
    with_plan = backend.decode(media["h264"], frame_start=3, frame_stop=6, plan=plan)
    for x, y in zip(decoded.frames, with_plan.frames, strict=True):
        np.testing.assert_array_equal(x, y)


def test_plan_invariants_and_presets(media: dict[str, str]) -> None:
    backend = PyAVBackend()
    for key in ("h264", "hevc", "vp9", ".png"):
        for preset in (keye.RELEASE_PRESET, PAPER_PRESET):
            plan = backend.probe(media[key], preset)
            lengths = {len(plan.frame_indices), len(plan.timestamps), len(plan.is_fast),
                       len(plan.heights), len(plan.widths)}
            assert lengths == {plan.num_frames}
            assert all(h % 28 == 0 and w % 28 == 0 for h, w in zip(plan.heights, plan.widths,
                                                                   strict=True))
            assert list(plan.tokens) == [h * w // 784 for h, w in zip(plan.heights, plan.widths,
                                                                      strict=True)]
            assert plan.path == media[key]


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_images_are_one_frame_media(suffix: str, media: dict[str, str]) -> None:
    from io_server.resize import pil_bicubic_resize

    backend = PyAVBackend()
    plan = backend.probe(media[suffix])
    assert plan.kind is MediaKind.IMAGE
    assert (plan.num_frames, plan.is_fast, plan.timestamps) == (1, (False,), (0.0,))
    assert (plan.source_width, plan.source_height) == (150, 110)
    assert (plan.heights[0], plan.widths[0]) == keye.image_size(110, 150)
    (frame,) = backend.decode(media[suffix], plan=plan).frames
    with av.open(media[suffix]) as container:
        source = next(container.decode(video=0)).to_ndarray(format="rgb24")
    # exact: Pillow's bicubic (keye_vl_utils.fetch_image), checked against Pillow itself in
    # tests/test_keye_pixels.py; fast: FFmpeg's scaler.
    np.testing.assert_array_equal(frame, pil_bicubic_resize(source, (plan.heights[0],
                                                                      plan.widths[0])))
    (fast,) = PyAVBackend(resize="fast").decode(media[suffix], plan=plan).frames
    (ref,) = _reference_frames(media[suffix], plan, "fast")
    np.testing.assert_array_equal(fast, ref)
    if suffix == ".png":  # lossless: the decoded source is the pixels written
        np.testing.assert_array_equal(source, synthetic.image_pixels(150, 110, 24))


# --------------------------------------------------------------------------------------------
# Errors


def test_missing_file_names_the_path(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(str(tmp_path), "nope.mp4")
    for call in (lambda: PyAVBackend().probe(path), lambda: PyAVBackend().decode(path)):
        with pytest.raises(MediaNotFoundError) as info:
            call()
        assert info.value.path == path and path in str(info.value)


@pytest.mark.parametrize("key", ["truncated", "truncated_webm", "garbage", "corrupted", "empty",
                                 "audio"])
def test_corrupt_media_raise_with_ffmpegs_reason(key: str, media: dict[str, str]) -> None:
    backend = PyAVBackend()
    t0 = time.monotonic()
    with pytest.raises(CorruptMediaError) as info:
        plan = backend.probe(media[key])
        backend.decode(media[key], plan=plan)  # a header that survives must fail on decode
    assert time.monotonic() - t0 < 10.0  # never hangs
    assert info.value.path == media[key] and info.value.reason
    if key == "audio":
        assert "no video stream" in info.value.reason


def test_directory_is_not_media(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(InvalidRequestError, match="not a regular file"):
        PyAVBackend().probe(str(tmp_path))


@pytest.mark.parametrize("start,stop", [(-1, 2), (3, 2), (0, 10**9), (10**9, None), (0, 9)])
def test_bad_frame_ranges(start: int, stop: int | None, media: dict[str, str]) -> None:
    backend = PyAVBackend()
    plan = backend.probe(media["vp9"])
    assert plan.num_frames == 8
    with pytest.raises(InvalidRequestError, match=r"frame range"):
        backend.decode(media["vp9"], frame_start=start, frame_stop=stop, plan=plan)


def test_plan_of_another_file_is_rejected(media: dict[str, str]) -> None:
    backend = PyAVBackend()
    plan = backend.probe(media["vp9"])
    with pytest.raises(InvalidRequestError, match="plan"):
        backend.decode(media["h264"], plan=plan)
    stale = dataclasses.replace(backend.probe(media["h264"]), num_source_frames=59)
    with pytest.raises(InvalidRequestError, match="changed since it was probed"):
        backend.decode(media["h264"], plan=stale)


def test_extreme_aspect_ratio_is_an_invalid_request(tmp_path: os.PathLike[str]) -> None:
    path = synthetic.write_image(os.path.join(str(tmp_path), "strip.png"), 2020, 10, seed=0)
    with pytest.raises(InvalidRequestError, match="aspect ratio"):
        PyAVBackend().probe(path)


@pytest.mark.parametrize("codec,suffix", [("h264", ".mp4"), ("vp9", ".webm")])
def test_synthetic_media_are_byte_identical_per_seed(codec: str, suffix: str,
                                                     tmp_path: os.PathLike[str]) -> None:
    def write(name: str, seed: int) -> bytes:
        path = os.path.join(str(tmp_path), name + suffix)
        synthetic.write_video(path, width=96, height=64, seconds=1.0, fps=8.0, codec=codec,
                              seed=seed)
        with open(path, "rb") as f:
            return f.read()

    assert write("a", 3) == write("b", 3)
    assert write("c", 4) != write("a", 3)


def test_get_backend_names() -> None:
    assert get_backend().name == "pyav"
    assert get_backend().resize == "exact" and get_backend(resize="fast").resize == "fast"
    with pytest.raises(ValueError, match="unknown decode backend"):
        get_backend("ffmpeg-cli")
    with pytest.raises(ValueError, match="resize mode 'bicubic'"):
        get_backend(resize="bicubic")
    assert issubclass(CorruptMediaError, MediaError)


# --------------------------------------------------------------------------------------------
# DALI (GPU)


def _gpu_reason() -> str | None:
    """Why the DALI test cannot run here, or None when it can."""
    if importlib.util.find_spec("nvidia") is None or \
            importlib.util.find_spec("nvidia.dali") is None:
        return "nvidia-dali is not installed"
    try:
        from io_server.backends import least_utilised_gpu

        least_utilised_gpu()
    except (ImportError, RuntimeError) as e:
        return f"no usable GPU: {e}"
    return None


def test_dali_without_dali_names_the_extra() -> None:
    if importlib.util.find_spec("nvidia") is not None and \
            importlib.util.find_spec("nvidia.dali") is not None:
        pytest.skip("nvidia-dali is installed")
    with pytest.raises(ImportError, match=r"hetero-mm-train\[gpu\]"):
        get_backend("dali")


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))
@pytest.mark.parametrize("codec", ["h264", "hevc"])
def test_dali_matches_pyav(codec: str, media: dict[str, str]) -> None:
    """Same plans; DALI's GPU cubic resize is its own fast path: close to PyAV's fast path."""
    dali, cpu = get_backend("dali", resize="fast"), get_backend("pyav", resize="fast")
    plan = cpu.probe(media[codec])
    assert dali.probe(media[codec]) == plan
    gpu_frames = dali.decode(media[codec], plan=plan, frame_start=1, frame_stop=plan.num_frames)
    cpu_frames = cpu.decode(media[codec], plan=plan, frame_start=1, frame_stop=plan.num_frames)
    for g, c in zip(gpu_frames.frames, cpu_frames.frames, strict=True):
        assert g.shape == c.shape and g.dtype == np.uint8
        assert np.abs(g.astype(int) - c.astype(int)).mean() < 6.0
