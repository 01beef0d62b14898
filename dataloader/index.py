"""Build a manifest: probe every media file once, in parallel, and stream the records out.

Inputs (`iter_items`, streamed):

- a folder: every image / video file under it (sorted by path parts, without following
  directory links), one record each; id = the path relative to the folder, dataset = ``dataset`` or
  the media kind ("image" / "video"), conversation = a user prompt and, as the assistant's answer,
  the text of a sidecar ``<name>.txt`` if there is one;
- a list file: one item per line, either a media path (relative paths are relative to the list
  file) or a JSON object ``{"id", "dataset", "conversation": [{"role", "content"}...] or "text",
  "media": [paths]}`` (no media: a text-only record).

Nothing stops a run but the command itself failing: a caption that is not UTF-8, a bad line of a
list file, a file that cannot be probed, a record that fails validation, or a probing process
that dies are each reported as a `BadFile` (with the records left out) and the rest is indexed.

`stream_index` takes items in windows of ``window`` items, probes the window's distinct media paths
(`Prober`) and hands the records, in item order, to a sink (e.g. `ColumnarWriter.add`), so memory
stays bounded whatever the number of items. ``python -m dataloader index`` drives it.

**Probing processes that die.** Local probing runs in a ``ProcessPoolExecutor`` with at most
``workers`` files in flight, so that when a worker is killed (SIGKILL, the OOM killer, a crash in
a decoder) the suspects are only the files then in flight. The broken pool is replaced by a fresh
one, and each suspect is probed again *alone* in its own process (so the exit status names the
signal, and one bad file cannot take the others down again); a file whose lone process dies too is
reported as ``WorkerDied``. A pool for the common case (no process start per file) plus per-file
isolation only for suspects keeps both the speed and an exact verdict. The processes are spawned,
not forked, and run one torch thread each: a child forked from a process whose OpenMP pool has
run (any caller that used torch) can block forever in its first parallel region (the resize of a
thumbnail), which is a hang, not a verdict. As with any spawning library, a script that indexes
with ``workers > 1`` keeps its top-level code under ``if __name__ == "__main__":``. An error or an
interrupt (Ctrl-C, a test's timeout) kills the probing processes rather than waiting for them.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import multiprocessing as mp
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataloader.manifest import ManifestError, MediaRef, Record, Turn

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi")
PROMPTS = {"image": "Describe the image.", "video": "Describe the video."}


@dataclass(frozen=True)
class IndexItem:
    """A record to be, before its media are probed."""

    id: str
    dataset: str
    conversation: tuple[Turn, ...]
    media: tuple[str, ...] = ()
    """Absolute paths."""
    source: str = ""
    """Where the item came from (``list.txt:12`` or the media file), for reports."""


@dataclass(frozen=True)
class BadFile:
    path: str
    """The file (or ``list file:line``) at fault."""
    error: str
    """The exception type, e.g. ``CorruptMediaError``, ``UnicodeDecodeError``, ``WorkerDied``."""
    reason: str
    records: tuple[str, ...]
    """Ids of the records left out because of this file."""

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "error": self.error, "reason": self.reason,
                "records": list(self.records)}


def _kind(path: str) -> str | None:
    suffix = os.path.splitext(path)[1].lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    return None


def _walk(folder: str) -> Iterator[str]:
    """Files under ``folder`` in the order of sorted path parts (as ``sorted(Path.rglob)``),
    streamed; directory links are not followed (no loops)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        logger.warning("cannot list %s: %s", folder, exc)
        return
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            yield from _walk(e.path)
        elif e.is_file():
            yield e.path


def _utf8_error(exc: UnicodeDecodeError, data: bytes) -> str:
    return (f"not valid UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} "
            f"({exc.reason})")


def _folder_items(src: Path, dataset: str | None) -> Iterator[IndexItem | BadFile]:
    for path in _walk(str(src)):
        kind = _kind(path)
        if kind is None:
            continue
        rel = Path(path).relative_to(src).as_posix()
        sidecar = os.path.splitext(path)[0] + ".txt"
        answer = ""
        if os.path.isfile(sidecar):
            data = Path(sidecar).read_bytes()
            try:
                answer = data.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                yield BadFile(sidecar, "UnicodeDecodeError",
                              f"caption of {rel}: {_utf8_error(exc, data)}", (rel,))
                continue
        yield IndexItem(rel, dataset or kind, (Turn("user", PROMPTS[kind]), Turn("assistant",
                                                                                  answer)),
                        (os.path.abspath(path),), path)


def _list_item(d: Any, base: Path, where: str, lineno: int, name: str,
               dataset: str | None) -> IndexItem:
    if type(d) is not dict:
        raise ManifestError(f"a JSON line must be an object, got {type(d).__name__}")
    if "conversation" in d:
        if type(d["conversation"]) is not list:
            raise ManifestError("conversation must be an array")
        conv = []
        for t in d["conversation"]:
            if type(t) is not dict or set(t) != {"role", "content"}:
                raise ManifestError(f"a turn must be {{'role', 'content'}}, got {t!r:.80}")
            conv.append(Turn(t["role"], t["content"]))
        conversation = tuple(conv)
    elif "text" in d:
        conversation = (Turn("text", d["text"]),)
    else:
        raise ManifestError("needs 'conversation' or 'text'")
    media = d.get("media", ())
    if type(media) not in (list, tuple) or any(type(m) is not str or not m for m in media):
        raise ManifestError(f"media must be an array of paths, got {media!r:.80}")
    rid = d.get("id", f"{name}:{lineno}")
    ds = d.get("dataset") or dataset or "default"
    if type(rid) is not str or not rid or type(ds) is not str:
        raise ManifestError(f"id and dataset must be non-empty strings, got {rid!r:.60}, "
                            f"{ds!r:.60}")
    return IndexItem(rid, ds, conversation,
                     tuple(os.path.abspath(base / m) for m in media), where)


def _list_items(src: Path, dataset: str | None) -> Iterator[IndexItem | BadFile]:
    base = src.resolve().parent
    with open(src, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{src}:{lineno}"
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                yield BadFile(where, "UnicodeDecodeError", _utf8_error(exc, raw), ())
                continue
            if not line or line.startswith("#"):
                continue
            if line.startswith("{"):
                try:
                    item = _list_item(json.loads(line), base, where, lineno, src.name, dataset)
                except (ValueError, KeyError, TypeError) as exc:
                    yield BadFile(where, type(exc).__name__, str(exc), ())
                    continue
                yield item
                continue
            kind = _kind(line)
            if kind is None:
                yield BadFile(where, "ValueError", f"{line!r:.200} is neither JSON nor a media "
                              f"file ({IMAGE_SUFFIXES + VIDEO_SUFFIXES})", ())
                continue
            yield IndexItem(line, dataset or kind,
                            (Turn("user", PROMPTS[kind]), Turn("assistant", "")),
                            (os.path.abspath(base / line),), where)


def iter_items(source: str | os.PathLike[str],
               dataset: str | None = None) -> Iterator[IndexItem | BadFile]:
    """Items of a folder or a list file (module docstring), streamed; what cannot become an
    item (a caption or line that is not UTF-8, a malformed line) comes as a `BadFile`."""
    src = Path(source)
    if src.is_dir():
        return _folder_items(src, dataset)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: neither a folder nor a list file")
    return _list_items(src, dataset)


def collect_items(source: str | os.PathLike[str],
                  dataset: str | None = None) -> list[IndexItem | BadFile]:
    """`iter_items` as a list (small sets; `index_items` reports the `BadFile` entries)."""
    return list(iter_items(source, dataset))


# --- probing -------------------------------------------------------------------------------------
_CLIENTS: dict[Any, Any] = {}


def _client(addresses: tuple[str, ...] | None):
    key = addresses or ()
    if key not in _CLIENTS:
        from io_server.client import IOClient

        _CLIENTS[key] = IOClient(key)
    return _CLIENTS[key]


def _probe(addresses: tuple[str, ...] | None, path: str,
           preset: str | None) -> tuple[str, Any]:
    """Probe through ``addresses`` (None: in this process): ("ok", media dict) or ("error",
    (type, reason))."""
    try:
        plan = _client(addresses).probe(path, preset)
        return "ok", MediaRef.from_plan(plan, path).to_dict()
    except Exception as exc:  # noqa: BLE001 - reported per file, never stops the run
        return "error", (type(exc).__name__, getattr(exc, "reason", str(exc)))


def probe_local(path: str, preset: str | None) -> tuple[str, Any]:
    """Probe in this process: ("ok", media dict) or ("error", (type, reason))."""
    return _probe(None, path, preset)


_PROCESS_CONTEXT = "spawn"
"""How probing processes start (module docstring: why not fork)."""


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # ``workers`` processes share the cores


def _alone(conn: Any, fn: Callable[[str, str | None], Any], path: str,
           preset: str | None) -> None:
    _init_worker()
    conn.send(fn(path, preset))
    conn.close()


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by signal {-exitcode} ({signal.Signals(-exitcode).name})"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


@dataclass
class ProbeStats:
    probed: int = 0
    worker_deaths: int = 0
    """Times the pool lost a worker."""
    retried: list[str] = field(default_factory=list)
    """Files in flight when a worker died, probed again alone."""


class Prober:
    """Probes media paths: I/O servers (``workers`` threads), in this process (``workers == 1``
    and not ``isolate``), or a process pool that survives killed workers (module docstring).

    ``probe`` (tests, custom probing): a module-level ``fn(path, preset) -> ("ok", media dict) |
    ("error", (type, reason))`` run in the worker processes instead of `probe_local`.
    """

    def __init__(self, *, workers: int = 1, servers: Sequence[str] = (),
                 preset: str | None = None, isolate: bool | None = None,
                 probe: Callable[[str, str | None], tuple[str, Any]] | None = None) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        self.workers = workers
        self.servers = tuple(servers)
        self.preset = preset
        self.fn = probe or probe_local
        self.processes = not self.servers and (workers > 1 if isolate is None else isolate)
        self.stats = ProbeStats()
        self._pool: concurrent.futures.Executor | None = None

    def _executor(self) -> concurrent.futures.Executor:
        if self._pool is None:
            if self.processes:
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    self.workers, mp_context=mp.get_context(_PROCESS_CONTEXT),
                    initializer=_init_worker)
            else:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.workers if self.servers else 1)
        return self._pool

    def _submit(self, path: str) -> concurrent.futures.Future:
        if self.servers:
            return self._executor().submit(_probe, self.servers, path, self.preset)
        return self._executor().submit(self.fn, path, self.preset)

    def probe(self, paths: Iterable[str], on_done: Callable[[], None] | None = None
              ) -> dict[str, tuple[str, Any]]:
        """path -> result for each path (each probed once)."""
        pending = deque(dict.fromkeys(paths))
        running: dict[concurrent.futures.Future, str] = {}
        results: dict[str, tuple[str, Any]] = {}

        def done(path: str, result: tuple[str, Any]) -> None:
            results[path] = result
            self.stats.probed += 1
            if on_done is not None:
                on_done()

        while pending or running:
            while pending and len(running) < self.workers:
                p = pending.popleft()
                running[self._submit(p)] = p
            finished, _ = concurrent.futures.wait(
                running, return_when=concurrent.futures.FIRST_COMPLETED)
            broken: list[str] = []
            for fut in finished:
                p = running.pop(fut)
                try:
                    done(p, fut.result())
                except BrokenProcessPool:
                    broken.append(p)
            if broken:
                # Every future still running fails with the pool; keep what finished first.
                concurrent.futures.wait(running)
                for fut, p in running.items():
                    try:
                        done(p, fut.result())
                    except BrokenProcessPool:
                        broken.append(p)
                running.clear()
                self._replace_pool(broken)
                for p in broken:
                    done(p, self._probe_alone(p))
        return results

    def _replace_pool(self, suspects: list[str]) -> None:
        self.stats.worker_deaths += 1
        self.stats.retried.extend(suspects)
        logger.warning("an index worker died while these files were in flight; probing each "
                       "again alone in a fresh process: %s", suspects)
        assert self._pool is not None
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def _probe_alone(self, path: str) -> tuple[str, Any]:
        ctx = mp.get_context(_PROCESS_CONTEXT)
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_alone, args=(send, self.fn, path, self.preset), daemon=True)
        proc.start()
        send.close()
        try:
            result = recv.recv()
        except EOFError:
            result = None
        finally:
            recv.close()
            proc.join()
        if result is None:
            return "error", ("WorkerDied", f"the probing process {_death(proc.exitcode)} while "
                             "probing this file, twice (the second time alone)")
        return result

    def close(self, *, kill: bool = False) -> None:
        """Release the pool: wait for its processes, or (``kill``: on an error or an interrupt,
        when a probe may never return) kill them first."""
        if self._pool is None:
            return
        if kill and self.processes:
            # ProcessPoolExecutor has no public way to stop a worker stuck in a probe (3.14's
            # kill_workers aside), and shutdown would wait for it forever.
            kill_workers = getattr(self._pool, "kill_workers", None)
            if kill_workers is not None:
                kill_workers()
            else:
                for proc in list((getattr(self._pool, "_processes", None) or {}).values()):
                    proc.kill()
        self._pool.shutdown(wait=not kill, cancel_futures=True)
        self._pool = None

    def __enter__(self) -> Prober:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(kill=exc_type is not None)


# --- indexing ------------------------------------------------------------------------------------
@dataclass
class IndexStats:
    items: int = 0
    records: int = 0
    bad: int = 0
    """Bad-file reports."""
    probe: ProbeStats = field(default_factory=ProbeStats)


def _stored_path(path: str, relative_to: str | None) -> str:
    return path if relative_to is None else os.path.relpath(path, relative_to)


def stream_index(items: Iterable[IndexItem | BadFile], sink: Callable[[Record], Any],
                 on_bad: Callable[[BadFile], Any], *, prober: Prober, window: int = 4096,
                 relative_to: str | os.PathLike[str] | None = None,
                 progress: bool = True) -> IndexStats:
    """Probes and hands every good record to ``sink`` (in item order) and every problem to
    ``on_bad``; a `ManifestError` from ``sink`` (validation) is reported, not raised.

    ``relative_to``: store media paths relative to this folder (default: absolute).
    """
    from tqdm import tqdm

    base = None if relative_to is None else os.path.abspath(os.fspath(relative_to))
    stats = IndexStats(probe=prober.stats)
    batch: list[IndexItem] = []
    with tqdm(desc="probing media", unit="file", disable=not progress) as bar:
        def run(window_items: list[IndexItem]) -> None:
            paths = [m for it in window_items for m in it.media]
            probed = prober.probe(paths, on_done=lambda: bar.update(1))
            users: dict[str, list[str]] = {}
            for it in window_items:
                failed = [m for m in it.media if probed[m][0] != "ok"]
                for m in failed:
                    users.setdefault(m, []).append(it.id)
                if failed:
                    continue
                try:
                    media = []
                    for m in it.media:
                        d = dict(probed[m][1], path=_stored_path(m, base))
                        media.append(MediaRef.from_dict(d))
                    sink(Record(it.id, it.dataset, it.conversation, tuple(media)))
                    stats.records += 1
                except ManifestError as exc:
                    stats.bad += 1
                    on_bad(BadFile(it.source or it.id, "InvalidRecord", str(exc), (it.id,)))
            for p in sorted(users):
                stats.bad += 1
                on_bad(BadFile(p, probed[p][1][0], probed[p][1][1], tuple(users[p])))

        for it in items:
            if isinstance(it, BadFile):
                stats.bad += 1
                on_bad(it)
                continue
            stats.items += 1
            batch.append(it)
            if len(batch) >= window:
                run(batch)
                batch = []
        if batch:
            run(batch)
    return stats


def index_items(items: Iterable[IndexItem | BadFile], *, workers: int = 1,
                servers: Sequence[str] = (), preset: str | None = None, progress: bool = True,
                relative_to: str | os.PathLike[str] | None = None,
                probe: Callable[[str, str | None], tuple[str, Any]] | None = None,
                isolate: bool | None = None) -> tuple[list[Record], list[BadFile]]:
    """Records (in item order) for every item whose media all probed, and the bad files (small
    sets, in memory; `stream_index` streams)."""
    records: list[Record] = []
    bad: list[BadFile] = []
    with Prober(workers=workers, servers=servers, preset=preset, probe=probe,
                isolate=isolate) as prober:
        stream_index(items, records.append, bad.append, prober=prober, progress=progress,
                     relative_to=relative_to)
    return records, sorted(bad, key=lambda b: b.path)


def refuse_repeated_ids(source: str | os.PathLike[str], dataset: str | None, tmp: str) -> None:
    """Raises `ManifestError` naming the lines of repeated ids of a list file, found before any
    probing with bounded memory (`dataloader.columnar.IdSet`)."""
    from dataloader.columnar_writer import IdSet

    ids = IdSet(tmp)
    for it in iter_items(source, dataset):
        if isinstance(it, IndexItem):
            ids.add([it.id.encode("utf-8")])
    dups = ids.duplicates()
    if dups:
        wanted = {i for pair in dups for i in pair}
        items = (it for it in iter_items(source, dataset) if isinstance(it, IndexItem))
        where = {i: it.source for i, it in enumerate(items) if i in wanted}
        pairs = "; ".join(f"{where[a]} and {where[b]}" for a, b in dups)
        raise ManifestError(f"{os.fspath(source)}: repeated record ids at {pairs}")


@dataclass(frozen=True, kw_only=True)
class IndexResult:
    out: str
    report: str
    items: int
    records: int
    bad: int
    """Entries of the report."""
    hash: str | None
    seconds: float
    probe: ProbeStats

    def summary(self) -> str:
        p = self.probe
        deaths = (f"; {p.worker_deaths} probing processes died, {len(p.retried)} files probed "
                  "again alone" if p.worker_deaths else "")
        return (f"indexed {self.records} records from {self.items} items in {self.seconds:.1f}s "
                f"-> {self.out} (hash {self.hash or '-'}); {self.bad} unreadable files -> "
                f"{self.report}{deaths}")


def index_manifest(source: str | os.PathLike[str], out: str | os.PathLike[str], *,
                   workers: int = 1, servers: Sequence[str] = (), preset: str | None = None,
                   dataset: str | None = None, report: str | None = None,
                   media_root: str | os.PathLike[str] | None = None, tokenizer: Any = None,
                   limits: Any = None, progress: bool = True,
                   probe: Callable[[str, str | None], tuple[str, Any]] | None = None,
                   window: int = 4096) -> IndexResult:
    """``python -m dataloader index``: probe ``source`` and write ``out``, a columnar folder
    (streamed, `ColumnarWriter`) or, for a ``.jsonl`` path, a JSONL file (small sets, in memory).

    Media paths are stored relative to ``media_root`` (default: the manifest's folder). Local
    probing always runs in worker processes (`Prober` with ``isolate``), so a killed worker is
    reported and retried, never fatal. Problems go to ``report`` (default ``<out>.bad.jsonl``), one
    JSON `BadFile` per line, as they happen.
    """
    import time

    from dataloader.columnar_writer import ColumnarWriter
    from dataloader.manifest import Manifest, write_jsonl
    from dataloader.validate import DEFAULT_LIMITS

    t0 = time.perf_counter()
    limits = limits or DEFAULT_LIMITS
    out = os.path.abspath(os.fspath(out))
    jsonl = out.endswith(".jsonl")
    if os.path.isfile(source):
        refuse_repeated_ids(source, dataset, f"{out}.ids.tmp")
    root = os.path.abspath(os.fspath(media_root)) if media_root is not None else \
        (os.path.dirname(out) if jsonl else out)
    report = report or f"{out}.bad.jsonl"
    prober = Prober(workers=workers, servers=servers, preset=preset, isolate=True, probe=probe)
    records: list[Record] = []
    writer = None if jsonl else ColumnarWriter(out, tokenizer=tokenizer, limits=limits,
                                               media_root=root)
    bad = 0
    digest = None
    with prober:  # on an error or an interrupt, kills the probing processes (`Prober.close`)
        try:
            with open(f"{report}.tmp", "w", encoding="utf-8") as rep:
                def on_bad(b: BadFile) -> None:
                    nonlocal bad
                    bad += 1
                    rep.write(json.dumps(b.to_dict(), sort_keys=True) + "\n")
                    rep.flush()

                stats = stream_index(iter_items(source, dataset),
                                     writer.add if writer is not None else records.append,
                                     on_bad, prober=prober, relative_to=root, progress=progress,
                                     window=window)
            os.replace(f"{report}.tmp", report)
            if stats.records and writer is not None:
                digest = writer.close().hash
            elif stats.records:
                manifest = Manifest(tuple(records), base=root, limits=limits)
                write_jsonl(manifest.records, out)
                digest = manifest.hash
            elif writer is not None:
                writer.abort()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
    return IndexResult(out=out, report=report, items=stats.items, records=stats.records, bad=bad,
                       hash=digest, seconds=time.perf_counter() - t0, probe=stats.probe)
