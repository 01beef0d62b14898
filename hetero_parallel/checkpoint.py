"""Checkpoints: one manager over named stateful parts, on `torch.distributed.checkpoint` (DCP).

A part is anything with ``state_dict()`` / ``load_state_dict(state)`` (the trainer, the
dataloader, the cost model, ...). Its state may hold tensors and JSON values:

- **tensors** (model weights, optimizer state) go through DCP under ``<part>/<key>``. A part
  returns *views* of its live tensors, under layout-free names with global shapes (TP shards as
  DTensors, see `hetero_parallel.megatron_state`); DCP writes each global tensor once (replicas on
  other data-parallel or ViT ranks are de-duplicated, and the copies it keeps are spread over the
  ranks that hold them) and, on load, reads into the same views whatever the new layout is. So a
  job resumes on another TP/PP/DP layout or another set of ViT ranks.
- **JSON values** (the loader's few integers, the cost model, the step) must be identical on every
  rank (checked at save) and go to ``meta.json``.

On disk, under ``folder`` (e.g. ``<out>/ckpt``)::

    step_00000120/  .metadata  __<rank>_0.distcp ...  meta.json  checksums.json
    latest          "120": the newest complete checkpoint (a hint; the folder is the truth)

A checkpoint counts only when complete: ``checksums.json`` (SHA-256 and size of every other file)
is written by rank 0 after every rank has finished writing, and only then does ``latest`` move.
`CheckpointManager.load` takes the newest complete checkpoint whose files all verify, reports each
corrupt or partial one by path and says which step it uses instead. Nothing is unpickled beyond
DCP's metadata, which is read with an allow-list of its own classes; tensors are read with
``weights_only`` loading and entries that are not tensors are refused.

``async_save`` copies the state to CPU memory and writes it in a background thread over a
dedicated gloo group, so training continues while it writes; the next save (or `wait`) waits.
"""

from __future__ import annotations

import concurrent.futures
import enum
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bump on any change of the layout on disk or of the key scheme (CHECKPOINT BREAKING)."""
META = "meta.json"
CHECKSUMS = "checksums.json"
LATEST = "latest"
_STEP_PREFIX = "step_"
_HASH_BLOCK = 8 << 20


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, incomplete, unsafe, or from another model."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointConfig:
    """Where and how checkpoints are written."""

    folder: Path
    """Holds one ``step_<n>`` folder per checkpoint and the ``latest`` pointer."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones (and leftovers of interrupted saves) are removed."""
    async_save: bool = False
    """Write in a background thread from a CPU copy while training continues."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))
        if isinstance(self.keep_last, bool) or not isinstance(self.keep_last, int) \
                or self.keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1, got {self.keep_last!r}")


@dataclass
class LoadReport:
    """What `CheckpointManager.load` did."""

    step: int | None
    """The step loaded, or None when there is no checkpoint."""
    path: Path | None
    skipped: list[str] = field(default_factory=list)
    """One line per checkpoint that was not used, with its path and why."""


def step_dir(folder: Path, step: int) -> Path:
    return folder / f"{_STEP_PREFIX}{step:08d}"


def _parse_step(name: str) -> int | None:
    if not name.startswith(_STEP_PREFIX):
        return None
    digits = name[len(_STEP_PREFIX):]
    return int(digits) if digits.isdigit() else None


# --- safe reading of DCP metadata ---------------------------------------------------------------
_ALLOWED_GLOBALS = frozenset({
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING", "BytesStorageMetadata")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
})


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` and nothing else: only DCP's own metadata classes, torch
    sizes, dtypes and layouts may be named; anything else is refused before it is looked up."""

    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module in ("builtins", "__builtin__") and name == "getattr":
            # Some Pythons (e.g. 3.11.2, Debian 12's) pickle an enum member as
            # getattr(EnumClass, name): allow that form only.
            return self._enum_member
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"{self.path}: refusing to unpickle {module}.{name} (not a "
                              "checkpoint metadata type): the file is corrupt or crafted")

    def _enum_member(self, cls: Any, name: Any) -> enum.Enum:
        if isinstance(cls, type) and issubclass(cls, enum.Enum) and isinstance(name, str) \
                and name in cls.__members__:
            return cls[name]
        raise CheckpointError(f"{self.path}: refusing getattr({cls!r:.60}, {name!r:.60}) (only "
                              "enum members of checkpoint metadata types): the file is corrupt or "
                              "crafted")


def read_metadata(path: Path) -> dcp_metadata.Metadata:
    """DCP metadata of the checkpoint folder ``path``, read safely (tensor entries only)."""
    file = path / ".metadata"
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read the checkpoint metadata: {exc}") from exc
    try:
        meta = _MetadataUnpickler(data, file).load()
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise CheckpointError(f"{file}: unreadable checkpoint metadata ({type(exc).__name__}: "
                              f"{exc})") from exc
    if not isinstance(meta, dcp_metadata.Metadata):
        raise CheckpointError(f"{file}: holds a {type(meta).__name__}, not checkpoint metadata")
    for key, entry in meta.state_dict_metadata.items():
        if not isinstance(entry, dcp_metadata.TensorStorageMetadata):
            raise CheckpointError(f"{file}: entry {key!r} is a {type(entry).__name__}; this "
                                  "format stores tensors only (non-tensor entries would be "
                                  "unpickled)")
    return meta


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        meta = read_metadata(Path(self.path))
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = dcp_metadata.StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


class _TensorOnlyLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value) -> None:  # noqa: ANN001 - DCP's signature
        raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn!r} is not a tensor; "
                              "refusing to unpickle it")


# --- checksums ----------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _file_problem(path: Path, want: Mapping[str, Any]) -> str | None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path}: missing"
    except OSError as exc:
        return f"{path}: unreadable ({exc})"
    if size != want.get("size"):
        return f"{path}: {size} bytes, {want.get('size')} when saved (truncated or overwritten)"
    if sha256_file(path) != want.get("sha256"):
        return f"{path}: SHA-256 differs from the one recorded at save (corrupt)"
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from exc


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- staging ------------------------------------------------------------------------------------
def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        local = t.to_local().detach().to("cpu", copy=True)
        return DTensor.from_local(local, t.device_mesh, t.placements, run_check=False,
                                  shape=t.shape, stride=t.stride())
    return t.detach().to("cpu", copy=True)


def _global_shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)  # a DTensor's shape is global


class CheckpointManager:
    """Saves and loads named `Stateful` parts; every method is collective over the world.

    Args:
        config: folder, retention, async.
        parts: name -> part; names are stable across runs (``"trainer"``, ``"loader"``, ...).
        rank: this process's rank (``dist.get_rank()``).
    """

    def __init__(self, config: CheckpointConfig, parts: Mapping[str, Stateful], *,
                 rank: int) -> None:
        bad = [n for n in parts if not n or "/" in n]
        if bad:
            raise ValueError(f"part names must be non-empty and without '/', got {bad}")
        self.config = config
        self.parts = dict(parts)
        self.rank = rank
        self.world = dist.get_world_size()
        # Checkpoint traffic (planning, checksums) runs on CPU tensors, possibly in a thread.
        self.group = dist.new_group(backend="gloo")
        self._executor = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt")
                          if config.async_save else None)
        self._pending: concurrent.futures.Future | None = None
        if rank == 0:
            config.folder.mkdir(parents=True, exist_ok=True)

    # -- saving -------------------------------------------------------------------------------

    def _collect(self) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, dict[str, Any]] = {}
        for name, part in self.parts.items():
            state = part.state_dict()
            meta[name] = {}
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"{name}/{key}"] = value
                else:
                    meta[name][key] = value
        return tensors, meta

    def save(self, step: int) -> None:
        """Write a checkpoint of every part at ``step`` (blocking, or in the background when
        ``async_save``; the previous background save is waited for first)."""
        self.wait()
        tensors, meta = self._collect()
        text = json.dumps({"format_version": FORMAT_VERSION, "step": step, "parts": meta},
                          sort_keys=True, indent=1)
        self._check_identical(text, step)
        if self._executor is None:
            self._write(step, tensors, text)
            return
        staged = {k: _cpu_copy(v) for k, v in tensors.items()}
        self._pending = self._executor.submit(self._write, step, staged, text)

    def wait(self) -> None:
        """Block until the background save (if any) is complete; re-raise its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        """Wait for a background save and release the manager's thread and process group."""
        self.wait()
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None

    def _check_identical(self, text: str, step: int) -> None:
        digest = hashlib.sha256(text.encode()).hexdigest()
        digests: list[str] = [""] * self.world
        dist.all_gather_object(digests, digest, group=self.group)
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise CheckpointError(f"step {step}: the JSON state (loader, cost model, step...) of "
                                  f"ranks {differ[:8]} differs from rank 0's; refusing to save")

    def _write(self, step: int, tensors: dict[str, torch.Tensor], meta_text: str) -> None:
        folder = self.config.folder
        path = step_dir(folder, step)
        if self.rank == 0 and path.exists():
            shutil.rmtree(path)  # an interrupted or superseded attempt at this step
        dist.barrier(group=self.group)
        dcp.save(tensors, storage_writer=FileSystemWriter(path, sync_files=True),
                 process_group=self.group)
        if self.rank == 0:
            atomic_write_text(path / META, meta_text)
        dist.barrier(group=self.group)
        names = [sorted(p.name for p in path.iterdir()
                        if p.is_file() and p.name != CHECKSUMS and not p.name.endswith(".tmp"))
                 if self.rank == 0 else None]
        dist.broadcast_object_list(names, src=0, group=self.group)
        mine = {n: {"size": (path / n).stat().st_size, "sha256": sha256_file(path / n)}
                for i, n in enumerate(names[0]) if i % self.world == self.rank}
        gathered: list[dict[str, Any]] = [{}] * self.world
        dist.all_gather_object(gathered, mine, group=self.group)
        if self.rank == 0:
            files = {k: v for part in gathered for k, v in part.items()}
            atomic_write_text(path / CHECKSUMS, json.dumps(
                {"format_version": FORMAT_VERSION, "step": step, "files": files},
                sort_keys=True, indent=1))
            atomic_write_text(folder / LATEST, f"{step}\n")
            self._prune(step)
            logger.info("saved checkpoint %s (%d files, %.1f MB)", path, len(files),
                        sum(v["size"] for v in files.values()) / 1e6)
        dist.barrier(group=self.group)

    def _prune(self, newest: int) -> None:
        complete, partial = [], []
        for child in self.config.folder.iterdir():
            step = _parse_step(child.name)
            if step is None or not child.is_dir() or step == newest:
                continue
            (complete if (child / CHECKSUMS).exists() else partial).append(step)
        keep = set(sorted(complete)[-(self.config.keep_last - 1):]) \
            if self.config.keep_last > 1 else set()
        for step in complete + partial:
            if step not in keep and step < newest:
                shutil.rmtree(step_dir(self.config.folder, step), ignore_errors=True)

    # -- loading ------------------------------------------------------------------------------

    def _candidates(self) -> tuple[list[int], list[str]]:
        """Complete checkpoints, newest first, and notes on what was passed over (rank 0 looks,
        everyone gets the same answer)."""
        payload: list[Any] = [None]
        if self.rank == 0:
            folder = self.config.folder
            notes: list[str] = []
            complete = []
            if folder.is_dir():
                for child in sorted(folder.iterdir()):
                    step = _parse_step(child.name)
                    if step is None or not child.is_dir():
                        continue
                    if (child / CHECKSUMS).exists():
                        complete.append(step)
                    else:
                        notes.append(f"{child}: incomplete (no {CHECKSUMS}; the save was "
                                     "interrupted)")
                latest = folder / LATEST
                if latest.exists():
                    try:
                        text = latest.read_text(encoding="utf-8").strip()
                    except (OSError, UnicodeDecodeError) as exc:
                        text = f"<unreadable: {exc}>"
                    if not text.isdigit():
                        notes.append(f"{latest}: holds {text[:40]!r}, not a step number; "
                                     f"using the newest complete checkpoint instead")
                    elif int(text) not in complete:
                        notes.append(f"{latest}: names step {int(text)}, which is not a "
                                     "complete checkpoint")
            payload[0] = (sorted(complete, reverse=True), notes)
        dist.broadcast_object_list(payload, src=0, group=self.group)
        return payload[0]

    def _verify(self, step: int) -> list[str]:
        """Problems with the checkpoint of ``step`` (empty: it verifies). Collective: the files
        are hashed in parallel, a share per rank."""
        path = step_dir(self.config.folder, step)
        problems: list[str] = []
        files: dict[str, Any] = {}
        try:
            manifest = _read_json(path / CHECKSUMS)
            files = manifest["files"]
            if not isinstance(files, dict) or not all(isinstance(v, dict) for v in
                                                      files.values()):
                raise TypeError("'files' is not a mapping of name -> {size, sha256}")
            if manifest.get("format_version") != FORMAT_VERSION:
                problems.append(f"{path / CHECKSUMS}: format_version "
                                f"{manifest.get('format_version')!r}, this code reads "
                                f"{FORMAT_VERSION}")
        except (CheckpointError, KeyError, TypeError, FileNotFoundError) as exc:
            problems.append(f"{path / CHECKSUMS}: {exc}")
        names = sorted(files)
        for required in (".metadata", META):
            if required not in files and not problems:
                problems.append(f"{path}: {CHECKSUMS} does not list {required}")
        for i, name in enumerate(names):
            if i % self.world == self.rank and "/" not in name and name not in ("..", "."):
                problem = _file_problem(path / name, files[name])
                if problem:
                    problems.append(problem)
        if not problems and self.rank == 0:
            try:
                read_metadata(path)  # unsafe metadata counts as corrupt, whatever its checksum
            except CheckpointError as exc:
                problems.append(str(exc))
        gathered: list[list[str]] = [[] for _ in range(self.world)]
        dist.all_gather_object(gathered, problems, group=self.group)
        return sorted({p for part in gathered for p in part})

    def load(self, step: int | None = None) -> LoadReport:
        """Load the newest complete checkpoint that verifies (or exactly ``step``).

        Corrupt or partial checkpoints are reported (logged on rank 0 and returned in
        `LoadReport.skipped`) and the next older one is tried. Raises `CheckpointError` when
        checkpoints exist but none can be used, or when the one that verifies does not fit the
        parts (a missing key or another shape: a different model).
        """
        self.wait()
        candidates, skipped = self._candidates()
        if step is not None:
            if step not in candidates:
                raise CheckpointError(f"{step_dir(self.config.folder, step)}: no complete "
                                      f"checkpoint of step {step} (complete: {candidates})")
            candidates = [step]
        for s in candidates:
            problems = self._verify(s)
            if problems:
                note = f"{step_dir(self.config.folder, s)}: " + "; ".join(problems[:4])
                skipped.append(note)
                if self.rank == 0:
                    logger.warning("checkpoint of step %d does not verify, trying an older one: "
                                   "%s", s, note)
                continue
            self._load(s)
            if self.rank == 0:
                for note in skipped:
                    logger.warning("skipped: %s", note)
                logger.info("loaded checkpoint %s (step %d)%s", step_dir(self.config.folder, s),
                            s, f"; {len(skipped)} newer or unusable ones skipped"
                            if skipped else "")
            return LoadReport(step=s, path=step_dir(self.config.folder, s), skipped=skipped)
        if candidates:
            raise CheckpointError(f"no checkpoint under {self.config.folder} verifies:\n  "
                                  + "\n  ".join(skipped))
        return LoadReport(step=None, path=None, skipped=skipped)

    def _load(self, step: int) -> None:
        path = step_dir(self.config.folder, step)
        meta = _read_json(path / META)
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path / META}: not a format-{FORMAT_VERSION} checkpoint "
                                  f"(format_version {meta.get('format_version')!r})"
                                  if isinstance(meta, dict) else f"{path / META}: not an object")
        saved_parts = meta.get("parts", {})
        missing = sorted(set(self.parts) - set(saved_parts))
        if missing:
            raise CheckpointError(f"{path}: has no state for parts {missing} (it has "
                                  f"{sorted(saved_parts)})")
        states = {name: part.state_dict() for name, part in self.parts.items()}
        targets = {f"{name}/{k}": v for name, state in states.items()
                   for k, v in state.items() if torch.is_tensor(v)}
        stored = read_metadata(path).state_dict_metadata
        for key, t in targets.items():
            if key not in stored:
                raise CheckpointError(f"{path}: has no tensor {key!r} (global shape "
                                      f"{_global_shape(t)}); it holds {len(stored)} tensors, "
                                      "so it comes from another model or configuration")
            want, have = tuple(stored[key].size), _global_shape(t)
            if want != have:
                raise CheckpointError(f"{path}: tensor {key!r} has shape {want} in the "
                                      f"checkpoint but {have} here")
            if stored[key].properties.dtype != t.dtype:
                raise CheckpointError(f"{path}: tensor {key!r} is {stored[key].properties.dtype} "
                                      f"in the checkpoint but {t.dtype} here")
        dcp.load(targets, storage_reader=_SafeReader(path),
                 planner=_TensorOnlyLoadPlanner(allow_partial_load=False),
                 process_group=self.group)
        for name, part in self.parts.items():
            state = dict(states[name])
            state.update(saved_parts[name])
            part.load_state_dict(state)


class JsonPart:
    """A `Stateful` from two callables, for state that is a small JSON object."""

    def __init__(self, get: Callable[[], dict[str, Any]],
                 put: Callable[[dict[str, Any]], None]) -> None:
        self._get, self._put = get, put

    def state_dict(self) -> dict[str, Any]:
        return self._get()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._put(state)
