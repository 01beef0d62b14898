"""The loader's checkpointable state: a handful of integers.

``cursor`` is the next global position of the order that no global batch has consumed; with the
seed, the mixture and the manifest it determines every future global batch, on any number of
ranks. ``step`` and ``skipped_samples`` are counters; ``epoch`` is ``cursor // len(manifest)``
(informational: datasets of a mixture keep their own epochs, see `dataloader.mixture`). The
fingerprints (global batch size, manifest hash, mixture hash) make a state from an incompatible
configuration fail loudly instead of resuming somewhere else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

STATE_VERSION = 1
"""Bump on any change to the fields or to what they mean (CHECKPOINT BREAKING)."""


class IncompatibleStateError(ValueError):
    """A loader state saved under another configuration (seed, batch size, manifest, ...)."""


@dataclass(frozen=True, kw_only=True)
class LoaderState:
    format_version: int
    seed: int
    epoch: int
    cursor: int
    """Next unconsumed global position."""
    step: int
    """Global batches produced so far."""
    skipped_samples: int
    """Bad samples skipped so far (each replaced by the next position of the order)."""
    global_batch_size: int
    manifest_hash: int
    """First 64 bits of the manifest's SHA-256."""
    mixture_hash: int
    """First 64 bits of the mixture fingerprint (dataset names, weights, sizes, order version)."""

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> LoaderState:
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(state))
        extra = sorted(set(state) - names)
        if missing or extra:
            raise IncompatibleStateError(
                f"loader state has missing keys {missing} and unknown keys {extra}")
        version = state["format_version"]
        if version != STATE_VERSION:
            raise IncompatibleStateError(
                f"loader state format_version {version!r} is not this loader's {STATE_VERSION}")
        for k in names:
            v = state[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise IncompatibleStateError(f"loader state field {k} must be an int >= 0, "
                                             f"got {v!r}")
        return cls(**{k: int(state[k]) for k in names})

    def check_compatible(self, expected: LoaderState) -> None:
        """Raises `IncompatibleStateError` naming both values of every mismatched fingerprint."""
        problems = []
        for k, fmt in (("seed", "{}"), ("global_batch_size", "{}"), ("manifest_hash", "{:016x}"),
                       ("mixture_hash", "{:016x}")):
            saved, mine = getattr(self, k), getattr(expected, k)
            if saved != mine:
                problems.append(f"{k}: saved {fmt.format(saved)}, this loader "
                                f"{fmt.format(mine)}")
        if problems:
            raise IncompatibleStateError(
                "the loader state comes from an incompatible configuration: " + "; ".join(problems))
