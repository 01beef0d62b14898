"""Per-phase cost model: seconds of ViT work per media item and of LLM work per sample.

Two phases, each linear plus quadratic in its size (attention is quadratic, everything else is
linear), plus a constant per item:

- ViT, per media item (one image, or one video frame; attention is per image / per frame):
  ``vit(P) = a_v*P + b_v*P**2 + c_v`` with ``P`` ViT patches (``patches_per_token`` per LLM token,
  4 for a 2x2 patch merge).
- LLM, per sample (causal attention over the whole fused sequence):
  ``llm(L) = a_l*L + b_l*L**2 + c_l`` with ``L`` LLM tokens.

Because costs are linear in the coefficients, the cost of a *group* of items (a chunk of frames, or
everything one rank did in one step) is ``a*sum(P) + b*sum(P**2) + c*count``. That is also the
design row of a measurement, so per-rank per-phase step times calibrate the model directly
(``CostModel.calibrate``, non-negative least squares).

Two starting points: ``CostModel.from_model_shapes`` (training FLOPs = 3x forward FLOPs divided by a
sustained FLOP rate) and a saved calibration (``to_json`` / ``from_json``, ``save`` / ``load``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

Phase = Literal["vit", "llm"]
PHASES: tuple[Phase, ...] = ("vit", "llm")
TRAIN_FLOPS_PER_FORWARD_FLOP = 3
"""Forward + backward = 3x forward (backward computes input and weight gradients: 2x forward)."""
_JSON_FORMAT = "hetero_parallel.CostModel/1"


@dataclass(frozen=True, kw_only=True)
class TransformerShape:
    """The shape numbers of a transformer stack that determine its FLOPs.

    Only the transformer layers are counted (no embedding, no LM head, no norms or softmax): for
    the models here those are a few percent of the total (see ``lm_head_flops_per_token``).
    """

    num_layers: int
    hidden_size: int
    """Model width ``d``: input and output width of the attention and MLP blocks."""
    num_attention_heads: int
    head_dim: int
    num_query_groups: int
    """Key/value heads (grouped-query attention); equal to ``num_attention_heads`` for MHA."""
    ffn_hidden_size: int
    gated_mlp: bool
    """SwiGLU-style MLP (three matrices) instead of two."""
    causal: bool
    """Causal attention computes half of the score matrix."""
    vocab_size: int = 0
    """Output vocabulary (for ``lm_head_flops_per_token``); 0 when there is no LM head."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "head_dim",
                     "num_query_groups", "ffn_hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TransformerShape.{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_query_groups({self.num_query_groups}) must divide "
                f"num_attention_heads({self.num_attention_heads})"
            )
        if self.vocab_size < 0:
            raise ValueError(f"vocab_size must be >= 0, got {self.vocab_size}")

    def linear_params_per_layer(self) -> int:
        """Weights of one layer's matrices: Q, K, V, output projection and the MLP."""
        q_width = self.num_attention_heads * self.head_dim
        kv_width = self.num_query_groups * self.head_dim
        attention = self.hidden_size * (q_width + 2 * kv_width) + q_width * self.hidden_size
        mlp = (3 if self.gated_mlp else 2) * self.hidden_size * self.ffn_hidden_size
        return attention + mlp

    def linear_flops_per_token(self) -> int:
        """Forward FLOPs per token of all matrix multiplies (2 FLOPs per weight per token)."""
        return 2 * self.num_layers * self.linear_params_per_layer()

    def attention_flops_coefficient(self) -> float:
        """Forward attention FLOPs of one sequence of length ``S`` divided by ``S**2``.

        ``Q K^T`` and ``softmax(.) V`` each cost ``2 * S**2 * heads * head_dim``; causal attention
        computes half of them.
        """
        full = 4 * self.num_attention_heads * self.head_dim * self.num_layers
        return full / 2 if self.causal else float(full)

    def lm_head_flops_per_token(self) -> int:
        """Forward FLOPs per token of the output projection (0 without an LM head)."""
        return 2 * self.hidden_size * self.vocab_size


SIGLIP_400M = TransformerShape(
    num_layers=27, hidden_size=1152, num_attention_heads=16, head_dim=72, num_query_groups=16,
    ffn_hidden_size=4304, gated_mlp=False, causal=False,
)
"""SigLIP so400m-patch14-384, the Keye-VL-1.5 ViT (bidirectional attention per image / frame)."""

QWEN3_8B = TransformerShape(
    num_layers=36, hidden_size=4096, num_attention_heads=32, head_dim=128, num_query_groups=8,
    ffn_hidden_size=12288, gated_mlp=True, causal=True, vocab_size=151_936,
)
"""Qwen3-8B, the Keye-VL-1.5 LLM."""


@dataclass(frozen=True)
class PhaseMeasurement:
    """One measured wall time: the work of one phase on one rank in one step (or any other group).

    ``sizes`` are the items processed: ViT patches per image / per frame for ``"vit"``, LLM tokens
    per sample for ``"llm"``.
    """

    phase: Phase
    sizes: tuple[int, ...]
    seconds: float

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"PhaseMeasurement.phase must be one of {PHASES}, got {self.phase!r}")
        sizes = tuple(self.sizes)
        bad = [s for s in sizes
               if not isinstance(s, int | np.integer) or isinstance(s, bool) or s < 1]
        if bad:
            raise ValueError(f"PhaseMeasurement.sizes must be ints >= 1, got {bad[0]!r}")
        object.__setattr__(self, "sizes", tuple(int(s) for s in sizes))
        if not math.isfinite(self.seconds) or self.seconds < 0:
            raise ValueError(
                f"PhaseMeasurement.seconds must be finite and >= 0, got {self.seconds}"
            )

    def design_row(self) -> tuple[int, int, int]:
        """``(sum(s), sum(s**2), count)``: the coefficients' multipliers in this record's cost."""
        return (sum(self.sizes), sum(s * s for s in self.sizes), len(self.sizes))


@dataclass(frozen=True, kw_only=True)
class CostModel:
    """Seconds per ViT item and per LLM sample. All coefficients are finite and >= 0.

    Vectorised: the ``*_cost`` methods accept ints or integer numpy arrays.
    """

    vit_linear: float
    """``a_v``: seconds per ViT patch."""
    vit_quadratic: float
    """``b_v``: seconds per squared patch count of one image / frame (attention)."""
    vit_constant: float = 0.0
    """``c_v``: seconds per image / frame (launch and packing overhead)."""
    llm_linear: float
    """``a_l``: seconds per LLM token."""
    llm_quadratic: float
    """``b_l``: seconds per squared token count of one sample (causal attention)."""
    llm_constant: float = 0.0
    """``c_l``: seconds per sample."""
    patches_per_token: int = 4
    """ViT patches per LLM token (2x2 patch merge in the projector)."""

    def __post_init__(self) -> None:
        for name in ("vit_linear", "vit_quadratic", "vit_constant",
                     "llm_linear", "llm_quadratic", "llm_constant"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"CostModel.{name} must be a finite number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not isinstance(self.patches_per_token, int) or self.patches_per_token < 1:
            raise ValueError(
                "CostModel.patches_per_token must be a positive int, got "
                f"{self.patches_per_token!r}"
            )

    # --- evaluation -----------------------------------------------------------------------------
    def vit_cost(self, patches: ArrayLike) -> np.ndarray | np.float64:
        """Seconds of ViT work for one image / frame of ``patches`` patches (int or array)."""
        p = np.asarray(patches, dtype=np.float64)
        return self.vit_linear * p + self.vit_quadratic * (p * p) + self.vit_constant

    def vit_cost_of_tokens(self, tokens: ArrayLike) -> np.ndarray | np.float64:
        """``vit_cost`` for an image / frame given in LLM tokens."""
        return self.vit_cost(np.asarray(tokens, dtype=np.int64) * self.patches_per_token)

    def llm_cost(self, tokens: ArrayLike) -> np.ndarray | np.float64:
        """Seconds of LLM work for one sample of ``tokens`` tokens (int or array)."""
        t = np.asarray(tokens, dtype=np.float64)
        return self.llm_linear * t + self.llm_quadratic * (t * t) + self.llm_constant

    def group_cost(self, phase: Phase, sum_sizes: ArrayLike, sum_squares: ArrayLike,
                   count: ArrayLike) -> np.ndarray | np.float64:
        """Cost of a group of items from its sums (exact integer sums keep this deterministic)."""
        a, b, c = self.coefficients(phase)
        s = np.asarray(sum_sizes, dtype=np.float64)
        s2 = np.asarray(sum_squares, dtype=np.float64)
        n = np.asarray(count, dtype=np.float64)
        return a * s + b * s2 + c * n

    def coefficients(self, phase: Phase) -> tuple[float, float, float]:
        """``(linear, quadratic, constant)`` of ``phase``."""
        if phase == "vit":
            return (self.vit_linear, self.vit_quadratic, self.vit_constant)
        if phase == "llm":
            return (self.llm_linear, self.llm_quadratic, self.llm_constant)
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")

    # --- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_model_shapes(
        cls,
        vit_shape: TransformerShape = SIGLIP_400M,
        llm_shape: TransformerShape = QWEN3_8B,
        *,
        flops_per_second: float,
        include_lm_head: bool = True,
        patches_per_token: int = 4,
    ) -> CostModel:
        """Training (forward + backward) FLOPs divided by a sustained rate ``flops_per_second``.

        E.g. ``flops_per_second = 0.4 * 989e12`` for an H100 at 40% MFU in BF16. Constants are 0.
        """
        if not math.isfinite(flops_per_second) or flops_per_second <= 0:
            raise ValueError(
                f"flops_per_second must be a finite number > 0, got {flops_per_second}"
            )
        scale = TRAIN_FLOPS_PER_FORWARD_FLOP / flops_per_second
        llm_linear = llm_shape.linear_flops_per_token()
        if include_lm_head:
            llm_linear += llm_shape.lm_head_flops_per_token()
        return cls(
            vit_linear=vit_shape.linear_flops_per_token() * scale,
            vit_quadratic=vit_shape.attention_flops_coefficient() * scale,
            llm_linear=llm_linear * scale,
            llm_quadratic=llm_shape.attention_flops_coefficient() * scale,
            patches_per_token=patches_per_token,
        )

    @classmethod
    def calibrate(
        cls,
        measurements: Iterable[PhaseMeasurement],
        *,
        fallback: CostModel | None = None,
        patches_per_token: int | None = None,
    ) -> CostModel:
        """Fit each phase's ``(linear, quadratic, constant)`` by non-negative least squares.

        Each record contributes one equation ``a*sum(s) + b*sum(s**2) + c*count = seconds``
        (unweighted: dividing by the measured seconds would bias the fit towards records whose
        noise made them short). A phase
        without records keeps ``fallback``'s coefficients (``ValueError`` when there is no
        fallback). A phase whose records cannot separate the three terms (design matrix rank < 3:
        e.g. every record the same size and count) is a ``ValueError`` naming how many distinct
        rows it got: vary the sizes, or pass fewer phases and a ``fallback``.
        """
        rows: dict[Phase, list[tuple[int, int, int]]] = {"vit": [], "llm": []}
        times: dict[Phase, list[float]] = {"vit": [], "llm": []}
        for m in measurements:
            rows[m.phase].append(m.design_row())
            times[m.phase].append(m.seconds)
        fitted: dict[str, float] = {}
        for phase in PHASES:
            if not rows[phase]:
                if fallback is None:
                    raise ValueError(
                        f"no {phase!r} measurements and no fallback model to take them from"
                    )
                coef = fallback.coefficients(phase)
            else:
                design = np.asarray(rows[phase], dtype=np.float64)
                rank = np.linalg.matrix_rank(design)
                if rank < 3:
                    raise ValueError(
                        f"{phase!r} measurements determine only {rank} of 3 coefficients "
                        f"({len(rows[phase])} records, {len(set(rows[phase]))} distinct "
                        "(sum, sum of squares, count) rows): vary item sizes and counts"
                    )
                coef = tuple(float(v) for v in nnls(design, np.asarray(times[phase])))
            for term, value in zip(("linear", "quadratic", "constant"), coef, strict=True):
                fitted[f"{phase}_{term}"] = value
        if patches_per_token is None:
            patches_per_token = fallback.patches_per_token if fallback is not None else 4
        return cls(**fitted, patches_per_token=patches_per_token)

    # --- serialisation --------------------------------------------------------------------------
    def to_json(self) -> str:
        """A JSON object with a ``format`` tag and every field (floats round-trip exactly)."""
        return json.dumps({"format": _JSON_FORMAT, **asdict(self)}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CostModel:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != _JSON_FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not a saved CostModel: format is {got!r}, expected {_JSON_FORMAT!r}")
        del data["format"]
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        return cls.from_json(Path(path).read_text())


def nnls(a: np.ndarray, b: np.ndarray, *, max_iter: int | None = None) -> np.ndarray:
    """Non-negative least squares ``argmin_{x >= 0} ||a x - b||_2`` (Lawson-Hanson active set).

    Columns are scaled to unit norm first (the columns here differ by ~10 orders of magnitude) and
    the solution is scaled back. ``a`` is ``(rows, cols)``, ``b`` is ``(rows,)``.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.shape != (a.shape[0],):
        raise ValueError(f"nnls needs a (rows, cols) matrix and a (rows,) vector, got {a.shape}, "
                         f"{b.shape}")
    norms = np.linalg.norm(a, axis=0)
    norms[norms == 0] = 1.0
    a = a / norms
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 10 * np.finfo(np.float64).eps * max(1.0, float(np.abs(a).max(initial=0.0))) * max(a.shape)
    for _ in range(max_iter if max_iter is not None else 3 * n + 10):
        w = a.T @ (b - a @ x)  # negative gradient
        candidates = ~passive & (w > tol)
        if not candidates.any():
            break
        passive[np.argmax(np.where(candidates, w, -np.inf))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            # Step from x towards z until the first passive coefficient reaches zero.
            blocking = passive & (z <= 0)
            alpha = np.min(x[blocking] / (x[blocking] - z[blocking]))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x / norms

