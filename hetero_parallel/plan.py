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

from dataclasses import dataclass, field, replace

LLM_DIMS: tuple[str, ...] = ("tp", "cp", "dp", "pp")
DEFAULT_ORDER = "tp-cp-ep-dp-pp"
"""megatron-core's default rank order (``ep`` has size 1 here: dense LLMs)."""


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
    ``tp * cp * pp`` divides ``world_size``; ``dp = world_size // (tp * cp * pp)``;
    ``vpp`` needs ``pp > 1``; ``vit_ranks`` is a non-empty, strictly increasing tuple of ranks in
    ``[0, world_size)``; ``order`` names ``tp``, ``cp``, ``dp`` and ``pp`` once each (``ep`` may
    appear and is ignored: size 1).
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
    order: str = DEFAULT_ORDER
    """megatron-core rank order, fastest-varying dimension first."""
    vit_ranks: tuple[int, ...] | None = None
    """Ranks that host a ViT replica; None means every rank."""
    _dims: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("world_size", "tp", "pp", "cp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        model = self.tp * self.cp * self.pp
        if self.world_size % model != 0:
            raise ValueError(
                f"tp({self.tp}) * cp({self.cp}) * pp({self.pp}) = {model} "
                f"does not divide world_size({self.world_size})"
            )
        if self.vpp is not None:
            if not isinstance(self.vpp, int) or self.vpp < 1:
                raise ValueError(f"vpp must be None or a positive integer, got {self.vpp!r}")
            if self.pp == 1:
                raise ValueError(
                    f"vpp({self.vpp}) needs pipeline parallelism, but pp is 1 "
                    "(interleaving needs pp > 1)"
                )
        object.__setattr__(self, "_dims", _parse_order(self.order))
        if self.vit_ranks is None:
            object.__setattr__(self, "vit_ranks", tuple(range(self.world_size)))
        else:
            ranks = tuple(self.vit_ranks)
            if not ranks:
                raise ValueError("vit_ranks is empty: at least one rank must host a ViT replica")
            bad = [r for r in ranks if not 0 <= r < self.world_size]
            if bad:
                raise ValueError(
                    f"vit_ranks {bad} are outside [0, world_size({self.world_size}))"
                )
            if any(b <= a for a, b in zip(ranks, ranks[1:], strict=False)):
                raise ValueError(f"vit_ranks must be strictly increasing, got {ranks}")
            object.__setattr__(self, "vit_ranks", ranks)

    # ---- sizes ---------------------------------------------------------------------------------

    @property
    def dp(self) -> int:
        """LLM data-parallel size (number of LLM replicas)."""
        return self.world_size // (self.tp * self.cp * self.pp)

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
        return (
            f"world={self.world_size}: LLM tp={self.tp} cp={self.cp} pp={self.pp}{vpp} "
            f"dp={self.dp} (order {self.order}); ViT dp={self.vit_dp} on {vit}"
        )


def _parse_order(order: str) -> tuple[str, ...]:
    names = [t for t in order.lower().split("-") if t != "ep"]
    if sorted(names) != sorted(LLM_DIMS):
        raise ValueError(
            f"order {order!r} must name each of {LLM_DIMS} exactly once (and optionally 'ep')"
        )
    return tuple(names)


def _parse_dims(dims: str) -> tuple[str, ...]:
    names = tuple(dims.lower().split("-"))
    unknown = [d for d in names if d not in LLM_DIMS]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"bad group dims {dims!r}: use names from {LLM_DIMS}, each at most once")
    return names
