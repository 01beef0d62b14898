"""`ParallelPlan`: a pure description of where the ViT and the LLM run.

The LLM is laid out exactly as megatron-core lays it out (``initialize_model_parallel`` with the
same sizes and ``order``): a rank's coordinates are the digits of a mixed-radix number whose digits
are read in ``order`` from the fastest-varying (``tp`` by default) to the slowest (``pp``). The ViT
runs pure data parallelism over ``vit_ranks`` (every rank by default), independent of that layout.

Everything here is arithmetic on integers: no process group, no torch. A plan for 100,000 ranks
answers any rank's coordinates and groups in O(group size).

Terms:
- *LLM replica*: one data-parallel copy of the LLM (``dp`` of them), spread over ``tp*cp*pp`` ranks.
- *first stage*: the ranks of a replica with pipeline coordinate 0; they embed tokens and receive
  the visual embeddings.
- *token loaders*: per replica, on the first and on the last pipeline stage, the rank with
  ``tp == cp == 0``; it loads the token ids (the first stage embeds them, the last stage takes the
  labels from them) and broadcasts them over its tensor-and-context group (megatron's ``tp-cp``).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

LLM_DIMS: tuple[str, ...] = ("tp", "cp", "dp", "pp")
DEFAULT_ORDER = "tp-cp-ep-dp-pp"
"""megatron-core's default rank order (``ep`` has size 1 here: dense LLMs)."""
ORDER_NAMES: tuple[str, ...] = ("tp", "cp", "ep", "dp", "pp")
"""The names megatron-core's ``RankGenerator`` knows in an ``order``."""
_PREVIEW = 8
"""At most this many offending values are quoted in an error message."""


@dataclass(frozen=True)
class RankCoords:
    """A rank's LLM coordinates and its place in the ViT data-parallel group."""

    rank: int
    tp: int
    cp: int
    dp: int
    pp: int
    vit: int | None
    """Index of this rank in the ViT data-parallel group, or None if it hosts no ViT replica."""


@dataclass(frozen=True)
class DataRole:
    """What a rank must load for one step."""

    loads_pixels: bool
    """Hosts a ViT replica: fetches the pixels of the media items the balancer gives it."""
    loads_tokens: bool
    """A token loader of its replica: fetches token ids and broadcasts them to its TP/CP peers."""
    needs_tokens: bool
    """On its replica's first or last pipeline stage: gets the token ids (inputs or labels)."""
    receives_visual: bool
    """On its replica's first pipeline stage: receives routed visual embeddings."""
    llm_replica: int


@dataclass(frozen=True, kw_only=True)
class ParallelPlan:
    """Sizes and placement of a heterogeneous ViT + LLM job.

    Invariants (checked in ``__post_init__``, ``ValueError`` with the numbers otherwise):
    sizes are integers >= 1 (Python or numpy, not bool; stored as ``int``); ``tp * cp * pp``
    divides ``world_size``; ``dp = world_size // (tp * cp * pp)``; ``vpp`` needs ``pp > 1``;
    ``sequence_parallel`` needs ``tp > 1``; ``vit_ranks`` is a non-empty, strictly increasing
    sequence of integer ranks in ``[0, world_size)`` (stored as a tuple of ``int``); ``order`` is
    one that megatron-core 0.16's ``initialize_model_parallel`` accepts for these sizes (see
    `megatron_dims`), so an impossible order fails here, before any process group exists.
    """

    world_size: int
    """Total number of processes."""
    tp: int = 1
    """LLM tensor-parallel size."""
    pp: int = 1
    """LLM pipeline-parallel size."""
    cp: int = 1
    """LLM context-parallel size."""
    vpp: int | None = None
    """Virtual pipeline stages per rank (interleaved 1F1B), or None."""
    sequence_parallel: bool = False
    """megatron's sequence parallelism: activations outside attention and MLP are split along the
    sequence over the TP group (needs ``tp > 1``, as megatron-core requires)."""
    order: str = DEFAULT_ORDER
    """megatron-core rank order, fastest-varying dimension first, passed to megatron unchanged;
    dimensions of size 1 may be left out where megatron allows it."""
    vit_ranks: tuple[int, ...] | None = None
    """Ranks that host a ViT replica; None means every rank."""
    _dims: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("world_size", "tp", "pp", "cp"):
            object.__setattr__(self, name, _positive_int(name, getattr(self, name)))
        model = self.tp * self.cp * self.pp
        if self.world_size % model != 0:
            raise ValueError(
                f"tp({self.tp}) * cp({self.cp}) * pp({self.pp}) = {model} "
                f"does not divide world_size({self.world_size})"
            )
        if self.vpp is not None:
            object.__setattr__(self, "vpp", _positive_int("vpp", self.vpp, "None or "))
            if self.pp == 1:
                raise ValueError(
                    f"vpp({self.vpp}) needs pipeline parallelism, but pp is 1 "
                    "(interleaving needs pp > 1)"
                )
        if not isinstance(self.sequence_parallel, bool):
            raise ValueError(f"sequence_parallel must be a bool, got {self.sequence_parallel!r}")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError(
                "sequence_parallel=True needs tensor parallelism, but tp is 1 (megatron-core "
                "splits the sequence over the TP group and refuses it with tp == 1)"
            )
        object.__setattr__(
            self, "_dims", megatron_dims(self.order, tp=self.tp, cp=self.cp, dp=self.dp, pp=self.pp)
        )
        if self.vit_ranks is None:
            object.__setattr__(self, "vit_ranks", tuple(range(self.world_size)))
        else:
            object.__setattr__(self, "vit_ranks", _check_vit_ranks(self.vit_ranks, self.world_size))

    # ---- sizes ---------------------------------------------------------------------------------

    @property
    def dp(self) -> int:
        """LLM data-parallel size (number of LLM replicas)."""
        return self.world_size // (self.tp * self.cp * self.pp)

    @property
    def seq_len_divisor(self) -> int:
        """What every LLM micro-batch sequence length must be divisible by (pad up to it).

        ``(tp if sequence_parallel else 1) * (2 * cp if cp > 1 else 1)``. Context parallelism
        cuts the sequence into ``2 * cp`` equal chunks and gives CP rank ``r`` chunks ``r`` and
        ``2 * cp - 1 - r``, so every rank gets the same share of causal-attention work (megatron's
        load-balanced split); sequence parallelism scatters the sequence over the ``tp`` ranks of
        the TP group, and with CP each of the ``2 * cp`` chunks is split so. Without either the
        length is free (1). megatron-core's own multimodal models pad to the same factor
        (``models.multimodal.context_parallel.get_padding``). This is the one home of the padding
        rule: the loader, the routing and the trainer read it from here.
        """
        return (self.tp if self.sequence_parallel else 1) * (2 * self.cp if self.cp > 1 else 1)

    @property
    def sample_len_divisor(self) -> int:
        """What every sample's span in a packed (THD) micro-batch must be divisible by:
        ``2 * cp if cp > 1 else 1``. With packing, CP splits each sample (not the row) into
        ``2 * cp`` chunks (TransformerEngine's THD layout); the packed row as a whole still
        follows `seq_len_divisor`."""
        return 2 * self.cp if self.cp > 1 else 1

    @property
    def vit_dp(self) -> int:
        """ViT data-parallel size (number of ViT replicas)."""
        return len(self.vit_ranks)

    def size(self, dim: str) -> int:
        if dim not in LLM_DIMS:
            raise ValueError(f"unknown dimension {dim!r}; expected one of {LLM_DIMS}")
        return getattr(self, dim)

    def _stride(self, dim: str) -> int:
        stride = 1
        for d in self._dims:
            if d == dim:
                return stride
            stride *= self.size(d)
        raise AssertionError(dim)

    # ---- coordinates ---------------------------------------------------------------------------

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size({self.world_size}))")

    def coords(self, rank: int) -> RankCoords:
        """The LLM coordinates of ``rank`` and its ViT index."""
        self._check_rank(rank)
        digits = {d: (rank // self._stride(d)) % self.size(d) for d in LLM_DIMS}
        return RankCoords(rank=rank, vit=self.vit_index(rank), **digits)

    def rank_of(self, *, tp: int = 0, cp: int = 0, dp: int = 0, pp: int = 0) -> int:
        """The rank with the given LLM coordinates."""
        coords = {"tp": tp, "cp": cp, "dp": dp, "pp": pp}
        for d, v in coords.items():
            if not 0 <= v < self.size(d):
                raise ValueError(f"{d} coordinate {v} is outside [0, {d}({self.size(d)}))")
        return sum(v * self._stride(d) for d, v in coords.items())

    def vit_index(self, rank: int) -> int | None:
        """Position of ``rank`` in the ViT data-parallel group, or None."""
        lo, hi = 0, len(self.vit_ranks)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.vit_ranks[mid] < rank:
                lo = mid + 1
            else:
                hi = mid
        return lo if lo < len(self.vit_ranks) and self.vit_ranks[lo] == rank else None

    # ---- groups --------------------------------------------------------------------------------

    def group(self, rank: int, dims: str) -> tuple[int, ...]:
        """Ranks that share every LLM coordinate of ``rank`` outside ``dims``, ascending.

        ``dims`` is megatron's token syntax: ``"tp"``, ``"dp-cp"``, ``"tp-pp"`` (model parallel),
        ``"tp-cp"``, ``"tp-dp-cp"``, ...; the order of the names does not matter.
        """
        self._check_rank(rank)
        varying = _parse_dims(dims)
        base = rank
        for d in varying:
            base -= ((rank // self._stride(d)) % self.size(d)) * self._stride(d)
        ranks = [base]
        for d in varying:
            stride, n = self._stride(d), self.size(d)
            ranks = [r + i * stride for i in range(n) for r in ranks]
        return tuple(sorted(ranks))

    def all_groups(self, dims: str) -> list[tuple[int, ...]]:
        """Every group of kind ``dims``, ordered by first rank (megatron's creation order)."""
        varying = set(_parse_dims(dims))
        leaders = [
            r for r in range(self.world_size)
            if all((r // self._stride(d)) % self.size(d) == 0 for d in varying)
        ]
        return [self.group(r, dims) for r in leaders]

    def tp_group(self, rank: int) -> tuple[int, ...]:
        return self.group(rank, "tp")

    def pp_group(self, rank: int) -> tuple[int, ...]:
        return self.group(rank, "pp")

    def cp_group(self, rank: int) -> tuple[int, ...]:
        return self.group(rank, "cp")

    def dp_group(self, rank: int, with_context_parallel: bool = False) -> tuple[int, ...]:
        """LLM data-parallel group (megatron's, optionally including the CP dimension)."""
        return self.group(rank, "dp-cp" if with_context_parallel else "dp")

    def model_parallel_group(self, rank: int) -> tuple[int, ...]:
        """One LLM replica's ranks for a fixed CP coordinate (megatron's ``tp-pp`` group)."""
        return self.group(rank, "tp-pp")

    def vit_group(self) -> tuple[int, ...]:
        """The ViT data-parallel group: the ranks that host a ViT replica."""
        return self.vit_ranks

    # ---- data placement ------------------------------------------------------------------------

    def first_stage_ranks(self, replica: int) -> tuple[int, ...]:
        """Ranks of LLM replica ``replica`` on pipeline stage 0 (all its TP and CP ranks)."""
        return self.group(self.rank_of(dp=replica), "tp-cp")

    def token_loaders(self, replica: int) -> tuple[int, ...]:
        """Ranks of ``replica`` that load token ids: one on the first and one on the last stage."""
        return tuple(sorted({self.rank_of(dp=replica), self.rank_of(dp=replica, pp=self.pp - 1)}))

    def with_vit_on_first_stage(self) -> ParallelPlan:
        """The same LLM layout with ViT replicas only on the first pipeline stage (Megatron's
        LLaVA layout, the baseline)."""
        first = sorted(r for d in range(self.dp) for r in self.first_stage_ranks(d))
        return replace(self, vit_ranks=tuple(first))

    def replica_vit_indices(self, replica: int) -> tuple[int, ...]:
        """ViT indices of the first-stage ranks of ``replica`` that host a ViT replica."""
        indices = (self.vit_index(r) for r in self.first_stage_ranks(replica))
        return tuple(i for i in indices if i is not None)

    def routing_ranks(self) -> tuple[int, ...]:
        """Ranks that take part in moving visual embeddings: ViT ranks and first-stage ranks."""
        first = {r for d in range(self.dp) for r in self.first_stage_ranks(d)}
        return tuple(sorted(first.union(self.vit_ranks)))

    def data_role(self, rank: int) -> DataRole:
        c = self.coords(rank)
        needs_tokens = c.pp in (0, self.pp - 1)
        return DataRole(
            loads_pixels=c.vit is not None,
            loads_tokens=needs_tokens and c.tp == 0 and c.cp == 0,
            needs_tokens=needs_tokens,
            receives_visual=c.pp == 0,
            llm_replica=c.dp,
        )

    def describe(self) -> str:
        vit = "all ranks" if self.vit_dp == self.world_size else f"{self.vit_dp} ranks"
        vpp = f", vpp={self.vpp}" if self.vpp else ""
        sp = (f", sequence parallel (sequence lengths padded to a multiple of "
              f"{self.seq_len_divisor})" if self.sequence_parallel else "")
        return (
            f"world={self.world_size}: LLM tp={self.tp} cp={self.cp} pp={self.pp}{vpp}{sp} "
            f"dp={self.dp} (order {self.order}); ViT dp={self.vit_dp} on {vit}"
        )


def megatron_dims(order: str, *, tp: int, cp: int, dp: int, pp: int) -> tuple[str, ...]:
    """The LLM dimensions, fastest-varying first, as megatron-core 0.16 lays out ranks for
    ``order`` and these sizes; ``ValueError`` (naming the order and the sizes) exactly where
    ``initialize_model_parallel`` would refuse them.

    megatron's rules, from ``parallel_state.RankGenerator``, ``generate_masked_orthogonal_rank_
    groups`` and ``initialize_model_parallel``:

    - ``order.lower()`` is split on ``-``; every part must be one of `ORDER_NAMES`.
    - megatron lays out ranks twice with the same order: the dense layout (sizes tp, cp, dp, pp)
      and an expert layout with ``cp`` folded into ``dp`` (sizes tp, 1, dp * cp, pp). In both, a
      dimension of size > 1 must be named (one left out is appended, harmless only at size 1).
    - A dimension's first mention sets its place. A repeated mention of a dimension of size > 1
      multiplies the strides of everything named after it, which runs ranks past the world unless
      every dimension of size > 1 was already named before the repeat.
    - With ``cp > 1`` and ``pp > 1`` the order must end in ``pp`` (the string as given,
      case-sensitively) and the two layouts must give the same pipeline groups.
    """
    sizes = f"tp={tp}, cp={cp}, dp={dp}, pp={pp}"
    if not isinstance(order, str):
        raise ValueError(
            f"order must be a str such as {DEFAULT_ORDER!r}, got {order!r} (sizes {sizes})"
        )
    names = order.lower().split("-")
    unknown = sorted({n for n in names if n not in ORDER_NAMES})
    if unknown:
        raise ValueError(
            f"order {order!r} has unknown part(s) {unknown}: use {', '.join(ORDER_NAMES)} "
            f"joined by '-' (sizes {sizes})"
        )
    dense = {"tp": tp, "cp": cp, "dp": dp, "pp": pp}
    expert = {"tp": tp, "cp": 1, "dp": dp * cp, "pp": pp}
    for layout in (dense, expert):
        big = [n for n in LLM_DIMS if layout[n] > 1]
        for name in big:
            if name not in names:
                why = (f"dp({dp}) * cp({cp}) = {dp * cp} > 1 (megatron-core's expert layout "
                       "folds cp into dp)" if layout is expert else f"{name}({layout[name]}) > 1")
                raise ValueError(
                    f"order {order!r} leaves out {name}, but {why}; only dimensions of size 1 "
                    f"may be left out (sizes {sizes})"
                )
        last_named = max((names.index(n) for n in big), default=-1)
        for name in big:
            again = names.index(name, names.index(name) + 1) if names.count(name) > 1 else None
            if again is not None and again < last_named:
                raise ValueError(
                    f"order {order!r} repeats {name} before it names {names[last_named]}: with "
                    f"{name} of size > 1 megatron-core then computes ranks past world_size("
                    f"{tp * cp * dp * pp}); name each dimension once (sizes {sizes})"
                )
    if cp > 1 and pp > 1:
        if not order.endswith("pp"):
            case = (" (megatron-core compares case-sensitively: write it in lower case)"
                    if order.lower().endswith("pp") else "")
            raise ValueError(
                f"order {order!r} must end in 'pp' when cp({cp}) > 1 and pp({pp}) > 1{case}: "
                "megatron-core's initialize_model_parallel refuses other orders there (its "
                f"expert layout folds cp into dp and must keep the pipeline groups) (sizes {sizes})"
            )
        # pp mentioned after every other dimension of size > 1: the same groups, no need to list
        # them; otherwise (a repeated pp) compare the two layouts' groups as megatron does.
        first = {n: names.index(n) for n in LLM_DIMS if n in names}
        pp_last = all(first["pp"] > first[n] for n in ("tp", "cp", "dp")
                      if max(dense[n], expert[n]) > 1)
        if not pp_last and _pp_groups(names, dense) != _pp_groups(names, expert):
            raise ValueError(
                f"order {order!r} places pp before cp or dp (its first mention counts), so "
                "megatron-core's dense and expert layouts disagree on the pipeline groups and "
                f"initialize_model_parallel refuses it; name pp once, last (sizes {sizes})"
            )
    return _first_mentions(names)


def _first_mentions(names: list[str]) -> tuple[str, ...]:
    """The LLM dimensions by first mention in ``names``; unnamed ones (size 1) last."""
    first = {n: names.index(n) if n in names else len(names) for n in LLM_DIMS}
    return tuple(sorted(LLM_DIMS, key=lambda n: (first[n], ORDER_NAMES.index(n))))


def _pp_groups(names: list[str], size: dict[str, int]) -> list[list[int]]:
    """megatron's pipeline groups, in its creation order, for a layout (O(world); only needed
    for the rare order that repeats ``pp``)."""
    dims = _first_mentions(names)
    strides, stride = {}, 1
    for d in dims:
        strides[d] = stride
        stride *= size[d]
    others = [d for d in dims if d != "pp"]
    groups = []
    for g in range(stride // size["pp"]):
        base, rest = 0, g
        for d in others:
            base += (rest % size[d]) * strides[d]
            rest //= size[d]
        groups.append([base + k * strides["pp"] for k in range(size["pp"])])
    return groups


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(name: str, value: object, allowed: str = "") -> int:
    if not _is_integer(value) or value < 1:
        raise ValueError(f"{name} must be {allowed}a positive integer, got {value!r}")
    return int(value)


def _preview(values: Sequence[object]) -> str:
    head = ", ".join(repr(v) for v in values[:_PREVIEW])
    more = f", ... ({len(values)} in all)" if len(values) > _PREVIEW else ""
    return f"[{head}{more}]"


def _check_vit_ranks(vit_ranks: object, world_size: int) -> tuple[int, ...]:
    """``vit_ranks`` as a tuple of ``int``, or ``ValueError`` naming the bad values (at most
    `_PREVIEW` of them, so 100,000 ranks never make a giant message)."""
    if isinstance(vit_ranks, str | bytes) or not isinstance(vit_ranks, Sequence | range) \
            and not hasattr(vit_ranks, "__array__"):
        raise ValueError(
            f"vit_ranks must be a sequence of integer ranks or None, got {vit_ranks!r:.80}"
        )
    # numpy arrays: their Python values, in one fast call
    ranks = tuple(vit_ranks.tolist() if hasattr(vit_ranks, "tolist") else vit_ranks)
    if not ranks:
        raise ValueError("vit_ranks is empty: at least one rank must host a ViT replica")
    bad = [r for r in ranks if not _is_integer(r)]
    if bad:
        raise ValueError(f"vit_ranks must be integer ranks; {len(bad)} value(s) are not: "
                         f"{_preview(bad)}")
    ranks = tuple(map(int, ranks))
    outside = [r for r in ranks if not 0 <= r < world_size]
    if outside:
        raise ValueError(
            f"vit_ranks {_preview(outside)} are outside [0, world_size({world_size}))"
        )
    if len(set(ranks)) != len(ranks):
        seen: set[int] = set()
        dups = sorted({r for r in ranks if r in seen or seen.add(r)})
        raise ValueError(
            f"vit_ranks has duplicate ranks {_preview(dups)} ({len(ranks) - len(seen)} "
            f"duplicate entries among {len(ranks)}); each rank hosts at most one ViT replica"
        )
    for i, (a, b) in enumerate(zip(ranks, ranks[1:], strict=False)):
        if b < a:
            raise ValueError(
                f"vit_ranks must be strictly increasing: vit_ranks[{i}] = {a} is followed by "
                f"{b} ({len(ranks)} ranks; sort them)"
            )
    return ranks


def _parse_dims(dims: str) -> tuple[str, ...]:
    names = tuple(dims.lower().split("-"))
    unknown = [d for d in names if d not in LLM_DIMS]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"bad group dims {dims!r}: use names from {LLM_DIMS}, each at most once")
    return names
