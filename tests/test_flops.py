"""Model FLOPs and MFU: hand-computed values, padding waste, and one owner with the cost model."""

from __future__ import annotations

import numpy as np
import pytest

from hetero_parallel.balancer import MediaSpec, SampleSpec
from hetero_parallel.cost_model import CostModel
from hetero_parallel.flops import (
    QWEN3_8B,
    SIGLIP_400M,
    TransformerShape,
    executed_llm_flops,
    llm_flops,
    mfu,
    step_flops,
    vit_flops,
)
from hetero_parallel.workload import KeyeWorkload

# 1 layer, d=4, 2 heads x 2, MHA, FFN 8 (not gated): Q,K,V,O 4x4 each + MLP 2x4x8 = 128 weights.
VIT = TransformerShape(num_layers=1, hidden_size=4, num_attention_heads=2, head_dim=2,
                       num_query_groups=2, ffn_hidden_size=8, gated_mlp=False, causal=False)
# 2 layers, d=4, 2 heads x 2, 1 KV group, FFN 8 gated, vocab 10: Q 4x4, K,V 4x2, O 4x4, MLP 3x4x8.
LLM = TransformerShape(num_layers=2, hidden_size=4, num_attention_heads=2, head_dim=2,
                       num_query_groups=1, ffn_hidden_size=8, gated_mlp=True, causal=True,
                       vocab_size=10)


def test_small_shapes_by_hand():
    # ViT: linear 2 * 128 = 256 per patch; attention 4 * 2 * 2 * 1 = 16 per squared patch count.
    # Frames of 3 and 5 patches: 256 * 8 + 16 * (9 + 25) = 2592 forward.
    model, recompute = vit_flops(VIT, [3, 5])
    assert model == 3 * 2592 and recompute == 0
    assert vit_flops(VIT, [3, 5], recompute=True) == (3 * 2592, 2592)
    assert vit_flops(VIT, [3, 5], training="frozen") == (2592, 0.0)  # no backward, none to redo
    # LLM: per layer 16 + 8 + 8 + 16 + 96 = 144 weights -> 2 * 2 * 144 = 576 per token, LM head
    # 2 * 4 * 10 = 80; causal attention 4 * 2 * 2 * 2 / 2 = 16 per squared length.
    # Samples of 2 and 6 tokens: 656 * 8 + 16 * (4 + 36) = 5888 forward.
    assert llm_flops(LLM, [2, 6]) == (3 * 5888, 0.0)
    assert llm_flops(LLM, [2, 6], training="input_grad") == (2 * 5888, 0.0)
    assert llm_flops(LLM, [2, 6], recompute="full") == (3 * 5888, 576 * 8 + 16 * 40)
    assert llm_flops(LLM, [2, 6], recompute="selective") == (3 * 5888, 16 * 40)


def test_step_flops_counts_every_frame_and_sample():
    samples = [SampleSpec(0, 5, (MediaSpec((1, 2)),)), SampleSpec(1, 7),
               SampleSpec(2, 1, (MediaSpec((3,)), MediaSpec((1,))))]
    got = step_flops(samples, vit_shape=VIT, llm_shape=LLM, patches_per_token=4,
                     recompute_vit=True, llm_recompute="selective")
    patches = [4, 8, 12, 4]
    lengths = [8, 7, 5]
    assert got.vit == vit_flops(VIT, patches)[0]
    assert got.llm == llm_flops(LLM, lengths)[0]
    assert got.model == got.vit + got.llm
    assert got.hardware == got.model + vit_flops(VIT, patches)[0] / 3 + 16 * sum(
        n * n for n in lengths)


def test_same_formulas_as_the_cost_model():
    rate = 3.7e14
    cost = CostModel.from_model_shapes(SIGLIP_400M, QWEN3_8B, flops_per_second=rate)
    samples = KeyeWorkload().sample(64, seed=3)
    flops = step_flops(samples)
    frames = np.asarray([t for s in samples for m in s.media for t in m.tokens_per_frame])
    lengths = np.asarray([s.num_tokens for s in samples])
    assert flops.vit == pytest.approx(float(np.sum(cost.vit_cost_of_tokens(frames))) * rate,
                                      rel=1e-12)
    assert flops.llm == pytest.approx(float(np.sum(cost.llm_cost(lengths))) * rate, rel=1e-12)


def test_max_size_image_numbers():
    # One 20,480-token image = 81,920 patches; FACTS.md: 8.2e8 per patch, 124,416 * P^2.
    model, _ = vit_flops(SIGLIP_400M, [81_920])
    assert model == pytest.approx(3 * (8.2e8 * 81_920 + 124_416 * 81_920**2), rel=5e-3)


def test_padding_waste_by_hand():
    # Micro-batches [3, 5] and [2]: padded rows 5, 5 and 2; packed (divisor 4) 4, 8 and 4.
    mbs = [[3, 5], [2]]
    per_token = 576 + 80
    padded = executed_llm_flops(LLM, mbs, packed=False)
    assert padded == 3 * (per_token * 12 + 16 * (25 + 25 + 4))
    packed = executed_llm_flops(LLM, mbs, packed=True, divisor=4)
    assert packed == 3 * (per_token * 16 + 16 * (16 + 64 + 16))
    assert executed_llm_flops(LLM, mbs, packed=True) == llm_flops(LLM, [3, 5, 2])[0]


def test_mfu_and_errors():
    assert mfu(4e15, 2.0, 1e15, gpus=4) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"seconds\(0\) and peak_flops_per_s\(1000.0\)"):
        mfu(1.0, 0, 1e3)
    with pytest.raises(ValueError, match="gpus must be an int >= 1, got 0"):
        mfu(1.0, 1.0, 1e15, gpus=0)
    with pytest.raises(ValueError, match="llm training must be one of"):
        llm_flops(LLM, [1], training="partial")
    with pytest.raises(ValueError, match="recompute must be 'none', 'selective' or 'full'"):
        llm_flops(LLM, [1], recompute="some")
    with pytest.raises(ValueError, match="lengths must be >= 0, got -1"):
        llm_flops(LLM, [3, -1])
