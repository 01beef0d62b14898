"""Keye-VL model on a `ParallelPlan`: build the ViT replica and this rank's LLM part, their
optimizers, and run one heterogeneous step.

Reads top to bottom like a step: the caller brings the balancer's `BatchPlan`, the per-sample
`SampleLayout`s, this ViT rank's frames and this replica's micro-batches (from the dataloader);
``KeyeTrainer.step`` runs `hetero_parallel.step.hetero_train_step` and the optimizer steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from examples.keye_vl.config import COMPONENTS, ModelConfig
from examples.keye_vl.llm import build_llm_chunks, load_full_state, transformer_config
from examples.keye_vl.vision import VisionEncoder
from hetero_parallel.balancer import BatchPlan
from hetero_parallel.groups import ParallelGroups
from hetero_parallel.routing import SampleLayout, build_routing, microbatch_shapes
from hetero_parallel.step import MicroBatch, StepOptions, StepOutput, hetero_train_step


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    optimizer: str = "adam"
    """"adam" or "sgd" (SGD without momentum makes steps easy to check by hand)."""
    lr: float = 1e-3
    weight_decay: float = 0.0
    sgd_momentum: float = 0.0


@dataclass
class KeyeTrainer:
    groups: ParallelGroups
    model: ModelConfig
    llm: list[nn.Module]
    """This rank's LLM chunks (megatron DDP-wrapped when the LLM trains)."""
    llm_optimizer: object | None
    vision: VisionEncoder | None
    vision_optimizer: torch.optim.Optimizer | None
    trainable: frozenset[str]

    @classmethod
    def build(cls, groups: ParallelGroups, model: ModelConfig, *, optim: OptimConfig,
              trainable: Sequence[str] = COMPONENTS, rotary_base: float | None = None,
              init_seed: int = 0, initial_state: dict | None = None) -> KeyeTrainer:
        """Build (same weights on every rank for the same ``init_seed``, or ``initial_state`` =
        ``{"vision": state_dict, "llm": unsharded state}``)."""
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        plan = groups.plan
        trainable = frozenset(trainable)
        llm_shape = model.llm
        if rotary_base is not None:
            llm_shape = dataclasses.replace(llm_shape, rotary_base=rotary_base)
        config = transformer_config(llm_shape, tensor_parallel=plan.tp, pipeline_parallel=plan.pp,
                                    virtual_pipeline=plan.vpp, context_parallel=plan.cp,
                                    calculate_per_token_loss=True, variable_seq_lengths=True)
        torch.manual_seed(init_seed)
        vision_full = VisionEncoder(model.vision)
        chunks = build_llm_chunks(llm_shape, config)
        if initial_state is not None:
            vision_full.load_state_dict(initial_state["vision"])
            load_full_state(chunks, initial_state["llm"])
        vision = vision_full if plan.vit_index(groups.rank) is not None else None

        llm_optimizer = None
        if "llm" in trainable:
            ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
            chunks = [DistributedDataParallel(config, ddp, c) for c in chunks]
            config.finalize_model_grads_func = finalize_model_grads
            llm_optimizer = get_megatron_optimizer(
                OptimizerConfig(optimizer=optim.optimizer, lr=optim.lr,
                                weight_decay=optim.weight_decay, sgd_momentum=optim.sgd_momentum,
                                clip_grad=0.0, use_distributed_optimizer=False,
                                bf16=config.bf16),
                chunks,
            )
        else:
            for c in chunks:
                c.requires_grad_(False)

        vision_optimizer = None
        if vision is not None:
            vision.vit.requires_grad_("vision" in trainable)
            vision.projector.requires_grad_("projector" in trainable)
            params = [p for p in vision.parameters() if p.requires_grad]
            if params:
                vision_optimizer = (
                    torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
                    if optim.optimizer == "adam"
                    else torch.optim.SGD(params, lr=optim.lr, momentum=optim.sgd_momentum)
                )
        return cls(groups, model, chunks, llm_optimizer, vision, vision_optimizer, trainable)

    def step(self, batch: BatchPlan, layouts: dict[int, SampleLayout],
             vision_frames: Sequence[torch.Tensor], microbatches: Sequence[MicroBatch] | None,
             total_loss_tokens: int, options: StepOptions | None = None) -> StepOutput:
        """One optimizer step on one global batch."""
        table = build_routing(self.groups.plan, batch, layouts, self.groups.rank)
        if self.llm_optimizer is not None:
            for m in self.llm:
                m.zero_grad_buffer()
            self.llm_optimizer.zero_grad()
        if self.vision_optimizer is not None:
            self.vision_optimizer.zero_grad(set_to_none=False)
        out = hetero_train_step(
            groups=self.groups, table=table, vision=self.vision, vision_frames=vision_frames,
            llm=self.llm, microbatches=microbatches, total_loss_tokens=total_loss_tokens,
            hidden_size=self.model.llm.hidden_size, options=options or StepOptions(),
        )
        if self.llm_optimizer is not None:
            ok, _, _ = self.llm_optimizer.step()
            if not ok:
                raise RuntimeError("the LLM optimizer skipped its step")
        if self.vision_optimizer is not None:
            self.vision_optimizer.step()
        return out


def replica_microbatch_shapes(groups: ParallelGroups, batch: BatchPlan,
                              layouts: dict[int, SampleLayout]):
    """This rank's replica's micro-batches (sample ids in row order and padded length)."""
    plan = groups.plan
    pad = 2 * plan.cp if plan.cp > 1 else 1
    return microbatch_shapes(batch, layouts, plan.coords(groups.rank).dp, pad)
