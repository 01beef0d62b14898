"""The Qwen3 LLM of Keye-VL-1.5 on megatron-core's `GPTModel`, with multimodal rotary positions.

Qwen3: RMSNorm, QK-norm (RMSNorm over each head), SwiGLU, GQA, no biases, untied embeddings.
Keye-VL-1.5 turns Qwen3's 1D RoPE into Qwen2-VL's multimodal RoPE: every token has three
position ids (t, h, w); the rotary frequencies of a head are split in three sections
(``mrope_section``, ``[16, 24, 24]`` of the 64 frequencies for head dim 128) that turn with t, h
and w respectively. Text tokens carry the same id on the three axes, which is exactly 1D RoPE;
visual tokens get (t, h, w) ids from `examples.keye_vl.rope`. megatron-core runs this as
``position_embedding_type="mrope"`` with ``position_ids`` of shape ``[3, b, s]``.

Single-model code only: no process groups are built here. The caller initialises megatron's
parallel state (``hetero_parallel.initialize``) first; ``build_llm`` then builds this rank's part
(its pipeline stage, its tensor-parallel shard).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from hetero_parallel.llm_chunks import (
    build_chunks,
    gpt_layer_spec,
    mrope_gpt_class,
    parallel_config_kwargs,
)
from hetero_parallel.plan import ParallelPlan


@dataclass(frozen=True, kw_only=True)
class LLMShape:
    """Shapes of a Qwen3 decoder with multimodal rotary positions."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    """Key/value heads (GQA)."""
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    max_sequence_length: int
    rotary_base: float = 1_000_000.0
    norm_epsilon: float = 1e-6
    tie_embeddings: bool = False
    mrope_section: tuple[int, int, int] | None = None
    """Rotary frequencies turned by (t, h, w); they sum to ``head_dim / 2``. Default: Qwen2-VL's
    split scaled to the head, ``[16, 24, 24]`` for head dim 128."""

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"num_attention_heads({self.num_attention_heads}) is not a multiple "
                             f"of num_query_groups({self.num_query_groups})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim({self.head_dim}) must be even for rotary embeddings")
        if self.mrope_section is None:
            half = self.head_dim // 2
            t = half // 4
            object.__setattr__(self, "mrope_section",
                               (t, (half - t) // 2, half - t - (half - t) // 2))
        section = tuple(int(s) for s in self.mrope_section)
        object.__setattr__(self, "mrope_section", section)
        if len(section) != 3 or sum(section) * 2 != self.head_dim or min(section) < 1:
            raise ValueError(f"mrope_section {list(section)} must be three positive sizes "
                             f"summing to head_dim / 2 = {self.head_dim // 2}")


TINY = LLMShape(
    num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, head_dim=16,
    ffn_hidden_size=128, vocab_size=512, max_sequence_length=4096, rotary_base=10_000.0,
)
"""Runs on CPU in tests and the demo (mrope_section ``[2, 3, 3]``)."""

QWEN3_8B = LLMShape(
    num_layers=36, hidden_size=4096, num_attention_heads=32, num_query_groups=8, head_dim=128,
    ffn_hidden_size=12288, vocab_size=151_936, max_sequence_length=131_072,
    rotary_base=8_000_000.0, mrope_section=(16, 24, 24),
)
"""The LLM of Keye-VL-1.5-8B: Qwen3-8B with multimodal RoPE (see `examples.keye_vl.config` for
the released values and their sources)."""


def check_tensor_parallel(shape: LLMShape, tp: int) -> None:
    """``ValueError`` naming the numbers when ``tp`` cannot split the heads or query groups."""
    if shape.num_attention_heads % tp or shape.num_query_groups % tp:
        raise ValueError(
            f"tensor parallel size {tp} does not divide the attention heads: "
            f"num_attention_heads={shape.num_attention_heads}, "
            f"num_query_groups (key/value heads)={shape.num_query_groups}; TP must divide both")


def transformer_config(
    shape: LLMShape,
    plan: ParallelPlan | None = None,
    *,
    params_dtype: torch.dtype = torch.float32,
    dropout: float = 0.0,
    **overrides,
):
    """megatron `TransformerConfig` of ``shape`` on ``plan``'s layout (one process if None).

    The layout's settings come from `hetero_parallel.llm_chunks.parallel_config_kwargs`; features
    that cannot run on CPU are refused there. A TP size that does not divide the heads is a
    ``ValueError`` here (megatron would only assert).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    plan = plan or ParallelPlan(world_size=1)
    check_tensor_parallel(shape, plan.tp)
    kwargs = parallel_config_kwargs(plan)
    kwargs.update(overrides)
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        kv_channels=shape.head_dim,
        ffn_hidden_size=shape.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=shape.norm_epsilon,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        mrope_section=list(shape.mrope_section),
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        # Dense model: no MoE, but megatron validates the dispatcher against variable lengths.
        moe_token_dispatcher_type="alltoall",
        **kwargs,
    )


def build_llm(
    shape: LLMShape,
    config,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    use_transformer_engine: bool | None = None,
):
    """This rank's part of the LLM (a `GPTModel` for one pipeline stage / virtual stage).

    ``use_transformer_engine``: True for megatron's TE layer spec, False for the plain-torch one
    (megatron's local spec on a GPU), None for the machine's default
    (`hetero_parallel.llm_chunks.gpt_layer_spec`).
    """
    impl = None
    if use_transformer_engine is not None:
        impl = "transformer_engine" if use_transformer_engine else (
            "local" if torch.cuda.is_available() else "torch")
    spec = gpt_layer_spec(config, vp_stage=vp_stage, qk_layernorm=True, normalization="RMSNorm",
                          impl=impl)
    return mrope_gpt_class()(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=shape.tie_embeddings,
        position_embedding_type="mrope",
        rotary_base=int(shape.rotary_base),
        vp_stage=vp_stage,
    )


def build_llm_chunks(shape: LLMShape, config, *, use_transformer_engine: bool | None = None
                     ) -> list:
    """This rank's model chunks: one per virtual pipeline stage (one without interleaving).

    Needs megatron's parallel state (``hetero_parallel.initialize``) to know the stage.
    """
    return build_chunks(config, lambda **stage: build_llm(
        shape, config, use_transformer_engine=use_transformer_engine, **stage))


def lm_forward_step(data_iterator, model):
    """megatron ``forward_step_func`` for next-token prediction with a mean token loss.

    The iterator yields ``(input_ids, labels)`` of shape ``[micro_batch, seq]``.
    """
    inputs, labels = next(data_iterator)
    position_ids = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
    output = model(inputs, position_ids, None, labels=labels)

    def loss_func(per_token_loss):
        loss = per_token_loss.float().mean()
        # Cloned: the schedule divides the returned loss in place by the micro-batch count.
        return loss, {"loss": loss.detach().clone()}

    return output, loss_func


def with_rotary_base(shape: LLMShape, rotary_base: float) -> LLMShape:
    """The same shape with another RoPE base (long-context stages raise it)."""
    return replace(shape, rotary_base=rotary_base)
