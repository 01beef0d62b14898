"""Move Keye-VL-1.5 weights between Hugging Face and the toolkit's unsharded model ("CKPT").

Run from the repository root::

    # the released model (config.json + sharded safetensors) -> CKPT, for fine-tuning
    python -m examples.keye_vl.convert from-hf --keye Keye-VL-1_5-8B --out ckpt/keye
    # the stage-1 start: SigLIP so400m + Qwen3-8B, projector freshly initialised
    python -m examples.keye_vl.convert from-hf --vision siglip-so400m-patch14-384 \\
        --llm Qwen3-8B --out ckpt/stage0
    # CKPT (e.g. a stage's <out>/final) -> the Keye-VL-1.5 layout (shards, index, config);
    # --template copies the released remote code, tokenizer and processor files next to it
    python -m examples.keye_vl.convert to-hf --ckpt runs/keye/final --out hf/keye \\
        --template Keye-VL-1_5-8B
    # transformers' own models vs ours on the same random inputs; exit 1 above tolerance
    python -m examples.keye_vl.convert verify --ckpt ckpt/keye --keye Keye-VL-1_5-8B

CKPT is what ``train.py --init-from`` takes (`hetero_parallel.export`): every rank then reads only
its own slices. Conversion goes tensor by tensor and writes shard by shard
(`examples.keye_vl.shards`), so it never holds the model in memory. Names and layouts are
`examples.keye_vl.hf_layout`'s; configs are `examples.keye_vl.hf_config`'s. A missing tensor, a
wrong shape or dtype, or a tensor the layout does not know is an error naming the tensor (and both
shapes or dtypes). ``verify`` runs in fp32 whatever the checkpoints' dtypes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from examples.keye_vl.hf_config import (
    PACKING_POSITIONS,
    keye_hf_config,
    model_config_from_keye,
    model_config_from_parts,
    qwen3_config_kwargs,
    siglip_vision_config_kwargs,
)
from examples.keye_vl.hf_layout import (
    KEYE_PASSTHROUGH,
    KEYE_VIT,
    PACKING_TABLE,
    PASSTHROUGH_PREFIX,
    Rule,
    SpecAliases,
    keye_rules,
    llm_rules,
    vit_rules,
)
from examples.keye_vl.shards import INDEX, ShardedWriter
from hetero_parallel.export import SafetensorsSource, check_tensor

logger = logging.getLogger("keye_vl.convert")
CKPT_FORMAT = "hetero_parallel.unsharded/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- reading ---------------------------------------------------------------------------------
def _read_config(folder: str | os.PathLike[str]) -> dict:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (a Hugging Face model folder has one)"
                                ) from None
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def _declared_dtype(cfg: dict, where: str) -> torch.dtype | None:
    name = cfg.get("torch_dtype") or cfg.get("dtype")
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"{where}: torch_dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def _convert(source, rules: list[Rule], writer: ShardedWriter, dtype: torch.dtype, where: str,
             declared: torch.dtype | None) -> set[str]:
    """Write our tensors made of ``source``'s Hugging Face tensors; returns the names used."""
    names = set(source.names())
    used: set[str] = set()
    for rule in rules:
        parts = []
        for name, shape in zip(rule.hf, rule.hf_shapes, strict=True):
            if name not in names:
                raise KeyError(f"{name}: missing from {where} ({len(names)} tensors); the "
                               f"model needs it for {rule.ckpt}")
            got = source.dtype(name)
            if not got.is_floating_point:
                raise ValueError(f"{name}: dtype {got} in {where} is not a floating point type")
            check_tensor(name, source.shape(name), got, shape, declared or got, where)
            parts.append(source.read(name))
            used.add(name)
        writer.add(rule.ckpt, rule.combine(parts).to(dtype))
    return used


def _refuse_unknown(names: set[str], where: str) -> None:
    if names:
        raise ValueError(f"{where}: {len(names)} tensors the Keye-VL-1.5 layout does not know, "
                         f"e.g. {sorted(names)[:5]}")


# --- from-hf ---------------------------------------------------------------------------------
def from_hf_keye(keye_dir: str, out: str, *, dtype: torch.dtype = torch.float32,
                 max_shard_bytes: int = 5 * 2**30):
    """A Keye-VL-1.5 Hugging Face folder -> CKPT at ``out``; returns the `ModelConfig`."""
    cfg = _read_config(keye_dir)
    model = model_config_from_keye(cfg, name="keye-vl-1.5", where=f"{keye_dir}/config.json")
    source = SafetensorsSource(keye_dir)
    writer = ShardedWriter(out, max_shard_bytes=max_shard_bytes,
                           metadata={"format": CKPT_FORMAT, "source": "keye-vl-1.5"})
    used = _convert(source, keye_rules(model), writer, dtype, keye_dir,
                    _declared_dtype(cfg, keye_dir))
    rest = set(source.names()) - used
    for name in sorted(rest):
        if KEYE_PASSTHROUGH.match(name):
            writer.add(PASSTHROUGH_PREFIX + name, source.read(name))
    _refuse_unknown({n for n in rest if not KEYE_PASSTHROUGH.match(n)}, keye_dir)
    writer.close()
    _write_json(Path(out) / "config.json", keye_hf_config(model, dtype=_dtype_name(dtype),
                                                          template=cfg))
    return model


def _siglip_prefix(names: set[str]) -> str:
    return "vision_model." if any(n.startswith("vision_model.") for n in names) else ""


def from_hf_parts(vision_dir: str, llm_dir: str, out: str, *, dtype: torch.dtype = torch.float32,
                  seed: int = 0, max_shard_bytes: int = 5 * 2**30):
    """SigLIP + Qwen3 Hugging Face folders -> the stage-1 CKPT at ``out`` (projector freshly
    initialised from ``seed``); returns the `ModelConfig`."""
    from examples.keye_vl.vision import Projector

    vcfg, lcfg = _read_config(vision_dir), _read_config(llm_dir)
    model = model_config_from_parts(vcfg, lcfg, name="keye-vl-1.5",
                                    where=(f"{vision_dir}/config.json", f"{llm_dir}/config.json"))
    writer = ShardedWriter(out, max_shard_bytes=max_shard_bytes,
                           metadata={"format": CKPT_FORMAT, "source": "siglip+qwen3"})
    vsrc = SafetensorsSource(vision_dir)
    vnames = set(vsrc.names())
    prefix = _siglip_prefix(vnames)
    used = _convert(vsrc, vit_rules(model.vision, hf_prefix=prefix), writer, dtype, vision_dir,
                    _declared_dtype(vcfg.get("vision_config", vcfg), vision_dir)
                    or _declared_dtype(vcfg, vision_dir))
    # A SiglipModel also holds the text tower and the contrastive head; the pooling head of the
    # vision tower is not part of Keye's ViT.
    unused = re.compile(rf"^(text_model\.|logit_scale$|logit_bias$|{re.escape(prefix)}head\.)")
    _refuse_unknown({n for n in vnames - used if not unused.match(n)}, vision_dir)
    lsrc = SafetensorsSource(llm_dir)
    used = _convert(lsrc, llm_rules(model.llm), writer, dtype, llm_dir,
                    _declared_dtype(lcfg, llm_dir))
    rest = set(lsrc.names()) - used
    if model.llm.tie_embeddings:
        rest.discard("lm_head.weight")
    _refuse_unknown(rest, llm_dir)
    torch.manual_seed(seed)
    for name, tensor in Projector(model.vision).state_dict().items():
        writer.add(f"vision.projector.{name}", tensor.to(dtype))
    writer.close()
    _write_json(Path(out) / "config.json", keye_hf_config(model, dtype=_dtype_name(dtype)))
    return model


# --- to-hf -----------------------------------------------------------------------------------
def ckpt_model_config(ckpt: str, model_name: str | None = None):
    """The `ModelConfig` of a CKPT folder: ``--model`` if given; else its ``config.json``: a
    Keye config (written by ``from-hf``) or ``train.py``'s ``{"model": NAME, ...}``."""
    import dataclasses

    from examples.keye_vl.config import MODELS, STAGES

    cfg_path = Path(ckpt) / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    if model_name is None and "vision_config" in cfg:
        return model_config_from_keye(cfg, where=str(cfg_path)), cfg
    name = model_name or cfg.get("model")
    if name not in MODELS:
        raise ValueError(f"{ckpt}: cannot tell the model's shapes (config.json names model "
                         f"{cfg.get('model')!r}); pass --model, one of {sorted(MODELS)}")
    model = MODELS[name]
    base = cfg.get("rotary_base")
    if base is None and cfg.get("stage") in STAGES:
        base = STAGES[cfg["stage"]].rotary_base
    if base is not None:
        model = dataclasses.replace(model, llm=dataclasses.replace(model.llm,
                                                                   rotary_base=float(base)))
    return model, {}


def to_hf(ckpt: str, out: str, *, dtype: torch.dtype = torch.bfloat16,
          model_name: str | None = None, template_dir: str | None = None,
          max_shard_bytes: int = 5 * 2**30):
    """CKPT -> the Keye-VL-1.5 Hugging Face layout at ``out``; returns the `ModelConfig`."""
    model, cfg = ckpt_model_config(ckpt, model_name)
    source = SpecAliases(SafetensorsSource(ckpt))
    names = set(source.names())
    writer = ShardedWriter(out, max_shard_bytes=max_shard_bytes,
                           metadata={"format": "pt"})
    used: set[str] = set()
    for rule in keye_rules(model):
        if rule.ckpt not in names:
            raise KeyError(f"{rule.ckpt}: missing from {ckpt} ({len(names)} tensors)")
        got = source.dtype(rule.ckpt)
        if not got.is_floating_point:
            raise ValueError(f"{rule.ckpt}: dtype {got} in {ckpt} is not a floating point type")
        check_tensor(rule.ckpt, source.shape(rule.ckpt), got, rule.ckpt_shape, got, ckpt)
        for name, tensor in zip(rule.hf, rule.split(source.read(rule.ckpt)), strict=True):
            writer.add(name, tensor.to(dtype))
        used.add(rule.ckpt)
    extra = sorted(n for n in names if n.startswith(PASSTHROUGH_PREFIX))
    for name in extra:
        writer.add(name[len(PASSTHROUGH_PREFIX):], source.read(name).to(dtype))
    if PASSTHROUGH_PREFIX + PACKING_TABLE not in names:
        # Keye's inference never reads it; vLLM's loader expects the tensor to exist.
        writer.add(PACKING_TABLE, torch.zeros(PACKING_POSITIONS, model.vision.hidden_size,
                                              dtype=dtype))
    covered = {source.real_name(n) for n in used} | set(extra)
    _refuse_unknown(set(source.source.names()) - covered, ckpt)
    writer.close()
    _write_json(Path(out) / "config.json",
                keye_hf_config(model, dtype=_dtype_name(dtype), template=cfg or None))
    if template_dir is not None:
        _copy_template(template_dir, out)
    return model


def _copy_template(template_dir: str, out: str) -> None:
    """Copy the non-weight files of a released Keye folder (remote code, tokenizer, processor,
    chat template, generation config) next to the converted weights."""
    skip = {"config.json", INDEX}
    for path in Path(template_dir).iterdir():
        if path.is_file() and path.name not in skip and not path.name.endswith(".safetensors") \
                and not path.name.endswith(".bin"):
            shutil.copy2(path, Path(out) / path.name)


# --- verify ----------------------------------------------------------------------------------
class _AsFloat32:
    """A tensor source that presents every floating tensor as fp32 (for ``verify``)."""

    def __init__(self, source) -> None:
        self.source = source

    def names(self):
        return self.source.names()

    def shape(self, name):
        return self.source.shape(name)

    def dtype(self, name):
        got = self.source.dtype(name)
        return torch.float32 if got.is_floating_point else got

    def read(self, name, index=None):
        t = self.source.read(name, index)
        return t.float() if t.is_floating_point() else t


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_rank_megatron() -> Iterator:
    """megatron's parallel state for one process (TP = PP = 1) on gloo; tears it down after."""
    import torch.distributed as dist

    from hetero_parallel import ParallelPlan, initialize, teardown
    from hetero_parallel.cpu_compat import cpu_compat

    created = not dist.is_initialized()
    if created:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    with cpu_compat():
        groups = initialize(ParallelPlan(world_size=1), backend="gloo")
        try:
            yield groups
        finally:
            teardown(groups, destroy_world=created)


def _reference_llm(model, source, hf_prefix: str = "model."):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    ref = Qwen3ForCausalLM(Qwen3Config(**qwen3_config_kwargs(model.llm),
                                       attn_implementation="eager")).float().eval()
    state = {}
    for key in ref.state_dict():
        name = hf_prefix + key[len("model."):] if key.startswith("model.") else key
        state[key] = source.read(name).float()
    ref.load_state_dict(state, strict=True)
    return ref


def _reference_vit(model, source, hf_prefix: str):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    ref = SiglipVisionModel(SiglipVisionConfig(**siglip_vision_config_kwargs(model.vision),
                                               attn_implementation="eager")).float().eval()
    state = {}
    for key in ref.state_dict():
        bare = key[len("vision_model."):] if key.startswith("vision_model.") else key
        state[key] = source.read(hf_prefix + bare).float()
    ref.load_state_dict(state, strict=True)
    return ref


def _reference_projector(x: torch.Tensor, source, vit) -> torch.Tensor:
    import torch.nn.functional as F

    def get(n):
        return source.read(f"mlp_AR.{n}").float()

    m = vit.hidden_size * 4
    y = F.layer_norm(x, (m,), get("pre_norm.weight"), get("pre_norm.bias"), eps=1e-5)
    y = F.gelu(F.linear(y, get("linear_1.weight"), get("linear_1.bias")))
    return F.linear(y, get("linear_2.weight"), get("linear_2.bias"))


def verify(ckpt: str, *, keye: str | None = None, vision: str | None = None,
           llm: str | None = None, seed: int = 0, tokens: int = 32) -> dict[str, float]:
    """Max abs differences (fp32) between transformers' models on the Hugging Face weights and
    ours on CKPT, on the same random inputs: ``llm`` (logits of Qwen3ForCausalLM on text),
    ``vit`` (SiglipVisionModel's features on a frame of the learned position grid, our 2D
    rotary off), and for a Keye folder ``projector`` (vs its tensors applied with torch ops)."""
    from examples.keye_vl.model import build_model
    from examples.keye_vl.vision import PATCH

    if keye is not None:
        model = model_config_from_keye(_read_config(keye), where=f"{keye}/config.json")
        vsrc = lsrc = _AsFloat32(SafetensorsSource(keye))
        vit_prefix = KEYE_VIT
    else:
        if vision is None or llm is None:
            raise ValueError("verify needs --keye DIR, or both --vision and --llm")
        model = model_config_from_parts(_read_config(vision), _read_config(llm))
        vsrc, lsrc = _AsFloat32(SafetensorsSource(vision)), _AsFloat32(SafetensorsSource(llm))
        vit_prefix = _siglip_prefix(set(vsrc.names()))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.llm.vocab_size, (1, tokens), generator=g)
    side = model.vision.position_grid * PATCH
    frame = torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8)
    merged = torch.randn(8, model.vision.hidden_size * 4, generator=g)
    out: dict[str, float] = {}
    with torch.no_grad():
        ref_llm = _reference_llm(model, lsrc)
        want_logits = ref_llm(ids).logits
        del ref_llm
        ref_vit = _reference_vit(model, vsrc, vit_prefix)
        pixels = frame.float().div(255).sub(0.5).div(0.5).permute(2, 0, 1)[None]
        want_vit = ref_vit(pixel_values=pixels).last_hidden_state[0]
        del ref_vit
        with single_rank_megatron() as groups:
            cast = _AsFloat32(SafetensorsSource(ckpt))
            encoder, chunks = build_model(groups, model, init_from=cast)
            device = next(chunks[0].parameters()).device
            gpt = chunks[0].eval()
            positions = torch.arange(tokens, device=device)[None]
            logits = gpt(ids.to(device), positions, None).float().cpu()
            out["llm"] = (logits - want_logits).abs().max().item()
            encoder = encoder.float().eval()
            feats = encoder.vit([frame], rope=False).float().cpu()
            out["vit"] = (feats - want_vit).abs().max().item()
            if keye is not None:
                mine = encoder.projector(merged.to(device)).float().cpu()
                out["projector"] = (mine - _reference_projector(merged, vsrc,
                                                                model.vision)).abs().max().item()
    return out


# --- command line ----------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"1GiB"`` or a byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 1048576)")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit != "B" else 0
    return int(float(m.group(1)) * base ** power)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m examples.keye_vl.convert",
                                description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("from-hf", help="Hugging Face -> CKPT")
    f.add_argument("--keye", help="a Keye-VL-1.5 folder (config.json + safetensors)")
    f.add_argument("--vision", help="a SigLIP folder (stage-1 start, with --llm)")
    f.add_argument("--llm", help="a Qwen3 folder (stage-1 start, with --vision)")
    f.add_argument("--out", required=True)
    f.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="CKPT dtype (train.py's model is float32)")
    f.add_argument("--seed", type=int, default=0, help="projector initialisation (stage 1)")
    f.add_argument("--max-shard-size", type=parse_size, default="5GB")
    t = sub.add_parser("to-hf", help="CKPT -> Keye-VL-1.5 Hugging Face layout")
    t.add_argument("--ckpt", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES),
                   help="output dtype (the released model is bfloat16)")
    t.add_argument("--model", default=None, help="model name, when CKPT's config.json lacks it")
    t.add_argument("--template", default=None,
                   help="a released Keye folder whose code/tokenizer/processor files to copy")
    t.add_argument("--max-shard-size", type=parse_size, default="5GB")
    v = sub.add_parser("verify", help="transformers' models vs ours on CKPT")
    v.add_argument("--ckpt", required=True)
    v.add_argument("--keye")
    v.add_argument("--vision")
    v.add_argument("--llm")
    v.add_argument("--tolerance", type=float, default=1e-4)
    v.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.command in ("from-hf", "verify"):
        parts = args.vision is not None or args.llm is not None
        if (args.keye is None) == (not parts) or (parts and (args.vision is None
                                                            or args.llm is None)):
            p.error(f"{args.command}: give --keye DIR, or both --vision DIR and --llm DIR")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "from-hf":
            kw = dict(dtype=DTYPES[args.dtype], max_shard_bytes=args.max_shard_size)
            if args.keye:
                model = from_hf_keye(args.keye, args.out, **kw)
            else:
                model = from_hf_parts(args.vision, args.llm, args.out, seed=args.seed, **kw)
            print(f"wrote {args.out}: {model.llm.num_layers}-layer LLM, "
                  f"{model.vision.num_layers}-layer ViT")
        elif args.command == "to-hf":
            to_hf(args.ckpt, args.out, dtype=DTYPES[args.dtype], model_name=args.model,
                  template_dir=args.template, max_shard_bytes=args.max_shard_size)
            print(f"wrote {args.out}")
        else:
            diffs = verify(args.ckpt, keye=args.keye, vision=args.vision, llm=args.llm,
                           seed=args.seed)
            for component, value in diffs.items():
                print(f"max_abs_diff {component} {value:.3e}")
            bad = [c for c, v in diffs.items() if not v <= args.tolerance]
            if bad:
                print(f"above tolerance {args.tolerance}: {bad}", file=sys.stderr)
                return 1
    except (KeyError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
