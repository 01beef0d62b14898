"""A record's planning layout from lengths, fast enough to precompute for 10^9 records.

`dataloader.sequence.sample_sizes` is the definition of a sample's layout (the Keye prompt format);
`LayoutComputer` gives the same numbers (``seq_len``, loss tokens and the first position of every
frame's visual slots) with one numpy pass per video instead of one Python object per piece: about
10x faster on long videos. It relies on what the prompt format guarantees: every special token is
one id, a frame's prefix is ``<|frame|>`` + the timestamp text (+ ``<|fast_start|>``), the suffix
``<|fast_end|>`` on fast frames. The columnar writer checks it against `sample_sizes` on a spot
sample of rows (`SPOT_CHECK_EVERY`) and stops on any difference, so a change of the prompt format
that is not mirrored here cannot go unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dataloader.manifest import Record

SPOT_CHECK_EVERY = 1024
"""The writer compares rows ``0, 1024, 2048, ...`` with `sample_sizes`."""


@dataclass(frozen=True, slots=True)
class RecordLayout:
    """The planning layout of one record (its sample id does not change it)."""

    seq_len: int
    loss_tokens: int
    frame_positions: np.ndarray
    """int64, the first visual-slot position of every frame of every media item, in order."""


class LayoutComputer:
    """`sample_sizes` numbers for records, with per-tokenizer caches of the small texts."""

    def __init__(self, tokenizer) -> None:
        from dataloader.sequence import ByteTokenizer

        self.tokenizer = tokenizer
        self.name: str = tokenizer.name
        if type(tokenizer) is ByteTokenizer:
            # One id per UTF-8 byte (ByteTokenizer.encode): skip building the id list.
            self._count = lambda text: len(text.encode("utf-8"))
        else:
            self._count = lambda text: len(tokenizer.encode(text))
        self._header = {role: 1 + self._count(f"{role}\n")
                        for role in ("system", "user", "assistant")}
        """``<|im_start|>`` + "role\\n"."""
        self._newline = self._count("\n")
        self._stamp: dict[float, int] = {}

    def _stamp_lengths(self, timestamps: tuple[float, ...]) -> np.ndarray:
        cache = self._stamp
        try:
            return np.fromiter((cache[t] for t in timestamps), dtype=np.int64,
                               count=len(timestamps))
        except KeyError:
            for t in timestamps:
                if t not in cache:
                    cache[t] = self._count(f"{t:.1f}")
            return self._stamp_lengths(timestamps)

    def _media(self, record: Record, pos: int, out: list[np.ndarray]) -> int:
        for m in record.media:
            pos += 1  # <|vision_start|>
            if m.kind == "image":
                out.append(np.asarray([pos], dtype=np.int64))
                pos += m.tokens[0]
            else:
                n = np.asarray(m.tokens, dtype=np.int64)
                fast = np.asarray(m.is_fast, dtype=np.int64)
                pre = 1 + self._stamp_lengths(m.timestamps) + fast  # <|frame|> ts [fast_start]
                step = pre + n + fast  # ... pads [<|fast_end|>]
                ends = np.cumsum(step)
                out.append(pos + ends - step + pre)
                pos += int(ends[-1])
            pos += 1  # <|vision_end|>
        return pos

    def layout(self, record: Record) -> RecordLayout:
        """A preference record's layout is its chosen conversation's (as `sample_sizes`)."""
        if record.is_preference:
            record = record.answers()[0]
        roles = [t.role for t in record.conversation]
        media_turn = roles.index("user") if "user" in roles else 0
        pos = loss = 0
        frames: list[np.ndarray] = []
        for i, turn in enumerate(record.conversation):
            if turn.role == "text":
                if i == media_turn:
                    pos = self._media(record, pos, frames)
                n = self._count(turn.content)
                loss += n - (pos == 0 and n > 0)  # as sample_sizes: position 0 predicts nothing
                pos += n
                loss += 1 - (pos == 0)  # <|endoftext|>
                pos += 1
                continue
            pos += self._header[turn.role]
            if i == media_turn:
                pos = self._media(record, pos, frames)
            n = self._count(turn.content) + 1  # content <|im_end|>
            if turn.role == "assistant":
                loss += n
            pos += n + self._newline
        positions = np.concatenate(frames) if frames else np.zeros(0, dtype=np.int64)
        return RecordLayout(int(pos), int(loss), positions)
