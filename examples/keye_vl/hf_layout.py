"""Tensor names and layouts: Hugging Face (Keye-VL-1.5, SigLIP, Qwen3) <-> our unsharded model.

Our unsharded model ("CKPT", `hetero_parallel.export`) names tensors ``vision.<VisionEncoder
state-dict name>`` and ``llm.<megatron single-model name>``. A `Rule` says which Hugging Face
tensors make one of ours and how:

- ``copy``: same tensor, new name;
- ``qkv``: megatron's grouped QKV, ``[g0: q heads of group 0, k0, v0; g1: ...]`` rows, from
  ``q_proj`` / ``k_proj`` / ``v_proj`` (GQA: ``heads / groups`` query heads per key/value head);
- ``cat``: rows stacked, e.g. SwiGLU ``linear_fc1 = [gate_proj; up_proj]`` or the ViT's fused
  ``qkv = [q; k; v]``.

Each rule also knows every Hugging Face tensor's shape for the model's config, so a converter can
refuse a wrong tensor by name, with both shapes, before touching it.

Keye-VL-1.5 layout (vLLM ``keye.py`` / ``keye_vl1_5.py`` weight names): ``visual.vision_model.*``
(SigLIP names), ``mlp_AR.{pre_norm,linear_1,linear_2}.*``, ``model.*`` and ``lm_head.weight``
(Qwen3 names). Tensors of that layout that the model never reads (the ViT's 32768-row packing
position table; a SigLIP pooling head, if a checkpoint has one) are carried through under
``PASSTHROUGH_PREFIX`` so ``to-hf(from-hf(x))`` gives ``x`` back.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from examples.keye_vl.llm import LLMShape
from examples.keye_vl.vision import MERGE, PATCH, VisionShape

KEYE_VIT = "visual.vision_model."
KEYE_PROJECTOR = "mlp_AR."
QWEN3_MODEL = "model."
PASSTHROUGH_PREFIX = "hf_extra."
"""CKPT prefix of Hugging Face tensors carried through unchanged (not part of the model)."""
KEYE_PASSTHROUGH = re.compile(
    r"^visual\.vision_model\.(embeddings\.packing_position_embedding\.weight|head\..+)$")
PACKING_TABLE = KEYE_VIT + "embeddings.packing_position_embedding.weight"

# megatron's local spec puts the pre-attention / pre-MLP RMSNorm in its own module; the
# TransformerEngine spec fuses it into the following linear. Same tensor, two names.
_TE_ALIASES = (("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
               ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"))


@dataclass(frozen=True)
class Rule:
    ckpt: str
    """Our name (with its ``vision.`` / ``llm.`` prefix)."""
    hf: tuple[str, ...]
    """The Hugging Face names it is made of, in order."""
    hf_shapes: tuple[tuple[int, ...], ...]
    kind: str = "copy"
    """``copy``, ``qkv`` (megatron grouped QKV) or ``cat`` (rows stacked)."""
    groups: int = 1
    """Key/value heads (``qkv`` only)."""

    @property
    def ckpt_shape(self) -> tuple[int, ...]:
        if self.kind == "copy":
            return self.hf_shapes[0]
        rows = sum(s[0] for s in self.hf_shapes)
        return (rows, *self.hf_shapes[0][1:])

    def combine(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Hugging Face tensors (in ``hf`` order) -> ours."""
        if self.kind == "copy":
            return tensors[0]
        if self.kind == "cat":
            return torch.cat(tensors, dim=0)
        q, k, v = tensors
        g = self.groups
        parts = [t.reshape(g, t.shape[0] // g, *t.shape[1:]) for t in (q, k, v)]
        return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Ours -> Hugging Face tensors (in ``hf`` order), contiguous."""
        if self.kind == "copy":
            return [tensor]
        sizes = [s[0] for s in self.hf_shapes]
        if self.kind == "cat":
            return [t.contiguous() for t in torch.split(tensor, sizes, dim=0)]
        g = self.groups
        grouped = tensor.reshape(g, -1, *tensor.shape[1:])
        parts = torch.split(grouped, [n // g for n in sizes], dim=1)
        return [p.reshape(n, *tensor.shape[1:]).contiguous() for p, n in zip(parts, sizes,
                                                                            strict=True)]


def llm_rules(llm: LLMShape, *, hf_prefix: str = QWEN3_MODEL, lm_head: str = "lm_head.weight"
              ) -> list[Rule]:
    """Qwen3 (``model.*``, ``lm_head.weight``) -> ``llm.*`` (megatron local-spec names)."""
    h, hd, ffn = llm.hidden_size, llm.head_dim, llm.ffn_hidden_size
    nq, nkv = llm.num_attention_heads, llm.num_query_groups
    rules = [Rule("llm.embedding.word_embeddings.weight", (hf_prefix + "embed_tokens.weight",),
                  ((llm.vocab_size, h),))]
    for i in range(llm.num_layers):
        src, dst = f"{hf_prefix}layers.{i}.", f"llm.decoder.layers.{i}."
        rules += [
            Rule(dst + "input_layernorm.weight", (src + "input_layernorm.weight",), ((h,),)),
            Rule(dst + "self_attention.linear_qkv.weight",
                 tuple(src + f"self_attn.{p}_proj.weight" for p in "qkv"),
                 ((nq * hd, h), (nkv * hd, h), (nkv * hd, h)), "qkv", nkv),
            Rule(dst + "self_attention.q_layernorm.weight", (src + "self_attn.q_norm.weight",),
                 ((hd,),)),
            Rule(dst + "self_attention.k_layernorm.weight", (src + "self_attn.k_norm.weight",),
                 ((hd,),)),
            Rule(dst + "self_attention.linear_proj.weight", (src + "self_attn.o_proj.weight",),
                 ((h, nq * hd),)),
            Rule(dst + "pre_mlp_layernorm.weight", (src + "post_attention_layernorm.weight",),
                 ((h,),)),
            Rule(dst + "mlp.linear_fc1.weight",
                 (src + "mlp.gate_proj.weight", src + "mlp.up_proj.weight"),
                 ((ffn, h), (ffn, h)), "cat"),
            Rule(dst + "mlp.linear_fc2.weight", (src + "mlp.down_proj.weight",), ((h, ffn),)),
        ]
    rules.append(Rule("llm.decoder.final_layernorm.weight", (hf_prefix + "norm.weight",),
                      ((h,),)))
    if not llm.tie_embeddings:
        rules.append(Rule("llm.output_layer.weight", (lm_head,), ((llm.vocab_size, h),)))
    return rules


def vit_rules(vit: VisionShape, *, hf_prefix: str = KEYE_VIT) -> list[Rule]:
    """SigLIP vision tower (``<prefix>embeddings.*``, ``encoder.layers.*``, ``post_layernorm``)
    -> ``vision.vit.*``."""
    d, ffn = vit.hidden_size, vit.ffn_hidden_size

    def wb(dst: str, src: str, out: int, inp: int | None) -> list[Rule]:
        return [Rule(f"{dst}.weight", (f"{src}.weight",), ((out, inp) if inp else (out,),)),
                Rule(f"{dst}.bias", (f"{src}.bias",), ((out,),))]

    p = hf_prefix
    rules = [
        Rule("vision.vit.patch_embed.weight", (p + "embeddings.patch_embedding.weight",),
             ((d, 3, PATCH, PATCH),)),
        Rule("vision.vit.patch_embed.bias", (p + "embeddings.patch_embedding.bias",), ((d,),)),
        Rule("vision.vit.pos_embed.weight", (p + "embeddings.position_embedding.weight",),
             ((vit.position_grid ** 2, d),)),
    ]
    for i in range(vit.num_layers):
        src, dst = f"{p}encoder.layers.{i}.", f"vision.vit.blocks.{i}."
        rules += wb(dst + "norm1", src + "layer_norm1", d, None)
        for suffix, shape in (("weight", (d, d)), ("bias", (d,))):
            rules.append(Rule(dst + f"qkv.{suffix}",
                              tuple(src + f"self_attn.{x}_proj.{suffix}" for x in "qkv"),
                              (shape, shape, shape), "cat"))
        rules += wb(dst + "proj", src + "self_attn.out_proj", d, d)
        rules += wb(dst + "norm2", src + "layer_norm2", d, None)
        rules += wb(dst + "fc1", src + "mlp.fc1", ffn, d)
        rules += wb(dst + "fc2", src + "mlp.fc2", d, ffn)
    rules += wb("vision.vit.post_norm", p + "post_layernorm", d, None)
    return rules


def projector_rules(vit: VisionShape, *, hf_prefix: str = KEYE_PROJECTOR) -> list[Rule]:
    """Keye's ``mlp_AR.{pre_norm,linear_1,linear_2}`` -> ``vision.projector.{norm,fc1,fc2}``."""
    m = vit.hidden_size * MERGE * MERGE
    out = []
    for dst, src, shape in (("norm", "pre_norm", (m,)), ("fc1", "linear_1", (m, m)),
                            ("fc2", "linear_2", (vit.llm_hidden_size, m))):
        out.append(Rule(f"vision.projector.{dst}.weight", (f"{hf_prefix}{src}.weight",),
                        (shape,)))
        out.append(Rule(f"vision.projector.{dst}.bias", (f"{hf_prefix}{src}.bias",),
                        ((shape[0],),)))
    return out


def keye_rules(model) -> list[Rule]:
    """Every tensor of a `ModelConfig` in the Keye-VL-1.5 layout."""
    return vit_rules(model.vision) + projector_rules(model.vision) + llm_rules(model.llm)


def canonical_llm_name(name: str) -> str:
    """A CKPT name with TransformerEngine's fused-norm names mapped to the local-spec ones."""
    for te, local in _TE_ALIASES:
        if name.endswith("." + te):
            return name[:-len(te)] + local
    return name


class SpecAliases:
    """A `hetero_parallel.export.TensorSource` that also answers to the other layer spec's names
    of the fused-or-not RMSNorm weights (so a checkpoint from either spec loads into either)."""

    def __init__(self, source) -> None:
        self.source = source
        self._alias: dict[str, str] = {}
        present = set(source.names())
        for name in present:
            for te, local in _TE_ALIASES:
                for mine, other in ((te, local), (local, te)):
                    if name.endswith("." + mine):
                        alias = name[:-len(mine)] + other
                        if alias not in present:
                            self._alias[alias] = name

    def names(self) -> Iterable[str]:
        return [*self.source.names(), *self._alias]

    def real_name(self, name: str) -> str:
        """The name in the wrapped source that ``name`` reads."""
        return self._alias.get(name, name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(self.real_name(name))

    def dtype(self, name: str) -> torch.dtype:
        return self.source.dtype(self.real_name(name))

    def read(self, name: str, index=None) -> torch.Tensor:
        return self.source.read(self.real_name(name), index)
