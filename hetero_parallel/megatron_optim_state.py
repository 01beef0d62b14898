"""megatron-core optimizer state under single-model names, for layout-free checkpoints.

`llm_optimizer_tensors` presents the state of the LLM's megatron optimizer as
``optim.llm.<single-model name>.<state key>`` tensors shaped like their parameter (global views,
TP shards as DTensors, see `hetero_parallel.megatron_state.global_view`), plus ``.main_param`` for
the fp32 master weights of mixed-precision training:

- the plain optimizers (``FP32Optimizer``, ``Float16OptimizerWithFloat16Params``) keep whole
  parameters, so their state tensors are returned as views (loaded in place);
- the distributed optimizer keeps, on each data-parallel rank, a flat slice of every parameter's
  state. Its state is gathered into parameter-shaped buffers over the data-parallel group (one
  all-reduce per state key; transiently the memory of the plain optimizer's state), and
  `LLMOptimizerTensors.load` slices loaded buffers back into this rank's shards. So a checkpoint
  written with or without the distributed optimizer, on any DP size, loads into either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from hetero_parallel.megatron_state import (
    global_view,
    local_tensor,
    named_global_parameters,
    tp_mesh,
)


def leaf_optimizers(optimizer) -> list:
    """The optimizers inside a megatron ``ChainedOptimizer`` (or the optimizer itself)."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


@dataclass
class _Shard:
    """One parameter's slice in a distributed optimizer."""

    optimizer: object
    main: torch.Tensor
    """The flat fp32 slice the inner optimizer updates (its state's key)."""
    start: int
    end: int
    master: bool
    """``main`` is an fp32 copy of a low-precision parameter (not a view of it)."""


@dataclass
class LLMOptimizerTensors:
    """The tensors of `llm_optimizer_tensors` and how to put loaded values back."""

    tensors: dict[str, torch.Tensor]
    _scatter: list[tuple[str, torch.Tensor, int, int]] = field(default_factory=list)
    """Distributed optimizer: (key, shard tensor, start, end) to refill from loaded buffers."""
    _steps: list[tuple[str, torch.Tensor]] = field(default_factory=list)

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Put loaded ``state`` (keyed as `tensors`) into the optimizer where it is not loaded
        in place already (the distributed optimizer's shards)."""
        with torch.no_grad():
            for key, shard, start, end in self._scatter:
                shard.copy_(local_tensor(state[key]).reshape(-1)[start:end].to(shard.dtype))
            for key, step in self._steps:
                step.copy_(local_tensor(state[key]))


def _distributed_shards(optimizer) -> dict[int, _Shard]:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    out: dict[int, _Shard] = {}
    for opt in leaf_optimizers(optimizer):
        if not isinstance(opt, DistributedOptimizer):
            continue
        pairs = [(m, s, False) for mg, sg in zip(opt.model_fp32_groups, opt.shard_fp32_groups,
                                                 strict=True) for m, s in zip(mg, sg, strict=True)]
        pairs += [(m, s, True) for mg, sg in zip(opt.model_float16_groups,
                                                 opt.shard_fp32_from_float16_groups, strict=True)
                  for m, s in zip(mg, sg, strict=True)]
        for model_param, main, master in pairs:
            rng = opt._get_model_param_range_map(model_param)["param"]
            out[id(model_param)] = _Shard(opt, main, rng.start, rng.end, master)
    return out


def _plain_mains(optimizer) -> dict[int, tuple[torch.Tensor, torch.optim.Optimizer]]:
    """id(model param) -> (the tensor its torch optimizer updates, that optimizer)."""
    out = {}
    for opt in leaf_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        if hasattr(opt, "float16_groups"):
            pairs = [(m, f) for mg, fg in zip(opt.float16_groups, opt.fp32_from_float16_groups,
                                              strict=True)
                     for m, f in zip(mg, fg, strict=True)]
            pairs += [(p, p) for g in opt.fp32_from_fp32_groups for p in g]
        else:
            pairs = [(p, p) for g in inner.param_groups for p in g["params"]]
        for model_param, main in pairs:
            out[id(model_param)] = (main, inner)
    return out


def llm_optimizer_tensors(optimizer, chunks: Sequence[nn.Module], prefix: str = "optim.llm."
                          ) -> LLMOptimizerTensors:
    """The LLM optimizer's state as layout-free tensors (see the module docstring). Collective
    over the data-parallel group when the optimizer is distributed."""
    mesh = tp_mesh()
    shards = _distributed_shards(optimizer)
    if not shards:
        mains = _plain_mains(optimizer)
        out: dict[str, torch.Tensor] = {}
        for gname, name, param, chunk in named_global_parameters(chunks):
            if id(param) not in mains:
                continue
            main, inner = mains[id(param)]
            if main is not param:
                out[f"{prefix}{gname}.main_param"] = global_view(main.data, param, name, chunk,
                                                                 mesh)
            for key, value in inner.state[main].items():
                if torch.is_tensor(value) and value.shape == param.shape:
                    value = global_view(value, param, name, chunk, mesh)
                out[f"{prefix}{gname}.{key}"] = value
        return LLMOptimizerTensors(out)

    # Distributed: gather every parameter's slices into parameter-shaped buffers.
    params = list(named_global_parameters(chunks))
    any_shard = next(iter(shards.values()))
    inner = any_shard.optimizer.optimizer
    keys = sorted(k for k, v in inner.state[any_shard.main].items()
                  if torch.is_tensor(v) and v.dim() > 0)
    master = any(s.master for s in shards.values())
    fields = keys + (["main_param"] if master else [])
    flats = {k: torch.zeros(sum(p.numel() for _, _, p, _ in params), dtype=torch.float32,
                            device=any_shard.main.device) for k in fields}
    step = torch.zeros((), dtype=torch.float32, device=any_shard.main.device)
    result = LLMOptimizerTensors({})
    offset = 0
    for gname, _, param, _ in params:
        shard = shards.get(id(param))
        if shard is not None and shard.end > shard.start:
            state = shard.optimizer.optimizer.state[shard.main]
            lo, hi = offset + shard.start, offset + shard.end
            for k in keys:
                flats[k][lo:hi] = state[k]
                result._scatter.append((f"{prefix}{gname}.{k}", state[k], shard.start,
                                        shard.end))
            if master:
                flats["main_param"][lo:hi] = shard.main
                result._scatter.append((f"{prefix}{gname}.main_param", shard.main.data,
                                        shard.start, shard.end))
            if "step" in state:
                step = torch.maximum(step, state["step"].float().reshape(()))
                result._steps.append((f"{prefix}{gname}.step", state["step"]))
        offset += param.numel()
    group = any_shard.optimizer.data_parallel_group
    for k in fields:
        dist.all_reduce(flats[k], group=group)
    dist.all_reduce(step, op=dist.ReduceOp.MAX, group=group)
    offset = 0
    for gname, name, param, chunk in params:
        for k in fields:
            buf = flats[k][offset:offset + param.numel()].view(param.shape)
            result.tensors[f"{prefix}{gname}.{k}"] = global_view(buf, param, name, chunk, mesh)
        result.tensors[f"{prefix}{gname}.step"] = step.clone()
        offset += param.numel()
    return result
