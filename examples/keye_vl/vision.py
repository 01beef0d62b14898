"""The vision side of Keye-VL-1.5: a SigLIP so400m-patch14 ViT with Keye's changes + the projector.

Single-device model code (no process groups). As the released model does it (learned from vLLM's
``keye.py`` / ``keye_vl1_5.py`` and the Keye-VL-1.5 port in transformers, PR #41040):

- frames arrive at their own resolution (sides multiples of 28 px, `io_server.keye.smart_resize`)
  and are cut into 14-px patches, row-major over the frame's patch grid;
- patch embedding: SigLIP's Conv2d(3, D, 14, stride 14) (applied here as the equivalent matmul);
- learned position embedding: SigLIP's ``(image_size / 14)^2`` table, seen as a square grid and
  resized to each frame's patch grid with bilinear interpolation (``align_corners=False``), then
  added to the patch embeddings (Keye's ``interpolate_pos_encoding`` path, the only one its
  inference uses). The released checkpoint also holds a 32768-row "packing" position table that
  this path never reads; the converter carries it through untouched (`examples.keye_vl.hf_layout`);
- 2D rotary attention: per head, the first half of the rotary pairs turn with the patch row, the
  second half with the patch column (theta 10,000), rotate-half style;
- packing: many frames of different sizes in one call, attention only within a frame;
- SigLIP encoder layers (pre-LN, tanh-GELU MLP) and SigLIP's post-LayerNorm;
- projector: each 2x2 block of patches is merged into one vector of ``4 * D`` in (row, column,
  channel) order, then LayerNorm(eps 1e-5), Linear(4D, 4D), exact GELU, Linear(4D, H).

A frame of ``h x w`` px gives ``(h / 28) * (w / 28)`` LLM tokens, row-major over its 28-px grid.

Shape legend: N patches, T tokens (= N / 4), D ViT width, H LLM width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hetero_parallel.vit_split import pieces_by_frame

PATCH = 14
MERGE = 2
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5
"""SigLIP's normalisation (Keye-VL-1.5's processor uses the same): ``(x / 255 - 0.5) / 0.5``."""


@dataclass(frozen=True, kw_only=True)
class VisionShape:
    """Shapes of the ViT and the projector."""

    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_hidden_size: int
    llm_hidden_size: int
    """Output width of the projector (the LLM's hidden size)."""
    image_size: int = 384
    """Pre-training resolution: the learned position table is ``(image_size // 14)^2`` rows
    (27 x 27 for 384 px, as SigLIP's 'valid' patch convolution drops the remainder)."""
    rope_theta: float = 10_000.0
    norm_epsilon: float = 1e-6

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ViT hidden_size({self.hidden_size}) is not divisible by "
                             f"num_heads({self.num_heads})")
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"2D rotary attention needs a head dim divisible by 4, got "
                             f"{self.hidden_size // self.num_heads}")
        if self.image_size < PATCH:
            raise ValueError(f"image_size({self.image_size}) is smaller than a {PATCH}-px patch")

    @property
    def position_grid(self) -> int:
        """Side of the learned position grid (27 for so400m-patch14-384)."""
        return self.image_size // PATCH


TINY_VISION = VisionShape(
    hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=64, llm_hidden_size=64,
    image_size=56,
)
SIGLIP_400M = VisionShape(
    hidden_size=1152, num_layers=27, num_heads=16, ffn_hidden_size=4304, llm_hidden_size=4096,
    image_size=384,
)
"""SigLIP so400m-patch14-384 with the projector into Qwen3-8B (Keye-VL-1.5-8B)."""


def frame_tokens(height: int, width: int) -> int:
    """LLM tokens of one frame of ``height x width`` px (both multiples of 28)."""
    side = PATCH * MERGE
    if height % side or width % side:
        raise ValueError(f"frame size {height}x{width} is not a multiple of {side} px")
    return (height // side) * (width // side)


def patchify(frame_HWC: torch.Tensor) -> torch.Tensor:
    """uint8 ``[h, w, 3]`` (sides multiples of 14) -> normalised patches ``[N, 3, 14, 14]``,
    row-major over the patch grid (the layout of SigLIP's and Keye's patch sequence)."""
    h, w, c = frame_HWC.shape
    if h % PATCH or w % PATCH or c != 3:
        raise ValueError(f"frame of shape {tuple(frame_HWC.shape)}: expected [h, w, 3] with h "
                         f"and w multiples of {PATCH}")
    x = frame_HWC.float().div(255.0).sub(PIXEL_MEAN).div(PIXEL_STD)
    x = x.reshape(h // PATCH, PATCH, w // PATCH, PATCH, 3).permute(0, 2, 4, 1, 3)
    return x.reshape(-1, 3, PATCH, PATCH)


def piece_patch_index(grid: tuple[int, int], token_start: int, token_stop: int) -> torch.Tensor:
    """Row-major patch indices of LLM tokens ``[token_start, token_stop)`` of a frame with patch
    ``grid``, in merge order: the 2x2 patches of each token together, (row, column) order."""
    rows, cols = grid
    t = torch.arange(token_start, token_stop)
    r, c = t // (cols // MERGE), t % (cols // MERGE)
    parts = [(MERGE * r + dr) * cols + MERGE * c + dc for dr in range(MERGE) for dc in range(MERGE)]
    return torch.stack(parts, dim=-1).reshape(-1)


def patch_positions(rows: int, cols: int) -> torch.Tensor:
    """(row, col) of every patch of a ``rows x cols`` patch grid, row-major: ``[N, 2]``."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([r, c], dim=-1).reshape(-1, 2)


class Rope2D(nn.Module):
    """Rotary angles over patch rows (first half of the rotary pairs) and columns (second half).

    ``head_dim / 4`` frequencies ``theta ** (-k / (head_dim / 4))``; a patch at (r, c) turns pair
    ``k`` by ``r * f_k`` and pair ``head_dim / 4 + k`` by ``c * f_k``.
    """

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
    a, b = x_NHd.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1).to(x_NHd.dtype)


def _attention_within_frames(q, k, v, frame_lengths: Sequence[int]) -> torch.Tensor:
    """Bidirectional attention inside each frame; frames of equal length run as one batch."""
    if len(set(frame_lengths)) == 1:
        n = len(frame_lengths)
        qb, kb, vb = (t.reshape(n, frame_lengths[0], *t.shape[1:]).transpose(1, 2)
                      for t in (q, k, v))
        return F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2).reshape(q.shape)
    out = torch.empty_like(q)
    starts = [0]
    for length in frame_lengths:
        starts.append(starts[-1] + length)
    by_length: dict[int, list[int]] = {}
    for i, length in enumerate(frame_lengths):
        by_length.setdefault(length, []).append(starts[i])
    for length, frame_starts in by_length.items():
        index = (torch.tensor(frame_starts, device=q.device)[:, None]
                 + torch.arange(length, device=q.device)).reshape(-1)
        # [frames, heads, length, head_dim]
        qb, kb, vb = (t[index].reshape(len(frame_starts), length, *t.shape[1:]).transpose(1, 2)
                      for t in (q, k, v))
        ob = F.scaled_dot_product_attention(qb, kb, vb)
        out[index] = ob.transpose(1, 2).reshape(-1, *q.shape[1:])
    return out


class VisionBlock(nn.Module):
    """One SigLIP encoder layer with 2D rotary attention (q, k, v fused into ``qkv``)."""

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

    def forward(self, x_ND: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                frame_lengths: Sequence[int], pieces: Sequence[int] = (),
                split=None) -> torch.Tensor:
        """``pieces``: indices (into ``frame_lengths``) of slices of split frames, in
        ``split.pieces`` order: their queries attend to the whole frame's keys and values,
        gathered over the ViT group (`hetero_parallel.vit_split`)."""
        n, d = x_ND.shape
        q, k, v = self.qkv(self.norm1(x_ND)).reshape(n, 3, self.num_heads, -1).unbind(1)
        if rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        if split is None:
            attn = _attention_within_frames(q, k, v, frame_lengths)
        else:
            attn = self._attention_with_pieces(q, k, v, frame_lengths, pieces, split)
        x_ND = x_ND + self.proj(attn.reshape(n, d))
        return x_ND + self.fc2(F.gelu(self.fc1(self.norm2(x_ND)), approximate="tanh"))

    @staticmethod
    def _attention_with_pieces(q, k, v, frame_lengths, pieces, split) -> torch.Tensor:
        starts = [0]
        for length in frame_lengths:
            starts.append(starts[-1] + length)
        spans = [(starts[i], starts[i + 1]) for i in pieces]
        kv = torch.cat([k, v], dim=-1)
        local = torch.cat([kv[a:b] for a, b in spans]) if spans else kv[:0]
        whole = split.gather(local)  # one exchange per layer, on every ViT rank
        out = torch.empty_like(q)
        whole_frames = [i for i in range(len(frame_lengths)) if i not in set(pieces)]
        if whole_frames:
            index = torch.cat([torch.arange(starts[i], starts[i + 1], device=q.device)
                               for i in whole_frames])
            out[index] = _attention_within_frames(
                q[index], k[index], v[index], [frame_lengths[i] for i in whole_frames])
        for (a, b), frame_kv in zip(spans, whole, strict=True):
            kf, vf = frame_kv.chunk(2, dim=-1)
            out[a:b] = F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), kf.transpose(0, 1), vf.transpose(0, 1)).transpose(0, 1)
        return out


class VisionTransformer(nn.Module):
    """Packed frames -> per-patch features ``[N, D]`` (each frame row-major over its patches)."""

    def __init__(self, shape: VisionShape) -> None:
        super().__init__()
        self.shape = shape
        self.patch_embed = nn.Conv2d(3, shape.hidden_size, PATCH, stride=PATCH)
        self.pos_embed = nn.Embedding(shape.position_grid ** 2, shape.hidden_size)
        self.rope = Rope2D(shape.hidden_size // shape.num_heads, shape.rope_theta)
        self.blocks = nn.ModuleList(VisionBlock(shape) for _ in range(shape.num_layers))
        self.post_norm = nn.LayerNorm(shape.hidden_size, eps=shape.norm_epsilon)

    def position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """The learned table resized to a ``rows x cols`` patch grid: ``[rows * cols, D]``
        (bilinear, ``align_corners=False``; the identity at the pre-training grid)."""
        g, d = self.shape.position_grid, self.shape.hidden_size
        table = self.pos_embed.weight.reshape(1, g, g, d).permute(0, 3, 1, 2)
        resized = F.interpolate(table.float(), size=(rows, cols), mode="bilinear",
                                align_corners=False)
        return resized.to(table.dtype).permute(0, 2, 3, 1).reshape(rows * cols, d)

    def forward(self, frames: Sequence[torch.Tensor], *, rope: bool = True,
                split=None) -> torch.Tensor:
        """uint8 frames ``[h, w, 3]`` (sides multiples of 14) -> ``[N, D]``.

        ``rope=False`` turns the 2D rotary attention off (SigLIP's own attention), for checking
        the rest of the tower against ``SiglipVisionModel``. With ``split``
        (`hetero_parallel.vit_split.SplitAttention`), a frame that is a piece of a split frame
        yields only its tokens' patches, in merge order (the 4 patches of each token together).
        """
        weight = self.patch_embed.weight
        grids = [(f.shape[0] // PATCH, f.shape[1] // PATCH) for f in frames]
        piece = pieces_by_frame(split)
        cache: dict[tuple[int, int], torch.Tensor] = {}
        xs, positions, lengths = [], [], []
        for i, (f, grid) in enumerate(zip(frames, grids, strict=True)):
            patches = patchify(f.to(weight.device)).to(weight.dtype)
            if grid not in cache:
                cache[grid] = self.position_embedding(*grid)
            pos_embed, where = cache[grid], patch_positions(*grid)
            if i in piece:
                index = piece_patch_index(grid, piece[i].token_start, piece[i].token_stop)
                patches, pos_embed, where = patches[index], pos_embed[index], where[index]
            xs.append(F.linear(patches.flatten(1), weight.flatten(1), self.patch_embed.bias)
                      + pos_embed)
            positions.append(where)
            lengths.append(patches.shape[0])
        x = torch.cat(xs) if xs else weight.new_zeros(0, self.shape.hidden_size)
        cos_sin = None
        if rope:
            where = torch.cat(positions) if positions else torch.zeros(0, 2, dtype=torch.long)
            cos_sin = self.rope(where.to(weight.device))
        pieces = [p.frame for p in split.pieces] if split is not None else []
        for block in self.blocks:
            x = block(x, cos_sin, lengths, pieces, split)
        return self.post_norm(x)


class Projector(nn.Module):
    """Merge each 2x2 patch block into ``4 * D`` (row, column, channel order) and map it to
    the LLM width: LayerNorm(eps 1e-5), Linear, exact GELU, Linear."""

    def __init__(self, shape: VisionShape) -> None:
        super().__init__()
        merged = shape.hidden_size * MERGE * MERGE
        self.norm = nn.LayerNorm(merged, eps=1e-5)
        self.fc1 = nn.Linear(merged, merged)
        self.fc2 = nn.Linear(merged, shape.llm_hidden_size)

    def merge(self, x_ND: torch.Tensor, grids: Sequence[tuple[int, int]],
              piece_tokens: Sequence[int | None] = ()) -> torch.Tensor:
        """Patch features of frames with ``grids`` (patch rows, cols) -> ``[T, 4D]``, row-major
        over each frame's 28-px grid. A frame's patches are row-major, or, for a piece of a split
        frame (``piece_tokens[i]`` tokens), already in merge order (`piece_patch_index`)."""
        d = x_ND.shape[-1]
        parts, offset = [], 0
        for i, (rows, cols) in enumerate(grids):
            tokens = piece_tokens[i] if piece_tokens else None
            if tokens is not None:
                n = tokens * MERGE * MERGE
                parts.append(x_ND[offset:offset + n].reshape(-1, MERGE * MERGE * d))
                offset += n
                continue
            feats = x_ND[offset:offset + rows * cols]
            offset += rows * cols
            blocks = feats.reshape(rows // MERGE, MERGE, cols // MERGE, MERGE, d)
            parts.append(blocks.permute(0, 2, 1, 3, 4).reshape(-1, MERGE * MERGE * d))
        return torch.cat(parts) if parts else x_ND.new_zeros(0, MERGE * MERGE * d)

    def forward(self, merged_TM: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(merged_TM))))


class VisionEncoder(nn.Module):
    """ViT + projector: frames (uint8 ``[h, w, 3]``, sides multiples of 28) -> visual tokens
    ``[T, H]``: the frames' tokens in input order, each frame row-major over its 28-px grid.

    Supports frames split over ViT ranks (`hetero_parallel.vit_split`): with ``split``, a piece
    of a split frame yields its token range only, and every layer exchanges keys and values.
    """

    supports_split_frames = True
    rows_per_token = MERGE * MERGE

    def __init__(self, shape: VisionShape) -> None:
        super().__init__()
        self.shape = shape
        self.vit = VisionTransformer(shape)
        self.projector = Projector(shape)

    def forward(self, frames: Sequence[torch.Tensor], split=None) -> torch.Tensor:
        if not frames and split is None:
            return self.projector.fc2.weight.new_zeros(0, self.shape.llm_hidden_size)
        for f in frames:
            frame_tokens(f.shape[0], f.shape[1])
        grids = [(f.shape[0] // PATCH, f.shape[1] // PATCH) for f in frames]
        pieces = pieces_by_frame(split)
        piece_tokens = [pieces[i].token_stop - pieces[i].token_start if i in pieces else None
                        for i in range(len(frames))]
        features = self.vit(frames, split=split)
        return self.projector(self.projector.merge(features, grids, piece_tokens))
