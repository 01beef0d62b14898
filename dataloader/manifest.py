"""The manifest: one record per training sample, with its media and their precomputed sizes.

A record holds an id, the dataset it belongs to, the conversation (turns of ``role`` and
``content``; role ``"text"`` marks plain pre-training text), and its media items. Each `MediaRef`
carries what planning needs without touching the file: the kind, and per sampled frame the LLM
tokens, resized height and width, Slow-Fast flag and timestamp (an image is one frame), exactly
as `io_server`'s ``Probe`` returned them at indexing time. So every rank can size every sample of
a global batch from the manifest alone.

Two formats, one interface (`open_manifest` accepts either):

- JSONL (`Manifest`, in memory, for small sets): one record per line (`write_jsonl`,
  `read_jsonl`); Parquet files of the same records still load (`read_parquet`, needs pyarrow).
- Columnar (`dataloader.columnar.ColumnarManifest`): memory-mapped columns with the planning
  layout precomputed, for 10^9 samples. ``python -m dataloader convert`` turns one into the other.

The interface both implement (the loader uses nothing else):

- ``len(m)``; ``m.datasets`` (name -> sample count, sorted by name); ``m.dataset_rows(name)``
  (int64 rows of that dataset in file order: sample ``i`` of the dataset is row
  ``dataset_rows(name)[i]``);
- ``m.hash``: 16 hex chars of a SHA-256 over the content columns (`dataloader.columnar`
  defines them), so the same records give the same hash in either format; loader states store it;
- ``m.planning_sizes(rows, sample_ids, tokenizer)`` -> one `dataloader.sequence.SampleSizes` per
  row, equal to ``sample_sizes(m.record(row), sample_id, tokenizer)``;
- ``m.record(row)`` (the whole record, conversation included) and ``m.media(row)`` (its media),
  with media paths resolved against the manifest's folder or the ``media_root`` given when opening
  (absolute paths stay as they are); ``m.record_id(row)`` (cheap);
- not part of it: ``m.records`` (JSONL: the records as stored; columnar: a lazy view of
  `record`, paths resolved), kept for code written before the interface.

Records are validated on construction (types, 28-px sides, ``tokens == h * w / 784``, timestamps:
`dataloader.validate.check_frames`) and, when read from a file, against `Limits` (Keye's caps), with
``file:line`` and the field in every error.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from dataloader.validate import (
    DEFAULT_LIMITS,
    Limits,
    ManifestError,
    check_frames,
    check_limits,
    check_utf8,
    json_type,
    normalise_frames,
)

if TYPE_CHECKING:
    from dataloader.columnar import ColumnarManifest
    from dataloader.sequence import SampleSizes, Tokenizer

logger = logging.getLogger(__name__)

KINDS = ("image", "video")
"""Media kinds; the columnar format stores the index (do not reorder)."""
ROLES = ("system", "user", "assistant", "text", "chosen", "rejected")
"""Turn roles; the columnar format stores the index (do not reorder, only append)."""
PREFERENCE_ROLES = ("chosen", "rejected")
"""The two answers of a preference record (its last two turns, after the prompt)."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class MediaRef:
    """One image or video of a record, with its frame plan's sizes (validated, see
    `dataloader.validate.check_frames`; numpy scalars are accepted and stored as Python values)."""

    path: str
    """As stored: relative to the manifest's folder (or media root), or absolute."""
    kind: str
    """"image" or "video"."""
    tokens: tuple[int, ...]
    """LLM tokens of each sampled frame (height * width / 28^2)."""
    heights: tuple[int, ...]
    """Resized frame heights in pixels (multiples of 28)."""
    widths: tuple[int, ...]
    """Resized frame widths in pixels (multiples of 28)."""
    is_fast: tuple[bool, ...]
    """Slow-Fast flag of each frame (images: ``(False,)``)."""
    timestamps: tuple[float, ...]
    """Seconds, finite, >= 0, non-decreasing; images have ``(0.0,)``."""

    def __post_init__(self) -> None:
        if type(self.path) is not str or not self.path:
            raise ManifestError(f"media path must be a non-empty string, got "
                                f"{json_type(self.path)} {self.path!r:.60}")
        name = f"media {self.path!r:.200}"
        if _CONTROL.search(self.path):
            raise ManifestError(f"{name}: the path contains a control character")
        check_utf8(name + " path", self.path)
        if self.kind not in KINDS:
            raise ManifestError(f"{name}: kind {self.kind!r:.40} is not one of {KINDS}")
        tokens = normalise_frames(name, "tokens", self.tokens, "int")
        heights = normalise_frames(name, "heights", self.heights, "int")
        widths = normalise_frames(name, "widths", self.widths, "int")
        is_fast = normalise_frames(name, "is_fast", self.is_fast, "bool")
        timestamps = normalise_frames(name, "timestamps", self.timestamps, "float")
        check_frames(name, self.kind, tokens, heights, widths, timestamps, is_fast)
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "heights", heights)
        object.__setattr__(self, "widths", widths)
        object.__setattr__(self, "is_fast", is_fast)
        object.__setattr__(self, "timestamps", timestamps)

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
    def from_dict(cls, d: Any) -> MediaRef:
        """From parsed JSON, refusing any other type than the schema's (a string is not a
        boolean, a float is not an integer) and unknown keys."""
        _keys(d, "a media item", _MEDIA_KEYS, _MEDIA_KEYS)
        for k in ("tokens", "heights", "widths", "is_fast", "timestamps"):
            if type(d[k]) is not list:
                raise ManifestError(f"media {d.get('path')!r:.200}: {k} must be an array, got "
                                    f"{json_type(d[k])} {d[k]!r:.60}")
        return cls(path=d["path"], kind=d["kind"], tokens=tuple(d["tokens"]),
                   heights=tuple(d["heights"]), widths=tuple(d["widths"]),
                   is_fast=tuple(d["is_fast"]), timestamps=tuple(d["timestamps"]))


_MEDIA_KEYS = frozenset(("path", "kind", "tokens", "heights", "widths", "is_fast", "timestamps"))
_RECORD_KEYS = frozenset(("id", "dataset", "conversation", "media"))
_TURN_KEYS = frozenset(("role", "content"))


def _keys(d: Any, what: str, required: frozenset[str], allowed: frozenset[str]) -> None:
    if type(d) is not dict:
        raise ManifestError(f"{what} must be a JSON object, got {json_type(d)} {d!r:.60}")
    missing = sorted(required - d.keys())
    unknown = sorted(d.keys() - allowed)
    if missing or unknown:
        raise ManifestError(f"{what} has missing keys {missing} and unknown keys {unknown} "
                            f"(allowed: {sorted(allowed)})")


@dataclass(frozen=True)
class Turn:
    role: str
    """"system", "user", "assistant" (the loss is on assistant turns), "text" (all loss), or
    "chosen" / "rejected": the two answers of a preference record."""
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES or type(self.role) is not str:
            raise ManifestError(f"turn role {self.role!r:.40} is not one of {ROLES}")
        if type(self.content) is not str:
            raise ManifestError(f"{self.role} turn: content must be a string, got "
                                f"{json_type(self.content)} {self.content!r:.60}")
        if not self.content.isascii():
            check_utf8(f"{self.role} turn content", self.content)


@dataclass(frozen=True)
class Record:
    """One training sample. Media go, in order, at the start of the first user turn (or first
    turn when there is no user turn)."""

    id: str
    dataset: str
    conversation: tuple[Turn, ...]
    media: tuple[MediaRef, ...] = ()

    def __post_init__(self) -> None:
        if type(self.id) is not str or not self.id:
            raise ManifestError(f"a record needs a non-empty string id, got "
                                f"{json_type(self.id)} {self.id!r:.60}")
        check_utf8(f"record id {self.id!r:.200}", self.id)
        if type(self.dataset) is not str or not self.dataset:
            raise ManifestError(f"record {self.id!r}: dataset must be a non-empty string, got "
                                f"{json_type(self.dataset)} {self.dataset!r:.60}")
        check_utf8(f"record {self.id!r}: dataset", self.dataset)
        object.__setattr__(self, "conversation", tuple(self.conversation))
        object.__setattr__(self, "media", tuple(self.media))
        if not self.conversation:
            raise ManifestError(f"record {self.id!r}: the conversation is empty")
        for i, t in enumerate(self.conversation):
            if not isinstance(t, Turn):
                raise ManifestError(f"record {self.id!r}: conversation[{i}] is a "
                                    f"{type(t).__name__}, not a Turn")
        for i, m in enumerate(self.media):
            if not isinstance(m, MediaRef):
                raise ManifestError(f"record {self.id!r}: media[{i}] is a {type(m).__name__}, "
                                    "not a MediaRef")
        roles = [t.role for t in self.conversation]
        if any(r in PREFERENCE_ROLES for r in roles):
            if sorted(roles[-2:]) != sorted(PREFERENCE_ROLES) \
                    or any(r in PREFERENCE_ROLES for r in roles[:-2]):
                raise ManifestError(f"record {self.id!r}: a preference record ends with one "
                                    f"'chosen' and one 'rejected' turn, got roles {roles}")
            if "user" not in roles[:-2] or "text" in roles:
                raise ManifestError(f"record {self.id!r}: a preference record needs a prompt "
                                    f"with a user turn (and no 'text' turn), got roles {roles}")

    @property
    def is_preference(self) -> bool:
        """A prompt with a chosen and a rejected answer (its last two turns)."""
        return self.conversation[-1].role in PREFERENCE_ROLES

    def answers(self) -> tuple[Record, Record]:
        """A preference record as its two conversations: the prompt followed by the chosen
        answer, and by the rejected one, each as an assistant turn."""
        if not self.is_preference:
            raise ValueError(f"record {self.id!r} is not a preference record")
        prompt = self.conversation[:-2]
        by_role = {t.role: t.content for t in self.conversation[-2:]}
        return tuple(Record(self.id, self.dataset, (*prompt, Turn("assistant", by_role[r])),
                            self.media) for r in PREFERENCE_ROLES)

    @property
    def visual_tokens(self) -> int:
        return sum(sum(m.tokens) for m in self.media)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "dataset": self.dataset,
                "conversation": [{"role": t.role, "content": t.content}
                                 for t in self.conversation],
                "media": [m.to_dict() for m in self.media]}

    @classmethod
    def from_dict(cls, d: Any) -> Record:
        """From parsed JSON (strict: see `MediaRef.from_dict`); errors name the record id."""
        _keys(d, "a record", _RECORD_KEYS - {"media"}, _RECORD_KEYS)
        rid = d["id"]
        try:
            conv = d["conversation"]
            if type(conv) is not list:
                raise ManifestError(f"conversation must be an array, got {json_type(conv)}")
            turns = []
            for i, t in enumerate(conv):
                _keys(t, f"conversation[{i}]", _TURN_KEYS, _TURN_KEYS)
                turns.append(Turn(t["role"], t["content"]))
            media = d.get("media")
            if media is None:
                media = []
            if type(media) is not list:
                raise ManifestError(f"media must be an array, got {json_type(media)}")
            refs = []
            for i, m in enumerate(media):
                try:
                    refs.append(MediaRef.from_dict(m))
                except ManifestError as exc:
                    raise ManifestError(f"media[{i}]: {exc}") from None
            return cls(id=rid, dataset=d["dataset"], conversation=tuple(turns),
                       media=tuple(refs))
        except ManifestError as exc:
            if type(rid) is str and rid and not str(exc).startswith("record "):
                raise ManifestError(f"record {rid!r:.200}: {exc}") from None
            raise

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False)


def check_row(row: Any, n: int) -> int:
    """``row`` as an ``int`` in ``[0, n)`` (the row argument of both manifests' interface), else
    an `IndexError`; a bool is not a row."""
    if isinstance(row, bool) or not isinstance(row, int | np.integer) or not 0 <= row < n:
        raise IndexError(f"row {row!r} is outside [0, {n})")
    return int(row)


def resolve_path(path: str, base: str | None) -> str:
    """``path`` joined to ``base`` and normalised (absolute paths and ``base=None`` leave it as
    it is)."""
    if base is None or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(base, path))


def resolved_media(media: tuple[MediaRef, ...], base: str | None) -> tuple[MediaRef, ...]:
    if base is None or all(os.path.isabs(m.path) for m in media):
        return media
    return tuple(MediaRef(resolve_path(m.path, base), m.kind, m.tokens, m.heights, m.widths,
                          m.is_fast, m.timestamps) for m in media)


@dataclass(frozen=True, eq=False)
class Manifest:
    """The in-memory (JSONL) manifest: records in file order, grouped by dataset. See the module
    docstring for the interface it shares with `dataloader.columnar.ColumnarManifest`."""

    records: tuple[Record, ...]
    """As stored (media paths unresolved); `record` resolves them."""
    base: str | None = None
    """Folder that relative media paths are relative to (None: leave them as stored)."""
    limits: Limits = DEFAULT_LIMITS
    """Caps every record must respect (checked here)."""
    _rows: dict[str, np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "records", tuple(self.records))
        if not self.records:
            raise ManifestError("the manifest has no record")
        seen: dict[str, int] = {}
        by_dataset: dict[str, list[int]] = {}
        for row, r in enumerate(self.records):
            if not isinstance(r, Record):
                raise ManifestError(f"row {row}: a {type(r).__name__}, not a Record")
            if r.id in seen:
                raise ManifestError(f"record id {r.id!r} appears at rows {seen[r.id]} and {row}")
            try:
                check_limits(r, self.limits)
            except ManifestError as exc:
                raise ManifestError(f"row {row}: {exc}") from None
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
        """int64 rows of dataset ``name`` in file order."""
        if name not in self._rows:
            raise KeyError(f"dataset {name!r} is not in the manifest (has {sorted(self._rows)})")
        return self._rows[name]

    @cached_property
    def hash(self) -> str:
        """SHA-256 of the content columns (`dataloader.columnar.content_hash`), 16 hex chars."""
        from dataloader.columnar import content_hash

        return content_hash(self.records)

    def _row(self, row: int) -> int:
        return check_row(row, len(self.records))

    def record_id(self, row: int) -> str:
        return self.records[self._row(row)].id

    def record(self, row: int) -> Record:
        """The record at ``row``, media paths resolved against ``base``."""
        r = self.records[self._row(row)]
        media = resolved_media(r.media, self.base)
        return r if media is r.media else Record(r.id, r.dataset, r.conversation, media)

    def media(self, row: int) -> tuple[MediaRef, ...]:
        """The media of ``row``, paths resolved against ``base``."""
        return resolved_media(self.records[self._row(row)].media, self.base)

    def planning_sizes(self, rows: np.ndarray, sample_ids: Sequence[int],
                       tokenizer: Tokenizer) -> list[SampleSizes]:
        """``sample_sizes(record(row), sample_id, tokenizer)`` for each pair (computed here:
        a JSONL manifest stores no layout)."""
        from dataloader.sequence import sample_sizes

        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or rows.size != len(sample_ids):
            raise ValueError(f"rows (shape {rows.shape}) and sample_ids ({len(sample_ids)}) must "
                             "be one row per sample id")
        return [sample_sizes(self.records[self._row(r)], int(s), tokenizer)
                for r, s in zip(rows.tolist(), sample_ids, strict=True)]


# --- files ---------------------------------------------------------------------------------------
def write_jsonl(records: Iterable[Record], path: str | os.PathLike[str]) -> int:
    """Writes one canonical JSON record per line (atomically: temp file + rename); streams."""
    tmp = f"{os.fspath(path)}.tmp"
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(r.canonical_json())
            f.write("\n")
            n += 1
    os.replace(tmp, path)
    return n


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ManifestError(f"key {k!r} appears twice in one JSON object")
            seen.add(k)
    return d


def parse_jsonl_line(raw: bytes, where: str) -> Any:
    """One line of a JSONL file -> its JSON value; `ManifestError` naming ``where`` (file:line)
    for bad UTF-8 (with the byte and column), bad JSON or a key given twice."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{where}: not valid UTF-8: byte 0x{raw[exc.start]:02x} at column "
                            f"{exc.start + 1} ({exc.reason})") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{where}: not JSON: {exc.msg} at column {exc.colno}") from None
    except ManifestError as exc:
        raise ManifestError(f"{where}: {exc}") from None


def iter_jsonl(path: str | os.PathLike[str],
               limits: Limits = DEFAULT_LIMITS) -> Iterator[tuple[int, Record]]:
    """(line number, record) of every non-blank line, validated (`Record.from_dict`,
    `check_limits`); streams. Errors are `ManifestError` with ``file:line``."""
    name = os.fspath(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{name}:{lineno}"
            d = parse_jsonl_line(raw, where)
            try:
                record = Record.from_dict(d)
                check_limits(record, limits)
            except ManifestError as exc:
                raise ManifestError(f"{where}: {exc}") from None
            yield lineno, record


def read_jsonl(path: str | os.PathLike[str], limits: Limits = DEFAULT_LIMITS) -> list[Record]:
    """Every record of a JSONL file (see `iter_jsonl`); a repeated id names both lines."""
    out = []
    lines: dict[str, int] = {}
    for lineno, record in iter_jsonl(path, limits):
        first = lines.setdefault(record.id, lineno)
        if first != lineno:
            raise ManifestError(f"{os.fspath(path)}:{lineno}: record id {record.id!r} already "
                                f"appears at line {first}")
        out.append(record)
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
    """Legacy: a Parquet file of the records (small sets; prefer the columnar format)."""
    pa, pq = _pyarrow()
    table = pa.Table.from_pylist([r.to_dict() for r in records], schema=_schema())
    tmp = f"{os.fspath(path)}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return table.num_rows


def read_parquet(path: str | os.PathLike[str], limits: Limits = DEFAULT_LIMITS) -> list[Record]:
    _, pq = _pyarrow()
    out = []
    for row, d in enumerate(pq.read_table(path).to_pylist()):
        try:
            record = Record.from_dict(d)
            check_limits(record, limits)
        except ManifestError as exc:
            raise ManifestError(f"{os.fspath(path)} row {row}: {exc}") from None
        out.append(record)
    return out


def read_records(path: str | os.PathLike[str], limits: Limits = DEFAULT_LIMITS) -> list[Record]:
    """JSONL or Parquet by suffix (``.parquet`` / ``.pq``; anything else is JSONL)."""
    if os.fspath(path).endswith((".parquet", ".pq")):
        return read_parquet(path, limits)
    return read_jsonl(path, limits)


def write_records(records: Sequence[Record], path: str | os.PathLike[str]) -> int:
    if os.fspath(path).endswith((".parquet", ".pq")):
        return write_parquet(records, path)
    return write_jsonl(records, path)


def load_manifest(path: str | os.PathLike[str], *, media_root: str | os.PathLike[str] | None = None,
                  limits: Limits = DEFAULT_LIMITS) -> Manifest:
    """A JSONL (or Parquet) file in memory; relative media paths resolve against ``media_root``,
    by default the file's folder."""
    base = os.fspath(media_root) if media_root is not None else \
        os.path.dirname(os.path.abspath(path))
    return Manifest(tuple(read_records(path, limits)), base=base, limits=limits)


def is_columnar(path: str | os.PathLike[str]) -> bool:
    """A columnar manifest folder (or its ``manifest.json``)?"""
    from dataloader.columnar import HEADER

    p = os.fspath(path)
    return os.path.isdir(p) or os.path.basename(p) == HEADER


def open_manifest(path: str | os.PathLike[str], *,
                  media_root: str | os.PathLike[str] | None = None,
                  limits: Limits = DEFAULT_LIMITS) -> Manifest | ColumnarManifest:
    """Either format: a folder (or its ``manifest.json``) is columnar and memory-mapped; a file
    is JSONL (or Parquet by suffix) and read into memory. ``media_root`` overrides where relative
    media paths resolve (default: the manifest's folder; see `dataloader.columnar`)."""
    if is_columnar(path):
        from dataloader.columnar import ColumnarManifest

        p = os.fspath(path)
        folder = p if os.path.isdir(p) else os.path.dirname(p)
        return ColumnarManifest.open(folder, media_root=media_root)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"manifest {os.fspath(path)!r}: no such file or folder")
    return load_manifest(path, media_root=media_root, limits=limits)
