"""The exact pixel path (`resize="exact"`) against an independent reference of Keye's released
processor, on clips with cuts, pans, fades to black, noise, odd sizes, portrait and 29.97/60 fps.

The reference is written here from Keye's code (`keye_vl_utils/vision_process.py` 1.5.2 and
`processing_keye_vl_1_5.py`), with no io_server pixel code: PyAV decodes every frame to RGB at the
source size; `torch.linspace(...).round()` picks the frames; torch float32 timestamps;
`interpolate(uint8, mode="bilinear", antialias=True)` makes the thumbnails, the slow and the fast
frames; `get_frame_sim` is recomputed with torch (HSV from `keye.rgb_to_hsv`, equal to OpenCV on
all 2^24 colours, see test_keye_processing.py); the budget search is keye-vl-utils' bisection.
Images: Pillow's bicubic resize, from outputs Pillow recorded (tests/data/pil_bicubic_expected.json)
or Pillow itself when installed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from typing import Any

import av
import numpy as np
import pytest
import torch

from io_server import keye, synthetic
from io_server.backends import PyAVBackend
from io_server.resize import pil_bicubic_resize

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

CLIPS: dict[str, dict[str, Any]] = {
    "cuts_pan": {"width": 224, "height": 160, "seconds": 4.0, "fps": 12.0, "seed": 31,
                 "scene_cuts": (1.5, 3.0), "motion": 0.08},
    "fade_to_black": {"width": 192, "height": 144, "seconds": 4.5, "fps": 10.0, "seed": 32,
                      "scene_cuts": (), "fade_out": (1.5, 2.5)},
    "noise": {"width": 160, "height": 120, "seconds": 3.0, "fps": 8.0, "seed": 33,
              "noise": 14.0, "scene_cuts": (1.5,)},
    "odd_444": {"width": 151, "height": 97, "seconds": 3.0, "fps": 10.0, "seed": 34,
                "pix_fmt": "yuv444p", "scene_cuts": (2.0,)},
    "portrait": {"width": 144, "height": 256, "seconds": 3.0, "fps": 15.0, "seed": 35,
                 "scene_cuts": (1.0,), "motion": 0.05},
    "ntsc_29.97": {"width": 200, "height": 112, "seconds": 4.0, "fps": 30000 / 1001,
                   "seed": 36, "scene_cuts": (2.2,)},
    "fps_60": {"width": 176, "height": 96, "seconds": 3.0, "fps": 60.0, "seed": 37,
               "scene_cuts": (1.2,), "motion": 0.1},
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("keye_pixels")
    return {name: synthetic.write_video(str(root / f"{name}.mp4"), **kw).path
            for name, kw in CLIPS.items()}


# ---------------------------------------------------------------------------------------------
# The reference, from Keye's code


def _get_frame_sim(a: torch.Tensor, b: torch.Tensor) -> float:
    """keye-vl-utils' get_frame_sim of two (3, H, W) uint8 thumbnails, in torch float32."""
    def patches(x: torch.Tensor) -> torch.Tensor:
        hsv = torch.from_numpy(keye.rgb_to_hsv(x.permute(1, 2, 0).contiguous().numpy()))
        c, h, w = 3, x.shape[1], x.shape[2]
        t = hsv.permute(2, 0, 1).float().reshape(c, h // 28, 28, w // 28, 28)
        return t.permute(1, 3, 0, 2, 4).reshape(h // 28, w // 28, c * 28 * 28)

    pa, pb = patches(a), patches(b)
    na = torch.norm(pa, p=2, dim=-1, keepdim=True) + 1e-8
    nb = torch.norm(pb, p=2, dim=-1, keepdim=True) + 1e-8
    cos = (pa / na * (pb / nb)).sum(dim=-1)
    both_black = (na.squeeze(-1) < 0.01) & (nb.squeeze(-1) < 0.01)
    keep = ~both_black
    return (cos[keep] > 0.7).float().mean().item()  # NaN when every patch is black in both


def _keye_cap(n_slow: int, n_fast: int) -> int:
    """keye-vl-utils' bisection for the per-slow-frame tokens (release preset)."""
    def total(t: int) -> int:
        return n_slow * t + n_fast * max(int(0.3 * t), 48)

    left, right = 48, 768
    while left < right:
        mid = (left + right) // 2
        if total(mid) > 65_536:
            right = mid
        else:
            left = mid + 1
    return left


def _reference(path: str) -> dict[str, Any]:
    with av.open(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        rgb = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    n = len(rgb)
    count = max(min(int(n / fps * min(2.0, fps)), 1365), 1)
    indices = torch.linspace(0, n - 1, count).round().long()
    timestamps = torch.FloatTensor([(1 / fps) * i for i in range(n)])[indices]
    frames = torch.from_numpy(rgb[indices.numpy()]).permute(0, 3, 1, 2)  # uint8 (N, 3, H, W)
    height, width = rgb.shape[1:3]
    sh, sw = keye.smart_resize(height, width, min_pixels=48 * 784, max_pixels=256 * 784)
    thumbs = torch.nn.functional.interpolate(frames, [sh, sw], mode="bilinear", antialias=True)
    types, sims, key = [0], [1.0], thumbs[0]
    for k in range(1, count):
        sim = _get_frame_sim(key, thumbs[k])
        sims.append(sim)
        slow = sim < 0.9
        types.append(0 if slow else 1)
        if slow:
            key = thumbs[k]
    n_fast = sum(types)
    cap = _keye_cap(count - n_fast, n_fast)
    slow_hw = keye.smart_resize(height, width, min_pixels=48 * 784, max_pixels=cap * 784)
    fast_max = max(int(slow_hw[0] * slow_hw[1] / 784 * 0.3) * 784, 48 * 784)
    fast_hw = keye.smart_resize(height, width, min_pixels=48 * 784, max_pixels=fast_max)
    out = []
    for k in range(count):
        hw = list(fast_hw if types[k] else slow_hw)
        resized = torch.nn.functional.interpolate(frames[k:k + 1], hw, mode="bilinear",
                                                  antialias=True)
        out.append(resized[0].permute(1, 2, 0).numpy())
    return {"indices": indices.tolist(), "timestamps": timestamps.tolist(),
            "prompt_times": [format(t, ".1f") for t in timestamps], "types": types,
            "sims": sims, "frames": out}


# ---------------------------------------------------------------------------------------------
# Video


@pytest.mark.parametrize("name", list(CLIPS))
def test_exact_path_equals_keyes_processor(name: str, clips: dict[str, str]) -> None:
    path = clips[name]
    ref = _reference(path)
    backend = PyAVBackend(threads=1)
    plan, sims = backend.probe_with_similarities(path)
    assert list(plan.frame_indices) == ref["indices"]
    assert list(plan.timestamps) == ref["timestamps"]  # float32 values
    prompt = [f.timestamp for f in keye.video_prompt_tokens(plan)]
    assert prompt == ref["prompt_times"]
    assert [int(f) for f in plan.is_fast] == ref["types"]
    # Similarity against the same reference: 1e-6 (NaN where both frames are black).
    np.testing.assert_allclose(sims, ref["sims"], rtol=0, atol=1e-6, equal_nan=True)
    frames = backend.decode(path, plan=plan).frames
    worst = 0
    for ours, want in zip(frames, ref["frames"], strict=True):
        assert ours.shape == want.shape and ours.dtype == np.uint8
        worst = max(worst, int(np.abs(ours.astype(np.int16) - want.astype(np.int16)).max()))
    assert worst <= 1, f"{name}: max |diff| {worst} levels"
    if name == "fade_to_black":  # black frames: NaN similarity, fast frames, as Keye
        assert any(math.isnan(s) for s in sims)
        assert all(plan.is_fast[k] for k, s in enumerate(sims) if math.isnan(s))
    if name == "cuts_pan":
        assert 0 < plan.num_fast < plan.num_frames


def test_fast_path_is_ffmpegs_scaler_a_few_levels_off(clips: dict[str, str]) -> None:
    """The named faster option keeps the plan's sizes and stays close to the exact pixels."""
    path = clips["cuts_pan"]
    exact = PyAVBackend(threads=1)
    fast = PyAVBackend(threads=1, resize="fast")
    plan = exact.probe(path)
    a = exact.decode(path, plan=plan).frames
    b = fast.decode(path, plan=plan).frames
    diffs = [np.abs(x.astype(np.int16) - y.astype(np.int16)) for x, y in zip(a, b, strict=True)]
    mean = float(np.mean([d.mean() for d in diffs]))
    assert 0 < mean < 6.0, mean  # different resamplers: not equal, but close
    # Its own (FFmpeg) thumbnails: the same frames and timestamps; a similarity near the
    # threshold can fall on the other side (on this clip one frame turns slow), which is why
    # plans made with one path must be decoded with the same path.
    fast_plan = fast.probe(path)
    assert fast_plan.frame_indices == plan.frame_indices
    assert fast_plan.timestamps == plan.timestamps
    assert fast_plan.num_frames - sum(a == b for a, b in zip(fast_plan.is_fast, plan.is_fast,
                                                             strict=True)) <= 2


# ---------------------------------------------------------------------------------------------
# Images: Pillow's bicubic


def _pil_recorder() -> Any:
    spec = importlib.util.spec_from_file_location(
        "record_pil_bicubic", os.path.join(DATA, "record_pil_bicubic.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pil_bicubic_resize_equals_pillow() -> None:
    rec = _pil_recorder()
    with open(os.path.join(DATA, "pil_bicubic_expected.json")) as f:
        recorded = json.load(f)
    live = importlib.util.find_spec("PIL") is not None
    cases = rec.cases()
    assert len(cases) == len(recorded["sha256"]) == 60
    for i, (case, want) in enumerate(zip(cases, recorded["sha256"], strict=True)):
        img = rec.image(case, i)
        ours = pil_bicubic_resize(img, tuple(case["out"]))
        assert ours.shape == (*case["out"], 3) and ours.flags.c_contiguous
        if live:
            np.testing.assert_array_equal(ours, rec.pillow_resize(img, case["out"]))
        else:
            assert rec.digest(ours) == want, (i, case)
