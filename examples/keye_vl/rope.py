"""Keye-VL-1.5's multimodal rotary positions: a pure function of a sample's `SampleLayout`.

The rule (Qwen2-VL's rope index as Keye-VL-1.5 applies it, learned from vLLM's
``KeyeVL1_5ForConditionalGeneration.get_mrope_input_positions``; every video frame is its own
visual block with one temporal step, since text — ``<|frame|>``, its timestamp, the Slow-Fast
markers — separates the frames):

- text tokens carry the same id on the three axes (t, h, w), one more than the previous token's
  largest id (0 for the first token);
- a visual block (an image, or one video frame) of ``rows x cols`` LLM tokens, row-major, whose
  first token would have had text id ``s``, gives the token at (r, c) the ids
  ``(s, s + r, s + c)``;
- the text after a block continues from the block's largest id + 1, i.e. ``s + max(rows, cols)``.

The layout already knows where each frame's tokens start (``frame_positions``), how many there
are (``frame_tokens``) and their grid (``frame_grids``), so no token ids are needed: every rank
that builds a micro-batch can compute the positions of its samples.
"""

from __future__ import annotations

import numpy as np

from hetero_parallel.layout import SampleLayout


def keye_position_ids(layout: SampleLayout) -> np.ndarray:
    """int64 ``[3, seq_len]``: the (t, h, w) rotary position of every token of the sample."""
    if layout.frame_tokens and any(layout.frame_tokens) and not layout.frame_grids:
        raise ValueError(f"sample {layout.sample_id}: visual tokens without frame_grids; "
                         "multimodal positions need each frame's (rows, cols)")
    out = np.empty((3, layout.seq_len), dtype=np.int64)
    token = 0  # next token index to fill
    next_id = 0  # the id the next text token gets
    blocks = sorted(
        (pos, n, grid)
        for poss, toks, grids in zip(layout.frame_positions, layout.frame_tokens,
                                     layout.frame_grids or [()] * len(layout.frame_tokens),
                                     strict=True)
        for pos, n, grid in zip(poss, toks, grids, strict=True))
    for pos, n, (rows, cols) in blocks:
        text = pos - token
        out[:, token:pos] = np.arange(next_id, next_id + text)
        start = next_id + text
        r, c = np.divmod(np.arange(n), cols)
        out[0, pos:pos + n] = start
        out[1, pos:pos + n] = start + r
        out[2, pos:pos + n] = start + c
        next_id = start + max(rows, cols)
        token = pos + n
    out[:, token:] = np.arange(next_id, next_id + layout.seq_len - token)
    return out
