"""SigLIP-style vision encoder of Keye-VL-1.5: native-resolution ViT + 2x2-merge MLP projector.

Single-device model code (no process groups). Frames arrive at their own resolution (sides are
multiples of 28 px, see ``io_server.keye.smart_resize``), are cut into 14-px patches, and attend
only within their own frame (NaViT-style packing: many frames of different sizes in one call).
Positions are encoded with 2D RoPE over (row, column) of the patch grid. The projector merges each
2x2 block of patches into one LLM token, so a frame of ``h x w`` px gives ``(h / 28) * (w / 28)``
tokens, in row-major order over its 28-px grid.

Shape legend: N patches, T tokens (= N / 4), D ViT width, H LLM width, P = 3 * 14 * 14.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PATCH = 14
MERGE = 2


@dataclass(frozen=True, kw_only=True)
class VisionShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_hidden_size: int
    llm_hidden_size: int
    """Output width of the projector (the LLM's hidden size)."""
    rope_theta: float = 10_000.0
    norm_epsilon: float = 1e-6


TINY_VISION = VisionShape(
    hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=64, llm_hidden_size=64
)
SIGLIP_400M = VisionShape(
    hidden_size=1152, num_layers=27, num_heads=16, ffn_hidden_size=4304, llm_hidden_size=4096
)
"""SigLIP so400m-patch14-384 widths with the projector into Qwen3-8B."""


def frame_tokens(height: int, width: int) -> int:
    """LLM tokens of one frame of ``height x width`` px (both multiples of 28)."""
    side = PATCH * MERGE
    if height % side or width % side:
        raise ValueError(f"frame size {height}x{width} is not a multiple of {side} px")
    return (height // side) * (width // side)


def patchify(frame_HWC: torch.Tensor) -> torch.Tensor:
    """uint8 ``[h, w, 3]`` -> normalised patches ``[N, P]`` in merge order.

    Merge order: the four patches of each 28-px block are consecutive, blocks row-major, so the
    projector merges rows ``4k .. 4k+3`` into token ``k``.
    """
    h, w, _ = frame_HWC.shape
    frame_tokens(h, w)
    x = frame_HWC.float().div(255.0).sub(0.5).div(0.5)
    gh, gw = h // (PATCH * MERGE), w // (PATCH * MERGE)
    x = x.reshape(gh, MERGE, PATCH, gw, MERGE, PATCH, 3)
    # -> [gh, gw, merge_row, merge_col, 3, PATCH, PATCH]
    x = x.permute(0, 3, 1, 4, 6, 2, 5)
    return x.reshape(gh * gw * MERGE * MERGE, 3 * PATCH * PATCH)


def patch_positions(height: int, width: int) -> torch.Tensor:
    """(row, col) of every patch of a frame, in merge order: ``[N, 2]``."""
    gh, gw = height // (PATCH * MERGE), width // (PATCH * MERGE)
    bh, bw, mr, mc = torch.meshgrid(
        torch.arange(gh), torch.arange(gw), torch.arange(MERGE), torch.arange(MERGE), indexing="ij"
    )
    return torch.stack([bh * MERGE + mr, bw * MERGE + mc], dim=-1).reshape(-1, 2)


class Rope2D(nn.Module):
    """Rotary embedding over patch rows (first half of each head) and columns (second half)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
        quarter = head_dim // 4
        inv_freq = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float32) / quarter)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions_N2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions_N2.float()[:, :, None] * self.inv_freq  # [N, 2, quarter]
        angles = angles.reshape(positions_N2.shape[0], -1)  # [N, head_dim / 2]
        return angles.cos(), angles.sin()


def _rotate(x_NHd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x_NHd.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class VisionBlock(nn.Module):
    def __init__(self, shape: VisionShape) -> None:
        super().__init__()
        d = shape.hidden_size
        self.num_heads = shape.num_heads
        self.norm1 = nn.LayerNorm(d, eps=shape.norm_epsilon)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=shape.norm_epsilon)
        self.fc1 = nn.Linear(d, shape.ffn_hidden_size)
        self.fc2 = nn.Linear(shape.ffn_hidden_size, d)

    def forward(self, x_ND: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                frame_lengths: Sequence[int]) -> torch.Tensor:
        n, d = x_ND.shape
        q, k, v = self.qkv(self.norm1(x_ND)).reshape(n, 3, self.num_heads, -1).unbind(1)
        q, k = _rotate(q, *rope), _rotate(k, *rope)
        attn = _attention_within_frames(q, k, v, frame_lengths)
        x_ND = x_ND + self.proj(attn.reshape(n, d))
        return x_ND + self.fc2(F.gelu(self.fc1(self.norm2(x_ND)), approximate="tanh"))


def _attention_within_frames(q, k, v, frame_lengths: Sequence[int]) -> torch.Tensor:
    """Bidirectional attention inside each frame; frames of equal length run as one batch."""
    out = torch.empty_like(q)
    starts = [0]
    for length in frame_lengths:
        starts.append(starts[-1] + length)
    by_length: dict[int, list[int]] = {}
    for i, length in enumerate(frame_lengths):
        by_length.setdefault(length, []).append(starts[i])
    for length, frame_starts in by_length.items():
        index = (torch.tensor(frame_starts)[:, None] + torch.arange(length)).reshape(-1)
        # [frames, heads, length, head_dim]
        qb, kb, vb = (t[index].reshape(len(frame_starts), length, *t.shape[1:]).transpose(1, 2)
                      for t in (q, k, v))
        ob = F.scaled_dot_product_attention(qb, kb, vb)
        out[index] = ob.transpose(1, 2).reshape(-1, *q.shape[1:])
    return out


class VisionTransformer(nn.Module):
    def __init__(self, shape: VisionShape) -> None:
        super().__init__()
        self.patch_embed = nn.Linear(3 * PATCH * PATCH, shape.hidden_size)
        self.rope = Rope2D(shape.hidden_size // shape.num_heads, shape.rope_theta)
        self.blocks = nn.ModuleList(VisionBlock(shape) for _ in range(shape.num_layers))
        self.post_norm = nn.LayerNorm(shape.hidden_size, eps=shape.norm_epsilon)

    def forward(self, patches_NP: torch.Tensor, positions_N2: torch.Tensor,
                frame_lengths: Sequence[int]) -> torch.Tensor:
        x = self.patch_embed(patches_NP)
        rope = self.rope(positions_N2)
        for block in self.blocks:
            x = block(x, rope, frame_lengths)
        return self.post_norm(x)


class Projector(nn.Module):
    """Merge each 2x2 patch block (4 consecutive rows) and map it to the LLM width."""

    def __init__(self, shape: VisionShape) -> None:
        super().__init__()
        merged = shape.hidden_size * MERGE * MERGE
        self.norm = nn.LayerNorm(merged, eps=1e-5)
        self.fc1 = nn.Linear(merged, merged)
        self.fc2 = nn.Linear(merged, shape.llm_hidden_size)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        x = x_ND.reshape(-1, x_ND.shape[-1] * MERGE * MERGE)
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class VisionEncoder(nn.Module):
    """ViT + projector: frames (uint8 ``[h, w, 3]`` each) -> visual tokens ``[T, H]``.

    Output rows are the frames' tokens in input order, each frame row-major over its 28-px grid.
    """

    def __init__(self, shape: VisionShape) -> None:
        super().__init__()
        self.shape = shape
        self.vit = VisionTransformer(shape)
        self.projector = Projector(shape)

    def forward(self, frames: Sequence[torch.Tensor]) -> torch.Tensor:
        if not frames:
            return self.projector.fc2.weight.new_zeros(0, self.shape.llm_hidden_size)
        patches = torch.cat([patchify(f) for f in frames])
        positions = torch.cat([patch_positions(f.shape[0], f.shape[1]) for f in frames])
        lengths = [frame_tokens(f.shape[0], f.shape[1]) * MERGE * MERGE for f in frames]
        return self.projector(self.vit(patches, positions, lengths))

