"""Record what Pillow's `Image.resize` (bicubic, its default filter) makes of seeded test images.

`keye_vl_utils.fetch_image` resizes images with `PIL.Image.resize((w, h))`. The project
reimplements that resampler in numpy (`io_server.resize.pil_bicubic_resize`, so Pillow is no
dependency); tests/test_keye_pixels.py compares it with these recorded outputs (SHA-256 of the
uint8 result), or with Pillow itself when it is importable.

Pillow 12+ runs the vertical pass first when the height shrinks by more than twice as many pixels
as the width; older Pillows always ran the horizontal pass first. The record says which version
made it. To regenerate (any Python with numpy; Pillow in a scratch directory):

    python -m pip install --target /tmp/pil pillow==13.0.0
    PYTHONPATH=/tmp/pil .venv/bin/python tests/data/record_pil_bicubic.py  # from the repo root
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pil_bicubic_expected.json")


def cases(seed: int = 0, count: int = 60) -> list[dict[str, Any]]:
    """Seeded (image size, target size) pairs: shrinking, growing, one side only, both pass
    orders, 1-px sides."""
    rng = np.random.default_rng(seed)
    out = [{"in": [5, 7], "out": [5, 3]}, {"in": [300, 40], "out": [60, 40]},
           {"in": [1, 90], "out": [7, 33]}, {"in": [250, 200], "out": [30, 190]},
           {"in": [64, 64], "out": [200, 31]}, {"in": [333, 500], "out": [112, 168]}]
    while len(out) < count:
        h, w = (int(x) for x in rng.integers(1, 400, 2))
        oh, ow = (int(x) for x in rng.integers(1, 500, 2))
        out.append({"in": [h, w], "out": [oh, ow]})
    return out


def image(case: dict[str, Any], index: int) -> np.ndarray:
    """The uint8 RGB test image of a case: noise on odd indices, smooth gradients on even."""
    h, w = case["in"]
    rng = np.random.default_rng(1000 + index)
    if index % 2:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255.0 / max(w - 1, 1), y * 255.0 / max(h - 1, 1),
                     (x + y) * 127.0 / max(h + w - 2, 1)], -1)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def pillow_resize(array: np.ndarray, size: list[int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(array).resize((size[1], size[0])))


def main() -> None:
    import PIL

    record = {"pillow": PIL.__version__,
              "sha256": [digest(pillow_resize(image(c, i), c["out"]))
                         for i, c in enumerate(cases())]}
    with open(OUT, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
