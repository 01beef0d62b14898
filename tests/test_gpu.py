"""GPU-only paths: run where CUDA (and TransformerEngine) are present, skip cleanly elsewhere.

One GPU hosts one NCCL rank, so these are single-rank checks; multi-rank behaviour is covered on
gloo by the CPU tests.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_te = pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                              reason="needs transformer-engine (pip install -e '.[gpu]')")


@pytest.fixture
def nccl_world():
    import torch.distributed as dist

    from tests.distributed import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _train_steps(use_te: bool, steps: int = 5) -> list[float]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from examples.keye_vl.llm import TINY, build_llm, lm_forward_step, transformer_config
    from hetero_parallel import ParallelPlan, initialize, teardown

    groups = initialize(ParallelPlan(world_size=1), backend="nccl")
    try:
        config = transformer_config(TINY)
        model = build_llm(TINY, config, use_transformer_engine=use_te).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, TINY.vocab_size, (8, 1), generator=g)
        tokens = ((start + torch.arange(65)) % TINY.vocab_size).cuda()
        batch = [(tokens[:, :-1], tokens[:, 1:])]
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            out = get_forward_backward_func()(
                forward_step_func=lm_forward_step, data_iterator=iter(batch), model=model,
                num_microbatches=1, seq_length=64, micro_batch_size=8, forward_only=False)
            opt.step()
            losses.append(float(out[0]["loss"]))
        return losses
    finally:
        teardown(groups)


@needs_cuda
def test_tp1_training_steps_on_nccl(nccl_world):
    losses = _train_steps(use_te=False)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


@needs_cuda
@needs_te
def test_transformer_engine_layer_spec_trains(nccl_world):
    losses = _train_steps(use_te=True)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]

