"""A record + its frame plans -> token ids, loss targets and the `SampleLayout` of its visual slots.

Prompt format (Qwen chat template with Keye-VL-1.5's visual tokens), per turn::

    <|im_start|>{role}\\n{media, first user turn only}{content}<|im_end|>\\n

with the loss on the content and ``<|im_end|>`` of assistant turns; a ``"text"`` turn is plain
pre-training text followed by ``<|endoftext|>``, all of it loss. A preference record (prompt,
chosen, rejected) is two sequences, ``Record.answers()``: the dataloader's preference mode loads
both; anywhere else it stands for its chosen conversation (SFT on the chosen answers). Media::

    image: <|vision_start|> <|image_pad|> x tokens <|vision_end|>
    video: <|vision_start|> then per frame  <|frame|> "%.1f" timestamp as text
           [<|fast_start|>] <|video_pad|> x tokens [<|fast_end|>]  (markers on fast frames only)
           then <|vision_end|>

The pad tokens are the visual slots: ``SampleLayout.frame_positions[m][f]`` is the position of
the first pad of frame ``f`` of media ``m``. `sample_sizes` computes the layout and the loss-token
count from lengths only (pads are never materialised), so every rank can size a whole global batch
cheaply; `tokenize` builds the ids, which only the token loaders do.

The default tokenizer is `ByteTokenizer` (UTF-8 bytes plus the special tokens above: deterministic,
no download). Anything with ``name``, ``pad_id``, ``encode(text)`` and ``special_id(token)``
plugs in, e.g. `HFTokenizer` around a Qwen tokenizer from ``transformers``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from dataloader.manifest import MediaRef, Record
from hetero_parallel.layout import SampleLayout

PAD = "<|pad|>"
END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
FRAME = "<|frame|>"
FAST_START = "<|fast_start|>"
FAST_END = "<|fast_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, END_OF_TEXT, IM_START, IM_END, VISION_START, VISION_END,
                                   IMAGE_PAD, VIDEO_PAD, FRAME, FAST_START, FAST_END)


class Tokenizer(Protocol):
    name: str
    """Identifies the vocabulary (part of the loader's configuration fingerprint)."""
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def special_id(self, token: str) -> int: ...


class ByteTokenizer:
    """UTF-8 bytes as ids ``16 + byte``; ids ``0..15`` are the special tokens (0 = pad)."""

    name = "bytes-v1"
    NUM_RESERVED = 16
    pad_id = 0
    vocab_size = NUM_RESERVED + 256

    def encode(self, text: str) -> list[int]:
        return [b + self.NUM_RESERVED for b in text.encode("utf-8")]

    def special_id(self, token: str) -> int:
        try:
            return SPECIAL_TOKENS.index(token)
        except ValueError:
            raise ValueError(f"unknown special token {token!r}; known: {SPECIAL_TOKENS}") from None

    def decode(self, ids: list[int]) -> str:
        """Inverse of `encode` with special tokens spelled out (for debugging and tests)."""
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            if i >= self.NUM_RESERVED:
                buf.append(i - self.NUM_RESERVED)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            out.append(SPECIAL_TOKENS[i] if i < len(SPECIAL_TOKENS) else f"<|reserved_{i}|>")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """Adapter for a ``transformers`` tokenizer (e.g. Qwen3's) that knows the special tokens."""

    def __init__(self, tokenizer: Any, name: str | None = None) -> None:
        self._tok = tokenizer
        self.name = name or getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else tokenizer.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def special_id(self, token: str) -> int:
        i = self._tok.convert_tokens_to_ids(token)
        if i is None or i == self._tok.unk_token_id:
            raise ValueError(f"tokenizer {self.name!r} has no special token {token!r}")
        return int(i)


@dataclass(frozen=True)
class SampleSizes:
    """What planning needs of one sample, computed without building its token ids."""

    layout: SampleLayout
    loss_tokens: int
    """Positions that carry loss: ``is_target[1:].sum()`` (each predicts the next token)."""


@dataclass(frozen=True)
class TokenizedSample:
    token_ids: np.ndarray
    """int64 ``[seq_len]``; visual slots hold the image/video pad id."""
    is_target: np.ndarray
    """bool ``[seq_len]``: the token is predicted (carries loss at the position before it)."""
    layout: SampleLayout


@dataclass(frozen=True)
class _Piece:
    ids: tuple[int, ...]
    target: bool
    repeat: int = 1
    """``ids`` repeated this many times (visual pads: one id, many times)."""
    frame: tuple[int, int] | None = None
    """(media, frame) when this piece is a frame's visual slots."""

    def __len__(self) -> int:
        return len(self.ids) * self.repeat


@functools.lru_cache(maxsize=4096)
def _encode_cached(tokenizer: Tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer.encode(text))


def _media_pieces(tok: Tokenizer, m: int, media: MediaRef) -> Iterator[_Piece]:
    sid = tok.special_id
    yield _Piece((sid(VISION_START),), False)
    if media.kind == "image":
        yield _Piece((sid(IMAGE_PAD),), False, media.tokens[0], (m, 0))
    else:
        for f, (n, fast, ts) in enumerate(zip(media.tokens, media.is_fast, media.timestamps,
                                               strict=True)):
            yield _Piece((sid(FRAME),) + _encode_cached(tok, f"{ts:.1f}"), False)
            if fast:
                yield _Piece((sid(FAST_START),), False)
            yield _Piece((sid(VIDEO_PAD),), False, n, (m, f))
            if fast:
                yield _Piece((sid(FAST_END),), False)
    yield _Piece((sid(VISION_END),), False)


def _pieces(record: Record, tok: Tokenizer) -> Iterator[_Piece]:
    sid = tok.special_id
    if record.is_preference:
        record = record.answers()[0]
    roles = [t.role for t in record.conversation]
    media_turn = roles.index("user") if "user" in roles else 0
    for i, turn in enumerate(record.conversation):
        media = record.media if i == media_turn else ()
        if turn.role == "text":
            for m, ref in enumerate(media):
                yield from _media_pieces(tok, m, ref)
            yield _Piece(tuple(tok.encode(turn.content)), True)
            yield _Piece((sid(END_OF_TEXT),), True)
            continue
        target = turn.role == "assistant"
        yield _Piece((sid(IM_START),) + _encode_cached(tok, f"{turn.role}\n"), False)
        for m, ref in enumerate(media):
            yield from _media_pieces(tok, m, ref)
        yield _Piece(tuple(tok.encode(turn.content)) + (sid(IM_END),), target)
        yield _Piece(_encode_cached(tok, "\n"), False)


def sample_sizes(record: Record, sample_id: int, tokenizer: Tokenizer) -> SampleSizes:
    """The layout and loss-token count of ``record`` as sample ``sample_id`` (no ids built)."""
    pos = 0
    loss = 0
    tokens: list[list[int]] = [[] for _ in record.media]
    positions: list[list[int]] = [[] for _ in record.media]
    for piece in _pieces(record, tokenizer):
        n = len(piece)
        if piece.frame is not None:
            m, _ = piece.frame
            tokens[m].append(n)
            positions[m].append(pos)
        if piece.target:
            loss += n - (1 if pos == 0 and n else 0)
        pos += n
    grids = tuple(tuple((h // 28, w // 28) for h, w in zip(m.heights, m.widths, strict=True))
                  for m in record.media)
    layout = SampleLayout(sample_id, pos, tuple(map(tuple, tokens)), tuple(map(tuple, positions)),
                          grids)
    return SampleSizes(layout, loss)


def tokenize(record: Record, sample_id: int, tokenizer: Tokenizer) -> TokenizedSample:
    """Token ids, targets and layout of ``record`` as sample ``sample_id``."""
    pieces = list(_pieces(record, tokenizer))
    ids = np.concatenate([np.tile(np.asarray(p.ids, dtype=np.int64), p.repeat) for p in pieces])
    target = np.concatenate([np.full(len(p), p.target, dtype=bool) for p in pieces])
    return TokenizedSample(ids, target, sample_sizes(record, sample_id, tokenizer).layout)
