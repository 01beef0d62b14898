"""Hugging Face <-> CKPT conversion for Keye-VL-1.5: round trips, clear errors, the released config,
the parameter count, ``verify`` on the command line, and ``--tokenizer`` folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from examples.keye_vl.config import MODELS, ModelConfig
from examples.keye_vl.hf_config import RELEASED_KEYE_VL_1_5_8B
from examples.keye_vl.llm import LLMShape
from examples.keye_vl.vision import VisionShape
from hetero_parallel.export import SafetensorsSource

ROOT = Path(__file__).resolve().parents[1]
TINY_KEYE = ModelConfig(
    name="tiny-keye",
    llm=LLMShape(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                 head_dim=16, ffn_hidden_size=128, vocab_size=512, max_sequence_length=4096,
                 rotary_base=10_000.0),
    vision=VisionShape(hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=64,
                       llm_hidden_size=64, image_size=56),
)


def keye_tensors(model: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the Keye-VL-1.5 layout, from transformers' own Qwen3 and SigLIP."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    llm, vit = model.llm, model.vision
    torch.manual_seed(seed)
    qwen = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
        intermediate_size=llm.ffn_hidden_size, num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_attention_heads, num_key_value_heads=llm.num_query_groups,
        head_dim=llm.head_dim, tie_word_embeddings=False))
    siglip = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=vit.hidden_size, intermediate_size=vit.ffn_hidden_size,
        num_hidden_layers=vit.num_layers, num_attention_heads=vit.num_heads,
        image_size=vit.image_size, patch_size=14))
    out = dict(qwen.state_dict())
    for k, v in siglip.state_dict().items():  # includes the pooling head
        out["visual.vision_model." + k.removeprefix("vision_model.")] = v
    out["visual.vision_model.embeddings.packing_position_embedding.weight"] = torch.randn(
        32768, vit.hidden_size)
    m = 4 * vit.hidden_size
    for name, shape in (("pre_norm", (m,)), ("linear_1", (m, m)),
                        ("linear_2", (llm.hidden_size, m))):
        out[f"mlp_AR.{name}.weight"] = torch.randn(shape) * 0.05 + (name == "pre_norm")
        out[f"mlp_AR.{name}.bias"] = torch.randn(shape[0]) * 0.05
    return out


def keye_config(model: ModelConfig, dtype: str) -> dict:
    llm, vit = model.llm, model.vision
    cfg = json.loads(json.dumps(RELEASED_KEYE_VL_1_5_8B))
    cfg.update(hidden_size=llm.hidden_size, intermediate_size=llm.ffn_hidden_size,
               num_hidden_layers=llm.num_layers, max_window_layers=llm.num_layers,
               num_attention_heads=llm.num_attention_heads,
               num_key_value_heads=llm.num_query_groups, head_dim=llm.head_dim,
               vocab_size=llm.vocab_size, max_position_embeddings=llm.max_sequence_length,
               rope_theta=llm.rotary_base, torch_dtype=dtype,
               rope_scaling={"type": "mrope", "mrope_section": list(llm.mrope_section)})
    cfg["vision_config"].update(hidden_size=vit.hidden_size, intermediate_size=vit.ffn_hidden_size,
                                num_hidden_layers=vit.num_layers,
                                num_attention_heads=vit.num_heads, image_size=vit.image_size)
    return cfg


def write_keye_folder(folder: Path, model: ModelConfig, *, dtype=torch.bfloat16,
                      edit=None) -> dict[str, torch.Tensor]:
    """A Keye-VL-1.5 Hugging Face folder (2 shards + index + config); ``edit(tensors)`` may
    change the tensors first. Returns what was written."""
    tensors = {k: v.to(dtype).contiguous() for k, v in keye_tensors(model).items()}
    if edit is not None:
        edit(tensors)
    folder.mkdir(parents=True)
    names = sorted(tensors)
    files = {}
    for i, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(folder / file))
        files.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": files}))
    (folder / "config.json").write_text(json.dumps(keye_config(model, str(dtype)[6:])))
    return tensors


# --- round trips ---------------------------------------------------------------------------

def test_to_hf_of_from_hf_gives_the_checkpoint_back_bitwise(tmp_path):
    from examples.keye_vl.convert import from_hf_keye, to_hf

    written = write_keye_folder(tmp_path / "hf", TINY_KEYE)
    from_hf_keye(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    ckpt = SafetensorsSource(tmp_path / "ckpt")
    assert {ckpt.dtype(n) for n in ckpt.names() if n.startswith(("llm.", "vision."))} \
        == {torch.float32}
    to_hf(str(tmp_path / "ckpt"), str(tmp_path / "back"), max_shard_bytes=300_000)
    back = SafetensorsSource(tmp_path / "back")
    assert len(set(back.weight_map.values())) > 2  # really sharded
    assert set(back.names()) == set(written)
    for name, tensor in written.items():
        got = back.read(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg == json.loads((tmp_path / "hf" / "config.json").read_text())


def test_stage1_start_from_siglip_and_qwen3_writes_the_keye_layout(tmp_path):
    from transformers import SiglipConfig, SiglipModel

    from examples.keye_vl.convert import from_hf_parts, to_hf
    from examples.keye_vl.hf_layout import keye_rules

    llm, vit = TINY_KEYE.llm, TINY_KEYE.vision
    tensors = keye_tensors(TINY_KEYE)
    qwen_dir = tmp_path / "qwen3"
    qwen_dir.mkdir()
    save_file({k: v for k, v in tensors.items() if k.startswith(("model.", "lm_head."))},
              str(qwen_dir / "model.safetensors"))
    (qwen_dir / "config.json").write_text(json.dumps(dict(
        model_type="qwen3", vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
        intermediate_size=llm.ffn_hidden_size, num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_attention_heads, num_key_value_heads=llm.num_query_groups,
        head_dim=llm.head_dim, max_position_embeddings=4096, rope_theta=10000.0,
        tie_word_embeddings=False, torch_dtype="float32")))
    # A whole SiglipModel (text tower, contrastive head, pooling head included).
    siglip = SiglipModel(SiglipConfig(
        vision_config=dict(hidden_size=vit.hidden_size, intermediate_size=vit.ffn_hidden_size,
                           num_hidden_layers=vit.num_layers, num_attention_heads=vit.num_heads,
                           image_size=vit.image_size, patch_size=14),
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=64, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)))
    siglip.save_pretrained(tmp_path / "siglip")
    from_hf_parts(str(tmp_path / "siglip"), str(qwen_dir), str(tmp_path / "ckpt"), seed=5)
    to_hf(str(tmp_path / "ckpt"), str(tmp_path / "keye"), dtype=torch.float32)
    out = SafetensorsSource(tmp_path / "keye")
    want = {n for r in keye_rules(TINY_KEYE) for n in r.hf}
    packing = "visual.vision_model.embeddings.packing_position_embedding.weight"
    assert set(out.names()) == want | {packing}
    assert torch.equal(out.read(packing), torch.zeros(32768, vit.hidden_size))
    for name in want:
        if name.startswith(("model.", "lm_head.")):
            assert torch.equal(out.read(name), tensors[name]), name
    sig = siglip.state_dict()
    assert torch.equal(out.read("visual.vision_model.encoder.layers.1.self_attn.k_proj.weight"),
                       sig["vision_model.encoder.layers.1.self_attn.k_proj.weight"])
    assert out.read("mlp_AR.linear_1.weight").std() > 0  # freshly initialised, not zeros


# --- clear errors --------------------------------------------------------------------------

def _from_hf_error(tmp_path, edit, dtype=torch.bfloat16) -> str:
    from examples.keye_vl.convert import from_hf_keye

    write_keye_folder(tmp_path / "hf", TINY_KEYE, dtype=dtype, edit=edit)
    with pytest.raises((KeyError, ValueError)) as info:
        from_hf_keye(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    return str(info.value)


def test_missing_tensor_is_named(tmp_path):
    msg = _from_hf_error(tmp_path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    assert "model.layers.1.self_attn.k_proj.weight: missing" in msg


def test_wrong_shape_names_the_tensor_and_both_shapes(tmp_path):
    def edit(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:100]

    msg = _from_hf_error(tmp_path, edit)
    assert "model.layers.0.mlp.up_proj.weight: shape (100, 64)" in msg and "(128, 64)" in msg


def test_wrong_dtype_names_the_tensor_and_both_dtypes(tmp_path):
    def edit(t):
        t["mlp_AR.linear_2.bias"] = t["mlp_AR.linear_2.bias"].half()

    msg = _from_hf_error(tmp_path, edit)
    assert "mlp_AR.linear_2.bias: dtype torch.float16" in msg and "torch.bfloat16" in msg


def test_unknown_tensor_is_refused(tmp_path):
    msg = _from_hf_error(tmp_path, lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    assert "model.extra.weight" in msg and "does not know" in msg


def test_ckpt_with_a_wrong_shape_is_refused_by_to_hf(tmp_path):
    from examples.keye_vl.convert import from_hf_keye, to_hf

    write_keye_folder(tmp_path / "hf", TINY_KEYE)
    from_hf_keye(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"llm.decoder.layers.0.mlp.linear_fc1.weight: shape "
                                         r"\(256, 64\).*expects \(192, 64\)"):
        to_hf(str(tmp_path / "ckpt"), str(tmp_path / "back"))


def test_tensor_parallel_size_must_divide_the_heads():
    from examples.keye_vl.llm import QWEN3_8B, TINY, check_tensor_parallel

    check_tensor_parallel(QWEN3_8B, 8)
    with pytest.raises(ValueError, match=r"tensor parallel size 3 .* num_attention_heads=4, "
                                         r"num_query_groups \(key/value heads\)=2"):
        check_tensor_parallel(TINY, 3)
    with pytest.raises(ValueError, match="tensor parallel size 16 .*=32.*=8"):
        check_tensor_parallel(QWEN3_8B, 16)


# --- the released config and parameter count ------------------------------------------------

def test_the_8b_config_is_the_released_config():
    from examples.keye_vl.hf_config import keye_hf_config, model_config_from_keye

    model = MODELS["keye-vl-1.5-8b"]
    assert keye_hf_config(model) == RELEASED_KEYE_VL_1_5_8B
    back = model_config_from_keye(RELEASED_KEYE_VL_1_5_8B)
    assert (back.llm, back.vision) == (model.llm, model.vision)


def released_parameter_count(cfg: dict) -> int:
    """Every tensor of the released checkpoint, counted from its config.json alone."""
    h, ffn, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg[
        "head_dim"]
    llm = 2 * cfg["vocab_size"] * h + h + layers * (
        h * (q + 2 * kv) + q * h + 2 * cfg["head_dim"] + 3 * h * ffn + 2 * h)
    v = cfg["vision_config"]
    d, vffn, grid = v["hidden_size"], v["intermediate_size"], v["image_size"] // v["patch_size"]
    vit = (d * 3 * v["patch_size"] ** 2 + d + grid * grid * d + 32768 * d + 2 * d
           + v["num_hidden_layers"] * (4 * (d * d + d) + 2 * d * vffn + vffn + d + 4 * d))
    m = 4 * d
    return llm + vit + (2 * m + m * m + m + m * h + h)


def test_released_parameter_count_from_the_released_config():
    # Qwen3-8B 8,190,735,360 + SigLIP-so400m tower 412,987,248 + packing table 37,748,736
    # + projector 40,125,952.
    assert released_parameter_count(RELEASED_KEYE_VL_1_5_8B) == 8_681_597_296


# --- verify on the command line (transformers' models vs ours) --------------------------------

@pytest.mark.slow
def test_verify_command_reports_small_diffs_and_fails_on_a_wrong_checkpoint(tmp_path):
    from examples.keye_vl.convert import from_hf_keye

    write_keye_folder(tmp_path / "hf", TINY_KEYE, dtype=torch.float32)
    from_hf_keye(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "examples.keye_vl.convert", "verify", "--ckpt",
           str(tmp_path / "ckpt"), "--keye", str(tmp_path / "hf")]
    ok = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    diffs = {line.split()[1]: float(line.split()[2]) for line in ok.stdout.splitlines()
             if line.startswith("max_abs_diff ")}
    print(diffs)
    assert set(diffs) == {"llm", "vit", "projector"} and max(diffs.values()) <= 1e-4
    # Another model's weights in the Keye folder: verify must notice.
    write_keye_folder(tmp_path / "other", TINY_KEYE, dtype=torch.float32,
                      edit=lambda t: t["model.norm.weight"].mul_(1.5))
    bad = subprocess.run(cmd[:-1] + [str(tmp_path / "other")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1, bad.stdout + bad.stderr[-2000:]
    assert "above tolerance" in bad.stderr and "llm" in bad.stderr


# --- a real tokenizer ----------------------------------------------------------------------

def tiny_tokenizer_folder(folder: Path, specials: tuple[str, ...] | None = None) -> Path:
    """A byte-level BPE tokenizer with Keye's special tokens and a Qwen chat template, saved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from examples.keye_vl.tokenizer import REQUIRED_TOKENS

    specials = REQUIRED_TOKENS if specials is None else specials
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["a video of a cat 0.5 1.0 describe the image"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials),
                                                initial_alphabet=pre_tokenizers.ByteLevel
                                                .alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                          "{{ m['content'] }}<|im_end|>\n{% endfor %}")
    fast.save_pretrained(folder)
    return folder


def test_tokenizer_folder_with_keye_special_tokens_tokenizes_samples(tmp_path):
    from dataloader.sequence import FRAME, IM_START, VIDEO_PAD, tokenize
    from examples.keye_vl.tokenizer import load_tokenizer
    from tests.test_keye_model import RECORDS

    tok = load_tokenizer(tiny_tokenizer_folder(tmp_path / "tok"), vocab_size=512)
    video = next(r for r in RECORDS if r.id == "video")
    sample = tokenize(video, 0, tok)
    ids = sample.token_ids.tolist()
    assert ids.count(tok.special_id(FRAME)) == 5
    assert ids.count(tok.special_id(VIDEO_PAD)) == sample.layout.num_visual_tokens
    assert ids[0] == tok.special_id(IM_START)
    assert tok._tok.decode(tok.encode("describe the image")) == "describe the image"
    with pytest.raises(ValueError, match="go up to .* past the model's vocabulary of 64"):
        load_tokenizer(tmp_path / "tok", vocab_size=64)


def test_tokenizer_without_keye_tokens_is_refused(tmp_path):
    from examples.keye_vl.tokenizer import REQUIRED_TOKENS, load_tokenizer

    folder = tiny_tokenizer_folder(tmp_path / "tok", tuple(t for t in REQUIRED_TOKENS
                                                           if t != "<|frame|>"))
    with pytest.raises(ValueError, match=r"lacks Keye-VL-1.5's special tokens \['<\|frame\|>'\]"):
        load_tokenizer(folder)
