"""What a manifest may hold: structural checks every record passes, and configurable size caps.

Two layers, one home each:

- `check_frames` holds the invariants of a media item's frame plan that hold for any model: one
  equal length >= 1 for every per-frame field (one frame for an image), sides that are positive
  multiples of 28, ``tokens == height * width / 28^2``, timestamps finite, >= 0 and non-decreasing.
  `dataloader.manifest.MediaRef` runs it on construction, so no record breaks them.
- `Limits` caps what a planner can meet (default: Keye-VL-1.5's limits from `io_server.keye`);
  `check_limits` applies them. The JSONL reader, the in-memory manifest and the columnar writer run
  it; the columnar reader re-checks the rows it gathers, so nothing absurd reaches the planner even
  from a damaged file.

Every error is a `ManifestError` (a ``ValueError``) naming where (``file:line``, or the row), the
record, the media item, the field, the value and the allowed range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from io_server.keye import RELEASE_PRESET

if TYPE_CHECKING:
    from dataloader.manifest import Record

TOKEN_SIDE = 28
"""Pixels per side of one LLM token (2x2 ViT patches of 14 px)."""
TOKEN_PIXELS = TOKEN_SIDE * TOKEN_SIDE
MAX_UNITS = (1 << 16) - 1
"""The columnar format stores sides in 28-px units as uint16: caps must keep them below this."""


class ManifestError(ValueError):
    """A manifest or one of its records is malformed (the message says where and why)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """Size caps that every record must respect (defaults: Keye-VL-1.5's released preset)."""

    max_frames: int = RELEASE_PRESET.max_frames
    """Sampled frames of one video (Keye: 1,365 = int(65,536 / 48))."""
    max_video_frame_tokens: int = RELEASE_PRESET.video_max_tokens
    """LLM tokens of one video frame (Keye: 768). The lower bound is 1, not Keye's 48:
    ``smart_resize`` floors both sides under a cap, so a real frame can get fewer (e.g. 45)."""
    max_image_tokens: int = RELEASE_PRESET.image_max_tokens
    """LLM tokens of one image (Keye: 20,480; lower bound 1)."""
    max_media: int = 256
    """Media items of one record."""
    max_seq_len: int = 1 << 24
    """Tokens of one sample (text, special tokens and visual tokens): far above any context
    length, so only absurd records hit it; the columnar format stores positions as int32."""

    def __post_init__(self) -> None:
        for name in ("max_frames", "max_video_frame_tokens", "max_image_tokens", "max_media",
                     "max_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Limits.{name} must be an int >= 1, got {v!r}")
        for name in ("max_video_frame_tokens", "max_image_tokens"):
            if getattr(self, name) > MAX_UNITS:
                raise ValueError(f"Limits.{name}({getattr(self, name)}) exceeds {MAX_UNITS}, "
                                 "the most a 28-px side count can hold in the columnar format")
        if self.max_seq_len >= 1 << 31:
            raise ValueError(f"Limits.max_seq_len({self.max_seq_len}) must be < 2^31 (positions "
                             "are stored as int32)")

    def to_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> Limits:
        return cls(**d)


DEFAULT_LIMITS = Limits()


def json_type(v: object) -> str:
    """The JSON name of a parsed value's type (for messages)."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
             float: "number", type(None): "null", tuple: "array"}
    return names.get(type(v), type(v).__name__)


def _is_int(x: object) -> bool:
    return not isinstance(x, bool | np.bool_) and isinstance(x, int | np.integer)


def _is_number(x: object) -> bool:
    return not isinstance(x, bool | np.bool_) and isinstance(x, int | float | np.integer
                                                             | np.floating)


_FRAME_TYPES = {
    "int": (int, _is_int, "an integer"),
    "bool": (bool, lambda x: isinstance(x, bool | np.bool_), "a boolean (true / false)"),
    "float": (float, _is_number, "a number"),
}
"""kind -> (the exact Python type, what else is accepted and converted, its name)."""


def normalise_frames(name: str, field: str, values: object, kind: str) -> tuple:
    """``values`` as a tuple of exact Python ``int`` / ``bool`` / ``float`` (``kind``), refusing
    other types (a bool is not an int, a string is not a bool) with the field and index."""
    if not isinstance(values, list | tuple):
        raise ManifestError(f"{name}: {field} must be an array, got {json_type(values)} "
                            f"{values!r:.60}")
    values = tuple(values)
    exact, accepted, what = _FRAME_TYPES[kind]
    if all(type(x) is exact for x in values):
        return values
    for i, x in enumerate(values):
        if not accepted(x):
            raise ManifestError(f"{name}: {field}[{i}] = {x!r:.60} ({json_type(x)}) "
                                f"is not {what}")
    return tuple(map(exact, values))


def _bad_index(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def check_frames(name: str, kind: str, tokens: tuple[int, ...], heights: tuple[int, ...],
                 widths: tuple[int, ...], timestamps: tuple[float, ...],
                 is_fast: tuple[bool, ...]) -> None:
    """The model-independent invariants of one media item's frame plan (module docstring).

    ``name`` says which media item it is, for the message.
    """
    n = len(tokens)
    lengths = (len(heights), len(widths), len(is_fast), len(timestamps))
    if n < 1 or any(k != n for k in lengths):
        raise ManifestError(f"{name}: per-frame fields must have one equal length >= 1, got "
                            f"tokens {n}, heights {lengths[0]}, widths {lengths[1]}, is_fast "
                            f"{lengths[2]}, timestamps {lengths[3]}")
    if kind == "image" and n != 1:
        raise ManifestError(f"{name}: an image has one frame, got {n}")
    # Bound the values before numpy sees them (a 10^30 would overflow int64).
    for field, vals in (("tokens", tokens), ("heights", heights), ("widths", widths)):
        lo, hi = min(vals), max(vals)
        if lo < 1 or hi >= 1 << 40:
            i = vals.index(lo if lo < 1 else hi)
            what = "an integer >= 1" if field == "tokens" else \
                f"a positive multiple of {TOKEN_SIDE} px"
            raise ManifestError(f"{name}: {field}[{i}] = {vals[i]} must be {what} (and < 2^40)")
    t = np.asarray(tokens, dtype=np.int64)
    h = np.asarray(heights, dtype=np.int64)
    w = np.asarray(widths, dtype=np.int64)
    for field, a in (("heights", h), ("widths", w)):
        bad = a % TOKEN_SIDE != 0
        if bad.any():
            i = _bad_index(bad)
            raise ManifestError(f"{name}: {field}[{i}] = {int(a[i])} is not a positive multiple "
                                f"of {TOKEN_SIDE} px")
    bad = h * w != t * TOKEN_PIXELS
    if bad.any():
        i = _bad_index(bad)
        raise ManifestError(f"{name}: frame {i}: {int(t[i])} tokens but {int(h[i])}x{int(w[i])} "
                            f"px ({int(h[i] * w[i]) / TOKEN_PIXELS:g} tokens of 28x28): tokens "
                            "must be height * width / 784")
    ts = np.asarray(timestamps, dtype=np.float64)
    bad = ~np.isfinite(ts) | (ts < 0)
    if bad.any():
        i = _bad_index(bad)
        raise ManifestError(f"{name}: timestamps[{i}] = {float(ts[i])!r} must be a finite number "
                            ">= 0 (seconds)")
    if n > 1:
        bad = np.diff(ts) < 0
        if bad.any():
            i = _bad_index(bad) + 1
            raise ManifestError(f"{name}: timestamps[{i}] = {float(ts[i])!r} is before "
                                f"timestamps[{i - 1}] = {float(ts[i - 1])!r}; timestamps must "
                                "not decrease")


def check_limits(record: Record, limits: Limits = DEFAULT_LIMITS) -> None:
    """Raises `ManifestError` when ``record`` exceeds ``limits`` (message: record, media, field,
    value and cap). Tokenizer-free: the exact ``seq_len`` cap is applied where layouts are
    computed (`dataloader.columnar.ColumnarWriter`); here the visual tokens alone must fit."""
    if len(record.media) > limits.max_media:
        raise ManifestError(f"record {record.id!r}: {len(record.media)} media items exceed "
                            f"max_media({limits.max_media})")
    visual = 0
    for m, media in enumerate(record.media):
        n = len(media.tokens)
        top = max(media.tokens)
        visual += sum(media.tokens)
        if media.kind == "video":
            if n > limits.max_frames:
                raise ManifestError(f"record {record.id!r} media {m} ({media.path!r}): {n} frames "
                                    f"exceed max_frames({limits.max_frames})")
            cap, what = limits.max_video_frame_tokens, "max_video_frame_tokens"
        else:
            cap, what = limits.max_image_tokens, "max_image_tokens"
        if top > cap:
            i = media.tokens.index(top)
            raise ManifestError(f"record {record.id!r} media {m} ({media.path!r}): tokens[{i}] = "
                                f"{top} exceeds {what}({cap}); allowed 1..{cap}")
    if visual > limits.max_seq_len:
        raise ManifestError(f"record {record.id!r}: {visual} visual tokens exceed "
                            f"max_seq_len({limits.max_seq_len})")


def check_utf8(name: str, text: str) -> bytes:
    """``text`` as UTF-8, or a `ManifestError` (a lone surrogate, e.g. JSON ``"\\ud800"``)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ManifestError(f"{name}: not valid Unicode ({exc.reason} at character "
                            f"{exc.start}: {text[exc.start]!r})") from None
