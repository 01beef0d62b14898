"""This rank's megatron-core LLM chunks for a `ParallelPlan`, whatever the model.

The model (its shapes, layer spec, position embedding) is the caller's; the layout is the plan's.
`parallel_config_kwargs` gives the `TransformerConfig` arguments the layout decides, so a model
builder never restates them, and `build_chunks` builds one chunk per virtual pipeline stage with
the right ``pre_process`` / ``post_process`` flags. `mrope_gpt_class` is megatron's ``GPTModel``
with multimodal RoPE made correct for packed rows under context parallelism.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hetero_parallel.plan import ParallelPlan


def parallel_config_kwargs(plan: ParallelPlan) -> dict[str, Any]:
    """`TransformerConfig` keyword arguments fixed by ``plan`` and by the heterogeneous step.

    - the parallel sizes and sequence parallelism;
    - ``calculate_per_token_loss`` and ``variable_seq_lengths`` (`hetero_train_step` needs both:
      the loss is a mean over the global batch's tokens, and micro-batch lengths vary);
    - with interleaving, megatron-LM's own p2p settings: batched p2p would post a stage's send to
      the next and to the previous stage in one batch, and with ``pp == 2`` both go to the same
      peer and are matched in posting order, so activations and gradients would swap;
    - CPU initialisation when there is no CUDA (with `hetero_parallel.cpu_compat`).
    """
    kwargs: dict[str, Any] = {
        "tensor_model_parallel_size": plan.tp,
        "pipeline_model_parallel_size": plan.pp,
        "virtual_pipeline_model_parallel_size": plan.vpp,
        "context_parallel_size": plan.cp,
        "sequence_parallel": plan.sequence_parallel,
        "calculate_per_token_loss": True,
        "variable_seq_lengths": True,
        "use_cpu_initialization": not torch.cuda.is_available(),
    }
    if plan.vpp is not None:
        kwargs.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    return kwargs


def build_chunks(config, make_chunk: Callable[..., nn.Module]) -> list[nn.Module]:
    """This rank's model chunks: ``make_chunk(pre_process=, post_process=, vp_stage=)`` once per
    virtual pipeline stage (once without interleaving).

    Needs megatron's parallel state (``hetero_parallel.initialize``) to know the stage.
    """
    from megatron.core import parallel_state as ps

    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp in range(vpp or 1):
        vp_stage = vp if vpp else None
        chunks.append(make_chunk(
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage,
        ))
    return chunks


def transformer_engine_available() -> bool:
    """TransformerEngine importable and CUDA present (its attention kernels need a GPU)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def gpt_layer_spec(config, *, vp_stage: int | None = None, qk_layernorm: bool = True,
                   normalization: str = "RMSNorm", impl: str | None = None):
    """The decoder spec of this rank's chunk (``vp_stage``).

    ``impl``:

    - ``"transformer_engine"``: megatron's TE layer spec, unchanged (the default on a GPU with
      TransformerEngine);
    - ``"torch"``: megatron's local layer spec with its core attention and norms replaced by
      `hetero_parallel.cpu_layers.CpuCoreAttention` / `CpuNorm` (exact, plain torch: packed
      sequences, context and sequence parallelism work on any device), as a block spec so that
      the final norm is `CpuNorm` too (the default when CUDA is absent);
    - ``"local"``: megatron's local spec, whose attention refuses CP and packing (the default on a
      GPU without TE).
    """
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if impl is None:
        impl = ("transformer_engine" if transformer_engine_available()
                else "local" if torch.cuda.is_available() else "torch")
    if impl == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    if impl not in ("torch", "local"):
        raise ValueError(f"impl must be 'transformer_engine', 'torch' or 'local', got {impl!r}")
    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=normalization)
    if impl == "local":
        return spec
    from hetero_parallel.cpu_layers import CpuCoreAttention, CpuNorm

    def swap(node):
        if isinstance(node, ModuleSpec):
            return dataclasses.replace(node, submodules=swap(node.submodules))
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            changes = {}
            for f in dataclasses.fields(node):
                value = getattr(node, f.name)
                if value is WrappedTorchNorm:
                    changes[f.name] = CpuNorm
                elif f.name == "core_attention":
                    changes[f.name] = CpuCoreAttention
                else:
                    changes[f.name] = swap(value)
            return dataclasses.replace(node, **changes)
        return node

    layer = swap(spec)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=CpuNorm)


def packing_supported(impl: str | None = None) -> bool:
    """Whether the default (or given) layer implementation takes packed THD micro-batches."""
    if impl is None:
        impl = ("transformer_engine" if transformer_engine_available()
                else "local" if torch.cuda.is_available() else "torch")
    return impl != "local"


class _OneRank:
    """Stands for a context-parallel group of one rank (``size() == 1``): megatron's multimodal
    rotary embedding then returns the whole row's frequencies."""

    @staticmethod
    def size() -> int:
        return 1


@functools.cache
def mrope_gpt_class() -> type:
    """megatron's ``GPTModel`` for multimodal RoPE (``position_embedding_type="mrope"``), with:

    - 1D ``[b, s]`` position ids accepted (text: the three axes equal, i.e. plain RoPE);
    - packed (THD) rows correct under context parallelism. megatron's
      ``MultimodalRotaryEmbedding`` always cuts its frequencies to this CP rank's two chunks of
      the whole row, as for padded rows; for a packed row megatron's THD rope instead wants the
      whole row's frequencies and takes each sample's two chunks itself (by its offset in
      ``cu_seqlens_q_padded``). With ``packed_seq_params`` the embedding therefore returns the
      whole row.
    """
    from megatron.core.models.common.embeddings.rotary_pos_embedding import (
        MultimodalRotaryEmbedding,
    )
    from megatron.core.models.gpt import GPTModel

    class PackedRowMultimodalRotaryEmbedding(MultimodalRotaryEmbedding):
        whole_row = False
        """Set by the model for each forward: the row is packed."""

        def forward(self, position_ids, mrope_section, cp_group=None):
            return super().forward(position_ids, mrope_section,
                                   cp_group=_OneRank() if self.whole_row else cp_group)

    class MropeGPTModel(GPTModel):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            if isinstance(getattr(self, "rotary_pos_emb", None), MultimodalRotaryEmbedding):
                self.rotary_pos_emb.__class__ = PackedRowMultimodalRotaryEmbedding

        def forward(self, input_ids, position_ids, attention_mask, *args,
                    packed_seq_params=None, **kwargs):
            if position_ids is None:
                raise ValueError(
                    "multimodal RoPE needs each micro-batch's position_ids ([3, b, s] or "
                    "[b, s]) on every pipeline stage, got None (a middle stage called without "
                    "its micro-batch's positions)")
            if position_ids.dim() == 2:
                position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
            if isinstance(self.rotary_pos_emb, PackedRowMultimodalRotaryEmbedding):
                self.rotary_pos_emb.whole_row = packed_seq_params is not None
            return super().forward(input_ids, position_ids, attention_mask, *args,
                                   packed_seq_params=packed_seq_params, **kwargs)

    return MropeGPTModel
