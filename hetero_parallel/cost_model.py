"""Per-phase cost model: seconds of ViT work per media item and of LLM work per sample.

Two phases, each linear plus quadratic in its size (attention is quadratic, everything else is
linear), plus a constant per item:

- ViT, per media item (one image, or one video frame; attention is per image / per frame):
  ``vit(P) = a_v*P + b_v*P**2 + c_v`` with ``P`` ViT patches (``patches_per_token`` per LLM token,
  4 for a 2x2 patch merge).
- LLM, per sample (causal attention over the whole fused sequence):
  ``llm(L) = a_l*L + b_l*L**2 + c_l`` with ``L`` LLM tokens.

A frame too big for one rank may be split into contiguous slices on several ViT ranks
(sequence-parallel attention: each rank's queries attend to the keys and values of the whole
frame, gathered from the others). A slice of ``s`` of the frame's ``P`` patches costs
``a_v*s + b_v*s*P + c_v + x_v*(P - s)`` (``vit_piece_cost``): its share of the linear work, its
queries against all ``P`` keys, and the exchange of the other ``P - s`` patches' keys and values
(``x_v = vit_exchange`` seconds per patch, forward gather plus backward reduce-scatter, not
overlapped with compute). The slices of one frame add up to the whole frame's cost plus the
exchange.

Because costs are linear in the coefficients, the cost of a *group* of items (a chunk of frames, or
everything one rank did in one step) is ``a*sum(P) + b*sum(P**2) + c*count``. That is also the
design row of a measurement, so per-rank per-phase step times calibrate the model directly
(``CostModel.calibrate``, non-negative least squares; ``CostModel.refit`` for online use,
regularised towards a prior so that terms the data cannot identify keep the prior's value).

Two starting points: ``CostModel.from_model_shapes`` (training FLOPs = 3x forward FLOPs divided by a
sustained FLOP rate, with the FLOPs formulas of `hetero_parallel.flops`) and a saved calibration
(``to_json`` / ``from_json``, ``save`` / ``load``).
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

from hetero_parallel.flops import (  # noqa: F401 - re-exported: their historical home
    QWEN3_8B,
    SIGLIP_400M,
    TRAIN_FLOPS_PER_FORWARD_FLOP,
    TransformerShape,
)

Phase = Literal["vit", "llm"]
PHASES: tuple[Phase, ...] = ("vit", "llm")
_TERMS = ("linear", "quadratic", "constant")
DEFAULT_EXCHANGE_BYTES_PER_SECOND = 50e9
"""One 400 Gb/s InfiniBand link per GPU (sequence-parallel ViT groups may span nodes)."""
_JSON_FORMAT = "hetero_parallel.CostModel/1"


@dataclass(frozen=True)
class PhaseMeasurement:
    """One measured wall time: the work of one phase on one rank in one step (or any other group).

    ``sizes`` are the items processed: ViT patches per image / per frame (or per slice of a split
    frame) for ``"vit"``, LLM tokens per sample for ``"llm"``. ``frame_sizes`` (ViT only, optional)
    gives each item's whole frame in patches when some items are slices of split frames (equal to
    the item's size for a whole frame); empty means every item is whole.
    """

    phase: Phase
    sizes: tuple[int, ...]
    seconds: float
    frame_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"PhaseMeasurement.phase must be one of {PHASES}, got {self.phase!r}")
        sizes = _positive_ints("PhaseMeasurement.sizes", self.sizes)
        object.__setattr__(self, "sizes", sizes)
        if not math.isfinite(self.seconds) or self.seconds < 0:
            raise ValueError(
                f"PhaseMeasurement.seconds must be finite and >= 0, got {self.seconds}"
            )
        frames = _positive_ints("PhaseMeasurement.frame_sizes", self.frame_sizes)
        if frames:
            if self.phase != "vit" or len(frames) != len(sizes):
                raise ValueError(
                    f"PhaseMeasurement.frame_sizes needs phase 'vit' and one entry per item: got "
                    f"phase {self.phase!r}, {len(frames)} frame sizes for {len(sizes)} items")
            bad = [(s, f) for s, f in zip(sizes, frames, strict=True) if s > f]
            if bad:
                raise ValueError(f"PhaseMeasurement: a slice of {bad[0][0]} patches is larger "
                                 f"than its frame of {bad[0][1]}")
        object.__setattr__(self, "frame_sizes", frames)

    def design_row(self) -> tuple[int, int, int]:
        """``(sum(s), sum(s * frame), count)``: the coefficients' multipliers in this record's cost
        (``sum(s**2)`` when every item is whole)."""
        frames = self.frame_sizes or self.sizes
        return (sum(self.sizes), sum(s * f for s, f in zip(self.sizes, frames, strict=True)),
                len(self.sizes))

    def exchanged(self) -> int:
        """Patches whose keys and values were exchanged for split frames: ``sum(frame - s)``."""
        if not self.frame_sizes:
            return 0
        return sum(f - s for s, f in zip(self.sizes, self.frame_sizes, strict=True))


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
    vit_exchange: float = 0.0
    """``x_v``: seconds per patch whose keys and values a slice of a split frame receives from
    the other slices (forward all-gather plus backward reduce-scatter; see `vit_piece_cost`)."""

    def __post_init__(self) -> None:
        for name in ("vit_linear", "vit_quadratic", "vit_constant",
                     "llm_linear", "llm_quadratic", "llm_constant", "vit_exchange"):
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

    def vit_piece_cost(self, piece_patches: ArrayLike, frame_patches: ArrayLike
                       ) -> np.ndarray | np.float64:
        """Seconds of ViT work for a slice of ``piece_patches`` of a frame of ``frame_patches``
        processed with sequence-parallel attention: ``a_v*s + b_v*s*P + c_v + x_v*(P - s)``.
        Equals ``vit_cost(P)`` for the whole frame (``s == P``)."""
        s = np.asarray(piece_patches, dtype=np.float64)
        p = np.asarray(frame_patches, dtype=np.float64)
        return (self.vit_linear * s + self.vit_quadratic * (s * p) + self.vit_constant
                + self.vit_exchange * (p - s))

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
        exchange_bytes_per_second: float = DEFAULT_EXCHANGE_BYTES_PER_SECOND,
        exchange_bytes_per_element: int = 2,
    ) -> CostModel:
        """Training (forward + backward) FLOPs divided by a sustained rate ``flops_per_second``.

        E.g. ``flops_per_second = 0.4 * 989e12`` for an H100 at 40% MFU in BF16. Constants are 0.
        The FLOPs come from `hetero_parallel.flops` (``TransformerShape``'s per-token and
        attention coefficients). ``vit_exchange`` is the time to receive one patch's keys and
        values of every ViT layer (``vit_shape.kv_bytes_per_token``) forward and send their
        gradients backward, at ``exchange_bytes_per_second`` (default: one 400 Gb/s link per GPU,
        the worst case of a group that spans nodes; NVLink inside a node is ~5-10x faster).
        """
        if not math.isfinite(flops_per_second) or flops_per_second <= 0:
            raise ValueError(
                f"flops_per_second must be a finite number > 0, got {flops_per_second}"
            )
        if not math.isfinite(exchange_bytes_per_second) or exchange_bytes_per_second <= 0:
            raise ValueError(f"exchange_bytes_per_second must be a finite number > 0, got "
                             f"{exchange_bytes_per_second}")
        scale = TRAIN_FLOPS_PER_FORWARD_FLOP / flops_per_second
        exchange = 2 * vit_shape.kv_bytes_per_token(exchange_bytes_per_element) \
            / exchange_bytes_per_second
        llm_linear = llm_shape.linear_flops_per_token()
        if include_lm_head:
            llm_linear += llm_shape.lm_head_flops_per_token()
        return cls(
            vit_linear=vit_shape.linear_flops_per_token() * scale,
            vit_quadratic=vit_shape.attention_flops_coefficient() * scale,
            llm_linear=llm_linear * scale,
            llm_quadratic=llm_shape.attention_flops_coefficient() * scale,
            patches_per_token=patches_per_token,
            vit_exchange=exchange,
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
        exchange = fallback.vit_exchange if fallback is not None else 0.0
        rows, times = _design(measurements, exchange)
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
            for term, value in zip(_TERMS, coef, strict=True):
                fitted[f"{phase}_{term}"] = value
        if patches_per_token is None:
            patches_per_token = fallback.patches_per_token if fallback is not None else 4
        return cls(**fitted, patches_per_token=patches_per_token, vit_exchange=exchange)

    def refit(self, measurements: Iterable[PhaseMeasurement], *, prior: CostModel | None = None,
              strength: float = 0.05) -> CostModel:
        """This model refitted to ``measurements``, regularised towards ``prior`` (default: this
        model). For online calibration every K steps: pass the per-rank phase times of the last
        steps (gathered from all ranks) and the FLOPs model as ``prior``.

        Per phase with records, with ``A`` the design rows (``PhaseMeasurement.design_row``),
        ``t`` the measured seconds minus the modelled K/V exchange of split frames, and ``p`` the
        prior's coefficients, it solves (non-negative least squares on an augmented system)::

            min_{x >= 0}  ||A x - t||**2 + strength * sum_i (||A[:, i]|| * (x_i - p_i))**2

        Each coefficient's penalty is in the units of the data it explains: ``strength`` is how
        much the prior weighs against all the records (0.05: like 5% of them), whatever their
        count and scale. Well-determined terms follow the data. Terms the records cannot tell
        apart (every item the same size, no large items, a term swamped by another) are not
        dropped to 0, as plain NNLS does, but moved from the prior as little as explains the
        records (sharing the change equally in the data's units); a term the records do not
        touch at all stays at the prior. A phase without records keeps this model's
        coefficients; ``patches_per_token`` and ``vit_exchange`` are not fitted (kept).

        Deterministic: the records are sorted first, so the same records in any order give
        bit-identical coefficients on every rank (the caller must hand every rank the same
        records, e.g. all-gathered).
        """
        if not isinstance(strength, int | float) or not math.isfinite(strength) or strength <= 0:
            raise ValueError(f"refit: strength must be a finite number > 0, got {strength!r}")
        prior = self if prior is None else prior
        rows, times = _design(measurements, self.vit_exchange)
        fitted: dict[str, float] = {}
        for phase in PHASES:
            coef = self.coefficients(phase)
            if rows[phase]:
                design = np.asarray(rows[phase], dtype=np.float64)
                target = np.asarray(times[phase], dtype=np.float64)
                anchor = np.asarray(prior.coefficients(phase), dtype=np.float64)
                norms = np.linalg.norm(design, axis=0)
                free = norms > 0  # a term no record touches stays at the prior
                weight = math.sqrt(strength) * norms[free]
                a = np.vstack([design[:, free], np.diag(weight)])
                b = np.concatenate([target, weight * anchor[free]])
                x = anchor.copy()
                x[free] = nnls(a, b)
                coef = tuple(float(v) for v in x)
            for term, value in zip(_TERMS, coef, strict=True):
                fitted[f"{phase}_{term}"] = value
        return CostModel(**fitted, patches_per_token=self.patches_per_token,
                         vit_exchange=self.vit_exchange)

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


def _design(measurements: Iterable[PhaseMeasurement], exchange: float
            ) -> tuple[dict[Phase, list[tuple[int, int, int]]], dict[Phase, list[float]]]:
    """Per phase: the design rows and the seconds left once the modelled exchange of split frames
    (``exchange`` seconds per exchanged patch) is taken off, sorted by (row, seconds) so that
    the fit does not depend on the records' order."""
    records: dict[Phase, list[tuple[tuple[int, int, int], float]]] = {"vit": [], "llm": []}
    for m in measurements:
        records[m.phase].append((m.design_row(), m.seconds - exchange * m.exchanged()))
    rows: dict[Phase, list[tuple[int, int, int]]] = {}
    times: dict[Phase, list[float]] = {}
    for phase, recs in records.items():
        recs.sort()
        rows[phase] = [r for r, _ in recs]
        times[phase] = [t for _, t in recs]
    return rows, times


def _positive_ints(name: str, values) -> tuple[int, ...]:
    values = tuple(values)
    bad = [v for v in values if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 1]
    if bad:
        raise ValueError(f"{name} must be ints >= 1, got {bad[0]!r}")
    return tuple(int(v) for v in values)


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

