"""`HeteroTrainer`: one optimizer step of a ViT + megatron LLM model on a `ParallelPlan`.

Generic over the model: a ViT replica (any ``nn.Module`` mapping a list of uint8 ``[h, w, 3]``
frames to ``[visual tokens, LLM hidden]`` rows, on the ranks that host one) and this rank's
megatron-core LLM chunks. The caller builds both (same initial weights on every rank) and marks
frozen parameters with ``requires_grad=False``; the trainer then owns everything else of a step:

1. zero the gradients (ViT ``.grad``, megatron's grad buffers);
2. the heterogeneous forward/backward (`hetero_parallel.step.hetero_train_step`);
3. one global gradient norm over ViT and LLM, and clipping by it (``clip_grad``);
4. the learning rate of this step (`OptimizerConfig.lr_at`) on both optimizers;
5. the optimizer steps: megatron's optimizer for the LLM (DDP over its data-parallel group), a
   torch optimizer for the ViT (its gradients were all-reduced over the ViT group in 2.).

The trainer also presents its model and optimizer tensors to the checkpoint manager
(`checkpoint_tensors`), as single-model names and global shapes, so a checkpoint reshards.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from torch import nn

from hetero_parallel.groups import ParallelGroups
from hetero_parallel.layout import MicroBatch
from hetero_parallel.megatron_optim_state import leaf_optimizers, llm_optimizer_tensors
from hetero_parallel.megatron_state import (
    global_view,
    local_tensor,
    named_global_parameters,
    tp_mesh,
)
from hetero_parallel.objectives import TokenCrossEntropy, TrainingObjective
from hetero_parallel.step import StepOptions, StepOutput, hetero_train_step
from hetero_parallel.step_plan import StepPlan


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizerConfig:
    """Optimizers and learning-rate schedule of both components."""

    optimizer: Literal["adam", "sgd"] = "adam"
    """AdamW (megatron's default) or SGD (plain SGD makes steps easy to check by hand)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    warmup_steps: int = 0
    """Linear warm-up from ``lr / warmup_steps`` to ``lr`` over this many steps."""
    decay_steps: int = 0
    """Steps of decay after the warm-up (0: constant after warm-up)."""
    decay_style: Literal["constant", "linear", "cosine"] = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.0
    clip_grad: float = 0.0
    """Clip the global gradient norm (ViT and LLM together) to this value; 0 disables."""
    distributed: bool = False
    """megatron's distributed optimizer for the LLM: gradients reduce-scattered and optimizer
    state sharded over its data-parallel group (ZeRO-1/2)."""

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(f"decay_style must be constant, linear or cosine, got "
                             f"{self.decay_style!r}")
        for name in ("lr", "min_lr", "weight_decay", "clip_grad", "sgd_momentum"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"OptimizerConfig.{name} must be a finite number >= 0, "
                                 f"got {v!r}")
        for name in ("warmup_steps", "decay_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"OptimizerConfig.{name} must be an int >= 0, got {v!r}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr({self.min_lr}) is above lr({self.lr})")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): warm-up, then decay to
        ``min_lr`` over ``decay_steps``, then ``min_lr`` (or ``lr`` when there is no decay)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.decay_steps == 0 or self.decay_style == "constant":
            return self.lr
        t = min(1.0, (step - self.warmup_steps) / self.decay_steps)
        if self.decay_style == "linear":
            return self.lr - (self.lr - self.min_lr) * t
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * t))


class StepInput(Protocol):
    """What one step consumes: the dataloader's `StepData` has exactly these attributes
    (``position_ids`` may be missing or None: 1D rotary positions; ``pairs`` and
    ``reference_logps`` are read by preference objectives only)."""

    plan: StepPlan
    vision_frames: Sequence[torch.Tensor]
    microbatches: Sequence[MicroBatch] | None
    total_loss_tokens: int
    pairs: Mapping[int, int]
    reference_logps: Mapping[int, float] | None


@dataclass
class TrainStepResult:
    """What one optimizer step reports (loss and norms are identical on every rank)."""

    step: int
    """Index of this optimizer step (0-based)."""
    loss: float
    num_loss_tokens: int
    grad_norm: float
    """Global gradient norm before clipping (ViT and LLM together)."""
    lr: float
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase on this rank (the step's phases plus ``optimizer``)."""
    llm_forward_s: list[float] = field(default_factory=list)
    """Forward seconds of each micro-batch on this rank's pipeline stage."""
    sample_logps: dict[int, float] = field(default_factory=dict)
    """Sample id -> summed log-prob of its loss-carrying tokens (before the update)."""


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the per-parameter state of a torch Adam/AdamW/SGD now, as its first step would
    (zeros, step 0), so that a checkpoint holds the same keys before and after the first step."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if state:
                continue
            if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(p)
            elif isinstance(optimizer, torch.optim.SGD):
                if group.get("momentum", 0):
                    state["momentum_buffer"] = torch.zeros_like(p)
            else:
                raise TypeError(f"cannot initialise the state of {type(optimizer).__name__}; "
                                "supported: Adam, AdamW, SGD")


class HeteroTrainer:
    """Owns the optimizers and runs optimizer steps; see the module docstring.

    Args:
        groups: from `hetero_parallel.initialize`.
        vision: this rank's ViT replica (None on a rank without one); frozen parameters have
            ``requires_grad=False`` (the same on every ViT rank).
        llm_chunks: this rank's megatron model chunks (unwrapped); the LLM trains when its
            parameters require grad (on every rank alike), and is then wrapped in megatron DDP.
        optim: optimizers, schedule and clipping.
        step_options: options of the heterogeneous step (e.g. ViT recomputation).
        objective: the loss (default: token cross-entropy; e.g.
            `hetero_parallel.objectives.MixedPreferenceObjective`); its state is part of the
            trainer's checkpoint state.
    """

    def __init__(self, groups: ParallelGroups, *, vision: nn.Module | None,
                 llm_chunks: Sequence[nn.Module], optim: OptimizerConfig,
                 step_options: StepOptions | None = None,
                 objective: TrainingObjective | None = None) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.utils import get_model_config

        if (vision is None) != (groups.plan.vit_index(groups.rank) is None):
            raise ValueError(f"rank {groups.rank}: a ViT replica must be given exactly on the "
                             f"plan's ViT ranks {groups.plan.vit_ranks[:8]}...")
        self.groups = groups
        self.optim = optim
        self.step_options = step_options or StepOptions()
        self.vision = vision
        self.objective = objective or TokenCrossEntropy()
        self.step_count = 0
        chunks = list(llm_chunks)
        config = get_model_config(chunks[0])
        self.llm_config = config
        self.train_llm = any(p.requires_grad for c in chunks for p in c.parameters())
        self.llm_optimizer = None
        if self.train_llm:
            ddp = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                use_distributed_optimizer=optim.distributed,
            )
            chunks = [DistributedDataParallel(config, ddp, c) for c in chunks]
            config.finalize_model_grads_func = finalize_model_grads
            self.llm_optimizer = get_megatron_optimizer(
                MegatronOptimizerConfig(
                    optimizer=optim.optimizer, lr=optim.lr, min_lr=optim.min_lr,
                    weight_decay=optim.weight_decay, adam_beta1=optim.adam_beta1,
                    adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
                    sgd_momentum=optim.sgd_momentum,
                    clip_grad=0.0,  # clipped here, jointly with the ViT
                    use_distributed_optimizer=optim.distributed, bf16=config.bf16,
                    fp16=config.fp16,
                ),
                chunks,
            )
            for opt in leaf_optimizers(self.llm_optimizer):
                if opt.optimizer is not None:
                    init_optimizer_state(opt.optimizer)
        self.llm = chunks
        self._optim_tensors = None
        self.vision_optimizer: torch.optim.Optimizer | None = None
        if vision is not None:
            params = [p for p in vision.parameters() if p.requires_grad]
            if params:
                self.vision_optimizer = (
                    torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay,
                                      betas=(optim.adam_beta1, optim.adam_beta2),
                                      eps=optim.adam_eps)
                    if optim.optimizer == "adam"
                    else torch.optim.SGD(params, lr=optim.lr, momentum=optim.sgd_momentum,
                                         weight_decay=optim.weight_decay))
                init_optimizer_state(self.vision_optimizer)

    # -- one step ---------------------------------------------------------------------------------

    def step(self, data: StepInput) -> TrainStepResult:
        """One optimizer step on one global batch (collective over every rank of the plan)."""
        if self.llm_optimizer is not None:
            for m in self.llm:
                m.zero_grad_buffer()
            self.llm_optimizer.zero_grad()
        if self.vision_optimizer is not None:
            self.vision_optimizer.zero_grad(set_to_none=False)
        out = self._run(data, forward_only=False)
        self.objective.after_step(data, out.sample_logps)
        t0 = time.perf_counter()
        found_inf = self.llm_optimizer.prepare_grads() if self.llm_optimizer is not None \
            else False
        if found_inf:
            raise RuntimeError(f"step {self.step_count}: the LLM gradients hold inf/NaN")
        grad_norm = self._grad_norm()
        if self.optim.clip_grad > 0 and grad_norm > self.optim.clip_grad:
            self._scale_grads(self.optim.clip_grad / (grad_norm + 1e-6))
        lr = self.optim.lr_at(self.step_count)
        for group in self._param_groups():
            group["lr"] = lr
        if self.llm_optimizer is not None and not self.llm_optimizer.step_with_ready_grads():
            raise RuntimeError(f"step {self.step_count}: the LLM optimizer skipped its step")
        if self.vision_optimizer is not None:
            self.vision_optimizer.step()
        timings = dict(out.timings)
        timings["optimizer"] = time.perf_counter() - t0
        result = TrainStepResult(step=self.step_count, loss=out.loss,
                                 num_loss_tokens=out.num_loss_tokens, grad_norm=grad_norm, lr=lr,
                                 timings=timings, llm_forward_s=out.llm_forward_s,
                                 sample_logps=out.sample_logps)
        self.step_count += 1
        return result

    def evaluate(self, data: StepInput) -> StepOutput:
        """The objective's loss and every sample's log-prob on ``data`` without any update
        (forward only; e.g. a validation set, or reference log-probs with a frozen model)."""
        return self._run(data, forward_only=True)

    def _run(self, data: StepInput, *, forward_only: bool) -> StepOutput:
        objective, normaliser = self.objective.for_step(data)
        return hetero_train_step(
            groups=self.groups, step=data.plan, vision=self.vision,
            vision_frames=data.vision_frames, llm=self.llm, microbatches=data.microbatches,
            total_loss_tokens=normaliser, options=self.step_options,
            position_ids=getattr(data, "position_ids", None), objective=objective,
            forward_only=forward_only,
        )

    def _param_groups(self) -> list[dict]:
        groups = list(self.llm_optimizer.param_groups) if self.llm_optimizer is not None else []
        if self.vision_optimizer is not None:
            groups += self.vision_optimizer.param_groups
        return groups

    def _grad_norm(self) -> float:
        """sqrt(|LLM grads|^2 + |ViT grads|^2), the same on every rank.

        The LLM part is megatron's (TP duplicates and shared weights counted once, summed over
        the model-parallel group; every LLM replica holds the same reduced gradients). ViT
        gradients are identical on every ViT rank after their all-reduce, so ViT rank 0's value
        is broadcast over the world.
        """
        llm_sq = self.llm_optimizer.get_grad_norm() ** 2 if self.llm_optimizer is not None \
            else 0.0
        vit_sq = 0.0
        if self.vision is not None:
            grads = [p.grad for p in self.vision.parameters() if p.grad is not None]
            vit_sq = float(sum(g.double().pow(2).sum() for g in grads)) if grads else 0.0
        value = torch.tensor([vit_sq], dtype=torch.float64)
        if torch.cuda.is_available():
            value = value.cuda()
        src = self.groups.plan.vit_ranks[0]
        dist.broadcast(value, src=src)
        return math.sqrt(llm_sq + float(value.item()))

    def _scale_grads(self, factor: float) -> None:
        if self.llm_optimizer is not None:
            for param in self.llm_optimizer.get_parameters():
                if param.grad is not None:
                    param.grad.mul_(factor)
        if self.vision is not None:
            for p in self.vision.parameters():
                if p.grad is not None:
                    p.grad.mul_(factor)

    # -- checkpointing --------------------------------------------------------------------------

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Model and optimizer tensors under layout-free names (DCP saves them, and loads into
        them in place):

        - ``model.llm.<single-model name>`` and ``model.vision.<name>``;
        - ``optim.llm.<single-model name>.<state key>`` (and ``.main_param`` when the optimizer
          keeps fp32 master weights; `hetero_parallel.megatron_optim_state`, which also gathers
          the distributed optimizer's shards), ``optim.vision.<name>.<state key>``.

        TP shards are DTensors over the TP group; everything else is a plain tensor held whole by
        each replica (DCP writes one copy and spreads the copies it writes over the ranks).
        """
        mesh = tp_mesh()
        out: dict[str, torch.Tensor] = {
            f"model.llm.{gname}": global_view(param.data, param, name, chunk, mesh)
            for gname, name, param, chunk in named_global_parameters(self.llm)}
        self._optim_tensors = None
        if self.llm_optimizer is not None:
            self._optim_tensors = llm_optimizer_tensors(self.llm_optimizer, self.llm)
            out.update(self._optim_tensors.tensors)
        if self.vision is not None:
            for name, t in self.vision.state_dict(keep_vars=True).items():
                out[f"model.vision.{name}"] = t.data
            if self.vision_optimizer is not None:
                names = {id(p): n for n, p in self.vision.named_parameters()}
                for group in self.vision_optimizer.param_groups:
                    for p in group["params"]:
                        for key, value in self.vision_optimizer.state[p].items():
                            out[f"optim.vision.{names[id(p)]}.{key}"] = value
        for k, v in out.items():
            if not torch.is_tensor(v):
                raise TypeError(f"{k}: optimizer state {type(v).__name__} is not a tensor")
        return out

    def after_load(self) -> None:
        """Re-derive what depends on loaded tensors: megatron's mixed-precision model weights
        from the fp32 master weights."""
        if self.llm_optimizer is not None:
            for opt in leaf_optimizers(self.llm_optimizer):
                if hasattr(opt, "_copy_main_params_to_model_params"):
                    opt._copy_main_params_to_model_params()

    def state_dict(self) -> dict[str, Any]:
        """`checkpoint_tensors` (views: a checkpoint manager loads into them in place), the
        optimizer step count and the objective's state (JSON)."""
        return {**self.checkpoint_tensors(), "step": self.step_count,
                "objective": self.objective.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take ``state`` after its tensors were loaded into the views of `state_dict`: copy any
        tensor that is not such a view, then re-derive what depends on them."""
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"trainer state 'step' must be an int >= 0, got {step!r}")
        live = self.checkpoint_tensors()
        missing = sorted(set(live) - set(state))
        if missing:
            raise KeyError(f"trainer state lacks {missing[:5]} ({len(missing)} tensors)")
        with torch.no_grad():
            for key, target in live.items():
                value = state[key]
                if local_tensor(value).data_ptr() != local_tensor(target).data_ptr():
                    local_tensor(target).copy_(local_tensor(value))
        if self._optim_tensors is not None:
            self._optim_tensors.load(state)
        self.after_load()
        self.objective.load_state_dict(state.get("objective") or {})
        self.step_count = step
