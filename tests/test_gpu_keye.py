"""Keye-VL-1.5-8B on one GPU: the TransformerEngine layer spec in bf16, forward and backward of one
8K-token micro-batch with ~20% visual tokens (ViT + projector + LLM); prints step time and MFU.

Skips cleanly without CUDA or TransformerEngine. Run alone with ``pytest -s
tests/test_gpu_keye.py``. All 36 LLM layers run when the GPU has >= 120 GiB (an H200); on smaller
GPUs the LLM keeps ``KEYE_GPU_LAYERS`` layers (default 16), and the printed line says so.
MFU counts the model's FLOPs (no recompute): 3x the forward matmuls and attention of the ViT (per
image, bidirectional) and of the LLM (causal), over the GPU's dense bf16 peak.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_te = pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                              reason="needs transformer-engine (pip install -e '.[gpu]')")

SEQ = 8192
IMAGES = ((26, 31), (26, 31))
"""Two images of 26x31 LLM tokens (728x868 px): 1612 visual tokens, 19.7% of the sequence."""
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12}


def _peak_flops() -> float:
    if "KEYE_PEAK_FLOPS" in os.environ:
        return float(os.environ["KEYE_PEAK_FLOPS"])
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    pytest.skip(f"unknown peak bf16 FLOP/s of {name!r}; set KEYE_PEAK_FLOPS")


def model_flops(model, seq: int, images) -> float:
    """Forward + backward FLOPs (3x forward) of one micro-batch."""
    llm, vit = model.llm, model.vision
    h, q, kv = llm.hidden_size, llm.num_attention_heads * llm.head_dim, \
        llm.num_query_groups * llm.head_dim
    per_token = llm.num_layers * 2 * (h * (q + 2 * kv) + q * h + 3 * h * llm.ffn_hidden_size)
    per_token += 2 * h * llm.vocab_size
    attention = llm.num_layers * 2 * seq * seq * q  # causal: half of 4 * s^2 * q
    d, ffn = vit.hidden_size, vit.ffn_hidden_size
    vit_flops = 0
    for rows, cols in images:
        n = rows * cols * 4
        vit_flops += n * 2 * (3 * 14 * 14 * d + vit.num_layers * (4 * d * d + 2 * d * ffn))
        vit_flops += vit.num_layers * 4 * n * n * d
        t = rows * cols
        vit_flops += t * 2 * (16 * d * d + 4 * d * h)
    return 3.0 * (seq * per_token + attention + vit_flops)


@pytest.fixture
def nccl_world():
    import torch.distributed as dist

    from tests.distributed import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@needs_cuda
@needs_te
def test_keye_8b_te_bf16_step_time_and_mfu(nccl_world):
    from examples.keye_vl.config import MODELS
    from examples.keye_vl.llm import build_llm, transformer_config
    from examples.keye_vl.rope import keye_position_ids
    from examples.keye_vl.vision import VisionEncoder
    from hetero_parallel import ParallelPlan, initialize, teardown
    from hetero_parallel.layout import SampleLayout

    model = MODELS["keye-vl-1.5-8b"]
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    layers = model.llm.num_layers if total_gib >= 120 else int(os.environ.get(
        "KEYE_GPU_LAYERS", 16))
    model = dataclasses.replace(model, llm=dataclasses.replace(model.llm, num_layers=layers))
    groups = initialize(ParallelPlan(world_size=1), backend="nccl")
    try:
        config = transformer_config(model.llm, params_dtype=torch.bfloat16)
        llm = build_llm(model.llm, config, use_transformer_engine=True).cuda()
        vision = VisionEncoder(model.vision).to(device="cuda", dtype=torch.bfloat16)
        g = torch.Generator().manual_seed(0)
        frames = [torch.randint(0, 256, (r * 28, c * 28, 3), generator=g, dtype=torch.uint8)
                  .cuda() for r, c in IMAGES]
        visual = sum(r * c for r, c in IMAGES)
        starts, pos = [], 16
        for r, c in IMAGES:
            starts.append(pos)
            pos += r * c + 32
        layout = SampleLayout(0, SEQ, tuple((r * c,) for r, c in IMAGES),
                              tuple((s,) for s in starts), tuple((rc,) for rc in IMAGES))
        positions = torch.from_numpy(keye_position_ids(layout))[:, None, :].cuda()
        ids = torch.randint(0, model.llm.vocab_size, (1, SEQ), generator=g).cuda()
        labels = torch.roll(ids, -1, dims=1)
        slots = torch.from_numpy(layout.visual_positions()).cuda()
        params = [p for m in (llm, vision) for p in m.parameters()]

        def step() -> float:
            for p in params:
                p.grad = None
            tokens = vision(frames)
            emb = llm.embedding(input_ids=ids, position_ids=None)  # [S, 1, H]
            emb = emb.index_put((slots, torch.zeros_like(slots)), tokens.to(emb.dtype))
            loss = llm(ids, positions, None, decoder_input=emb, labels=labels).float().mean()
            loss.backward()
            return loss.item()

        losses = [step(), step()]  # warm-up (TE kernel selection, allocator)
        torch.cuda.synchronize()
        runs = 3
        t0 = time.perf_counter()
        for _ in range(runs):
            losses.append(step())
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / runs
        mfu = model_flops(model, SEQ, IMAGES) / seconds / _peak_flops()
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"\nkeye-vl-1.5-8b TE bf16 on {torch.cuda.get_device_name()}: {layers}/36 LLM "
              f"layers, {SEQ} tokens ({visual} visual, {visual / SEQ:.0%}), step "
              f"{seconds * 1e3:.0f} ms, MFU {mfu:.1%}, peak memory {peak:.1f} GiB")
        assert all(torch.isfinite(torch.tensor(losses)))
        assert 0 < mfu < 1
    finally:
        teardown(groups)
