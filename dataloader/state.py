"""The loader's checkpointable state: a handful of integers.

``cursor`` is the next global position of the order that no global batch has consumed; with the
seed, the mixture and the manifest it determines every future global batch, on any number of
ranks. ``step`` and ``skipped_samples`` are counters; ``epoch`` is ``cursor // len(manifest)``
(informational: datasets of a mixture keep their own epochs, see `dataloader.mixture`). The
fingerprints (global batch size, manifest hash, mixture hash) make a state from an incompatible
configuration fail loudly instead of resuming somewhere else.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from dataloader.mixture import MAX_POSITION

STATE_VERSION = 1
"""Bump on any change to the fields or to what they mean (CHECKPOINT BREAKING)."""


_U64 = 1 << 64
RANGES: dict[str, tuple[int, int]] = {
    "format_version": (STATE_VERSION, STATE_VERSION + 1),
    "seed": (0, _U64),
    "epoch": (0, MAX_POSITION),
    "cursor": (0, MAX_POSITION),
    "step": (0, MAX_POSITION),
    "skipped_samples": (0, MAX_POSITION),
    "global_batch_size": (1, MAX_POSITION),
    "manifest_hash": (0, _U64),
    "mixture_hash": (0, _U64),
}
"""Allowed ``[low, high)`` of each field: positions stay below the mixture's 2^42, hashes and the
seed are 64-bit."""


def _bound(hi: int) -> str:
    return {MAX_POSITION: "2^42", _U64: "2^64"}.get(hi, str(hi))


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
    def from_dict(cls, state: Any) -> LoaderState:
        """Validates a saved state: a mapping with exactly these fields, each an integer in its
        range (`RANGES`), and ``cursor == step * global_batch_size + skipped_samples`` (every
        step consumes its batch and the bad samples it skipped). Raises `IncompatibleStateError`
        naming the field, the value and the allowed range."""
        if not isinstance(state, Mapping):
            raise IncompatibleStateError(
                f"loader state must be a mapping of field -> int (as state_dict() returns), got "
                f"{type(state).__name__} {state!r:.100}")
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(state))
        extra = sorted(map(str, set(state) - names))
        if missing or extra:
            raise IncompatibleStateError(
                f"loader state has missing keys {missing} and unknown keys {extra}")
        version = state["format_version"]
        if version != STATE_VERSION or isinstance(version, bool):
            raise IncompatibleStateError(
                f"loader state format_version {version!r} is not this loader's {STATE_VERSION}")
        values = {}
        for k in sorted(names):
            v = state[k]
            lo, hi = RANGES[k]
            if isinstance(v, bool | np.bool_) or not isinstance(v, numbers.Integral):
                raise IncompatibleStateError(f"loader state field {k} must be an integer in "
                                             f"[{lo}, {_bound(hi)}), got {type(v).__name__} "
                                             f"{v!r:.60}")
            if not lo <= v < hi:
                raise IncompatibleStateError(f"loader state field {k} = {v} is outside its "
                                             f"range [{lo}, {_bound(hi)})")
            values[k] = int(v)
        consumed = values["step"] * values["global_batch_size"] + values["skipped_samples"]
        if values["cursor"] != consumed:
            raise IncompatibleStateError(
                f"loader state is inconsistent: cursor {values['cursor']} != step "
                f"{values['step']} * global_batch_size {values['global_batch_size']} + "
                f"skipped_samples {values['skipped_samples']} = {consumed}")
        return cls(**values)

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
