"""megatron-core layers for CPU runs: exact core attention (packed THD, context parallelism) and
norms that support sequence parallelism.

megatron-core's local ``DotProductAttention`` refuses context parallelism and packed (THD)
sequences, and its local norm (``WrappedTorchNorm``) refuses sequence parallelism; on GPUs
TransformerEngine provides all three. `CpuCoreAttention` and `CpuNorm` take their place in the
layer spec when CUDA is absent (`hetero_parallel.llm_chunks.gpt_layer_spec`), so CP, packing,
sequence parallelism and the distributed optimizer run on gloo with the data layout TE uses.

`CpuCoreAttention`:

- **BSHD** (``[s, b, heads, dim]``): causal attention over each row.
- **THD** (``[t, heads, dim]``, ``PackedSeqParams(qkv_format="thd")``): the samples of a packed
  row attend causally within themselves only (``cu_seqlens``, padded lengths when given).
- **CP > 1**: each rank holds its load-balanced share of every sequence (parts ``r`` and
  ``2 * cp - 1 - r`` of ``2 * cp``, per row in BSHD and per sample in THD, as
  `hetero_parallel.layout.cp_local_positions` says); keys and values are all-gathered over the CP
  group (backward: summed and sliced back), and each local query attends to every key of its own
  sequence at a global position at or before its own.

It computes the full masked score matrix (exact, O(local queries x keys) memory): a correctness
tool for development and CI machines, not a fast kernel.

`CpuNorm` is torch's ``LayerNorm`` / ``RMSNorm`` whose parameters carry megatron's
``sequence_parallel`` attribute, as TransformerEngine's norms do, so that megatron all-reduces
their gradients over the TP group when each TP rank normalised only its part of the sequence.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hetero_parallel.layout import cp_local_positions


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 over a group; backward sums the gradients and keeps this rank's
    part (each rank's keys feed every rank's queries)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        ctx.rank, ctx.size, ctx.n = dist.get_rank(group), dist.get_world_size(group), x.shape[0]
        out = x.new_empty((ctx.size * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def _segments(lengths: list[int], cp: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(sample index, position in sample) of each token rank ``rank`` holds, in its local order,
    for packed samples of (padded) ``lengths``."""
    seg, pos = [], []
    for i, n in enumerate(lengths):
        p = cp_local_positions(n, cp, rank)
        seg.append(np.full(p.size, i, np.int64))
        pos.append(p)
    if not seg:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(seg), np.concatenate(pos)


class CpuCoreAttention(torch.nn.Module):
    """Drop-in ``core_attention`` for megatron's ``SelfAttention`` (same constructor and forward
    signature as ``DotProductAttention``); see the module docstring."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None) -> None:
        from megatron.core import parallel_state
        from megatron.core.transformer.enums import AttnMaskType

        super().__init__()
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"CpuCoreAttention computes causal attention, got {attn_mask_type}")
        self.config = config
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None \
            else attention_dropout
        self.cp = config.context_parallel_size
        self.cp_group = (parallel_state.get_context_parallel_group() if self.cp > 1 else None)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type=None,
                attention_bias: torch.Tensor | None = None, packed_seq_params=None
                ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("CpuCoreAttention does not take an attention bias")
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        cp, rank = self.cp, (dist.get_rank(self.cp_group) if self.cp > 1 else 0)
        if thd:
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
            lengths = (cu[1:] - cu[:-1]).tolist()
            q_seg, q_pos = _segments(lengths, cp, rank)
            parts = [_segments(lengths, cp, r) for r in range(cp)]
            q, k, v = query[:, None], key[:, None], value[:, None]  # [t, 1, heads, dim]
        else:
            s_local = query.shape[0]
            q_seg = np.zeros(s_local, np.int64)
            q_pos = cp_local_positions(s_local * cp, cp, rank)
            parts = [(np.zeros(s_local, np.int64), cp_local_positions(s_local * cp, cp, r))
                     for r in range(cp)]
            q, k, v = query, key, value  # [s, b, heads, dim]
        if q_pos.size != q.shape[0]:
            raise ValueError(f"CpuCoreAttention: {q.shape[0]} local tokens, the sequence layout "
                             f"gives this CP rank {q_pos.size}")
        if cp > 1:
            k = _GatherSequence.apply(k, self.cp_group)
            v = _GatherSequence.apply(v, self.cp_group)
        k_seg = np.concatenate([p[0] for p in parts])
        k_pos = np.concatenate([p[1] for p in parts])
        allowed = torch.from_numpy((q_seg[:, None] == k_seg[None, :])
                                   & (k_pos[None, :] <= q_pos[:, None]))
        dtype = q.dtype
        # [s, b, h, d] -> [b, h, s, d]; keys and values repeated over the query groups (GQA).
        qb = q.permute(1, 2, 0, 3).float()
        kb = k.permute(1, 2, 0, 3).float().repeat_interleave(self.heads // self.groups, dim=1)
        vb = v.permute(1, 2, 0, 3).float().repeat_interleave(self.heads // self.groups, dim=1)
        p = self.dropout if self.training else 0.0
        if p > 0:
            from megatron.core import tensor_parallel

            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed, dropout_p=p,
                                                     scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed,
                                                 scale=self.softmax_scale)
        out = out.permute(2, 0, 1, 3).to(dtype)  # [s, b, h, d]
        if thd:
            return out[:, 0].reshape(out.shape[0], -1)
        return out.reshape(out.shape[0], out.shape[1], -1)


class CpuNorm:
    """megatron's local norm (``WrappedTorchNorm``) without its sequence-parallel refusal: the
    returned torch module's parameters are marked ``sequence_parallel`` when the config is."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        if config.layernorm_zero_centered_gamma or config.persist_layer_norm:
            raise ValueError("CpuNorm: zero-centered gamma and persist_layer_norm need "
                             "TransformerEngine / apex")
        kinds = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in kinds:
            raise ValueError(f"CpuNorm supports {sorted(kinds)}, got {config.normalization!r}")
        norm = kinds[config.normalization](hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm
