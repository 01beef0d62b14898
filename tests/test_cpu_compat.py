"""The CPU compatibility layer: what it redirects and that it restores."""

from __future__ import annotations

import pytest
import torch

from hetero_parallel import cpu_compat as compat


def test_redirects_cuda_devices_and_restores_on_exit():
    original = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.Stream)
    with compat.cpu_compat() as active:
        assert active
        assert torch.empty(3, device="cuda").device.type == "cpu"
        assert torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
        assert torch.ones(2, device=torch.cuda.current_device()).device.type == "cpu"
        x = torch.arange(4.0)
        assert x.to("cuda:0").device.type == "cpu"
        assert x.to(device=0, dtype=torch.float64).dtype == torch.float64
        assert x.cuda() is x
        # megatron's optimizers compare type strings: CPU tensors answer as CUDA ones, while
        # conversions with Tensor.type(dtype) still convert.
        assert x.type() == "torch.cuda.FloatTensor"
        assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        assert x.type(torch.float64).dtype == torch.float64
        torch.cuda.synchronize()
        with torch.cuda.stream(torch.cuda.Stream()):
            pass
        with pytest.raises(RuntimeError, match="not re-entrant"), compat.cpu_compat():
            pass
    assert (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.Stream) == original
    with pytest.raises((AssertionError, RuntimeError)):
        torch.empty(1, device="cuda")


def test_megatron_rng_tracker_forks_the_cpu_generator():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    tracker.reset()
    with compat.cpu_compat():
        tracker.add("model-parallel-rng", 42)
        torch.manual_seed(0)
        outside_before = torch.get_rng_state()
        with tracker.fork():
            a = torch.rand(5)
        # The fork restores the default stream of random numbers...
        assert torch.equal(torch.get_rng_state(), outside_before)
        with tracker.fork():
            b = torch.rand(5)
        # ...and the tracked stream continues where it stopped.
        assert not torch.equal(a, b)
        tracker.reset()
        tracker.add("model-parallel-rng", 42)
        with tracker.fork():
            assert torch.equal(torch.rand(5), a)
    tracker.reset()


def test_does_nothing_on_a_cuda_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = torch.cuda.current_device
    with compat.cpu_compat() as active:
        assert active is False
        assert torch.cuda.current_device is before
