"""The manifest: one record per training sample, with its media and their precomputed sizes.

A record holds an id, the dataset it belongs to, the conversation (turns of ``role`` and
``content``; role ``"text"`` marks plain pre-training text), and its media items. Each `MediaRef`
carries what planning needs without touching the file: the kind, and per sampled frame the LLM
tokens, resized height and width, Slow-Fast flag and timestamp (an image is one frame), exactly
as `io_server`'s ``Probe`` returned them at indexing time. So every rank can size every sample of
a global batch from the manifest alone.

Files: JSONL (one record per line, `write_jsonl` / `read_jsonl`) or Parquet when ``pyarrow`` is
installed (`write_parquet` / `read_parquet`; ``pip install hetero-mm-train[parquet]``).
`Manifest.hash` is a SHA-256 over the canonical JSON of every record, in order: a loader state
saved with one manifest is rejected with another.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

FORMAT = "dataloader.Manifest/1"
KINDS = ("image", "video")
ROLES = ("system", "user", "assistant", "text")


@dataclass(frozen=True)
class MediaRef:
    """One image or video of a record, with its frame plan's sizes."""

    path: str
    kind: str
    """"image" or "video"."""
    tokens: tuple[int, ...]
    """LLM tokens of each sampled frame (height * width / 28^2)."""
    heights: tuple[int, ...]
    widths: tuple[int, ...]
    is_fast: tuple[bool, ...]
    timestamps: tuple[float, ...]
    """Seconds; images have ``(0.0,)``."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"media {self.path!r}: kind {self.kind!r} is not one of {KINDS}")
        n = len(self.tokens)
        lengths = {len(self.heights), len(self.widths), len(self.is_fast), len(self.timestamps)}
        if n < 1 or lengths != {n}:
            raise ValueError(f"media {self.path!r}: per-frame fields must have one equal length "
                             f">= 1, got tokens {n}, heights {len(self.heights)}, widths "
                             f"{len(self.widths)}, is_fast {len(self.is_fast)}, timestamps "
                             f"{len(self.timestamps)}")
        if self.kind == "image" and n != 1:
            raise ValueError(f"image {self.path!r} has {n} frames; an image has one")
        for f, (t, h, w) in enumerate(zip(self.tokens, self.heights, self.widths, strict=True)):
            if t < 1 or h * w != t * 784:
                raise ValueError(f"media {self.path!r} frame {f}: {t} tokens but {h}x{w} px "
                                 f"({h * w / 784:g} tokens of 28x28)")
        object.__setattr__(self, "tokens", tuple(int(t) for t in self.tokens))
        object.__setattr__(self, "heights", tuple(int(t) for t in self.heights))
        object.__setattr__(self, "widths", tuple(int(t) for t in self.widths))
        object.__setattr__(self, "is_fast", tuple(bool(t) for t in self.is_fast))
        object.__setattr__(self, "timestamps", tuple(float(t) for t in self.timestamps))

    @property
    def num_frames(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_plan(cls, plan: Any, path: str | None = None) -> MediaRef:
        """From an `io_server.media.FramePlan` (``path`` overrides the plan's path)."""
        return cls(path=path or plan.path, kind=plan.kind.value, tokens=plan.tokens,
                   heights=plan.heights, widths=plan.widths, is_fast=plan.is_fast,
                   timestamps=plan.timestamps)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "tokens": list(self.tokens),
                "heights": list(self.heights), "widths": list(self.widths),
                "is_fast": list(self.is_fast), "timestamps": list(self.timestamps)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MediaRef:
        return cls(path=d["path"], kind=d["kind"], tokens=tuple(d["tokens"]),
                   heights=tuple(d["heights"]), widths=tuple(d["widths"]),
                   is_fast=tuple(d["is_fast"]), timestamps=tuple(d["timestamps"]))


@dataclass(frozen=True)
class Turn:
    role: str
    """"system", "user", "assistant" (the loss is on assistant turns) or "text" (all loss)."""
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"turn role {self.role!r} is not one of {ROLES}")


@dataclass(frozen=True)
class Record:
    """One training sample. Media go, in order, at the start of the first user turn (or first
    turn when there is no user turn)."""

    id: str
    dataset: str
    conversation: tuple[Turn, ...]
    media: tuple[MediaRef, ...] = ()

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("a record needs a non-empty id")
        if not self.dataset:
            raise ValueError(f"record {self.id!r}: dataset name is empty")
        if not self.conversation:
            raise ValueError(f"record {self.id!r}: the conversation is empty")
        object.__setattr__(self, "conversation", tuple(self.conversation))
        object.__setattr__(self, "media", tuple(self.media))

    @property
    def visual_tokens(self) -> int:
        return sum(sum(m.tokens) for m in self.media)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "dataset": self.dataset,
                "conversation": [{"role": t.role, "content": t.content}
                                 for t in self.conversation],
                "media": [m.to_dict() for m in self.media]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        return cls(id=str(d["id"]), dataset=str(d["dataset"]),
                   conversation=tuple(Turn(t["role"], t["content"]) for t in d["conversation"]),
                   media=tuple(MediaRef.from_dict(m) for m in d.get("media") or ()))

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False)


@dataclass(frozen=True, eq=False)
class Manifest:
    """Records in file order, grouped by dataset: ``dataset_rows(name)[i]`` is the row of sample
    ``i`` of dataset ``name`` (its rows in file order)."""

    records: tuple[Record, ...]
    _rows: dict[str, np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "records", tuple(self.records))
        if not self.records:
            raise ValueError("the manifest has no record")
        seen: dict[str, int] = {}
        by_dataset: dict[str, list[int]] = {}
        for row, r in enumerate(self.records):
            if r.id in seen:
                raise ValueError(f"record id {r.id!r} appears at rows {seen[r.id]} and {row}")
            seen[r.id] = row
            by_dataset.setdefault(r.dataset, []).append(row)
        object.__setattr__(self, "_rows", {k: np.asarray(v, dtype=np.int64)
                                           for k, v in by_dataset.items()})

    def __len__(self) -> int:
        return len(self.records)

    @property
    def datasets(self) -> dict[str, int]:
        """Dataset name -> number of samples, sorted by name."""
        return {k: int(self._rows[k].size) for k in sorted(self._rows)}

    def dataset_rows(self, name: str) -> np.ndarray:
        if name not in self._rows:
            raise KeyError(f"dataset {name!r} is not in the manifest (has {sorted(self._rows)})")
        return self._rows[name]

    @cached_property
    def hash(self) -> str:
        """SHA-256 of the canonical JSON of every record, in order (hex, 16 chars)."""
        h = hashlib.sha256(FORMAT.encode())
        for r in self.records:
            h.update(r.canonical_json().encode())
            h.update(b"\n")
        return h.hexdigest()[:16]


# --- files ----------------------------------------------------------------------------------
def write_jsonl(records: Iterable[Record], path: str | os.PathLike[str]) -> int:
    """Writes one canonical JSON record per line (atomically: temp file + rename)."""
    tmp = f"{os.fspath(path)}.tmp"
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(r.canonical_json())
            f.write("\n")
            n += 1
    os.replace(tmp, path)
    return n


def read_jsonl(path: str | os.PathLike[str]) -> list[Record]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(Record.from_dict(json.loads(line)))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{os.fspath(path)}:{lineno}: bad record: {exc}") from exc
    return out


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError("Parquet manifests need pyarrow: pip install 'hetero-mm-train[parquet]'"
                          ) from exc
    return pa, pq


def _schema():
    pa, _ = _pyarrow()
    media = pa.struct([("path", pa.string()), ("kind", pa.string()),
                       ("tokens", pa.list_(pa.int32())), ("heights", pa.list_(pa.int32())),
                       ("widths", pa.list_(pa.int32())), ("is_fast", pa.list_(pa.bool_())),
                       ("timestamps", pa.list_(pa.float64()))])
    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.schema([("id", pa.string()), ("dataset", pa.string()),
                      ("conversation", pa.list_(turn)), ("media", pa.list_(media))])


def write_parquet(records: Sequence[Record], path: str | os.PathLike[str]) -> int:
    pa, pq = _pyarrow()
    table = pa.Table.from_pylist([r.to_dict() for r in records], schema=_schema())
    tmp = f"{os.fspath(path)}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return table.num_rows


def read_parquet(path: str | os.PathLike[str]) -> list[Record]:
    _, pq = _pyarrow()
    return [Record.from_dict(d) for d in pq.read_table(path).to_pylist()]


def read_records(path: str | os.PathLike[str]) -> list[Record]:
    """JSONL or Parquet by suffix (``.parquet`` / ``.pq``; anything else is JSONL)."""
    if os.fspath(path).endswith((".parquet", ".pq")):
        return read_parquet(path)
    return read_jsonl(path)


def write_records(records: Sequence[Record], path: str | os.PathLike[str]) -> int:
    if os.fspath(path).endswith((".parquet", ".pq")):
        return write_parquet(records, path)
    return write_jsonl(records, path)


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    return Manifest(tuple(read_records(path)))
