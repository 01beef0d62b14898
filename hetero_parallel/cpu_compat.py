"""Run real megatron-core on CPU with gloo: an explicit, opt-in compatibility layer.

megatron-core assumes CUDA in a handful of places that have nothing to do with the maths: buffers
allocated with ``device=torch.cuda.current_device()`` (RoPE frequencies, causal masks, every
pipeline schedule's ``total_num_tokens``, p2p receive buffers), the model-parallel CUDA RNG
tracker, and CUDA streams/synchronisation in DDP and the schedules. On a machine without CUDA this
layer redirects exactly those to the CPU, so megatron's own TP, PP (1F1B, interleaved) and DDP run
unchanged over gloo, bit-for-bit the same maths as on a GPU up to kernel differences.

What it redirects while active (see ``REDIRECTS``):

- every torch call's ``device=`` argument (and ``Tensor.to`` / ``Tensor.cuda`` targets) naming a
  CUDA device -> ``cpu`` (a ``torch.overrides.TorchFunctionMode``);
- ``torch.cuda.current_device`` -> 0 (so ``device=torch.cuda.current_device()`` becomes CPU);
- ``torch.cuda.synchronize`` / ``current_stream`` / ``Stream`` / ``stream`` / ``Event`` -> no-ops;
- the CUDA RNG state used by megatron's ``CudaRNGStatesTracker`` (``get_rng_state``,
  ``set_rng_state``, ``manual_seed``) -> the CPU default generator, which is what CPU dropout uses.

- ``Tensor.type()`` (the type-string query, no argument) on a CPU tensor answers
  ``'torch.cuda.<T>Tensor'``: megatron's optimizers check those strings
  (``optimizer.py`` ``Float16OptimizerWithFloat16Params``: ``'torch.cuda.FloatTensor'`` /
  ``'torch.cuda.BFloat16Tensor'``; ``distrib_optimizer.py`` ``_build_model_and_main_param_groups``;
  ``clip_grads.py`` ``clip_grad_by_total_norm_fp32``), so the distributed optimizer and megatron's
  gradient clipping run on CPU;
- megatron's local core attention (``DotProductAttention``, which refuses context parallelism and
  packed THD sequences) is replaced, through the layer spec, by
  `hetero_parallel.cpu_layers.CpuCoreAttention` (``llm_chunks.gpt_layer_spec``), so context
  parallelism, packing and sequence parallelism run on gloo.

On a machine where CUDA is available the layer does nothing: ``cpu_compat()`` yields ``False`` and
leaves torch untouched, so a training script can always wrap itself in it.

Usage::

    from hetero_parallel.cpu_compat import cpu_compat

    with cpu_compat():
        initialize(plan, backend="gloo")
        ...  # build megatron modules, run schedules
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

REDIRECTS: tuple[str, ...] = (
    "device='cuda'|'cuda:N'|int in torch factory calls and Tensor.to/Tensor.cuda -> 'cpu'",
    "torch.cuda.current_device() -> 0",
    "torch.cuda.synchronize/current_stream/default_stream/Stream/stream/Event -> no-ops",
    "torch.cuda.get_rng_state/set_rng_state/manual_seed and megatron's CUDA RNG tracker "
    "-> CPU default generator",
    "torch.Tensor.pin_memory -> identity; pin_memory=True in factory calls -> False",
    "Tensor.type() (no argument) on CPU tensors -> 'torch.cuda.<T>Tensor' (megatron's "
    "optimizer, distributed optimizer and grad-clipping type-string checks)",
    "megatron local-spec core attention -> hetero_parallel.cpu_layers.CpuCoreAttention "
    "(CP, packed THD; via llm_chunks.gpt_layer_spec)",
)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int as a device means a CUDA ordinal.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            return _backward_redirected(func, args, kwargs or {})
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = torch.device("cpu")
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # no pinned-memory allocator without CUDA
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and kwargs.get("dtype") is None:
            name = func(*args, **kwargs)
            if name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch."):]
            return name
        return func(*args, **kwargs)


def _backward_redirected(func, args, kwargs) -> None:
    """Run a backward pass with the redirects active inside it.

    A mode is switched off while its handler runs, and a backward pass runs Python code (autograd
    Functions such as megatron's sequence-parallel linear layers) that allocates on the "current
    CUDA device" too. So the handler does what ``torch.autograd.backward`` does after its own
    torch-function check, the autograd engine call, under a fresh instance of the mode.
    """
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    if func is torch.Tensor.backward:
        names = ("tensors", "grad_tensors", "retain_graph", "create_graph", "inputs")
        bound = dict(zip(names, args, strict=False))
        for k, v in kwargs.items():
            bound["grad_tensors" if k == "gradient" else k] = v
    else:
        bound = {"tensors": args[0], **kwargs}
    tensors = bound["tensors"]
    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    create_graph = bool(bound.get("create_graph") or False)
    retain_graph = bound.get("retain_graph")
    retain_graph = create_graph if retain_graph is None else retain_graph
    inputs = bound.get("inputs")
    inputs = () if inputs is None else ((inputs,) if isinstance(inputs, torch.Tensor)
                                        else tuple(inputs))
    grads = _tensor_or_tensors_to_tuple(bound.get("grad_tensors"), len(tensors))
    with _CudaToCpuMode():
        grads = _make_grads(tensors, grads, is_grads_batched=False)
        _engine_run_backward(tensors, grads, retain_graph, create_graph, inputs,
                             allow_unreachable=True, accumulate_grad=True)


class _NoOpStream:
    """Stands in for ``torch.cuda.Stream``; CPU work is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _NoOpEvent:
        return _NoOpEvent()

    def synchronize(self) -> None:
        pass

    def __enter__(self) -> _NoOpStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class _NoOpEvent:
    """Stands in for ``torch.cuda.Event``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _stream_context(stream: Any = None) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def _cpu_get_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


class _DropForkWarning(logging.Filter):
    """megatron warns when the CPU RNG moves inside a CUDA-RNG fork; on CPU that is the point."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


@dataclass(frozen=True)
class _Patch:
    owner: Any
    name: str
    value: Any


def _patches() -> list[_Patch]:
    from megatron.core.tensor_parallel import random as mcore_random

    cuda = torch.cuda
    return [
        _Patch(cuda, "current_device", lambda: 0),
        _Patch(cuda, "synchronize", lambda device=None: None),
        _Patch(cuda, "current_stream", lambda device=None: _NoOpStream()),
        _Patch(cuda, "default_stream", lambda device=None: _NoOpStream()),
        _Patch(cuda, "Stream", _NoOpStream),
        _Patch(cuda, "Event", _NoOpEvent),
        _Patch(cuda, "stream", _stream_context),
        _Patch(cuda, "get_rng_state", _cpu_get_rng_state),
        _Patch(cuda, "set_rng_state", _cpu_set_rng_state),
        _Patch(cuda, "manual_seed", _cpu_manual_seed),
        _Patch(mcore_random, "_get_cuda_rng_state", _cpu_get_rng_state),
        _Patch(mcore_random, "_set_cuda_rng_state", _cpu_set_rng_state),
    ]


@contextlib.contextmanager
def cpu_compat() -> Iterator[bool]:
    """Activate the CPU redirects for the duration of the block (this thread's torch calls).

    Yields True when the redirects are active, False on a CUDA machine (where nothing changes).
    Not re-entrant: nesting it raises ``RuntimeError``.
    """
    if torch.cuda.is_available():
        yield False
        return
    if getattr(torch.cuda, "_hetero_parallel_cpu_compat", False):
        raise RuntimeError("cpu_compat() is already active; it is not re-entrant")
    patches = _patches()
    saved = [(p, getattr(p.owner, p.name)) for p in patches]
    for p in patches:
        setattr(p.owner, p.name, p.value)
    torch.cuda._hetero_parallel_cpu_compat = True
    fork_logger = logging.getLogger("megatron.core.tensor_parallel.random")
    fork_filter = _DropForkWarning()
    fork_logger.addFilter(fork_filter)
    logger.info("megatron-core CPU compatibility active: %s", "; ".join(REDIRECTS))
    try:
        with _CudaToCpuMode():
            yield True
    finally:
        fork_logger.removeFilter(fork_filter)
        for p, original in saved:
            setattr(p.owner, p.name, original)
        torch.cuda._hetero_parallel_cpu_compat = False
