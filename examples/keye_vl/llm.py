"""Qwen3-style LLM on megatron-core's `GPTModel`: RMSNorm, QK-norm, SwiGLU, GQA, RoPE.

Single-model code only: no process groups are built here. The caller initialises megatron's
parallel state (``hetero_parallel.initialize``) first; ``build_llm`` then builds this rank's part
(its pipeline stage, its tensor-parallel shard).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


@dataclass(frozen=True, kw_only=True)
class LLMShape:
    """Shapes of a Qwen3-style decoder."""

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


TINY = LLMShape(
    num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, head_dim=16,
    ffn_hidden_size=128, vocab_size=512, max_sequence_length=4096, rotary_base=10_000.0,
)
"""Runs on CPU in tests and the demo."""

QWEN3_8B = LLMShape(
    num_layers=36, hidden_size=4096, num_attention_heads=32, num_query_groups=8, head_dim=128,
    ffn_hidden_size=12288, vocab_size=151_936, max_sequence_length=131_072,
)
"""Qwen3-8B, the LLM of Keye-VL-1.5-8B."""


def transformer_config(
    shape: LLMShape,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    virtual_pipeline: int | None = None,
    context_parallel: int = 1,
    params_dtype: torch.dtype = torch.float32,
    dropout: float = 0.0,
    **overrides,
):
    """megatron `TransformerConfig` for ``shape`` and the given parallel sizes.

    On a machine without CUDA, settings that cannot run on CPU are refused here
    (``hetero_parallel.cpu_compat.check_supported``).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    from hetero_parallel.cpu_compat import check_supported

    overrides.setdefault("use_cpu_initialization", not torch.cuda.is_available())
    check_supported(
        context_parallel_size=context_parallel,
        sequence_parallel=overrides.get("sequence_parallel", False),
    )

    if virtual_pipeline is not None:
        # As Megatron-LM does for the interleaved schedule. Batched p2p would post a stage's
        # send-to-next and send-to-previous in one batch; with pp=2 both go to the same peer
        # and are matched in posting order, so activations and gradients would swap.
        overrides.setdefault("overlap_p2p_comm", True)
        overrides.setdefault("batch_p2p_comm", False)

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
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
        context_parallel_size=context_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        # Dense model: no MoE, but megatron validates the dispatcher against variable lengths.
        moe_token_dispatcher_type="alltoall",
        **overrides,
    )


def build_llm(
    shape: LLMShape,
    config,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    use_transformer_engine: bool = False,
):
    """This rank's part of the LLM (a `GPTModel` for one pipeline stage / virtual stage)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_transformer_engine:
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=shape.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(shape.rotary_base),
        vp_stage=vp_stage,
    )


def build_llm_chunks(shape: LLMShape, config) -> list:
    """This rank's model chunks: one per virtual pipeline stage (one without interleaving).

    Needs megatron's parallel state (``hetero_parallel.initialize``) to know the stage.
    """
    from megatron.core import parallel_state as ps

    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp in range(vpp or 1):
        vp_stage = vp if vpp else None
        chunks.append(
            build_llm(
                shape, config,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                vp_stage=vp_stage,
            )
        )
    return chunks


def lm_forward_step(data_iterator, model):
    """megatron ``forward_step_func`` for next-token prediction with a mean token loss.

    The iterator yields ``(input_ids, labels)`` of shape ``[micro_batch, seq]``.
    """
    inputs, labels = next(data_iterator)
    position_ids = torch.arange(inputs.shape[1]).expand_as(inputs)
    output = model(inputs, position_ids, None, labels=labels)

    def loss_func(per_token_loss):
        loss = per_token_loss.float().mean()
        # Cloned: the schedule divides the returned loss in place by the micro-batch count.
        return loss, {"loss": loss.detach().clone()}

    return output, loss_func


def with_rotary_base(shape: LLMShape, rotary_base: float) -> LLMShape:
    """The same shape with another RoPE base (long-context stages raise it)."""
    return replace(shape, rotary_base=rotary_base)


def _global_names(chunk) -> dict[str, str]:
    """Local parameter name -> name in the unsharded, single-stage model."""
    layers = chunk.decoder.layers
    renumber = {str(i): str(layer.layer_number - 1) for i, layer in enumerate(layers)}
    names = {}
    for name, _ in chunk.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = renumber[parts[2]]
        names[name] = ".".join(parts)
    return names


def _is_gated_fc1(name: str, chunk) -> bool:
    return name.endswith("mlp.linear_fc1.weight") and chunk.config.gated_linear_unit


def _shard(full: torch.Tensor, param, name: str, chunk, tp_rank: int, tp_size: int):
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim = param.partition_dim
    if _is_gated_fc1(name, chunk):
        # A SwiGLU fc1 holds [gate; up]; each TP rank holds [gate shard; up shard].
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp_size, dim)[tp_rank], up.chunk(tp_size, dim)[tp_rank]], dim)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def load_full_state(chunks, full_state: dict[str, torch.Tensor]) -> None:
    """Copy an unsharded (TP=1, PP=1) state into this rank's model chunks (its stage, its shard).

    ``full_state`` maps the single-model parameter names (``decoder.layers.{global index}...``)
    to tensors; every parameter of the local chunks must be present.
    """
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for chunk in chunks:
        chunk = getattr(chunk, "module", chunk)
        names = _global_names(chunk)
        with torch.no_grad():
            for name, param in chunk.named_parameters():
                local = _shard(full_state[names[name]], param, name, chunk, tp_rank, tp_size)
                if local.shape != param.shape:
                    raise ValueError(
                        f"{names[name]}: shard shape {tuple(local.shape)} does not match "
                        f"parameter {name} of shape {tuple(param.shape)}"
                    )
                param.copy_(local)


def gather_full_state(chunks, *, grads: bool = False) -> dict[str, torch.Tensor]:
    """This rank's stage as unsharded tensors (gathered over its TP group), by single-model name.

    With ``grads`` it gathers ``main_grad`` (megatron DDP) or ``grad`` instead of the weights.
    Collective over the tensor-parallel group.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    out = {}
    for chunk in chunks:
        chunk = getattr(chunk, "module", chunk)
        names = _global_names(chunk)
        for name, param in chunk.named_parameters():
            value = param
            if grads:
                value = getattr(param, "main_grad", None)
                value = param.grad if value is None else value
            value = value.detach().clone()
            if getattr(param, "tensor_model_parallel", False) and tp_size > 1:
                parts = [torch.empty_like(value) for _ in range(tp_size)]
                dist.all_gather(parts, value.contiguous(), group=group)
                dim = param.partition_dim
                if _is_gated_fc1(name, chunk):
                    gates, ups = zip(*(p.chunk(2, dim=dim) for p in parts), strict=True)
                    value = torch.cat([torch.cat(gates, dim), torch.cat(ups, dim)], dim)
                else:
                    value = torch.cat(parts, dim)
            out[names[name]] = value
    return out
