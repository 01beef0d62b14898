"""Build a manifest: probe every media file once, in parallel, and record its frame plan's sizes.

Inputs (`collect_items`):
- a folder: every image / video file under it (sorted), one record each; id = the path relative
  to the folder, dataset = ``dataset`` or the media kind ("image" / "video"), conversation = a
  user prompt and, as the assistant's answer, the text of a sidecar ``<name>.txt`` if there is one;
- a list file: one item per line, either a media path (relative paths are relative to the list
  file) or a JSON object ``{"id", "dataset", "conversation": [{"role", "content"}...] or "text",
  "media": [paths]}`` (no media: a text-only record).

`index_items` probes the distinct media paths with ``workers`` processes (or, given I/O server
addresses, ``workers`` threads sharing one `IOClient`), with a tqdm progress bar. A file that
cannot be probed does not stop the run: its records are left out and `BadFile` says why.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing as mp
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataloader.manifest import MediaRef, Record, Turn

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


@dataclass(frozen=True)
class BadFile:
    path: str
    error: str
    """The exception type, e.g. ``CorruptMediaError``."""
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


def collect_items(source: str | os.PathLike[str], dataset: str | None = None) -> list[IndexItem]:
    """Items of a folder or a list file (see the module docstring)."""
    src = Path(source)
    if src.is_dir():
        items = []
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            kind = _kind(str(path))
            if kind is None:
                continue
            sidecar = path.with_suffix(".txt")
            answer = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else ""
            items.append(IndexItem(
                id=path.relative_to(src).as_posix(), dataset=dataset or kind,
                conversation=(Turn("user", PROMPTS[kind]), Turn("assistant", answer)),
                media=(str(path.resolve()),)))
        return items
    if not src.is_file():
        raise FileNotFoundError(f"{src}: neither a folder nor a list file")
    items = []
    base = src.resolve().parent
    with open(src, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("{"):
                d = json.loads(line)
                if "conversation" in d:
                    conv = tuple(Turn(t["role"], t["content"]) for t in d["conversation"])
                else:
                    conv = (Turn("text", d["text"]),)
                media = tuple(str((base / m).resolve()) for m in d.get("media", ()))
                items.append(IndexItem(str(d.get("id", f"{src.name}:{lineno}")),
                                       d.get("dataset") or dataset or "default", conv, media))
                continue
            kind = _kind(line)
            if kind is None:
                raise ValueError(f"{src}:{lineno}: {line!r} is neither JSON nor a media file "
                                 f"({IMAGE_SUFFIXES + VIDEO_SUFFIXES})")
            path = str((base / line).resolve())
            items.append(IndexItem(line, dataset or kind,
                                   (Turn("user", PROMPTS[kind]), Turn("assistant", "")), (path,)))
    return items


def _probe_local(path: str, preset: str | None) -> tuple[str, Any]:
    """In a worker process: ("ok", media dict) or ("error", (type, reason))."""
    try:
        plan = _client(None).probe(path, preset)
        return "ok", MediaRef.from_plan(plan, path).to_dict()
    except Exception as exc:  # noqa: BLE001 - reported per file, never stops the run
        return "error", (type(exc).__name__, getattr(exc, "reason", str(exc)))


_CLIENTS: dict[Any, Any] = {}


def _client(addresses: tuple[str, ...] | None):
    key = addresses or ()
    if key not in _CLIENTS:
        from io_server.client import IOClient

        _CLIENTS[key] = IOClient(key)
    return _CLIENTS[key]


def _probe_remote(addresses: tuple[str, ...], path: str, preset: str | None) -> tuple[str, Any]:
    try:
        plan = _client(addresses).probe(path, preset)
        return "ok", MediaRef.from_plan(plan, path).to_dict()
    except Exception as exc:  # noqa: BLE001
        return "error", (type(exc).__name__, getattr(exc, "reason", str(exc)))


def probe_all(paths: Sequence[str], *, workers: int = 1, servers: Sequence[str] = (),
              preset: str | None = None, progress: bool = True) -> dict[str, tuple[str, Any]]:
    """Probe each path once; path -> ("ok", media dict) or ("error", (type, reason))."""
    from tqdm import tqdm

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    results: dict[str, tuple[str, Any]] = {}
    if servers:
        pool: concurrent.futures.Executor = concurrent.futures.ThreadPoolExecutor(workers)
        submit = lambda p: pool.submit(_probe_remote, tuple(servers), p, preset)  # noqa: E731
    elif workers == 1:
        pool = concurrent.futures.ThreadPoolExecutor(1)
        submit = lambda p: pool.submit(_probe_local, p, preset)  # noqa: E731
    else:
        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"))
        submit = lambda p: pool.submit(_probe_local, p, preset)  # noqa: E731
    with pool, tqdm(total=len(paths), desc="probing media", unit="file",
                    disable=not progress) as bar:
        futures = {submit(p): p for p in paths}
        for fut in concurrent.futures.as_completed(futures):
            results[futures[fut]] = fut.result()
            bar.update(1)
    return results


def index_items(items: Iterable[IndexItem], *, workers: int = 1, servers: Sequence[str] = (),
                preset: str | None = None,
                progress: bool = True) -> tuple[list[Record], list[BadFile]]:
    """Records (in item order) for every item whose media all probed, and the bad files."""
    items = list(items)
    paths = sorted({m for it in items for m in it.media})
    probed = probe_all(paths, workers=workers, servers=servers, preset=preset, progress=progress)
    records, users = [], {}
    for it in items:
        failed = [m for m in it.media if probed[m][0] != "ok"]
        for m in failed:
            users.setdefault(m, []).append(it.id)
        if failed:
            continue
        records.append(Record(it.id, it.dataset, it.conversation,
                              tuple(MediaRef.from_dict(probed[m][1]) for m in it.media)))
    bad = [BadFile(p, probed[p][1][0], probed[p][1][1], tuple(users[p])) for p in sorted(users)]
    return records, bad
