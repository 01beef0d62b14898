"""Write a model as sharded safetensors plus ``model.safetensors.index.json``, shard by shard.

Tensors are added one by one; a shard is written as soon as it reaches ``max_shard_bytes``, so a
converter holds at most one shard (plus the tensors it is combining) in memory, never the model.
File names follow Hugging Face's ``model-00001-of-00004.safetensors``; the index carries
``metadata.total_size`` (bytes) and the ``weight_map``. Files are written under temporary names
and renamed at `close`, so an interrupted write never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"


class ShardedWriter:
    def __init__(self, folder: str | os.PathLike[str], *, max_shard_bytes: int = 5 * 2**30,
                 metadata: Mapping[str, str] | None = None) -> None:
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._total = 0
        self._names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"{name}: written twice")
        self._names.add(name)
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += size
        self._total += size

    def _tmp(self, i: int) -> Path:
        return self.folder / f".shard-{i:05d}.safetensors.tmp"

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        i = len(self._shards)
        save_file(self._pending, str(self._tmp(i)), metadata=self.metadata)
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> dict[str, str]:
        """Write the last shard and the index; returns the weight map."""
        self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self._tmp(i), self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self._total, **self.metadata},
                 "weight_map": dict(sorted(weight_map.items()))}
        tmp = self.folder / f".{INDEX}.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, self.folder / INDEX)
        return weight_map
