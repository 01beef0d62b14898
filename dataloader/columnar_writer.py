"""Writing a columnar manifest folder (`dataloader.columnar` defines the format), streaming.

`ColumnarWriter` appends records (or chunks of columns) with bounded memory: one chunk of records
is encoded at a time and appended to the column files while the content hash and every file's
checksum are updated; the dataset index (``dataset.rows``) is built and repeated ids are looked for
(`IdSet`) at the end, from the files. Everything goes to a temporary folder renamed into place, so a
failed or interrupted write never leaves a half-written manifest where a reader would look.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dataloader.columnar import (
    FORMAT,
    HEADER,
    STREAMED,
    VERSION,
    _ChunkBuilder,
    _file,
    _Sink,
    check_chunk,
    combine_hash,
)
from dataloader.manifest import Record
from dataloader.validate import DEFAULT_LIMITS, Limits, ManifestError, check_limits

if TYPE_CHECKING:
    from dataloader.sequence import Tokenizer


# --- duplicate ids with bounded memory -----------------------------------------------------------
_ID_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("line", "<u8")])


class IdSet:
    """Finds repeated ids among any number of them with bounded memory: 128-bit BLAKE2b digests
    (and each id's line) go to a temp file; `duplicates` sorts them in buckets of at most
    ``bucket`` entries (partitioned by the digest's top bits)."""

    def __init__(self, path: str, bucket: int = 1 << 23) -> None:
        self.path = path
        self.bucket = bucket
        self.count = 0
        self._f = open(path, "wb")  # noqa: SIM115
        self._digests: list[bytes] = []
        self._lines: list[int] = []

    def add(self, ids: Sequence[bytes], lines: Sequence[int] | None = None) -> None:
        """Adds ids; ``lines`` (default: their running number) is what `duplicates` reports."""
        start = self.count + len(self._lines)
        self._digests.extend(hashlib.blake2b(i, digest_size=16).digest() for i in ids)
        self._lines.extend(range(start, start + len(ids)) if lines is None else lines)
        if len(self._lines) >= 1 << 16:
            self._flush()

    def _flush(self) -> None:
        if not self._lines:
            return
        rec = np.empty(len(self._lines), dtype=_ID_DTYPE)
        both = np.frombuffer(b"".join(self._digests), dtype="<u8").reshape(-1, 2)
        rec["hi"], rec["lo"] = both[:, 0], both[:, 1]
        rec["line"] = self._lines
        self._f.write(rec.tobytes())
        self.count += len(self._lines)
        self._digests, self._lines = [], []

    def _buckets(self) -> Iterator[np.ndarray]:
        self._flush()
        self._f.close()
        if not self.count:
            return
        data = np.memmap(self.path, dtype=_ID_DTYPE, mode="r", shape=(self.count,))
        if self.count <= self.bucket:
            yield np.array(data)
            return
        bits = math.ceil(math.log2(math.ceil(self.count / self.bucket))) + 1
        shift = np.uint64(64 - bits)
        parts = [f"{self.path}.{b}" for b in range(1 << bits)]
        files = [open(p, "wb") for p in parts]  # noqa: SIM115
        try:
            for s in range(0, self.count, 1 << 22):
                chunk = np.array(data[s:s + (1 << 22)])
                top = chunk["hi"] >> shift
                order = np.argsort(top, kind="stable")
                bounds = np.searchsorted(top[order], np.arange((1 << bits) + 1))
                for b in range(1 << bits):
                    if bounds[b + 1] > bounds[b]:
                        files[b].write(chunk[order[bounds[b]:bounds[b + 1]]].tobytes())
        finally:
            for f in files:
                f.close()
        del data
        for p in parts:
            part = np.fromfile(p, dtype=_ID_DTYPE)
            os.remove(p)
            yield part

    def duplicates(self, limit: int = 5) -> list[tuple[int, int]]:
        """Up to ``limit`` (first line, repeated line) pairs of equal digests, by repeated line."""
        found: list[tuple[int, int]] = []
        for part in self._buckets():
            s = part[np.lexsort((part["line"], part["lo"], part["hi"]))]
            same = (s["hi"][1:] == s["hi"][:-1]) & (s["lo"][1:] == s["lo"][:-1])
            if not same.any():
                continue
            starts = np.concatenate([[True], ~same])
            group_start = np.maximum.accumulate(np.where(starts, np.arange(s.size), 0))
            repeat = np.flatnonzero(same) + 1
            lines = s["line"][repeat]
            keep = repeat[np.argsort(lines, kind="stable")[:limit]]
            found.extend(zip(s["line"][group_start[keep]].tolist(), s["line"][keep].tolist(),
                             strict=True))
        os.remove(self.path)
        return sorted(found, key=lambda p: p[1])[:limit]

    def discard(self) -> None:
        if not self._f.closed:
            self._f.close()
        if os.path.exists(self.path):
            os.remove(self.path)


# --- writing -------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class WriteResult:
    path: str
    """The manifest folder."""
    records: int
    hash: str
    datasets: dict[str, int]
    """Name -> sample count, sorted by name."""


class ColumnarWriter:
    """Streams records into a columnar manifest folder (see the module docstring).

    Use as a context manager (or call `close`). Records are validated (`check_limits`, the exact
    ``seq_len`` cap, `check_chunk`) and their planning layout computed with ``tokenizer``
    (default `ByteTokenizer`); the layout is compared with `dataloader.sequence.sample_sizes` on
    every `dataloader.planning.SPOT_CHECK_EVERY`-th row. Everything is written to
    ``<out>.tmp-<pid>`` and renamed to ``out`` at the end, replacing a previous manifest there; on
    an error nothing is left behind. Memory: one chunk of ``chunk_records`` records, whatever N.

    Args:
        media_root: the folder relative media paths are relative to (stored in the header
            relative to ``out``); default ``out`` itself.
        source: named in error messages (e.g. the JSONL file converted), with the ``line`` given to
            `add`.
    """

    def __init__(self, out: str | os.PathLike[str], *, tokenizer: Tokenizer | None = None,
                 limits: Limits = DEFAULT_LIMITS, media_root: str | os.PathLike[str] | None = None,
                 chunk_records: int = 16384, source: str | None = None,
                 id_bucket: int = 1 << 23) -> None:
        from dataloader.planning import SPOT_CHECK_EVERY, LayoutComputer
        from dataloader.sequence import ByteTokenizer

        self.out = os.path.abspath(os.fspath(out))
        if os.path.exists(self.out) and not _replaceable(self.out):
            raise FileExistsError(f"{self.out} exists and is not a columnar manifest folder; "
                                  "refusing to replace it")
        self.tmp = f"{self.out}.tmp-{os.getpid()}"
        if os.path.exists(self.tmp):
            shutil.rmtree(self.tmp)
        os.makedirs(self.tmp)
        root = self.out if media_root is None else os.path.abspath(os.fspath(media_root))
        self.media_root = os.path.relpath(root, self.out)
        self.limits = limits
        self.tokenizer = tokenizer or ByteTokenizer()
        self.layouts = LayoutComputer(self.tokenizer)
        self._spot_every = SPOT_CHECK_EVERY
        self.chunk_records = chunk_records
        self.source = source
        self.rows = 0
        self._codes: dict[str, int] = {}
        self._builder = _ChunkBuilder()
        self._lines: list[int] = []
        self._sink = _Sink(STREAMED, self.tmp)
        self._ids = IdSet(os.path.join(self.tmp, "ids.tmp"), bucket=id_bucket)
        self._closed = False

    def _where(self, line: int | None) -> str:
        if self.source is not None and line is not None:
            return f"{self.source}:{line}"
        return f"{self.out} row {self.rows}"

    def add(self, record: Record, line: int | None = None) -> int:
        """Appends ``record`` (validated first: on a `ManifestError` nothing is appended)."""
        where = self._where(line)
        try:
            check_limits(record, self.limits)
            layout = self.layouts.layout(record)
            if layout.seq_len > self.limits.max_seq_len:
                raise ManifestError(f"record {record.id!r}: {layout.seq_len} tokens exceed "
                                    f"max_seq_len({self.limits.max_seq_len})")
        except ManifestError as exc:
            raise ManifestError(f"{where}: {exc}") from None
        if self.rows % self._spot_every == 0:
            self._spot_check(record, layout, where)
        self._builder.add(record, self._codes.setdefault(record.dataset, len(self._codes)),
                          layout)
        # Duplicates are reported by line when the caller names a source, else by row.
        self._lines.append(line if self.source is not None and line is not None else self.rows)
        self.rows += 1
        if len(self._builder) >= self.chunk_records:
            self._flush()
        return self.rows - 1

    def _spot_check(self, record: Record, layout: Any, where: str) -> None:
        from dataloader.sequence import sample_sizes

        ref = sample_sizes(record, 0, self.tokenizer)
        got = (layout.seq_len, layout.loss_tokens, tuple(layout.frame_positions.tolist()))
        want = (ref.layout.seq_len, ref.loss_tokens,
                tuple(p for poss in ref.layout.frame_positions for p in poss))
        if got != want:
            raise RuntimeError(f"{where}: the precomputed layout {got[:2]} differs from "
                               f"dataloader.sequence.sample_sizes {want[:2]} (positions equal: "
                               f"{got[2] == want[2]}): dataloader.planning no longer mirrors the "
                               "prompt format")

    def _flush(self) -> None:
        if not len(self._builder):
            return
        chunk = self._builder.build()
        first = self.rows - len(self._builder)
        try:
            self._append(chunk, self._builder.ids, self._lines,
                         f"{self.out} rows {first}..{self.rows - 1}")
        except ManifestError as exc:
            # Every record passed `add`'s checks: this is a bug here, not a bad record.
            raise RuntimeError(f"internal error: validated records failed the chunk check: "
                               f"{exc}") from exc
        self._builder = _ChunkBuilder()
        self._lines = []

    def _append(self, chunk: dict[str, np.ndarray], ids: Sequence[bytes],
                lines: Sequence[int], where: str) -> None:
        check_chunk(chunk, list(self._codes), self.limits, where)
        self._ids.add(ids, lines)
        self._sink.append(chunk)

    def add_columns(self, chunk: dict[str, np.ndarray], dataset_names: Sequence[str]) -> None:
        """Appends a chunk of columns built elsewhere (local offsets from 0, dataset codes into
        ``dataset_names``), e.g. by a generator that never builds `Record` objects. The chunk is
        checked like any other (`check_chunk`) and its strings must be valid UTF-8; its planning
        columns are trusted to follow ``tokenizer`` (compare a sample with `sample_sizes`)."""
        self._flush()
        n = chunk["dataset"].size
        used = np.unique(chunk["dataset"], return_index=True)
        order = used[0][np.argsort(used[1])]  # local codes by first appearance
        remap = np.zeros(len(dataset_names), dtype=np.int64)
        for local in order.tolist():
            remap[local] = self._codes.setdefault(dataset_names[local], len(self._codes))
        chunk = dict(chunk, dataset=remap[chunk["dataset"]].astype("<u4"))
        where = f"{self.out} rows {self.rows}..{self.rows + n - 1}"
        for name in ("id", "turn.text", "media.path"):
            try:
                chunk[f"{name}.bytes"].tobytes().decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ManifestError(f"{where}: {name} bytes are not UTF-8 at byte {exc.start}"
                                    ) from None
        offsets, blob = chunk["id.offsets"].astype(np.int64), chunk["id.bytes"].tobytes()
        ids = [blob[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(),
                                         strict=True)]
        self._append(chunk, ids, range(self.rows, self.rows + n), where)
        self.rows += n

    def close(self) -> WriteResult:
        """Finishes the folder (dataset index, duplicate check, header) and renames it."""
        if self._closed:
            raise RuntimeError("the writer is closed")
        try:
            self._flush()
            self._sink.close()
            if not self.rows:
                raise ManifestError(f"{self.source or self.out}: no record to write")
            dups = self._ids.duplicates()
            if dups:
                raise ManifestError(self._duplicates_message(dups))
            datasets = self._write_dataset_rows()
            digests = self._sink.digests()
            columns = {c.name: {"file": _file(c.name), "dtype": c.dtype,
                                "length": self._sink.lengths[c.name], "sha256": digests[c.name]}
                       for c in STREAMED}
            columns["dataset.rows"] = datasets.pop("__column__")
            names = list(self._codes)
            header = {
                "format": FORMAT, "version": VERSION,
                "hash": combine_hash(columns, names),
                "records": self.rows, "turns": self._sink.lengths["turn.role"],
                "media": self._sink.lengths["media.kind"],
                "frames": self._sink.lengths["frame.height"],
                "dataset_names": names,
                "datasets": datasets,
                "tokenizer": self.layouts.name,
                "limits": self.limits.to_dict(),
                "media_root": self.media_root,
                "columns": columns,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            with open(os.path.join(self.tmp, HEADER), "w", encoding="utf-8") as f:
                json.dump(header, f, indent=1, ensure_ascii=False)
                f.write("\n")
            _install(self.tmp, self.out)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return WriteResult(path=self.out, records=self.rows, hash=header["hash"],
                           datasets={k: v["count"] for k, v in header["datasets"].items()})

    def _duplicates_message(self, dups: list[tuple[int, int]]) -> str:
        if self.source is not None:
            where = ", ".join(f"lines {a} and {b}" for a, b in dups)
            return f"{self.source}: repeated record ids at {where}"
        ids = np.memmap(os.path.join(self.tmp, _file("id.offsets")), dtype="<u8", mode="r")
        blob = os.path.join(self.tmp, _file("id.bytes"))
        with open(blob, "rb") as f:
            def read(row: int) -> str:
                f.seek(int(ids[row]))
                return f.read(int(ids[row + 1] - ids[row])).decode("utf-8")

            return "repeated record ids: " + "; ".join(
                f"{read(b)!r} at rows {a} and {b}" for a, b in dups)

    def _write_dataset_rows(self) -> dict[str, Any]:
        """``dataset.rows`` (rows grouped by dataset name, file order inside) and the index."""
        names = list(self._codes)
        codes = np.memmap(os.path.join(self.tmp, _file("dataset")), dtype="<u4", mode="r",
                          shape=(self.rows,))
        parts = {c: open(os.path.join(self.tmp, f"rows.{c}.tmp"), "wb")  # noqa: SIM115
                 for c in range(len(names))}
        counts = np.zeros(len(names), dtype=np.int64)
        try:
            for s in range(0, self.rows, 1 << 22):
                chunk = np.asarray(codes[s:s + (1 << 22)], dtype=np.int64)
                order = np.argsort(chunk, kind="stable")
                bounds = np.searchsorted(chunk[order], np.arange(len(names) + 1))
                for c in range(len(names)):
                    if bounds[c + 1] > bounds[c]:
                        rows = (order[bounds[c]:bounds[c + 1]] + s).astype("<i8")
                        parts[c].write(rows.tobytes())
                        counts[c] += rows.size
        finally:
            for f in parts.values():
                f.close()
            del codes
        datasets: dict[str, Any] = {}
        h = hashlib.sha256()
        start = 0
        with open(os.path.join(self.tmp, _file("dataset.rows")), "wb") as out:
            for name in sorted(names):
                c = self._codes[name]
                part = os.path.join(self.tmp, f"rows.{c}.tmp")
                with open(part, "rb") as f:
                    while block := f.read(1 << 24):
                        out.write(block)
                        h.update(block)
                os.remove(part)
                datasets[name] = {"start": start, "count": int(counts[c])}
                start += int(counts[c])
        datasets["__column__"] = {"file": _file("dataset.rows"), "dtype": "<i8",
                                  "length": self.rows, "sha256": h.hexdigest()}
        return datasets

    def abort(self) -> None:
        """Removes everything written so far."""
        self._closed = True
        self._sink.close()
        self._ids.discard()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> ColumnarWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if self._closed:
            return
        if exc_type is not None:
            self.abort()
        else:
            self.result = self.close()


def _replaceable(path: str) -> bool:
    return os.path.isdir(path) and (not os.listdir(path)
                                    or os.path.isfile(os.path.join(path, HEADER)))


def _install(tmp: str, out: str) -> None:
    """Renames ``tmp`` to ``out``, replacing a previous manifest folder there."""
    old = None
    if os.path.exists(out):
        old = f"{out}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_columnar(records: Iterable[Record], out: str | os.PathLike[str], **kwargs: Any
                   ) -> WriteResult:
    """All ``records`` into a columnar folder (see `ColumnarWriter` for the options)."""
    with ColumnarWriter(out, **kwargs) as w:
        for r in records:
            w.add(r)
        return w.close()
