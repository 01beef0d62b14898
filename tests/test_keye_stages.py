"""Stage configs and stage-4 model fusion."""

from __future__ import annotations

import os

import pytest
import torch

from examples.keye_vl.config import MODELS, STAGES, StageConfig
from examples.keye_vl.merge import main as merge_main
from examples.keye_vl.merge import merge_state_dicts


def test_stage_chain_and_settings():
    assert STAGES[1].trainable == {"projector"}
    assert STAGES[2].trainable == {"vision", "projector", "llm"}
    assert STAGES[3].rotary_base == 8e6 and STAGES[2].rotary_base == 1e6
    assert STAGES[3].mixture == {"video": 24.0, "image": 50.0, "text": 26.0}
    assert STAGES[3].cp > 1 and STAGES[3].pp > 1
    for s in (2, 3):
        assert STAGES[s].init_from == s - 1
    with pytest.raises(ValueError, match=r"unknown components \['decoder'\]"):
        StageConfig(stage=9, name="x", trainable=frozenset({"decoder"}), seq_len=1, rotary_base=1)


def test_real_8b_shapes():
    m = MODELS["keye-vl-1.5-8b"]
    assert (m.llm.num_layers, m.llm.hidden_size, m.llm.ffn_hidden_size) == (36, 4096, 12288)
    assert (m.llm.num_attention_heads, m.llm.num_query_groups, m.llm.head_dim) == (32, 8, 128)
    assert m.vision.llm_hidden_size == m.llm.hidden_size


def test_merge_is_the_weighted_average(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g),
         "step": torch.tensor(7)}
    b = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g),
         "step": torch.tensor(7)}
    merged = merge_state_dicts([a, b], [0.7, 0.3])
    torch.testing.assert_close(merged["w"], 0.7 * a["w"] + 0.3 * b["w"])
    torch.testing.assert_close(merged["b"], 0.7 * a["b"] + 0.3 * b["b"])
    assert merged["step"].item() == 7
    # Weights are normalised; the command line writes the same thing, which loads back.
    from safetensors.torch import save_file

    from hetero_parallel.export import SafetensorsSource

    save_file(a, tmp_path / "a.safetensors")
    (tmp_path / "b").mkdir()
    save_file(b, tmp_path / "b" / "model.safetensors")
    merge_main([f"{tmp_path / 'a.safetensors'}:7", f"{tmp_path / 'b'}:3", "--out",
                str(tmp_path / "m")])
    out = SafetensorsSource(tmp_path / "m")
    torch.testing.assert_close(out.read("w"), merged["w"])
    assert out.read("step").item() == 7


def test_merge_refuses_mismatched_models():
    a = {"w": torch.zeros(3, 4), "b": torch.zeros(4)}
    with pytest.raises(ValueError, match="w: shapes differ"):
        merge_state_dicts([a, {"w": torch.zeros(4, 3), "b": torch.zeros(4)}], [1, 1])
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        merge_state_dicts([a, {"w": torch.zeros(3, 4)}], [1, 1])
    with pytest.raises(ValueError, match="weights must be >= 0"):
        merge_state_dicts([a, a], [1, -1])


_BUILD_8B = """
import os, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
from examples.keye_vl.config import MODELS
from examples.keye_vl.llm import build_llm, transformer_config
from examples.keye_vl.vision import VisionEncoder
from hetero_parallel import ParallelPlan, initialize, teardown
from hetero_parallel.cpu_compat import cpu_compat
m = MODELS["keye-vl-1.5-8b"]
with cpu_compat():
    groups = initialize(ParallelPlan(world_size=1), backend="gloo")
    with torch.device("meta"):  # shapes only: 8B parameters are not materialised
        llm = build_llm(m.llm, transformer_config(m.llm, params_dtype=torch.bfloat16,
                                                  use_cpu_initialization=False,
                                                  perform_initialization=False))
        vision = VisionEncoder(m.vision)
    print(sum(p.numel() for p in llm.parameters()), sum(p.numel() for p in vision.parameters()))
    teardown(groups, destroy_world=True)
"""


def test_keye_vl_8b_constructs_with_the_real_shapes():
    import subprocess
    import sys
    from pathlib import Path

    from tests.distributed import free_port

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _BUILD_8B], cwd=root, capture_output=True,
                         text=True, timeout=300,
                         env={**os.environ, "PORT": str(free_port()),
                              "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-3000:]
    llm_params, vision_params = map(int, out.stdout.split()[-2:])
    # Qwen3-8B: 36 layers of 4096 (32 Q / 8 KV heads of 128, FFN 12288), 151,936-token vocab,
    # untied embeddings: 8.19e9 parameters.
    embeddings = 2 * 151_936 * 4096
    per_layer = 4096 * (32 + 2 * 8) * 128 + 32 * 128 * 4096 + 3 * 4096 * 12288 + 2 * 4096 + 2 * 128
    assert llm_params == embeddings + 36 * per_layer + 4096 == 8_190_735_360
    # SigLIP so400m-patch14-384 tower (27x27 learned positions) 412,987,248 + the 2x2-merge
    # projector 40,125,952.
    assert vision_params == 412_987_248 + 40_125_952
    # The released checkpoint also carries the ViT's 32768 x 1152 packing position table, which
    # Keye's inference never reads (the converter carries it through, see hf_layout).
    from examples.keye_vl.hf_config import PACKING_POSITIONS, RELEASED_KEYE_VL_1_5_8B
    from tests.test_keye_convert import released_parameter_count

    released = released_parameter_count(RELEASED_KEYE_VL_1_5_8B)
    assert llm_params + vision_params + PACKING_POSITIONS * 1152 == released == 8_681_597_296
