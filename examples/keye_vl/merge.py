"""Stage 4: fuse expert checkpoints into the base model by weighted parameter averaging.

    python -m examples.keye_vl.merge --out runs/merged runs/base/final:0.7 runs/ocr/final:0.3

Each input is an unsharded model (``train.py``'s ``final/`` folder, a ``.safetensors`` file, or a
previous merge). The output folder holds ``model.safetensors`` with ``sum_i w_i * state_i`` per
tensor, weights normalised to sum to 1; ``train.py --init-from`` takes it. Names and shapes must
match exactly: a missing or extra tensor, or a shape difference, is an error naming it (merging
models of different architectures silently is the failure to avoid).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from hetero_parallel.export import SafetensorsSource


def merge_state_dicts(states: Sequence[Mapping[str, torch.Tensor]],
                      weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted average of ``states`` (floating tensors; others must be equal and are copied)."""
    if len(states) != len(weights) or not states:
        raise ValueError(f"need one weight per state dict, got {len(states)} states and "
                         f"{len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    names = set(states[0])
    for i, state in enumerate(states[1:], start=1):
        missing, extra = names - set(state), set(state) - names
        if missing or extra:
            raise ValueError(f"state {i} does not match state 0: missing {sorted(missing)[:5]}, "
                             f"extra {sorted(extra)[:5]}")
    merged = {}
    for name in sorted(names):
        tensors = [s[name] for s in states]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise ValueError(f"{name}: shapes differ between inputs: {sorted(shapes)}")
        if not tensors[0].is_floating_point():
            if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
                raise ValueError(f"{name}: non-floating tensor differs between inputs")
            merged[name] = tensors[0].clone()
            continue
        acc = torch.zeros_like(tensors[0], dtype=torch.float64)
        for t, w in zip(tensors, weights, strict=True):
            acc += t.to(torch.float64) * (w / total)
        merged[name] = acc.to(tensors[0].dtype)
    return merged


def _load(path: str) -> dict[str, torch.Tensor]:
    source = SafetensorsSource(path)
    return {name: source.read(name) for name in source.names()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="PATH:WEIGHT")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    paths, weights = [], []
    for item in args.inputs:
        path, _, weight = item.rpartition(":")
        if not path:
            raise SystemExit(f"{item!r}: expected PATH:WEIGHT")
        paths.append(path)
        weights.append(float(weight))
    from safetensors.torch import save_file

    merged = merge_state_dicts([_load(p) for p in paths], weights)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in merged.items()}, str(out / "model.safetensors"),
              metadata={"format": "hetero_parallel.unsharded/1",
                        "merged_from": ",".join(args.inputs)})
    print(f"merged {len(paths)} checkpoints ({len(merged)} tensors) into {out}")


if __name__ == "__main__":
    main()
