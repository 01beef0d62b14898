"""Model FLOPs of a training step from the real per-sample shapes, and MFU.

One owner for the FLOPs formulas: `TransformerShape` gives the per-token (matrix multiplies) and
per-squared-length (attention) forward FLOPs of a transformer stack, and both this module and
``CostModel.from_model_shapes`` (`hetero_parallel.cost_model`) use them.

What is counted, per step:

- ViT: every image / video frame is one bidirectional attention over its own patches (the ViT
  never attends across frames), ``linear * P + attention * P**2`` forward FLOPs for ``P``
  patches;
- LLM: causal attention over each sample's real, unpadded length ``L`` (packing or padding is an
  execution detail: model FLOPs ignore it), ``(linear + lm_head) * L + attention * L**2``;
- training: backward = 2x forward for a component that trains (input and weight gradients), 1x
  for a frozen one that gradients pass through (a frozen LLM under a trained projector), 0 for a
  frozen one nothing upstream of needs gradients (a frozen ViT);
- recomputation (activation checkpointing) runs forward work again: it is counted apart, in
  `StepFlops.recompute`, and only *hardware* FLOPs include it. MFU uses model FLOPs.

Only the transformer layers (and the LM head) count: embeddings, norms, softmax and the small
projector are a few percent and omitted, as in the usual MFU convention.

`executed_llm_flops` is the other view: the FLOPs a kernel actually runs for a micro-batch laid
out padded (every row the longest sample) or packed (THD rows, attention per sample), so that
padding waste can be measured.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:
    from hetero_parallel.balancer import SampleSpec

TRAIN_FLOPS_PER_FORWARD_FLOP = 3
"""Forward + backward = 3x forward (backward computes input and weight gradients: 2x forward)."""

Training = Literal["train", "input_grad", "frozen"]
"""How a component takes part in the backward pass: ``"train"`` (weight and input gradients,
backward = 2x forward), ``"input_grad"`` (frozen, but gradients pass through it to a trained part
before it: 1x), ``"frozen"`` (no backward: 0x)."""
_BACKWARD_FACTOR: dict[str, int] = {"train": 2, "input_grad": 1, "frozen": 0}

Recompute = Literal["none", "selective", "full"]
"""Activation recomputation of the LLM: ``"selective"`` recomputes core attention (megatron's
``recompute_granularity="selective"``), ``"full"`` every layer's forward."""


@dataclass(frozen=True, kw_only=True)
class TransformerShape:
    """The shape numbers of a transformer stack that determine its FLOPs.

    Only the transformer layers are counted (no embedding, no norms or softmax), plus the LM head
    when ``vocab_size`` is given (see ``lm_head_flops_per_token``).
    """

    num_layers: int
    hidden_size: int
    """Model width ``d``: input and output width of the attention and MLP blocks."""
    num_attention_heads: int
    head_dim: int
    num_query_groups: int
    """Key/value heads (grouped-query attention); equal to ``num_attention_heads`` for MHA."""
    ffn_hidden_size: int
    gated_mlp: bool
    """SwiGLU-style MLP (three matrices) instead of two."""
    causal: bool
    """Causal attention computes half of the score matrix."""
    vocab_size: int = 0
    """Output vocabulary (for ``lm_head_flops_per_token``); 0 when there is no LM head."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "head_dim",
                     "num_query_groups", "ffn_hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TransformerShape.{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_query_groups({self.num_query_groups}) must divide "
                f"num_attention_heads({self.num_attention_heads})"
            )
        if self.vocab_size < 0:
            raise ValueError(f"vocab_size must be >= 0, got {self.vocab_size}")

    def linear_params_per_layer(self) -> int:
        """Weights of one layer's matrices: Q, K, V, output projection and the MLP."""
        q_width = self.num_attention_heads * self.head_dim
        attention = self.hidden_size * (q_width + 2 * self.kv_width) + q_width * self.hidden_size
        mlp = (3 if self.gated_mlp else 2) * self.hidden_size * self.ffn_hidden_size
        return attention + mlp

    @property
    def kv_width(self) -> int:
        """Width of one token's keys (and of its values) in one layer."""
        return self.num_query_groups * self.head_dim

    def linear_flops_per_token(self) -> int:
        """Forward FLOPs per token of all matrix multiplies (2 FLOPs per weight per token)."""
        return 2 * self.num_layers * self.linear_params_per_layer()

    def attention_flops_coefficient(self) -> float:
        """Forward attention FLOPs of one sequence of length ``S`` divided by ``S**2``.

        ``Q K^T`` and ``softmax(.) V`` each cost ``2 * S**2 * heads * head_dim``; causal attention
        computes half of them.
        """
        full = 4 * self.num_attention_heads * self.head_dim * self.num_layers
        return full / 2 if self.causal else float(full)

    def lm_head_flops_per_token(self) -> int:
        """Forward FLOPs per token of the output projection (0 without an LM head)."""
        return 2 * self.hidden_size * self.vocab_size

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """Bytes of one token's keys and values over all layers (what sequence-parallel attention
        exchanges per token)."""
        return 2 * self.kv_width * self.num_layers * bytes_per_element

    def forward_flops(self, lengths: ArrayLike, *, include_lm_head: bool = False) -> float:
        """Forward FLOPs of independent sequences of ``lengths`` tokens (each attends only to
        itself): ``(linear [+ lm_head]) * sum(L) + attention * sum(L**2)``, summed exactly."""
        lengths = _lengths(lengths)
        total = int(lengths.sum())
        squares = int(np.dot(lengths, lengths))
        per_token = self.linear_flops_per_token()
        if include_lm_head:
            per_token += self.lm_head_flops_per_token()
        return float(per_token * total) + self.attention_flops_coefficient() * squares


SIGLIP_400M = TransformerShape(
    num_layers=27, hidden_size=1152, num_attention_heads=16, head_dim=72, num_query_groups=16,
    ffn_hidden_size=4304, gated_mlp=False, causal=False,
)
"""SigLIP so400m-patch14-384, the Keye-VL-1.5 ViT (bidirectional attention per image / frame)."""

QWEN3_8B = TransformerShape(
    num_layers=36, hidden_size=4096, num_attention_heads=32, head_dim=128, num_query_groups=8,
    ffn_hidden_size=12288, gated_mlp=True, causal=True, vocab_size=151_936,
)
"""Qwen3-8B, the Keye-VL-1.5 LLM."""


@dataclass(frozen=True, kw_only=True)
class StepFlops:
    """FLOPs of one training step (forward + backward, all ranks together)."""

    vit: float
    """ViT model FLOPs."""
    llm: float
    """LLM model FLOPs (real, unpadded lengths)."""
    vit_recompute: float = 0.0
    """Extra ViT forward FLOPs from recomputation."""
    llm_recompute: float = 0.0
    """Extra LLM forward FLOPs from recomputation."""

    @property
    def model(self) -> float:
        """What MFU counts: the work the model needs, once."""
        return self.vit + self.llm

    @property
    def recompute(self) -> float:
        return self.vit_recompute + self.llm_recompute

    @property
    def hardware(self) -> float:
        """What the GPUs execute for the model (model FLOPs plus recomputation)."""
        return self.model + self.recompute


def vit_flops(shape: TransformerShape, frame_patches: ArrayLike, *,
              training: Training = "train", recompute: bool = False) -> tuple[float, float]:
    """``(model FLOPs, recompute FLOPs)`` of the ViT over frames of ``frame_patches`` patches
    (one bidirectional attention per frame). Recomputation only exists with a backward."""
    forward = shape.forward_flops(frame_patches)
    factor = 1 + _backward_factor(training, "vit training")
    return forward * factor, forward if recompute and factor > 1 else 0.0


def llm_flops(shape: TransformerShape, seq_lens: ArrayLike, *, training: Training = "train",
              recompute: Recompute = "none", include_lm_head: bool = True) -> tuple[float, float]:
    """``(model FLOPs, recompute FLOPs)`` of the LLM over samples of ``seq_lens`` real tokens
    (causal attention within each sample)."""
    forward = shape.forward_flops(seq_lens, include_lm_head=include_lm_head)
    factor = 1 + _backward_factor(training, "llm training")
    if recompute not in ("none", "selective", "full"):
        raise ValueError(f"recompute must be 'none', 'selective' or 'full', got {recompute!r}")
    extra = 0.0
    if factor > 1 and recompute == "full":
        extra = shape.forward_flops(seq_lens)  # the LM head sits outside the recomputed layers
    elif factor > 1 and recompute == "selective":
        lengths = _lengths(seq_lens)
        extra = shape.attention_flops_coefficient() * int(np.dot(lengths, lengths))
    return forward * factor, extra


def step_flops(samples: Iterable[SampleSpec], *, vit_shape: TransformerShape = SIGLIP_400M,
               llm_shape: TransformerShape = QWEN3_8B, patches_per_token: int = 4,
               vit_training: Training = "train", llm_training: Training = "train",
               recompute_vit: bool = False, llm_recompute: Recompute = "none",
               include_lm_head: bool = True) -> StepFlops:
    """FLOPs of one step over ``samples`` (`hetero_parallel.balancer.SampleSpec`: real sequence
    lengths and per-frame visual tokens; ``patches_per_token`` ViT patches per visual token)."""
    if not isinstance(patches_per_token, int) or patches_per_token < 1:
        raise ValueError(f"patches_per_token must be a positive int, got {patches_per_token!r}")
    seq_lens, frames = [], []
    for s in samples:
        seq_lens.append(s.num_tokens)
        for m in s.media:
            frames.extend(m.tokens_per_frame)
    patches = np.asarray(frames, dtype=np.int64) * patches_per_token
    vit, vit_re = vit_flops(vit_shape, patches, training=vit_training, recompute=recompute_vit)
    llm, llm_re = llm_flops(llm_shape, seq_lens, training=llm_training, recompute=llm_recompute,
                            include_lm_head=include_lm_head)
    return StepFlops(vit=vit, llm=llm, vit_recompute=vit_re, llm_recompute=llm_re)


def executed_llm_flops(shape: TransformerShape, microbatches: Sequence[Sequence[int]], *,
                       packed: bool, divisor: int = 1, training: Training = "train",
                       include_lm_head: bool = True) -> float:
    """FLOPs the LLM kernels execute for micro-batches of samples with these real lengths.

    Padded: each micro-batch is one row per sample, every row its longest sample rounded up to
    ``divisor``, and attention runs over every full row. Packed (THD): one row of the samples
    end to end (each rounded up to ``divisor``), attention within each sample. Padding tokens
    cost what real ones do. Compare with `llm_flops` (model FLOPs) for the waste.
    """
    if not isinstance(divisor, int) or divisor < 1:
        raise ValueError(f"divisor must be a positive int, got {divisor!r}")
    lengths: list[int] = []
    for mb in microbatches:
        if not mb:
            continue
        if packed:
            lengths.extend(-(-int(n) // divisor) * divisor for n in mb)
        else:
            longest = -(-max(int(n) for n in mb) // divisor) * divisor
            lengths.extend([longest] * len(mb))
    forward = shape.forward_flops(lengths, include_lm_head=include_lm_head)
    return forward * (1 + _backward_factor(training, "training"))


def mfu(flops: float, seconds: float, peak_flops_per_s: float, gpus: int = 1) -> float:
    """Model FLOPs utilisation: ``flops / (seconds * peak_flops_per_s * gpus)``."""
    for name, value in (("flops", flops), ("seconds", seconds),
                        ("peak_flops_per_s", peak_flops_per_s)):
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"mfu: {name} must be a finite number >= 0, got {value!r}")
    if seconds <= 0 or peak_flops_per_s <= 0:
        raise ValueError(f"mfu: seconds({seconds}) and peak_flops_per_s({peak_flops_per_s}) "
                         "must be > 0")
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"mfu: gpus must be an int >= 1, got {gpus!r}")
    return flops / (seconds * peak_flops_per_s * gpus)


def _backward_factor(training: str, what: str) -> int:
    if training not in _BACKWARD_FACTOR:
        raise ValueError(f"{what} must be one of {tuple(_BACKWARD_FACTOR)}, got {training!r}")
    return _BACKWARD_FACTOR[training]


def _lengths(values: ArrayLike) -> np.ndarray:
    arr = np.asarray(values, dtype=np.int64).reshape(-1)
    if arr.size and arr.min() < 0:
        raise ValueError(f"lengths must be >= 0, got {int(arr.min())}")
    return arr
