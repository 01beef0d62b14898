"""Synthetic Keye-like samples held in memory: token ids, visual-slot layouts and random frames.

For exactness tests and step benchmarks, where real files would only add decoding time. Sequence
format: ``BOS, [FRAME, slot x tokens] per frame per media, text...``; slots carry the
``PAD_VISUAL`` placeholder and no loss. Everything is a pure function of the arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetero_parallel.layout import SampleLayout

BOS, FRAME, PAD_VISUAL = 1, 2, 3
FIRST_TEXT = 4
SIDE = 28
"""Pixels per LLM token side."""


@dataclass(frozen=True)
class ToySample:
    sample_id: int
    tokens: torch.Tensor
    is_target: torch.Tensor
    layout: SampleLayout
    frames: tuple[tuple[torch.Tensor, ...], ...]
    """Pixels per media per frame (uint8 ``[h, w, 3]``)."""

    @property
    def num_loss_tokens(self) -> int:
        return int(self.is_target[1:].sum())


def frame_grid(tokens: int) -> tuple[int, int]:
    """A near-square grid of ``h * w == tokens`` 28-px cells (h <= w)."""
    h = max(d for d in range(1, int(tokens**0.5) + 1) if tokens % d == 0)
    return h, tokens // h


def build_sample(sample_id: int, media_frame_tokens: list[list[int]], text_tokens: int,
                 vocab_size: int, generator: torch.Generator) -> ToySample:
    """One sample with the given visual tokens per frame per media and ``text_tokens`` of text."""
    ids, target = [BOS], [False]
    frames, frame_tokens, frame_positions = [], [], []
    for media in media_frame_tokens:
        pixels, toks, poss = [], [], []
        for n in media:
            h, w = frame_grid(n)
            pixels.append(torch.randint(0, 256, (SIDE * h, SIDE * w, 3), generator=generator,
                                        dtype=torch.uint8))
            ids.append(FRAME)
            target.append(False)
            poss.append(len(ids))
            toks.append(n)
            ids.extend([PAD_VISUAL] * n)
            target.extend([False] * n)
        frames.append(tuple(pixels))
        frame_tokens.append(tuple(toks))
        frame_positions.append(tuple(poss))
    ids.extend(torch.randint(FIRST_TEXT, vocab_size, (max(text_tokens, 2),),
                             generator=generator).tolist())
    target.extend([True] * max(text_tokens, 2))
    layout = SampleLayout(sample_id, len(ids), tuple(frame_tokens), tuple(frame_positions))
    return ToySample(sample_id, torch.tensor(ids), torch.tensor(target), layout, tuple(frames))


def mixed_samples(seed: int, count: int, vocab_size: int) -> list[ToySample]:
    """Text-only, one or two images of 1-9 tokens, and Slow-Fast videos (4-token slow frames,
    1-token fast frames), in turn."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for sid in range(count):
        kind = sid % 3
        media: list[list[int]] = []
        if kind == 1:
            for _ in range(1 + int(torch.randint(0, 2, (1,), generator=g))):
                h, w = (int(x) for x in torch.randint(1, 4, (2,), generator=g))
                media.append([h * w])
        elif kind == 2:
            n_frames = int(torch.randint(3, 7, (1,), generator=g))
            media.append([4 if f % 3 == 0 else 1 for f in range(n_frames)])
        text = int(torch.randint(4, 20, (1,), generator=g))
        samples.append(build_sample(sid, media, text, vocab_size, g))
    return samples


def preference_pairs(seed: int, count: int, vocab_size: int) -> list[ToySample]:
    """``count`` preference pairs: a prompt (`mixed_samples`' media and text, no loss) followed by
    a chosen answer (sample ``2p``) or a rejected one (sample ``2p + 1``, of another length).
    The rejected sample shares the chosen one's media (``media_from``); both are in group ``p``."""
    g = torch.Generator().manual_seed(seed + 7)
    out = []
    for p, prompt in enumerate(mixed_samples(seed, count, vocab_size)):
        prompt_ids = prompt.tokens.tolist()
        for answer in (0, 1):
            sid = 2 * p + answer
            n = int(torch.randint(2, 12, (1,), generator=g))
            tail = torch.randint(FIRST_TEXT, vocab_size, (n,), generator=g).tolist()
            base = prompt.layout
            layout = SampleLayout(sid, len(prompt_ids) + n, base.frame_tokens,
                                  base.frame_positions, group=p,
                                  media_from=2 * p if answer else None)
            out.append(ToySample(sid, torch.tensor(prompt_ids + tail),
                                 torch.tensor([False] * len(prompt_ids) + [True] * n), layout,
                                 prompt.frames))
    return out
