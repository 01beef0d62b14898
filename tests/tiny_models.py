"""Tiny models for the library's tests (no example code): a frame encoder and a megatron GPT.

`TinyVisionEncoder` maps uint8 ``[h, w, 3]`` frames (sides multiples of 28 px) to one row per
28-px cell, row-major, as a ViT + 2x2-merge projector does: a cell embedding and one
self-attention block inside each frame (``vit``), then an MLP (``projector``). `build_gpt_chunks`
builds this rank's chunks of a small megatron-core ``GPTModel`` (RMSNorm, QK-norm, SwiGLU, GQA).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hetero_parallel.llm_chunks import (
    build_chunks,
    gpt_layer_spec,
    mrope_gpt_class,
    parallel_config_kwargs,
)
from hetero_parallel.plan import ParallelPlan
from hetero_parallel.vit_split import pieces_by_frame

CELL = 28
VISION_WIDTH = 32
HIDDEN = 64
VOCAB = 512
NUM_LAYERS = 4
MROPE_SECTION = [2, 3, 3]
"""(t, h, w) frequency pairs of the multimodal rope variant (head dim 16: 8 pairs)."""


class _FrameAttention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed = nn.Linear(CELL * CELL * 3, width)
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, cells: torch.Tensor, lengths: Sequence[int], pieces: Sequence[int] = (),
                split=None) -> torch.Tensor:
        """``pieces``: indices of the frames (in ``lengths``) that are pieces of split frames,
        in ``split.pieces`` order; their queries attend to the whole frame (``split.gather``)."""
        x = self.embed(cells)
        frames = list(torch.split(x, list(lengths)))
        qkv = [self.qkv(self.norm(f)).chunk(3, dim=-1) for f in frames]
        whole_kv = {}
        if split is not None:
            local = torch.cat([torch.cat(qkv[i][1:], dim=-1) for i in pieces]) if pieces \
                else x.new_zeros(0, 2 * x.shape[-1])
            for i, kv in zip(pieces, split.gather(local), strict=True):
                whole_kv[i] = kv.chunk(2, dim=-1)
        parts = []
        for i, (frame, (q, k, v)) in enumerate(zip(frames, qkv, strict=True)):
            k, v = whole_kv.get(i, (k, v))
            parts.append(frame + self.out(F.scaled_dot_product_attention(q[None], k[None],
                                                                         v[None])[0]))
        return torch.cat(parts)


class TinyVisionEncoder(nn.Module):
    """Supports split frames (`hetero_parallel.vit_split`): one row per 28-px cell (= token)."""

    supports_split_frames = True
    rows_per_token = 1

    def __init__(self, width: int = VISION_WIDTH, out: int = HIDDEN) -> None:
        super().__init__()
        self.vit = _FrameAttention(width)
        self.projector = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, out))
        self.out = out

    def forward(self, frames: Sequence[torch.Tensor], split=None) -> torch.Tensor:
        if not frames and split is None:
            return self.projector[-1].weight.new_zeros(0, self.out)
        piece = pieces_by_frame(split)
        cells, lengths = [], []
        for i, f in enumerate(frames):
            h, w = f.shape[0] // CELL, f.shape[1] // CELL
            x = f.float().div(255.0).reshape(h, CELL, w, CELL, 3).permute(0, 2, 1, 3, 4)
            x = x.reshape(h * w, -1)
            if i in piece:
                x = x[piece[i].token_start:piece[i].token_stop]
            cells.append(x)
            lengths.append(x.shape[0])
        if not cells:
            cells = [self.projector[0].weight.new_zeros(0, CELL * CELL * 3)]
        pieces = [p.frame for p in split.pieces] if split is not None else []
        return self.projector(self.vit(torch.cat(cells), lengths, pieces, split))


def gpt_config(plan: ParallelPlan | None = None, *, mrope: bool = False, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = parallel_config_kwargs(plan or ParallelPlan(world_size=1))
    if mrope:
        kwargs["mrope_section"] = MROPE_SECTION
    kwargs.update(overrides)
    return TransformerConfig(
        num_layers=NUM_LAYERS, hidden_size=HIDDEN, num_attention_heads=4, num_query_groups=2,
        kv_channels=16, ffn_hidden_size=128, normalization="RMSNorm", qk_layernorm=True,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, moe_token_dispatcher_type="alltoall",
        params_dtype=torch.float32, pipeline_dtype=torch.float32,
        **kwargs,
    )


def build_gpt(config, *, pre_process: bool = True, post_process: bool = True,
              vp_stage: int | None = None):
    from megatron.core.models.gpt import GPTModel

    model_class = mrope_gpt_class() if config.mrope_section else GPTModel
    return model_class(config=config, transformer_layer_spec=gpt_layer_spec(
        config, vp_stage=vp_stage), vocab_size=VOCAB, max_sequence_length=1024,
        pre_process=pre_process, post_process=post_process,
        position_embedding_type="mrope" if config.mrope_section else "rope",
        rotary_base=10_000, vp_stage=vp_stage)


def build_gpt_chunks(config) -> list[nn.Module]:
    return build_chunks(config, lambda **stage: build_gpt(config, **stage))


def toy_mrope_positions(layout) -> np.ndarray:
    """A deterministic 3-axis position rule for the mrope variant (not Keye's: any rule that
    differs per axis exercises the plumbing)."""
    n = np.arange(layout.seq_len, dtype=np.int64)
    return np.stack([n, n // 2, n // 3])
