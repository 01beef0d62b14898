"""Model sizes, the four Keye-VL-1.5 pre-training stages and the post-training stages as configs.

- stage 1 (alignment): only the projector trains; ViT and LLM are frozen.
- stage 2 (multi-task pre-training): everything trains, 8K context.
- stage 3 (annealing): long context, RoPE base 1e6 -> 8e6, context + pipeline parallelism,
  token mix video:image:text = 24:50:26.
- stage 4 (model fusion): no training; ``merge.py`` averages an expert checkpoint into the base.

Post-training (after stage 4's fused model):

- ``sft``: supervised fine-tuning on multi-turn chat data with images and videos, the loss on
  assistant turns only, samples packed under a token budget per micro-batch;
- ``mpo``: mixed preference optimisation on (prompt, chosen, rejected) records
  (`hetero_parallel.objectives.MixedPreferenceObjective`, the published 0.8 / 0.2 / 1.0 weights),
  against reference log-probs precomputed once from the SFT model
  (``train.py --stage mpo --reference-pass``, `dataloader.reference_logps`).

The paper gives no post-training learning rates; the ones here are common choices for full
fine-tuning (SFT) and DPO-style training (MPO) of 8B models, meant to be overridden (``--lr``).

Every trained stage starts from the previous stage's checkpoint (``init_from``); stage 1 starts
from SigLIP + Qwen3 and fine-tuning from the released model, both converted by
``python -m examples.keye_vl.convert from-hf``. ``keye-vl-1.5-8b`` is the released architecture:
`examples.keye_vl.hf_config.RELEASED_KEYE_VL_1_5_8B` records its ``config.json`` with sources.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from examples.keye_vl.llm import QWEN3_8B, TINY, LLMShape
from examples.keye_vl.vision import SIGLIP_400M, TINY_VISION, VisionShape
from hetero_parallel.cost_model import CostModel, TransformerShape

COMPONENTS = ("vision", "projector", "llm")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A Keye-VL model: the ViT + projector and the LLM."""

    name: str
    llm: LLMShape
    """The Qwen3 decoder (multimodal RoPE)."""
    vision: VisionShape
    """The SigLIP tower with Keye's changes, and the projector into ``llm.hidden_size``."""


MODELS = {
    "tiny": ModelConfig(name="tiny", llm=TINY, vision=TINY_VISION),
    "keye-vl-1.5-8b": ModelConfig(name="keye-vl-1.5-8b", llm=QWEN3_8B, vision=SIGLIP_400M),
}


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """One pre-training stage. Parallel sizes are for the 8B model on a cluster; the CPU demo
    overrides them from the command line."""

    stage: int | str
    """1-3 (pre-training) or "sft" / "mpo" (post-training)."""
    name: str
    trainable: frozenset[str]
    """Which of ``COMPONENTS`` receive gradients."""
    seq_len: int
    rotary_base: float
    mixture: dict[str, float] | None = field(default=None)
    """Dataset weights (None: the manifest's natural mix)."""
    tp: int = 1
    pp: int = 1
    cp: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    """The learning rate decays (cosine) to ``lr * min_lr_ratio`` by the last step."""
    warmup_ratio: float = 0.0
    """Linear warm-up over this fraction of the steps."""
    init_from: int | str | None = None
    """The stage whose checkpoint this one starts from."""
    token_budget: int | None = None
    """Packing budget: at most this many tokens per micro-batch (None: no cap)."""
    objective: Literal["token", "mpo"] = "token"
    """Token cross-entropy, or MPO on preference pairs (the loader's preference mode)."""

    def __post_init__(self) -> None:
        unknown = set(self.trainable) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"stage {self.stage}: unknown components {sorted(unknown)}; "
                             f"expected a subset of {COMPONENTS}")
        if self.objective not in ("token", "mpo"):
            raise ValueError(f"stage {self.stage}: objective must be 'token' or 'mpo', got "
                             f"{self.objective!r}")


STAGES = {
    1: StageConfig(stage=1, name="alignment", trainable=frozenset({"projector"}), seq_len=8192,
                   rotary_base=1e6, lr=1e-3),
    2: StageConfig(stage=2, name="pretrain", trainable=frozenset(COMPONENTS), seq_len=8192,
                   rotary_base=1e6, init_from=1),
    3: StageConfig(stage=3, name="anneal", trainable=frozenset(COMPONENTS), seq_len=131_072,
                   rotary_base=8e6, mixture={"video": 24.0, "image": 50.0, "text": 26.0},
                   tp=4, pp=4, cp=8, lr=2e-5, init_from=2),
    "sft": StageConfig(stage="sft", name="sft", trainable=frozenset(COMPONENTS), seq_len=32_768,
                       rotary_base=8e6, tp=2, pp=2, lr=1e-5, warmup_ratio=0.03, init_from=3,
                       token_budget=32_768),
    "mpo": StageConfig(stage="mpo", name="mpo", trainable=frozenset(COMPONENTS), seq_len=32_768,
                       rotary_base=8e6, tp=2, pp=2, lr=1e-6, warmup_ratio=0.05, init_from="sft",
                       token_budget=32_768, objective="mpo"),
}
"""Stage 4 (fusion) is ``merge.py``, not a training run."""


def transformer_shapes(model: ModelConfig) -> tuple[TransformerShape, TransformerShape]:
    """(ViT, LLM) shapes for FLOPs counting (`hetero_parallel.flops`) and the cost model."""
    llm, vit = model.llm, model.vision
    return (
        TransformerShape(num_layers=vit.num_layers, hidden_size=vit.hidden_size,
                         num_attention_heads=vit.num_heads,
                         head_dim=vit.hidden_size // vit.num_heads, num_query_groups=vit.num_heads,
                         ffn_hidden_size=vit.ffn_hidden_size, gated_mlp=False, causal=False),
        TransformerShape(num_layers=llm.num_layers, hidden_size=llm.hidden_size,
                         num_attention_heads=llm.num_attention_heads, head_dim=llm.head_dim,
                         num_query_groups=llm.num_query_groups,
                         ffn_hidden_size=llm.ffn_hidden_size, gated_mlp=True, causal=True,
                         vocab_size=llm.vocab_size),
    )


def cost_model_for(model: ModelConfig, flops_per_second: float | None = None) -> CostModel:
    """FLOPs cost model of ``model`` (forward + backward), at ``flops_per_second``.

    Default rate: an H100 at 40% MFU in BF16 when CUDA is available, else a nominal 10 GFLOP/s
    (only relative costs matter for balancing). Online calibration refits it to measured times
    (``train.py --calibrate-every``).
    """
    if flops_per_second is None:
        flops_per_second = 0.4 * 989e12 if torch.cuda.is_available() else 1e10
    return CostModel.from_model_shapes(*transformer_shapes(model),
                                       flops_per_second=flops_per_second)
