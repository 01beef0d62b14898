"""Reference log-probs of a preference manifest, computed once offline and stored beside it.

MPO (and DPO-style objectives) compare the policy's log-prob of each answer with a frozen
reference model's. They are precomputed here, in a resumable forward-only pass, rather than by a
second model during training, because:

- a second model replica per rank would double the weight memory of every LLM stage (16 GB more
  for the 8B model in BF16) and add a forward of the whole batch to each step (about a third of a
  training step's compute), on every MPO epoch again;
- offline, each answer costs one forward once, on whatever layout is fastest (forward only, no
  optimizer state: more data parallelism), and every later epoch and resumed run reads the same
  numbers (a resume cannot silently change them);
- the cost is a store of 16 bytes per pair and one file tied to the reference model
  (``source``, recorded and shown) and to the manifest (its hash, checked on open).

Layout of a store folder::

    logps.npy       float64 [manifest rows, 2]: (chosen, rejected) summed log-probs of the answer
                    tokens, NaN where not computed yet (memory-mapped; written by rank 0 only)
    reference.json  manifest hash and rows, source, the pass's loader state at its last flush,
                    the rows the pass skipped (bad media) and whether it is complete

`compute_reference_logps` runs the pass with the training loader (preference mode, any layout)
and a forward-only evaluation, flushing every ``flush_every`` steps; run again after a crash, it
continues from the last flush (values written after it are recomputed, identically).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hetero_parallel.checkpoint import atomic_write_text

if TYPE_CHECKING:
    from dataloader.loader import StepData, StepLoader

logger = logging.getLogger(__name__)

VALUES = "logps.npy"
META = "reference.json"
FORMAT_VERSION = 1


class ReferenceLogps:
    """A store folder (see the module docstring), opened for reading, or for writing by the
    pass's rank 0."""

    def __init__(self, folder: Path, values: np.ndarray, meta: dict[str, Any]) -> None:
        self.folder = folder
        self.values = values
        """float64 ``[rows, 2]`` (a memory map)."""
        self.meta = meta

    @classmethod
    def open(cls, folder: str | Path, *, writable: bool = False) -> ReferenceLogps:
        """Open an existing store (``ValueError`` naming the file when it is not one)."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / META).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{folder}: no reference log-probs here ({META} missing); run the "
                             "reference pass first") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{folder / META}: unreadable ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{folder / META}: not a format-{FORMAT_VERSION} reference store")
        values = np.load(folder / VALUES, mmap_mode="r+" if writable else "r",
                         allow_pickle=False)
        if values.dtype != np.float64 or values.ndim != 2 or values.shape[1] != 2 \
                or values.shape[0] != meta.get("rows"):
            raise ValueError(f"{folder / VALUES}: expected float64 [{meta.get('rows')}, 2], got "
                             f"{values.dtype} {list(values.shape)}")
        return cls(folder, values, meta)

    @classmethod
    def create(cls, folder: str | Path, *, manifest_hash: str, rows: int,
               source: str) -> ReferenceLogps:
        """A new store of ``rows`` NaN pairs for the manifest with ``manifest_hash``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        values = np.lib.format.open_memmap(folder / VALUES, mode="w+", dtype=np.float64,
                                           shape=(rows, 2))
        values[:] = np.nan
        values.flush()
        store = cls(folder, values, {"format_version": FORMAT_VERSION,
                                     "manifest_hash": manifest_hash, "rows": rows,
                                     "source": source, "loader": None, "skipped_rows": [],
                                     "complete": False})
        store.save_meta()
        return store

    def check_manifest(self, manifest) -> None:  # noqa: ANN001 - either manifest format
        """``ValueError`` unless the store was computed for ``manifest``."""
        if self.meta["manifest_hash"] != manifest.hash or self.meta["rows"] != len(manifest):
            raise ValueError(f"{self.folder}: reference log-probs of manifest "
                             f"{self.meta['manifest_hash'][:12]} ({self.meta['rows']} rows), not "
                             f"of this one {manifest.hash[:12]} ({len(manifest)} rows)")

    def save_meta(self) -> None:
        atomic_write_text(self.folder / META, json.dumps(self.meta, indent=1, sort_keys=True))

    def lookup(self, rows: np.ndarray, record_ids: Sequence[str]) -> np.ndarray:
        """``[len(rows), 2]`` (chosen, rejected); ``ValueError`` naming the records that have
        none (the pass did not reach them)."""
        out = np.asarray(self.values[rows])
        missing = np.flatnonzero(np.isnan(out).any(axis=1))
        if missing.size:
            names = [f"{record_ids[i]} (row {int(rows[i])})" for i in missing[:4]]
            raise ValueError(f"{self.folder}: no reference log-probs for {missing.size} records "
                             f"of this batch, e.g. {names}; complete the reference pass")
        return out


def compute_reference_logps(
    loader: StepLoader,
    evaluate: Callable[[StepData], Mapping[int, float]],
    folder: str | Path,
    *,
    rank: int,
    source: str,
    flush_every: int = 50,
    barrier: Callable[[], None] = lambda: None,
    max_steps: int | None = None,
) -> ReferenceLogps:
    """Fill the store in ``folder`` (created, or continued) with ``evaluate``'s per-sample
    log-probs, step after step of ``loader`` (preference mode), until every manifest row has
    its pair (or was skipped for bad media). Collective: every rank of the loader's plan calls
    it with the same arguments; rank 0 writes, and ``barrier`` (e.g. ``dist.barrier``) keeps the
    others from reading before it has. ``max_steps`` bounds this call (for tests and time
    limits); the store then holds what was done and a later call continues."""
    if not loader.config.preference or loader.config.prompt_state:
        raise ValueError("the reference pass needs a loader in preference mode without a "
                         "prompt-state column")
    folder = Path(folder)
    manifest = loader.manifest
    if rank == 0 and not (folder / META).exists():
        ReferenceLogps.create(folder, manifest_hash=manifest.hash, rows=len(manifest),
                              source=source)
    barrier()
    store = ReferenceLogps.open(folder, writable=rank == 0)
    store.check_manifest(manifest)
    if store.meta["source"] != source:
        raise ValueError(f"{folder}: holds reference log-probs of {store.meta['source']!r}, "
                         f"not of {source!r}; use another folder")
    done = ~np.isnan(np.asarray(store.values)).any(axis=1)
    done[np.asarray(store.meta["skipped_rows"], np.int64)] = True
    if store.meta["loader"] is not None:
        loader.load_state_dict(store.meta["loader"])
    skipped = list(store.meta["skipped_rows"])
    steps = 0

    def flush() -> None:
        if rank == 0:
            store.values.flush()
            store.meta.update(loader=loader.state_dict(), skipped_rows=sorted(set(skipped)),
                              complete=bool(done.all()))
            store.save_meta()
        barrier()

    while not done.all() and (max_steps is None or steps < max_steps):
        data = loader.next_step()
        logps = evaluate(data)
        rows = np.asarray([r.row for r in data.samples], np.int64)
        pair = np.asarray([[logps[2 * r.position], logps[2 * r.position + 1]]
                           for r in data.samples], np.float64)
        if rank == 0:
            store.values[rows] = pair
        done[rows] = True
        for s in data.skipped:
            row = loader.sample_ref(s.position).row
            skipped.append(row)
            done[row] = True
        steps += 1
        if steps % flush_every == 0:
            flush()
            logger.info("reference pass: %d/%d records", int(done.sum()), done.size)
    flush()
    if rank != 0:
        store = ReferenceLogps.open(folder)
    return store
