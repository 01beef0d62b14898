"""Build the Keye-VL model of a stage on a `ParallelPlan`: this rank's ViT replica and LLM chunks.

Initial weights come from ``init_seed`` (the same on every rank) or from an unsharded model folder
(`hetero_parallel.export`: a previous stage's ``final/``, a ``merge`` output or a Hugging Face
checkpoint converted by ``python -m examples.keye_vl.convert from-hf``), of which each rank reads
only its own slices (names of either megatron layer spec are accepted, see
`examples.keye_vl.hf_layout.SpecAliases`). Components that the stage does not train are frozen
(``requires_grad=False``); `hetero_parallel.trainer.HeteroTrainer` takes it from there.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection

import torch
from torch import nn

from examples.keye_vl.config import COMPONENTS, ModelConfig
from examples.keye_vl.hf_layout import SpecAliases
from examples.keye_vl.llm import build_llm_chunks, transformer_config
from examples.keye_vl.vision import VisionEncoder
from hetero_parallel.export import LLM_PREFIX, VISION_PREFIX, SafetensorsSource, load_module
from hetero_parallel.groups import ParallelGroups
from hetero_parallel.megatron_state import load_full_state


def build_model(groups: ParallelGroups, model: ModelConfig, *,
                trainable: Collection[str] = COMPONENTS, rotary_base: float | None = None,
                init_seed: int = 0, init_from=None,
                params_dtype: torch.dtype = torch.float32,
                use_transformer_engine: bool | None = None,
                ) -> tuple[VisionEncoder | None, list[nn.Module]]:
    """(this rank's ViT replica or None, this rank's LLM chunks), with frozen parts marked.

    ``init_from``: a folder or ``.safetensors`` file (path), or any
    `hetero_parallel.export.TensorSource`. ``use_transformer_engine``: megatron's TE layer spec
    (default: when TE and a GPU are available).
    """
    unknown = set(trainable) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; expected a subset of "
                         f"{COMPONENTS}")
    plan = groups.plan
    llm_shape = model.llm
    if rotary_base is not None:
        llm_shape = dataclasses.replace(llm_shape, rotary_base=rotary_base)
    config = transformer_config(llm_shape, plan, params_dtype=params_dtype)
    torch.manual_seed(init_seed)
    # Every rank draws the ViT's initial weights, so the LLM's draw does not depend on the layout.
    vision = VisionEncoder(model.vision).to(params_dtype)
    chunks = build_llm_chunks(llm_shape, config, use_transformer_engine=use_transformer_engine)
    if init_from is not None:
        where = str(init_from) if isinstance(init_from, str | os.PathLike) else "init_from"
        source = SafetensorsSource(init_from) if isinstance(init_from, str | os.PathLike) \
            else init_from
        source = SpecAliases(source)
        if plan.vit_index(groups.rank) is not None:
            load_module(vision, source, VISION_PREFIX, where=where)
        load_full_state(chunks, source, prefix=LLM_PREFIX, where=where)
    if plan.vit_index(groups.rank) is None:
        vision = None
    else:
        if torch.cuda.is_available():
            vision = vision.cuda()
        vision.vit.requires_grad_("vision" in trainable)
        vision.projector.requires_grad_("projector" in trainable)
    for chunk in chunks:
        chunk.requires_grad_("llm" in trainable)
    return vision, chunks
