"""Unsharded model files: the whole model under single-model names, in safetensors.

The portable form of a trained model, for the next stage (``--init-from``), stage-4 merging and
conversion to Hugging Face layouts. On disk::

    folder/model.safetensors.index.json   {"metadata": {...}, "weight_map": {name: file}}
    folder/vision.safetensors              "vision.<name>" (the ViT replica's state dict)
    folder/llm-stage-00.safetensors ...    "llm.<single-model name>" of one pipeline stage

`export_model` writes it from any parallel layout: one rank per pipeline stage writes that stage
(gathered over its TP group only) and ViT rank 0 writes the ViT, so no rank ever holds the whole
model. `SafetensorsSource` reads it lazily: ``read(name, index)`` reads only the requested slice
(safetensors' lazy slicing), so loading into a TP/PP layout costs a rank about its shard
(`hetero_parallel.megatron_state.load_full_state`). safetensors holds raw tensors only: nothing is
unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

INDEX = "model.safetensors.index.json"
VISION_PREFIX = "vision."
LLM_PREFIX = "llm."


class TensorSource(Protocol):
    """Named tensors that can be read whole or by slice (an unsharded model)."""

    def names(self) -> Iterable[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor: ...


class DictSource:
    """A `TensorSource` over an in-memory mapping."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> None:
        self._tensors = {prefix + k: v for k, v in tensors.items()}

    def names(self) -> Iterable[str]:
        return self._tensors.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._get(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._get(name).dtype

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        t = self._get(name)
        return t if index is None else t[index]

    def _get(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise KeyError(f"{name}: not in the tensors given ({len(self._tensors)} names)")
        return self._tensors[name]


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsSource:
    """A `TensorSource` over safetensors files: a folder with an index (``weight_map``) or a
    single ``.safetensors`` file. Files open lazily; slices read only their bytes."""

    def __init__(self, path: str | os.PathLike[str], index_name: str = INDEX) -> None:
        path = Path(path)
        self.path = path
        if path.is_dir():
            index = path / index_name
            if index.exists():
                try:
                    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"{index}: not a safetensors index ({exc})") from exc
                if not isinstance(weight_map, dict):
                    raise ValueError(f"{index}: 'weight_map' is not an object")
            else:
                files = sorted(path.glob("*.safetensors"))
                if not files:
                    raise FileNotFoundError(f"{path}: no {index_name} and no *.safetensors file")
                weight_map = {}
                for f in files:
                    for name in self._open(f).keys():  # noqa: SIM118 - safe_open has no __iter__
                        weight_map[name] = f.name
        else:
            weight_map = {name: path.name for name in self._open(path).keys()}  # noqa: SIM118
            path = path.parent
        for name, file in weight_map.items():
            if not isinstance(file, str) or Path(file).name != file:
                raise ValueError(f"{self.path}: tensor {name!r} maps to {file!r}, not a file "
                                 "name inside the folder")
        self.folder = path
        self.weight_map: dict[str, str] = dict(weight_map)
        self._handles: dict[str, object] = {}

    @staticmethod
    def _open(file: Path):
        from safetensors import safe_open

        try:
            return safe_open(str(file), framework="pt", device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types
            raise ValueError(f"{file}: not a readable safetensors file ({exc})") from exc

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise KeyError(f"{name}: not in {self.path} ({len(self.weight_map)} tensors)")
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = self._open(self.folder / file)
        return self._handles[file]

    def names(self) -> Iterable[str]:
        return self.weight_map.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._handle(name).get_slice(name).get_dtype()
        if code not in _DTYPES:
            raise ValueError(f"{name}: unsupported safetensors dtype {code}")
        return _DTYPES[code]

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        handle = self._handle(name)
        if index is None:
            return handle.get_tensor(name)
        return handle.get_slice(name)[index]


def check_tensor(name: str, got_shape: Sequence[int], got_dtype: torch.dtype,
                 want_shape: Sequence[int], want_dtype: torch.dtype, where: str) -> None:
    """``ValueError`` naming the key and both shapes/dtypes when they differ."""
    if tuple(got_shape) != tuple(want_shape):
        raise ValueError(f"{name}: shape {tuple(got_shape)} in {where}, but the model expects "
                         f"{tuple(want_shape)}")
    if got_dtype != want_dtype:
        raise ValueError(f"{name}: dtype {got_dtype} in {where}, but the model expects "
                         f"{want_dtype} (convert the checkpoint's dtype first)")


def load_module(module: nn.Module, source: TensorSource, prefix: str, *,
                where: str = "the source") -> None:
    """Copy ``prefix + name`` for every state-dict entry of ``module`` (strict: every key, same
    shape and dtype; extra keys under ``prefix`` are an error too)."""
    state = module.state_dict()
    available = {n[len(prefix):] for n in source.names() if n.startswith(prefix)}
    missing = sorted(set(state) - available)
    extra = sorted(available - set(state))
    if missing or extra:
        raise KeyError(f"{where}: {prefix}* does not match the model: missing "
                       f"{[prefix + m for m in missing[:5]]}, unexpected "
                       f"{[prefix + e for e in extra[:5]]}")
    with torch.no_grad():
        for name, target in state.items():
            key = prefix + name
            check_tensor(key, source.shape(key), source.dtype(key), target.shape, target.dtype,
                         where)
            target.copy_(source.read(key))


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
              metadata=dict(metadata))
    os.replace(tmp, path)


def export_model(folder: str | os.PathLike[str], *, groups, vision: nn.Module | None,
                 llm_chunks: Sequence[nn.Module], metadata: Mapping[str, str] | None = None
                 ) -> None:
    """Collective: write the unsharded model of this job to ``folder`` (see module docstring)."""
    from hetero_parallel.megatron_state import gather_full_state

    folder = Path(folder)
    plan, rank = groups.plan, groups.rank
    metadata = {"format": "hetero_parallel.unsharded/1", **(metadata or {})}
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    stage = gather_full_state(llm_chunks)  # collective over TP
    c = plan.coords(rank)
    files: dict[str, list[str]] = {}
    if c.tp == 0 and c.cp == 0 and c.dp == 0:
        name = f"llm-stage-{c.pp:02d}.safetensors"
        _save({LLM_PREFIX + k: v for k, v in stage.items()}, folder / name, metadata)
        files[name] = [LLM_PREFIX + k for k in stage]
    if plan.vit_index(rank) == 0:
        assert vision is not None
        _save({VISION_PREFIX + k: v for k, v in vision.state_dict().items()},
              folder / "vision.safetensors", metadata)
        files["vision.safetensors"] = [VISION_PREFIX + k for k in vision.state_dict()]
    gathered: list[dict[str, list[str]]] = [{}] * plan.world_size
    dist.all_gather_object(gathered, files)
    if rank == 0:
        weight_map = {key: file for part in gathered for file, keys in part.items()
                      for key in keys}
        tmp = folder / f".{INDEX}.tmp"
        tmp.write_text(json.dumps({"metadata": metadata, "weight_map": dict(sorted(
            weight_map.items()))}, indent=1))
        os.replace(tmp, folder / INDEX)
    dist.barrier()
