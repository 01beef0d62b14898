"""Megatron-core LLM parameters under single-model names, whatever the TP/PP layout.

A megatron ``GPTModel`` chunk holds one pipeline stage (or virtual stage) and one tensor-parallel
shard of each parameter. Everything here maps that local view to the *global* view of the same
model with TP=1, PP=1 (layer ``i`` named ``decoder.layers.{i}...`` by its global index), so
weights move between layouts:

- `global_names`: local parameter name -> single-model name;
- `load_full_state` / `gather_full_state`: copy an unsharded model into this rank's shards (reading
  only its slices), or gather this rank's stage unsharded (collective over the TP group);
- `global_tensors`: this rank's parameters as views of the global tensors (DTensors over the TP
  group, sharded along megatron's partition dim), for `torch.distributed.checkpoint`, which then
  writes each global tensor once and reshards on load.

Two megatron conventions matter: a SwiGLU ``linear_fc1`` shard is ``[gate shard; up shard]``
(presented globally as ``[2, ffn, hidden]`` sharded on dim 1), and with tied embeddings and PP > 1
the last stage's output layer is a copy of the word embeddings (same global name).

Needs megatron's parallel state (``hetero_parallel.initialize``) for the TP rank and group.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

WORD_EMBEDDINGS = "embedding.word_embeddings.weight"


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside megatron's DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def global_names(chunk: nn.Module) -> dict[str, str]:
    """Local parameter name -> name in the unsharded, single-stage model."""
    chunk = unwrap(chunk)
    layers = chunk.decoder.layers
    renumber = {str(i): str(layer.layer_number - 1) for i, layer in enumerate(layers)}
    tied_copy = (getattr(chunk, "share_embeddings_and_output_weights", False)
                 and not getattr(chunk, "pre_process", True))
    names = {}
    for name, _ in chunk.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = renumber[parts[2]]
        full = ".".join(parts)
        if tied_copy and full == "output_layer.weight":
            full = WORD_EMBEDDINGS
        names[name] = full
    return names


def named_global_parameters(chunks: Sequence[nn.Module]
                            ) -> Iterator[tuple[str, str, nn.Parameter, nn.Module]]:
    """(single-model name, local name, parameter, its unwrapped chunk) for every parameter of
    this rank's chunks."""
    for chunk in chunks:
        inner = unwrap(chunk)
        names = global_names(inner)
        for name, param in inner.named_parameters():
            yield names[name], name, param, inner


def _is_gated_fc1(name: str, chunk: nn.Module) -> bool:
    return name.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")) \
        and chunk.config.gated_linear_unit


def _tp():
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_group())


def is_tp_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def shard_index(shape: Sequence[int], param: torch.Tensor, name: str, chunk: nn.Module,
                tp_rank: int, tp_size: int) -> list[tuple[slice, ...]]:
    """The slices of the unsharded tensor (of ``shape``) that make up this TP rank's shard of
    ``param``, to be concatenated along the partition dim (two for a SwiGLU fc1, else one)."""
    full = tuple(slice(0, n) for n in shape)
    if not is_tp_sharded(param) or tp_size == 1:
        return [full]
    dim = param.partition_dim
    n = shape[dim]
    halves = [(0, n // 2), (n // 2, n)] if _is_gated_fc1(name, chunk) else [(0, n)]
    out = []
    for lo, hi in halves:
        step = (hi - lo) // tp_size
        index = list(full)
        index[dim] = slice(lo + tp_rank * step, lo + (tp_rank + 1) * step)
        out.append(tuple(index))
    return out


def load_full_state(chunks: Sequence[nn.Module], source, *, prefix: str = "",
                    where: str = "the source") -> None:
    """Copy an unsharded (TP=1, PP=1) model into this rank's chunks (its stage, its shard).

    ``source`` is a `hetero_parallel.export.TensorSource` (or a mapping of tensors) keyed by
    ``prefix + single-model name``; only this rank's slices are read. Every parameter of the local
    chunks must be present with the unsharded shape and the parameter's dtype, else
    ``KeyError``/``ValueError`` naming the key and both shapes or dtypes.
    """
    from hetero_parallel.export import DictSource, check_tensor

    if isinstance(source, Mapping):
        source = DictSource(source)
    tp_rank, tp_size, _ = _tp()
    names = set(source.names())
    with torch.no_grad():
        for gname, local_name, param, chunk in named_global_parameters(chunks):
            key = prefix + gname
            if key not in names:
                raise KeyError(f"{key}: missing from {where} (it has {len(names)} tensors)")
            shape = source.shape(key)
            if is_tp_sharded(param) and tp_size > 1:
                dim = param.partition_dim
                parts = 2 if _is_gated_fc1(local_name, chunk) else 1
                if dim >= len(shape) or shape[dim] % (tp_size * parts):
                    raise ValueError(
                        f"{key}: shape {tuple(shape)} in {where} cannot be split {tp_size} ways "
                        f"along dim {dim} (TP size {tp_size}; the parameter {local_name} is "
                        f"{tuple(param.shape)} per rank)")
            want = list(param.shape)
            if is_tp_sharded(param):
                want[param.partition_dim] *= tp_size
            check_tensor(key, shape, source.dtype(key), want, param.dtype, where)
            pieces = [source.read(key, index)
                      for index in shard_index(shape, param, local_name, chunk, tp_rank, tp_size)]
            local = pieces[0] if len(pieces) == 1 else torch.cat(pieces, param.partition_dim)
            param.copy_(local)


def gather_full_state(chunks: Sequence[nn.Module], *, grads: bool = False
                      ) -> dict[str, torch.Tensor]:
    """This rank's stage as unsharded tensors (gathered over its TP group), by single-model name.

    With ``grads`` it gathers ``main_grad`` (megatron DDP) or ``grad`` instead of the weights.
    Collective over the tensor-parallel group.
    """
    import torch.distributed as dist

    _, tp_size, group = _tp()
    out = {}
    for chunk in chunks:
        inner = unwrap(chunk)
        names = global_names(inner)
        for name, param in inner.named_parameters():
            value = param
            if grads:
                value = getattr(param, "main_grad", None)
                value = param.grad if value is None else value
            value = value.detach().clone()
            if is_tp_sharded(param) and tp_size > 1:
                parts = [torch.empty_like(value) for _ in range(tp_size)]
                dist.all_gather(parts, value.contiguous(), group=group)
                dim = param.partition_dim
                if _is_gated_fc1(name, inner):
                    gates, ups = zip(*(p.chunk(2, dim=dim) for p in parts), strict=True)
                    value = torch.cat([torch.cat(gates, dim), torch.cat(ups, dim)], dim)
                else:
                    value = torch.cat(parts, dim)
            out[names[name]] = value
    return out


def tp_mesh():
    """A `DeviceMesh` over this rank's TP group that creates no process group (checkpoint
    metadata only: DCP needs each shard's global offset, not collectives on the mesh)."""
    from megatron.core import parallel_state
    from torch.distributed.device_mesh import DeviceMesh

    ranks = torch.distributed.get_process_group_ranks(
        parallel_state.get_tensor_model_parallel_group())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return DeviceMesh(device, sorted(ranks), _init_backend=False)


def global_view(local: torch.Tensor, param: torch.Tensor, name: str, chunk: nn.Module, mesh
                ) -> torch.Tensor:
    """``local`` (a tensor shaped like this rank's shard of ``param``) as a view of the global
    tensor: a DTensor sharded over ``mesh`` (TP) or a plain tensor when it is not TP-sharded.

    A SwiGLU fc1 is presented as ``[2, ffn, ...]`` (gate, up) in every layout, so its global shape
    does not depend on the TP size. Writes into the view land in ``local`` (DCP loads in place).
    """
    dim = getattr(param, "partition_dim", 0) if is_tp_sharded(param) else None
    if _is_gated_fc1(name, chunk):
        dim = dim or 0
        shape = list(local.shape)
        local = local.view(*shape[:dim], 2, shape[dim] // 2, *shape[dim + 1:])
        dim += 1
    if dim is None or mesh.size() == 1:
        return local
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False)


def global_tensors(chunks: Sequence[nn.Module], prefix: str = "") -> dict[str, torch.Tensor]:
    """This rank's LLM parameters as global views for DCP, keyed ``prefix + single-model name``.

    Identical (name, global offset) pieces on other ranks (DP/CP replicas, the tied output copy)
    are written once by DCP's de-duplication.
    """
    mesh = tp_mesh()
    return {prefix + gname: global_view(param.data, param, name, chunk, mesh)
            for gname, name, param, chunk in named_global_parameters(chunks)}
