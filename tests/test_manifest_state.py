"""Loader states are validated when loaded: the field, the value and the allowed range are named
(issue 14 item 9: ``None`` or a list gave a bare TypeError; a cursor >= 2^42 failed one step
later)."""

from __future__ import annotations

import numpy as np
import pytest

from dataloader.state import STATE_VERSION, IncompatibleStateError, LoaderState

GOOD = {"format_version": STATE_VERSION, "seed": 7, "epoch": 1, "cursor": 21, "step": 2,
        "skipped_samples": 5, "global_batch_size": 8, "manifest_hash": (1 << 64) - 1,
        "mixture_hash": 12345}


def test_a_valid_state_round_trips_and_numpy_integers_are_accepted():
    state = LoaderState.from_dict(GOOD)
    assert state.to_dict() == GOOD
    from_numpy = LoaderState.from_dict({k: np.int64(v) if k != "manifest_hash" else v
                                        for k, v in GOOD.items()})
    assert from_numpy == state and type(from_numpy.cursor) is int


@pytest.mark.parametrize("state, pattern", [
    (None, r"must be a mapping of field -> int .*got NoneType None"),
    ([1, 2, 3], r"must be a mapping .*got list \[1, 2, 3\]"),
    ("cursor=5", r"must be a mapping .*got str 'cursor=5'"),
    ({k: v for k, v in GOOD.items() if k != "cursor"}, r"missing keys \['cursor'\]"),
    (dict(GOOD, extra=1), r"unknown keys \['extra'\]"),
    (dict(GOOD, format_version=2), r"format_version 2 is not this loader's 1"),
    (dict(GOOD, format_version=True), r"format_version True is not this loader's 1"),
    (dict(GOOD, cursor=1 << 42, step=(1 << 42) // 8, skipped_samples=0),
     r"field cursor = 4398046511104 is outside its range \[0, 2\^42\)"),
    (dict(GOOD, cursor=-1), r"field cursor = -1 is outside its range \[0, 2\^42\)"),
    (dict(GOOD, cursor=21.0), r"field cursor must be an integer in \[0, 2\^42\), got float 21\.0"),
    (dict(GOOD, step=True), r"field step must be an integer .*got bool True"),
    (dict(GOOD, seed="7"), r"field seed must be an integer in \[0, 2\^64\), got str '7'"),
    (dict(GOOD, global_batch_size=0),
     r"field global_batch_size = 0 is outside its range \[1, 2\^42\)"),
    (dict(GOOD, manifest_hash=1 << 64), r"field manifest_hash = .* is outside its range "
                                        r"\[0, 2\^64\)"),
    (dict(GOOD, cursor=22), r"inconsistent: cursor 22 != step 2 \* global_batch_size 8 \+ "
                            r"skipped_samples 5 = 21"),
], ids=["None", "list", "str", "missing", "extra", "version", "bool version", "cursor 2^42",
        "negative", "float", "bool", "str seed", "zero batch", "hash 2^64", "inconsistent"])
def test_bad_states_name_the_field_and_range(state, pattern):
    with pytest.raises(IncompatibleStateError, match=pattern):
        LoaderState.from_dict(state)
