"""Hugging Face ``config.json`` <-> our model shapes, and the released Keye-VL-1.5-8B config.

`RELEASED_KEYE_VL_1_5_8B` is the architecture part of ``Kwai-Keye/Keye-VL-1_5-8B/config.json``
(bookkeeping keys such as ``transformers_version`` left out), written down here with the source
of every value, because this machine cannot reach the Hub. `keye_hf_config` maps a `ModelConfig`
to that layout (``to-hf`` writes it); `model_config_from_keye` maps it back (``from-hf``), and
`model_config_from_parts` builds the stage-1 model from a SigLIP and a Qwen3 config.

Sources (read with the search tools; no file copied):

- [P] the released config.json of Keye-VL-8B-Preview (mirrored in GitHub ``svjack/Keye``,
  ``keye-vl-8b-preview/config.json``): the flat Qwen3 text fields, the token ids, the SigLIP
  ``vision_config`` and ``rope_scaling.mrope_section`` — Keye-VL-1.5 keeps this architecture
  (same ViT, projector input, Qwen3-8B LLM; vLLM's ``keye_vl1_5.py`` reuses ``keye.py``'s ViT and
  reads the same fields);
- [V] vLLM ``keye_vl1_5.py`` / ``keye.py`` and the model registry: the architecture name
  ``KeyeVL1_5ForConditionalGeneration``, ``spatial_merge_size``, the projector shapes;
- [T] transformers PR #41040 (``models/keye_vl_1_5``): ``model_type`` ``KeyeVL1_5``, the
  ``configuration_keye_vl_1_5`` / ``modeling_keye_vl_1_5`` module names, ``tokens_per_second``;
- [R] the Keye-VL-1.5 technical report (arXiv 2509.01563) and model card: context extended to
  128K tokens with RoPE base 8e6 in the last pre-training stage. These two values
  (``max_position_embeddings``, ``rope_theta``) are the ones not read from a config file.
"""

from __future__ import annotations

import copy
from typing import Any

from examples.keye_vl.llm import LLMShape
from examples.keye_vl.vision import PATCH, VisionShape

# Keep the import light: ModelConfig lives in config.py, which imports this module lazily.

RELEASED_KEYE_VL_1_5_8B: dict[str, Any] = {
    "architectures": ["KeyeVL1_5ForConditionalGeneration"],  # [V]
    "auto_map": {  # [T] module names of the remote code
        "AutoConfig": "configuration_keye_vl_1_5.KeyeVL1_5Config",
        "AutoModel": "modeling_keye_vl_1_5.KeyeVL1_5ForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_keye_vl_1_5.KeyeVL1_5ForConditionalGeneration",
    },
    "model_type": "KeyeVL1_5",  # [T]
    "attention_bias": False,  # [P]
    "attention_dropout": 0.0,  # [P]
    "bos_token_id": 151643,  # [P]
    "eos_token_id": 151645,  # [P]
    "vision_start_token_id": 151652,  # [P]
    "vision_end_token_id": 151653,  # [P]
    "vision_token_id": 151654,  # [P]
    "image_token_id": 151655,  # [P], [T] default
    "video_token_id": 151656,  # [P], [T] default
    "head_dim": 128,  # [P]
    "hidden_act": "silu",  # [P]
    "hidden_size": 4096,  # [P]
    "initializer_range": 0.02,  # [P]
    "intermediate_size": 12288,  # [P]
    "max_position_embeddings": 131072,  # [R] 128K context
    "max_window_layers": 36,  # [P]
    "num_attention_heads": 32,  # [P]
    "num_hidden_layers": 36,  # [P]
    "num_key_value_heads": 8,  # [P]
    "rms_norm_eps": 1e-06,  # [P]
    "rope_theta": 8000000.0,  # [R] RoPE base 1e6 -> 8e6 at 128K
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},  # [P]
    "sliding_window": None,  # [P]
    "tie_word_embeddings": False,  # [P]
    "torch_dtype": "bfloat16",  # [P]
    "use_cache": True,  # [P]
    "use_sliding_window": False,  # [P]
    "vocab_size": 151936,  # [P]
    "vision_config": {  # [P]; hidden_act / layer_norm_eps are SigLIP's defaults, as [T] states
        "model_type": "siglip_vision_model",
        "hidden_size": 1152,
        "image_size": 384,
        "intermediate_size": 4304,
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
        "num_channels": 3,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-06,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
    },
}

PACKING_POSITIONS = 32768
"""Rows of the ViT's "packing" position table in Keye checkpoints ([V]: ``nn.Embedding(32768,
hidden)``); never read by Keye's inference path (`examples.keye_vl.vision`)."""


def _get(cfg: dict, key: str, where: str):
    if key not in cfg:
        raise KeyError(f"{where}: config has no {key!r} (keys: {sorted(cfg)[:20]})")
    return cfg[key]


def _expect(cfg: dict, key: str, allowed: tuple, where: str, default=None) -> None:
    value = cfg.get(key, default)
    if value not in allowed:
        raise ValueError(f"{where}: {key}={value!r} is not supported (expected one of "
                         f"{list(allowed)})")


def _rope_theta(cfg: dict, where: str) -> float:
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    params = cfg.get("rope_parameters") or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    raise KeyError(f"{where}: config has neither rope_theta nor rope_parameters.rope_theta")


def llm_shape_from_hf(text: dict, where: str) -> LLMShape:
    """A Qwen3 text config (flat Keye fields or a ``Qwen3Config`` dict) -> `LLMShape`."""
    _expect(text, "hidden_act", ("silu",), where, "silu")
    _expect(text, "attention_bias", (False,), where, False)
    _expect(text, "use_sliding_window", (False,), where, False)
    scaling = text.get("rope_scaling") or text.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise ValueError(f"{where}: rope scaling {kind!r} is not supported (default or mrope)")
    heads = int(_get(text, "num_attention_heads", where))
    hidden = int(_get(text, "hidden_size", where))
    head_dim = int(text.get("head_dim") or hidden // heads)
    section = scaling.get("mrope_section")
    return LLMShape(
        num_layers=int(_get(text, "num_hidden_layers", where)),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=int(text.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        ffn_hidden_size=int(_get(text, "intermediate_size", where)),
        vocab_size=int(_get(text, "vocab_size", where)),
        max_sequence_length=int(_get(text, "max_position_embeddings", where)),
        rotary_base=_rope_theta(text, where),
        norm_epsilon=float(text.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(text.get("tie_word_embeddings", False)),
        mrope_section=tuple(section) if section else None,
    )


def vision_shape_from_hf(vision: dict, llm_hidden_size: int, where: str) -> VisionShape:
    """A SigLIP vision config (Keye's ``vision_config``, a ``SiglipVisionConfig`` or a
    ``SiglipConfig`` with ``vision_config``) -> `VisionShape`."""
    vision = vision.get("vision_config", vision)
    _expect(vision, "hidden_act", ("gelu_pytorch_tanh",), where, "gelu_pytorch_tanh")
    _expect(vision, "patch_size", (PATCH,), where, PATCH)
    _expect(vision, "num_channels", (3,), where, 3)
    _expect(vision, "spatial_merge_size", (2,), where, 2)
    return VisionShape(
        hidden_size=int(_get(vision, "hidden_size", where)),
        num_layers=int(_get(vision, "num_hidden_layers", where)),
        num_heads=int(_get(vision, "num_attention_heads", where)),
        ffn_hidden_size=int(_get(vision, "intermediate_size", where)),
        llm_hidden_size=llm_hidden_size,
        image_size=int(_get(vision, "image_size", where)),
        rope_theta=float(vision.get("rope_theta", 10_000.0)),
        norm_epsilon=float(vision.get("layer_norm_eps", 1e-6)),
    )


def model_config_from_keye(cfg: dict, name: str = "hf", where: str = "config.json"):
    """A Keye-VL-1.5 ``config.json`` (flat text fields, or ``text_config``) -> `ModelConfig`."""
    from examples.keye_vl.config import ModelConfig

    if "vision_config" not in cfg:
        raise KeyError(f"{where}: not a Keye-VL config (no 'vision_config')")
    text = cfg.get("text_config") or cfg
    llm = llm_shape_from_hf(text, where)
    return ModelConfig(name=name, llm=llm,
                       vision=vision_shape_from_hf(cfg["vision_config"], llm.hidden_size, where))


def model_config_from_parts(siglip: dict, qwen3: dict, name: str = "hf", *,
                            where: tuple[str, str] = ("siglip", "qwen3")):
    """The stage-1 model of a SigLIP config and a Qwen3 config."""
    from examples.keye_vl.config import ModelConfig

    llm = llm_shape_from_hf(qwen3, where[1])
    return ModelConfig(name=name, llm=llm,
                       vision=vision_shape_from_hf(siglip, llm.hidden_size, where[0]))


def keye_hf_config(model, *, dtype: str = "bfloat16", template: dict | None = None
                   ) -> dict[str, Any]:
    """The Keye-VL-1.5 ``config.json`` of ``model`` (a `ModelConfig`): ``template`` (default:
    the released config; e.g. the config a checkpoint came with, so its token ids and bookkeeping
    keys survive a round trip) with ``model``'s shapes and the released architecture names."""
    out = copy.deepcopy(template if template is not None else RELEASED_KEYE_VL_1_5_8B)
    out.pop("text_config", None)
    for key in ("architectures", "auto_map", "model_type"):
        out[key] = copy.deepcopy(RELEASED_KEYE_VL_1_5_8B[key])
    llm, vit = model.llm, model.vision
    rope_scaling = dict(out.get("rope_scaling") or {"type": "mrope"})
    rope_scaling["mrope_section"] = list(llm.mrope_section)
    if "dtype" in out:  # transformers >= 5 writes "dtype"
        out["dtype"] = dtype
    out.update({
        "head_dim": llm.head_dim,
        "hidden_size": llm.hidden_size,
        "intermediate_size": llm.ffn_hidden_size,
        "max_position_embeddings": llm.max_sequence_length,
        "max_window_layers": llm.num_layers,
        "num_attention_heads": llm.num_attention_heads,
        "num_hidden_layers": llm.num_layers,
        "num_key_value_heads": llm.num_query_groups,
        "rms_norm_eps": llm.norm_epsilon,
        "rope_theta": float(llm.rotary_base),
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": llm.tie_embeddings,
        "torch_dtype": dtype,
        "vocab_size": llm.vocab_size,
    })
    vision = out.get("vision_config") or copy.deepcopy(RELEASED_KEYE_VL_1_5_8B["vision_config"])
    vision.update({
        "hidden_size": vit.hidden_size,
        "image_size": vit.image_size,
        "intermediate_size": vit.ffn_hidden_size,
        "num_attention_heads": vit.num_heads,
        "num_hidden_layers": vit.num_layers,
        "layer_norm_eps": vit.norm_epsilon,
    })
    if vit.rope_theta != 10_000.0:
        vision["rope_theta"] = vit.rope_theta
    out["vision_config"] = vision
    return out


def qwen3_config_kwargs(llm: LLMShape) -> dict[str, Any]:
    """Arguments of transformers' ``Qwen3Config`` for the text part (1D RoPE: text only)."""
    return dict(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
                intermediate_size=llm.ffn_hidden_size, num_hidden_layers=llm.num_layers,
                num_attention_heads=llm.num_attention_heads,
                num_key_value_heads=llm.num_query_groups, head_dim=llm.head_dim,
                max_position_embeddings=llm.max_sequence_length, rms_norm_eps=llm.norm_epsilon,
                rope_theta=float(llm.rotary_base), tie_word_embeddings=llm.tie_embeddings,
                attention_bias=False, hidden_act="silu")


def siglip_vision_config_kwargs(vit: VisionShape) -> dict[str, Any]:
    """Arguments of transformers' ``SiglipVisionConfig`` for the ViT (no pooling head)."""
    return dict(hidden_size=vit.hidden_size, intermediate_size=vit.ffn_hidden_size,
                num_hidden_layers=vit.num_layers, num_attention_heads=vit.num_heads,
                image_size=vit.image_size, patch_size=PATCH, num_channels=3,
                hidden_act="gelu_pytorch_tanh", layer_norm_eps=vit.norm_epsilon,
                vision_use_head=False)
