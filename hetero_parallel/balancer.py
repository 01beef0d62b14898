"""Deterministic greedy balancer: one global batch -> LLM replicas, micro-batches and ViT ranks.

Every rank calls ``plan_global_batch`` with the same samples and gets a bit-identical ``BatchPlan``
(no communication). Two independent placements:

- **LLM.** Each sample (its text and the slots of its visual tokens) goes to one data-parallel
  replica and one of its ``num_microbatches`` micro-batches, by longest-processing-time first (LPT)
  on ``CostModel.llm_cost``: samples in decreasing cost, each to the least-loaded replica that can
  take it, and inside it to the least-loaded micro-batch with token room (an empty micro-batch
  first). Constraints: every replica gets ``num_microbatches`` non-empty micro-batches; no
  micro-batch exceeds ``max_tokens_per_microbatch``; with ``equal_samples_per_replica`` every
  replica gets ``len(samples) / num_replicas`` samples. Micro-batches are then ordered for the
  pipeline: the lightest at both ends, the heaviest in the middle. When the greedy finds no
  room under the token cap, the batch is not refused yet: a bin-packing lower bound, then an
  exact search (bounded by a work count, so deterministic), then (without equal counts) a
  best-fit-decreasing packing repair take over. A refusal says either "no placement exists"
  (proved by the bound or by the exhausted search) or "gave up" (the search hit its limit and
  the repair failed), with the numbers.
  **Groups** (`SampleSpec.group`: a preference pair, the rollouts of one prompt) are placed as
  one unit: its cost and tokens are its members' sums, it counts its members against equal
  counts, and all of them land in one micro-batch; a group over the token cap is an error that
  names it. With groups and equal counts a stuck greedy runs once more with the largest groups
  first before the search.
- **ViT.** Each media item (an image, or a chunk of ``frames_per_chunk`` consecutive video frames)
  goes to one of ``num_vit_ranks`` ranks by LPT on ``CostModel`` ViT cost, wherever its sample's
  text went. With ``split_vit_items``, an item above the fair share is split first (a chunk into
  frames, a frame into contiguous token slices on distinct ranks, `BatchPlan.split_groups`), so
  one max-size image no longer sets the ViT phase.

Options and baselines: ``pipeline=PipelineSchedule(...)`` picks the micro-batch count and order
that minimise the simulated pipeline (`PipelineSchedule` states the rule); `plan_by_position` is
Megatron's split by position (the LLaVA layout) and `plan_loongforge_style` a LoongForge-style
per-micro-batch balancing, both for comparisons; all of them keep groups whole.

Determinism: items are ordered by (decreasing cost, sample id, media index, first frame; a split
frame's pieces as one unit; a group as its smallest sample id); ties between bins go to the lowest
index. Costs are computed from exact integer sums, and a bin's load is the sum of its items' costs
added in placement order, so the plan depends on nothing but the input (not on the order of
``samples`` either: everything is keyed by sample id).

The plan is stored as flat numpy arrays; the whole-batch tuple views (``microbatches``,
``media_chunks``) are built on first use, and the per-rank views (``samples_for_replica``,
``chunks_for_vit_rank``, ``chunks_for_replica``) take one O(batch) numpy scan each.

Speed: 16,384 Keye-like samples (~550K frames, ~81K chunks) over 1,024 replicas x 8 micro-batches
and 8,192 ViT ranks plan in ~45 ms on one CPU core (``benchmarks/bench_balancer.py``): LPT over many
bins runs as a windowed numpy loop (``lpt_assign``) and sizes travel as packed bytes.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import heapq
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property

import numpy as np

from hetero_parallel.cost_model import CostModel

DEFAULT_FRAMES_PER_CHUNK = 8
_FRAME_BYTES = operator.attrgetter("_frame_bytes")
_MEDIA_FRAMES_BYTES = operator.attrgetter("_media_frames_bytes")
_WIRE = np.dtype("<i4")  # frame token counts fit easily; half the bytes to join
_MAX_FRAME_TOKENS = 2**31 - 1
_HEADER = np.dtype("<i8")
_HEADER_BYTES = operator.attrgetter("_header_bytes")


# --- inputs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MediaSpec:
    """One image (one frame) or one video (one entry per sampled frame) in LLM tokens per frame.

    Slow-Fast video frames differ in size. ViT patches per frame are
    ``CostModel.patches_per_token`` times the tokens.
    """

    tokens_per_frame: tuple[int, ...]
    num_tokens: int = field(init=False, repr=False, compare=False)
    """Sum of ``tokens_per_frame``."""

    def __post_init__(self) -> None:
        tokens = tuple(self.tokens_per_frame)
        arr = np.asarray(tokens)
        if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu" or arr.min() < 1 \
                or arr.max() > _MAX_FRAME_TOKENS:
            raise ValueError(
                f"MediaSpec.tokens_per_frame must be a non-empty sequence of ints in "
                f"[1, {_MAX_FRAME_TOKENS}], got {_preview(tokens)}"
            )
        arr = arr.astype(np.int64)
        arr.flags.writeable = False
        object.__setattr__(self, "tokens_per_frame", tokens)
        object.__setattr__(self, "_tokens", arr)
        object.__setattr__(self, "num_tokens", int(arr.sum()))

    @property
    def num_frames(self) -> int:
        return len(self.tokens_per_frame)


@dataclass(frozen=True)
class SampleSpec:
    """One sample of the global batch.

    Its LLM sequence length is ``num_tokens = text_tokens + sum of all media tokens``; text tokens
    include every special token (image / frame markers, timestamps). ``sample_id`` is unique in a
    batch and keys every output.
    """

    sample_id: int
    text_tokens: int
    media: tuple[MediaSpec, ...] = ()
    group: int | None = None
    """Samples of a batch with the same group id (an int >= 0) go to the same LLM replica and
    micro-batch, e.g. the chosen and rejected answers of a preference pair, or the rollouts of one
    prompt; None: a group of its own. Their ViT work is placed like any other (a member may have
    no media, e.g. an answer whose prompt's media another member carries)."""
    num_tokens: int = field(init=False, repr=False, compare=False)
    """LLM sequence length: text plus every media token."""
    num_media: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _is_int(self.sample_id) or self.sample_id < 0:
            raise ValueError(f"SampleSpec.sample_id must be an int >= 0, got {self.sample_id!r}")
        if not _is_int(self.text_tokens) or self.text_tokens < 0:
            raise ValueError(f"sample {self.sample_id}: text_tokens must be an int >= 0, got "
                             f"{self.text_tokens!r}")
        if self.group is not None and (not _is_int(self.group) or not 0 <= self.group < 2**63):
            raise ValueError(f"sample {self.sample_id}: group must be None or an int in "
                             f"[0, 2**63), got {self.group!r}")
        media = tuple(self.media)
        if not all(isinstance(m, MediaSpec) for m in media):
            raise TypeError(f"sample {self.sample_id}: media must be MediaSpec items")
        object.__setattr__(self, "media", media)
        total = self.text_tokens + sum(m.num_tokens for m in media)
        if total < 1:
            raise ValueError(f"sample {self.sample_id} has 0 tokens")
        object.__setattr__(self, "num_tokens", total)
        object.__setattr__(self, "num_media", len(media))
        # Packed as bytes: the planner joins 16K samples' frames with one b"".join (~1 ms)
        # where np.concatenate of 16K small arrays takes ~10 ms.
        frames = np.concatenate([m._tokens for m in media]) if media else np.zeros(0, np.int64)
        counts = np.asarray([m.num_frames for m in media], dtype=np.int64)
        object.__setattr__(self, "_header_bytes", np.array(
            [self.sample_id, total, len(media), -1 if self.group is None else self.group],
            dtype=_HEADER).tobytes())
        object.__setattr__(self, "_frame_bytes", frames.astype(_WIRE).tobytes())
        object.__setattr__(self, "_media_frames_bytes", counts.astype(_WIRE).tobytes())


# --- outputs ------------------------------------------------------------------------------------
@functools.total_ordering
@dataclass(frozen=True)
class MediaChunk:
    """Frames ``[frame_start, frame_stop)`` of media item ``media_index`` of a sample, and the ViT
    rank that encodes them; tokens ``[token_start, token_stop)`` of them.

    An image is the chunk ``[0, 1)``. An ordinary chunk has ``token_start = 0`` and ``token_stop``
    its frames' total visual tokens. A *piece* of a split frame (`plan_global_batch` with
    ``split_vit_items``) has ``frame_stop = frame_start + 1`` and holds that frame's visual tokens
    ``[token_start, token_stop)`` (row-major, LLM tokens; ``patches_per_token`` ViT patches
    each); the pieces of one frame sit on distinct ViT ranks (`BatchPlan.split_groups`). A
    sample's visual tokens, in sequence order, are its chunks sorted by ``(media_index,
    frame_start, token_start)`` (see ``BatchPlan.chunks_for_sample``). Chunks sort by (sample id,
    media index, frame start, token start), the order of ``BatchPlan.media_chunks``.
    """

    sample_id: int
    media_index: int
    frame_start: int
    frame_stop: int
    vit_rank: int
    token_start: int
    token_stop: int

    @property
    def num_tokens(self) -> int:
        return self.token_stop - self.token_start

    def frame_slices(self, frame_tokens: Sequence[int]):
        """``(frame, first token within the frame, tokens)`` of each of the chunk's frames that
        holds any of its tokens ``[token_start, token_stop)``, in order; ``frame_tokens``: the
        visual tokens of every frame of the media item."""
        offset = 0
        for f in range(self.frame_start, self.frame_stop):
            lo = max(self.token_start, offset)
            hi = min(self.token_stop, offset + frame_tokens[f])
            if hi > lo:
                yield f, lo - offset, hi - lo
            offset += frame_tokens[f]

    def _key(self) -> tuple[int, ...]:
        return (self.sample_id, self.media_index, self.frame_start, self.token_start,
                self.frame_stop, self.token_stop, self.vit_rank)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, MediaChunk):
            return NotImplemented
        return self._key() < other._key()


@dataclass(frozen=True)
class SplitGroup:
    """One frame split into contiguous token slices on distinct ViT ranks (sequence-parallel
    attention: each rank's queries attend to the whole frame's keys and values, gathered from
    the group's other ranks in ``vit_ranks`` order)."""

    sample_id: int
    media_index: int
    frame: int
    """Frame index within the media item (0 for an image)."""
    frame_tokens: int
    """The whole frame's visual tokens."""
    token_bounds: tuple[int, ...]
    """``k + 1`` increasing bounds from 0 to ``frame_tokens``: piece ``i`` holds tokens
    ``[token_bounds[i], token_bounds[i + 1])``."""
    vit_ranks: tuple[int, ...]
    """ViT rank of each piece, in token order (all distinct)."""
    chunks: tuple[int, ...]
    """Index of each piece in ``BatchPlan.media_chunks``, in token order."""


@dataclass(frozen=True, kw_only=True)
class PipelineSchedule:
    """The LLM pipeline a plan is made for: `plan_global_batch` then picks the micro-batch count
    and order that minimise the simulated step of the slowest replica.

    The rule (`_place_for_pipeline`): for every candidate count ``m`` (``microbatch_counts``, or
    ``num_stages * 2**i`` up to ``num_microbatches`` and ``num_microbatches`` itself), samples are
    placed as without this option (replicas by LPT on cost, micro-batches by LPT inside each
    replica, so every micro-batch gets the same cost budget ``replica total / m`` under the
    token cap) and ordered lightest at both ends, heaviest in the middle; then each replica's
    order is improved by steepest descent over swaps of adjacent micro-batches (all replicas and
    all swaps evaluated at once by `hetero_parallel.simulator.pipeline_times`, at most
    ``swap_rounds`` rounds). The candidate whose slowest replica finishes first wins (ties: the
    smaller ``m``). Counts the token cap cannot fill, or that megatron's interleaved schedule
    refuses, are skipped. Equal budgets are deliberate: on the Keye-like mix, smaller
    micro-batches at the ends (a ramp) simulated 5-8% slower than this order, because 1F1B's
    limit of ``num_stages`` micro-batches in flight stalls the stages around a heavy one unless
    its neighbours are heavy too.
    """

    num_stages: int
    """Pipeline stages (megatron's PP)."""
    num_chunks: int = 1
    """Model chunks per stage (virtual pipeline size; interleaved 1F1B when > 1)."""
    tp: int = 1
    """Tensor-parallel GPUs that share a stage's work (scales times against ``p2p_s``)."""
    p2p_s: float = 0.0
    """Seconds added to every send between stages."""
    microbatch_counts: tuple[int, ...] = ()
    """Candidate micro-batch counts (default: see above)."""
    swap_rounds: int = 16
    """Rounds of the adjacent-swap descent (a count, so every rank stops at the same point)."""

    def __post_init__(self) -> None:
        for name in ("num_stages", "num_chunks", "tp"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"PipelineSchedule.{name} must be an int >= 1, got {v!r}")
        if not _is_int(self.swap_rounds) or self.swap_rounds < 0:
            raise ValueError(f"PipelineSchedule.swap_rounds must be an int >= 0, got "
                             f"{self.swap_rounds!r}")
        if self.num_chunks > 1 and self.num_stages < 2:
            raise ValueError(f"PipelineSchedule: num_chunks({self.num_chunks}) > 1 needs "
                             f"num_stages >= 2, got {self.num_stages}")
        counts = tuple(self.microbatch_counts)
        if any(not _is_int(c) or c < 1 for c in counts):
            raise ValueError(f"PipelineSchedule.microbatch_counts must be ints >= 1, got "
                             f"{counts!r}")
        object.__setattr__(self, "microbatch_counts", counts)
        if not isinstance(self.p2p_s, int | float) or not 0 <= self.p2p_s < float("inf"):
            raise ValueError(f"PipelineSchedule.p2p_s must be a finite number >= 0, got "
                             f"{self.p2p_s!r}")

    def candidates(self, num_microbatches: int) -> list[int]:
        """Micro-batch counts to try, at most ``num_microbatches``, increasing."""
        if self.microbatch_counts:
            counts = {c for c in self.microbatch_counts if c <= num_microbatches}
        else:
            counts = {num_microbatches}
            c = self.num_stages
            while c < num_microbatches:
                counts.add(c)
                c *= 2
        if self.num_chunks > 1:  # megatron's interleaved schedule: groups of num_stages
            counts = {c for c in counts if c % self.num_stages == 0}
        return sorted(counts)

    def makespans(self, microbatch_costs: np.ndarray) -> np.ndarray:
        """Simulated pipeline makespan of each replica (leading axes) for whole-model costs
        ``microbatch_costs[..., m]`` in pipeline order."""
        from hetero_parallel.simulator import pipeline_times, stage_times

        fwd, bwd = stage_times(microbatch_costs, self.num_stages, self.num_chunks, self.tp)
        return pipeline_times(fwd, bwd, num_stages=self.num_stages, p2p_s=self.p2p_s)[0]


@dataclass(frozen=True)
class PhaseReport:
    """Load balance of one phase: ``loads[r]`` is the modelled cost (seconds) of rank ``r``.

    ``lower_bound = max(total / ranks, largest item)``: no placement of these indivisible items can
    have a smaller maximum. ``outliers`` are the items whose cost alone exceeds the fair share
    ``total / ranks``, as ``(item, cost)`` with ``item`` a sample id (LLM; for a group of samples,
    its smallest sample id and the group's cost) or an index into ``BatchPlan.media_chunks``
    (ViT), largest first.
    """

    loads: tuple[float, ...]
    total: float
    largest_item: float
    outliers: tuple[tuple[int, float], ...]

    @property
    def max(self) -> float:
        return max(self.loads)

    @property
    def mean(self) -> float:
        return self.total / len(self.loads)

    @property
    def lower_bound(self) -> float:
        return max(self.mean, self.largest_item)

    @property
    def max_over_mean(self) -> float:
        return _ratio(self.max, self.mean)

    @property
    def max_over_lower_bound(self) -> float:
        return _ratio(self.max, self.lower_bound)

    @classmethod
    def build(cls, loads: np.ndarray, item_costs: np.ndarray, item_keys: np.ndarray) -> PhaseReport:
        """Report for ``loads`` given every item's cost and key (same order)."""
        total = float(np.sum(item_costs))
        fair = total / len(loads)
        big = np.flatnonzero(item_costs > fair)
        big = big[np.lexsort((item_keys[big], -item_costs[big]))]
        return cls(
            loads=tuple(loads.tolist()),
            total=total,
            largest_item=float(item_costs.max()) if item_costs.size else 0.0,
            outliers=tuple(zip(item_keys[big].tolist(), item_costs[big].tolist(), strict=True)),
        )


@dataclass(frozen=True, eq=False)
class BatchPlan:
    """Where every sample and media chunk of one global batch goes. Compare plans with ``digest``.

    Arrays (read-only, int64 unless noted):
    - ``sample_ids[i]``, ``replica[i]``, ``microbatch[i]``, ``sample_tokens[i]``,
      ``sample_group[i]`` (`SampleSpec.group`, -1 for None) for sample ``i`` in increasing id
      order (samples of one group share their replica and micro-batch);
    - ``chunk_*[k]`` for chunk ``k`` in (sample id, media index, frame start, token start) order
      (``chunk_tokens``: the visual tokens it yields, to size the ViT -> LLM exchange;
      ``chunk_token_start`` / ``chunk_token_stop``: its token range, see `MediaChunk`;
      ``chunk_cost`` (float64): its modelled ViT seconds; ``chunk_split_group``: index into
      ``split_groups()`` for a piece of a split frame, -1 otherwise);
    - ``microbatch_costs[r, j]`` (float64) the LLM cost of micro-batch ``j`` of replica ``r``.
    """

    num_replicas: int
    num_microbatches: int
    num_vit_ranks: int
    sample_ids: np.ndarray
    replica: np.ndarray
    microbatch: np.ndarray
    sample_tokens: np.ndarray
    sample_group: np.ndarray
    microbatch_costs: np.ndarray
    chunk_sample_id: np.ndarray
    chunk_media_index: np.ndarray
    chunk_frame_start: np.ndarray
    chunk_frame_stop: np.ndarray
    chunk_vit_rank: np.ndarray
    chunk_tokens: np.ndarray
    """LLM tokens (visual embeddings after the patch merge) each chunk produces."""
    chunk_token_start: np.ndarray
    chunk_token_stop: np.ndarray
    chunk_cost: np.ndarray
    chunk_split_group: np.ndarray
    llm_report: PhaseReport
    vit_report: PhaseReport

    # --- LLM side ---
    def placement(self, sample_id: int) -> tuple[int, int]:
        """``(replica, micro-batch)`` of ``sample_id`` (``KeyError`` if it is not in the batch)."""
        i = self._position(sample_id)
        return int(self.replica[i]), int(self.microbatch[i])

    def samples_for_replica(self, replica: int) -> tuple[tuple[int, ...], ...]:
        """The micro-batches of one replica in pipeline order, each a tuple of increasing ids.
        O(batch size): what one replica's loader needs, without building the whole table."""
        self._check_index("replica", replica, self.num_replicas)
        rows = np.flatnonzero(self.replica == replica)
        mbs = self.microbatch[rows]
        return tuple(tuple(self.sample_ids[rows[mbs == j]].tolist())
                     for j in range(self.num_microbatches))

    @cached_property
    def microbatches(self) -> tuple[tuple[tuple[int, ...], ...], ...]:
        """``microbatches[replica][mb]``: sample ids, increasing inside each micro-batch."""
        m = self.num_microbatches
        rows = np.lexsort((self.sample_ids, self.microbatch, self.replica))
        ids = self.sample_ids[rows].tolist()
        bounds = _offsets(self.replica * m + self.microbatch, self.num_replicas * m).tolist()
        return tuple(
            tuple(tuple(ids[bounds[r * m + j]:bounds[r * m + j + 1]]) for j in range(m))
            for r in range(self.num_replicas)
        )

    # --- ViT side ---
    @cached_property
    def media_chunks(self) -> tuple[MediaChunk, ...]:
        """Every chunk, in (sample id, media index, frame start) order."""
        return self._chunks(np.arange(self.chunk_sample_id.size))

    def chunks_for_vit_rank(self, rank: int) -> tuple[MediaChunk, ...]:
        """The chunks ViT rank ``rank`` encodes, in (sample id, media index, frame start) order."""
        self._check_index("rank", rank, self.num_vit_ranks)
        return self._chunks(np.flatnonzero(self.chunk_vit_rank == rank))

    @cached_property
    def chunk_replica(self) -> np.ndarray:
        """LLM replica that owns each chunk's sample (where its embeddings must go)."""
        out = self.replica[np.searchsorted(self.sample_ids, self.chunk_sample_id)]
        out.flags.writeable = False
        return out

    def chunks_for_replica(self, replica: int) -> tuple[MediaChunk, ...]:
        """Chunks of the samples of one LLM replica, in (sample id, media index, frame start)
        order: what its first pipeline stage receives from the ViT ranks."""
        self._check_index("replica", replica, self.num_replicas)
        return self._chunks(np.flatnonzero(self.chunk_replica == replica))

    def chunks_for_sample(self, sample_id: int) -> tuple[MediaChunk, ...]:
        """A sample's chunks in visual-token order (their frames, concatenated, are its media)."""
        self._position(sample_id)
        lo, hi = np.searchsorted(self.chunk_sample_id, [sample_id, sample_id + 1])
        return self._chunks(np.arange(lo, hi))

    def split_groups(self) -> tuple[SplitGroup, ...]:
        """Every split frame with its pieces in token order, in (sample id, media index, frame)
        order; empty unless the plan was made with ``split_vit_items``. O(chunks)."""
        return self._split_groups

    @cached_property
    def _split_groups(self) -> tuple[SplitGroup, ...]:
        rows = np.flatnonzero(self.chunk_split_group >= 0)
        if not rows.size:
            return ()
        bounds = _offsets(self.chunk_split_group[rows], int(self.chunk_split_group[rows].max()) + 1)
        out = []
        for g in range(bounds.size - 1):
            k = rows[bounds[g]:bounds[g + 1]]  # pieces are contiguous and in token order
            first = int(k[0])
            out.append(SplitGroup(
                sample_id=int(self.chunk_sample_id[first]),
                media_index=int(self.chunk_media_index[first]),
                frame=int(self.chunk_frame_start[first]),
                frame_tokens=int(self.chunk_token_stop[k[-1]]),
                token_bounds=(0, *self.chunk_token_stop[k].tolist()),
                vit_ranks=tuple(self.chunk_vit_rank[k].tolist()),
                chunks=tuple(k.tolist())))
        return tuple(out)

    # --- comparison ---
    def digest(self) -> str:
        """SHA-256 of every assignment and of the groups (not the reports): equal digests,
        identical plans."""
        h = hashlib.sha256()
        h.update(np.asarray([self.num_replicas, self.num_microbatches, self.num_vit_ranks],
                            dtype="<i8").tobytes())
        grouped = (self.sample_group,) if (self.sample_group >= 0).any() else ()
        for arr in (self.sample_ids, self.replica, self.microbatch, self.chunk_sample_id,
                    self.chunk_media_index, self.chunk_frame_start, self.chunk_frame_stop,
                    self.chunk_vit_rank, self.chunk_tokens, self.chunk_token_start,
                    self.chunk_token_stop, *grouped):
            h.update(np.ascontiguousarray(arr, dtype="<i8").tobytes())
        return h.hexdigest()

    def _chunks(self, rows: np.ndarray) -> tuple[MediaChunk, ...]:
        cols = (self.chunk_sample_id[rows].tolist(), self.chunk_media_index[rows].tolist(),
                self.chunk_frame_start[rows].tolist(), self.chunk_frame_stop[rows].tolist(),
                self.chunk_vit_rank[rows].tolist(), self.chunk_token_start[rows].tolist(),
                self.chunk_token_stop[rows].tolist())
        return tuple(MediaChunk(*c) for c in zip(*cols, strict=True))

    def _position(self, sample_id: int) -> int:
        i = int(np.searchsorted(self.sample_ids, sample_id))
        if i == self.sample_ids.size or self.sample_ids[i] != sample_id:
            raise KeyError(f"sample {sample_id} is not in this batch")
        return i

    @staticmethod
    def _check_index(name: str, value: int, size: int) -> None:
        if not 0 <= value < size:
            raise IndexError(f"{name} {value} out of range [0, {size})")


# --- the planner --------------------------------------------------------------------------------
def plan_global_batch(
    samples: Sequence[SampleSpec],
    cost_model: CostModel,
    *,
    num_replicas: int,
    num_microbatches: int,
    num_vit_ranks: int,
    max_tokens_per_microbatch: int | None = None,
    equal_samples_per_replica: bool = False,
    frames_per_chunk: int = DEFAULT_FRAMES_PER_CHUNK,
    split_vit_items: bool = False,
    split_share: float = 1.0,
    pipeline: PipelineSchedule | None = None,
) -> BatchPlan:
    """Place one global batch (see the module docstring for the rules).

    ``pipeline``: choose the micro-batch count and order for this pipeline by simulating it
    (`PipelineSchedule`); ``num_microbatches`` is then the largest count tried and the plan's
    ``num_microbatches`` the one chosen.

    ``split_vit_items``: a ViT item costing more than ``split_share`` times the fair share
    (total ViT cost / ``num_vit_ranks``) is split: a chunk of several frames into single frames,
    and a frame still above it into ``k`` contiguous token slices on ``k`` distinct ViT ranks,
    the fewest whose slices (``CostModel.vit_piece_cost``: queries against the whole frame, plus
    the K/V exchange) each fit under that share, ``k <= min(num_vit_ranks, frame tokens)``
    (`BatchPlan.split_groups`). Off by default: the ViT must run sequence-parallel attention for
    split frames.

    Samples with the same `SampleSpec.group` share one replica and one micro-batch (see the
    module docstring); ``BatchPlan.sample_group`` keeps the group ids.

    Raises ``ValueError`` (naming the values) for: a non-positive count; duplicate sample ids; fewer
    samples (with groups: fewer groups) than ``num_replicas * num_microbatches`` (every
    micro-batch needs one); a sample or a group (its members and their tokens) longer than
    ``max_tokens_per_microbatch``; ``equal_samples_per_replica`` with ``len(samples)`` not a
    multiple of ``num_replicas``, or with a group larger than a replica's share or group sizes
    that cannot add up to it; a batch that cannot fit under the token cap ("no placement
    exists", proved); and one the bounded fallback could not place ("gave up": rare, at scale with
    a cap within a few percent of the mean micro-batch, mostly with equal counts).
    """
    for name, value in (("num_replicas", num_replicas), ("num_microbatches", num_microbatches),
                        ("num_vit_ranks", num_vit_ranks), ("frames_per_chunk", frames_per_chunk)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    cap = max_tokens_per_microbatch
    if cap is not None and (not _is_int(cap) or cap < 1):
        raise ValueError(f"max_tokens_per_microbatch must be an int >= 1 or None, got {cap!r}")
    if not isinstance(split_share, int | float) or not 0 < split_share < float("inf"):
        raise ValueError(f"split_share must be a finite number > 0, got {split_share!r}")

    n = len(samples)
    samples, ids, tokens, media_count, group, groups = _read_units(samples, num_replicas,
                                                                   num_microbatches)
    if equal_samples_per_replica and n % num_replicas:
        raise ValueError(
            f"equal_samples_per_replica: {n} samples do not divide evenly over "
            f"num_replicas({num_replicas})"
        )
    single = groups.size is None or groups.group[groups.of_sample] < 0
    if cap is not None and (over := np.flatnonzero((tokens > cap) & single)).size:
        i = int(over[np.argmax(tokens[over])])
        raise ValueError(
            f"sample {int(ids[i])} has {int(tokens[i])} tokens, more than "
            f"max_tokens_per_microbatch({cap}) ({over.size} sample(s) over the cap)"
        )
    quota = n // num_replicas if equal_samples_per_replica else None
    groups.check(cap, quota, num_replicas)

    llm_cost = np.asarray(cost_model.llm_cost(tokens), dtype=np.float64)
    cost = groups.sum_cost(llm_cost)
    if pipeline is None:
        replica, microbatch, mb_costs = _place_samples(
            cost, groups.tokens, groups.key, num_replicas, num_microbatches, cap, quota,
            groups.size, groups.name)
        microbatch, mb_costs = _pipeline_order(replica, microbatch, mb_costs, groups.key)
    else:
        replica, microbatch, mb_costs = _place_for_pipeline(
            cost, groups.tokens, groups.key, num_replicas, num_microbatches, cap, quota,
            pipeline, groups.size, groups.name)
        num_microbatches = mb_costs.shape[1]

    chunks = _media_chunks(samples, ids, media_count, frames_per_chunk, cost_model,
                           split_share=split_share if split_vit_items else None,
                           num_vit_ranks=num_vit_ranks)
    vit_rank, vit_loads = _place_vit(chunks, num_vit_ranks)
    return _assemble(ids, tokens, group, groups, llm_cost, cost, groups.expand(replica),
                     groups.expand(microbatch), mb_costs, chunks, vit_rank, vit_loads,
                     num_replicas, num_microbatches, num_vit_ranks)


def _read_samples(samples: Sequence[SampleSpec]):
    """``(samples, ids, tokens, media counts, groups)`` in increasing id order (group -1: none);
    ``ValueError`` for a repeated id."""
    n = len(samples)
    header = np.frombuffer(b"".join(map(_HEADER_BYTES, samples)), dtype=_HEADER).reshape(n, 4)
    by_id = np.argsort(header[:, 0], kind="stable")
    ids, tokens, media_count, group = (np.ascontiguousarray(col) for col in header[by_id].T)
    if n > 1 and (dup := np.flatnonzero(ids[1:] == ids[:-1])).size:
        raise ValueError(f"sample id {int(ids[dup[0]])} appears more than once in the batch")
    return [samples[i] for i in by_id.tolist()], ids, tokens, media_count, group


def _read_units(samples: Sequence[SampleSpec], num_replicas: int, num_microbatches: int):
    """`_read_samples` plus the placement units (`_Groups`); ``ValueError`` when there are fewer
    units than the ``num_replicas * num_microbatches`` micro-batches they must fill."""
    n = len(samples)
    samples, ids, tokens, media_count, group = _read_samples(samples)
    groups = _Groups.build(ids, tokens, group)
    slots = num_replicas * num_microbatches
    if groups.count < slots:
        raise ValueError(
            f"{n} samples{groups.in_groups()} cannot fill num_replicas({num_replicas}) * "
            f"num_microbatches({num_microbatches}) = {slots} micro-batches (each needs a sample"
            + (", and a group's samples share one)" if groups.size is not None else ")")
        )
    return samples, ids, tokens, media_count, group, groups


@dataclass(frozen=True)
class _Groups:
    """The units the LLM placement moves: each group, and each sample without a group (a group
    of one), in increasing order of ``key``, the smallest sample id of the unit. When every unit
    is one sample, ``size`` and ``of_sample`` are None and the units are the samples."""

    key: np.ndarray
    tokens: np.ndarray
    """Summed over the members (exact integers)."""
    group: np.ndarray
    """Group id of each unit (-1: a sample without one)."""
    size: np.ndarray | None
    """Members of each unit."""
    of_sample: np.ndarray | None
    """Unit of each sample (samples in increasing id order)."""
    ids: np.ndarray
    sample_tokens: np.ndarray

    @classmethod
    def build(cls, ids: np.ndarray, tokens: np.ndarray, group: np.ndarray) -> _Groups:
        grouped = group >= 0
        if grouped.sum() > 1:
            labels, first_of, inverse = np.unique(
                np.where(grouped, group, -1 - np.arange(ids.size)),
                return_index=True, return_inverse=True)
            if labels.size < ids.size:
                order = np.argsort(first_of, kind="stable")  # units by their smallest id
                rank = np.empty_like(order)
                rank[order] = np.arange(order.size)
                of_sample = rank[inverse]
                unit_first = first_of[order]
                return cls(key=ids[unit_first], tokens=_sum_by(of_sample, tokens, order.size),
                           group=group[unit_first],
                           size=np.bincount(of_sample, minlength=order.size),
                           of_sample=of_sample, ids=ids, sample_tokens=tokens)
        return cls(key=ids, tokens=tokens, group=group, size=None, of_sample=None, ids=ids,
                   sample_tokens=tokens)

    @property
    def count(self) -> int:
        return self.key.size

    def in_groups(self) -> str:
        return "" if self.size is None else f" in {self.count} groups"

    def sum_cost(self, llm_cost: np.ndarray) -> np.ndarray:
        """Each unit's cost: its members' costs added in increasing id order."""
        if self.of_sample is None:
            return llm_cost
        out = np.zeros(self.count)
        np.add.at(out, self.of_sample, llm_cost)
        return out

    def expand(self, per_unit: np.ndarray) -> np.ndarray:
        """A per-unit array as a per-sample one (samples in increasing id order)."""
        return per_unit if self.of_sample is None else per_unit[self.of_sample]

    def members(self, unit: int) -> np.ndarray:
        return np.flatnonzero(self.of_sample == unit)

    def name(self, key: int) -> str:
        """The unit with smallest id ``key`` as an error names it, with its tokens."""
        u = int(np.searchsorted(self.key, key))
        if self.size is None or self.group[u] < 0:
            return f"sample {key} ({int(self.tokens[u])} tokens)"
        rows = self.members(u)
        cut = rows.size > _NAMED_MEMBERS
        shown = rows[:_NAMED_MEMBERS]
        ids = ", ".join([str(int(i)) for i in self.ids[shown]] + ["..."] * cut)
        tokens = " + ".join([str(int(t)) for t in self.sample_tokens[shown]] + ["..."] * cut)
        count = f"{rows.size} samples: " if cut else "samples "
        return (f"group {int(self.group[u])} ({count}{ids} with {tokens} = "
                f"{int(self.tokens[u])} tokens)")

    def check(self, cap: int | None, quota: int | None, num_replicas: int) -> None:
        """``ValueError`` for a group that no placement can hold: over the token cap, larger
        than a replica's quota, or of sizes that cannot add up to the quota."""
        if self.size is None:
            return
        if cap is not None and (over := np.flatnonzero(self.tokens > cap)).size:
            u = int(over[np.argmax(self.tokens[over])])
            raise ValueError(
                f"{self.name(int(self.key[u]))} is over max_tokens_per_microbatch({cap}): a "
                f"group's samples share one micro-batch ({over.size} group(s) over the cap)")
        if quota is None:
            return
        u = int(np.argmax(self.size))
        if self.size[u] > quota:
            raise ValueError(
                f"equal_samples_per_replica: {self.name(int(self.key[u]))} holds "
                f"{int(self.size[u])} samples, more than the {quota} each of "
                f"num_replicas({num_replicas}) gets")
        step = int(np.gcd.reduce(self.size))
        if quota % step:
            raise ValueError(
                f"equal_samples_per_replica: every group has a multiple of {step} samples, so no "
                f"replica can get {quota} ({quota * num_replicas} samples over "
                f"num_replicas({num_replicas}))")


_NAMED_MEMBERS = 16
"""An error lists at most this many samples of a group."""


def plan_by_position(
    samples: Sequence[SampleSpec],
    cost_model: CostModel,
    *,
    num_replicas: int,
    num_microbatches: int,
    replica_vit_ranks: Sequence[Sequence[int]],
    frames_per_chunk: int = DEFAULT_FRAMES_PER_CHUNK,
) -> BatchPlan:
    """The baseline: Megatron's split by position, with the ViT where the sample goes.

    Samples in increasing id order are cut into ``num_replicas`` contiguous runs (the first
    ``n % num_replicas`` runs one longer), each run into ``num_microbatches`` contiguous
    micro-batches; a sample's media chunks go to the ViT ranks ``replica_vit_ranks[r]`` of its own
    replica (Megatron's LLaVA layout: the ViT lives on pipeline stage 0), round robin in chunk
    order.
    Groups (`SampleSpec.group`) stay whole: a group takes the position of its smallest sample id,
    and a cut that would fall inside a group moves to the group's end (`_position_split`).
    The cost model only fills the reports. Same output type as `plan_global_batch`, so the same
    routing and step code runs both.
    """
    if len(replica_vit_ranks) != num_replicas or any(not r for r in replica_vit_ranks):
        raise ValueError(f"replica_vit_ranks needs a non-empty list of ViT ranks for each of the "
                         f"{num_replicas} replicas, got {list(replica_vit_ranks)!r}")
    num_vit_ranks = max(max(r) for r in replica_vit_ranks) + 1
    samples, ids, tokens, media_count, group, groups = _read_units(samples, num_replicas,
                                                                   num_microbatches)
    unit_replica = _position_split(groups.size, groups.count, num_replicas, num_microbatches)
    unit_mb = np.empty(groups.count, dtype=np.int64)
    for r in range(num_replicas):
        rows = np.flatnonzero(unit_replica == r)
        unit_mb[rows] = _position_split(None if groups.size is None else groups.size[rows],
                                        rows.size, num_microbatches)
    replica, microbatch = groups.expand(unit_replica), groups.expand(unit_mb)
    llm_cost = np.asarray(cost_model.llm_cost(tokens), dtype=np.float64)
    mb_costs = np.zeros((num_replicas, num_microbatches))
    np.add.at(mb_costs, (replica, microbatch), llm_cost)

    chunks = _media_chunks(samples, ids, media_count, frames_per_chunk, cost_model)
    chunk_replica = replica[np.searchsorted(ids, chunks.sample_id)]
    vit_rank = np.empty(chunk_replica.size, dtype=np.int64)
    for r in range(num_replicas):
        rows = np.flatnonzero(chunk_replica == r)
        vit_rank[rows] = np.asarray(replica_vit_ranks[r])[np.arange(rows.size)
                                                          % len(replica_vit_ranks[r])]
    vit_loads = np.zeros(num_vit_ranks)
    np.add.at(vit_loads, vit_rank, chunks.cost)
    return _assemble(ids, tokens, group, groups, llm_cost, groups.sum_cost(llm_cost), replica,
                     microbatch, mb_costs, chunks, vit_rank, vit_loads, num_replicas,
                     num_microbatches, num_vit_ranks)


def _contiguous_split(n: int, parts: int) -> np.ndarray:
    """Part index of each of ``n`` items cut into ``parts`` contiguous runs, longest first."""
    sizes = np.full(parts, n // parts)
    sizes[: n % parts] += 1
    return np.repeat(np.arange(parts), sizes)


def _position_split(sizes: np.ndarray | None, count: int, parts: int,
                    min_units: int = 1) -> np.ndarray:
    """Part index of each of ``count`` units (groups of ``sizes`` samples, in position order; None:
    one sample each) cut into ``parts`` contiguous runs of at least ``min_units`` units each
    (``count >= parts * min_units``).

    The cuts of `_contiguous_split` over the samples, each moved forward to the next unit
    boundary (a group across a cut stays in the earlier run), then moved on where a run would
    hold fewer than ``min_units`` units, and back where the runs after it would. Without
    groups, the cuts of `_contiguous_split` themselves."""
    if sizes is None:
        return _contiguous_split(count, parts)
    n = int(sizes.sum())
    cut = np.cumsum(np.where(np.arange(parts) < n % parts, n // parts + 1, n // parts))[:-1]
    first = np.searchsorted(np.cumsum(sizes) - sizes, cut, side="left")  # first unit at/after cut
    k = np.arange(parts)
    bounds = np.concatenate(([0], first))
    bounds = k * min_units + np.maximum.accumulate(bounds - k * min_units)
    bounds = np.minimum(bounds, count - (parts - k) * min_units)
    return np.repeat(k, np.diff(np.concatenate((bounds, [count]))))


def _assemble(ids, tokens, group, groups: _Groups, llm_cost, unit_cost, replica, microbatch,
              mb_costs, chunks: _Chunks, vit_rank, vit_loads, num_replicas: int,
              num_microbatches: int, num_vit_ranks: int) -> BatchPlan:
    arrays = dict(
        sample_ids=ids, replica=replica, microbatch=microbatch, sample_tokens=tokens,
        sample_group=group, microbatch_costs=mb_costs, chunk_sample_id=chunks.sample_id,
        chunk_media_index=chunks.media_index, chunk_frame_start=chunks.frame_start,
        chunk_frame_stop=chunks.frame_stop, chunk_vit_rank=vit_rank, chunk_tokens=chunks.tokens,
        chunk_token_start=chunks.token_start, chunk_token_stop=chunks.token_stop,
        chunk_cost=chunks.cost, chunk_split_group=chunks.split_group,
    )
    for arr in arrays.values():
        arr.flags.writeable = False
    return BatchPlan(
        num_replicas=num_replicas,
        num_microbatches=num_microbatches,
        num_vit_ranks=num_vit_ranks,
        llm_report=PhaseReport.build(mb_costs.sum(axis=1), unit_cost, groups.key),
        vit_report=PhaseReport.build(vit_loads, chunks.cost, np.arange(chunks.size)),
        **arrays,
    )


def _place_vit(chunks: _Chunks, num_vit_ranks: int) -> tuple[np.ndarray, np.ndarray]:
    """(ViT rank of each chunk, load of each rank): LPT over ViT ranks, the pieces of a split
    frame placed as one unit on distinct ranks.

    Units (a chunk, or all pieces of one split frame) go in decreasing cost (a group: its
    largest piece), ties in chunk order. A chunk goes to the least-loaded rank; a group's pieces,
    largest first (ties: token order), to the least-loaded ranks, one each, which is where
    placing them one at a time on ranks not yet used by the group would put them.
    """
    cost, group = chunks.cost, chunks.split_group
    if not (group >= 0).any():
        # Chunks are in (sample id, media index, frame start) order: a stable sort breaks ties so.
        order = np.argsort(-cost, kind="stable")
        vit_rank = np.empty(cost.size, dtype=np.int64)
        vit_rank[order], loads = lpt_assign(cost[order], num_vit_ranks)
        return vit_rank, loads
    n = cost.size
    unit = np.where(group >= 0, -1, np.arange(n))
    grouped = np.flatnonzero(group >= 0)
    n_groups = int(group[grouped].max()) + 1
    unit[grouped] = n + group[grouped]  # group units after every chunk index
    unit_cost = np.full(n + n_groups, -np.inf)
    np.maximum.at(unit_cost, unit, cost)
    unit_first = np.full(n + n_groups, n, dtype=np.int64)
    np.minimum.at(unit_first, unit, np.arange(n))
    live = np.flatnonzero(unit_first < n)
    units = live[np.lexsort((unit_first[live], -unit_cost[live]))]
    members = _offsets(group[grouped], n_groups)
    vit_rank = np.empty(n, dtype=np.int64)
    order, loads = np.arange(num_vit_ranks), np.zeros(num_vit_ranks)
    singles: list[int] = []

    def flush() -> None:
        nonlocal order, loads
        if singles:
            rows = np.asarray(singles, dtype=np.int64)
            vit_rank[rows], order, loads = _lpt_run(cost[rows], order, loads)
            singles.clear()

    for u in units.tolist():
        if u < n:
            singles.append(u)
            continue
        flush()
        pieces = grouped[members[u - n]:members[u - n + 1]]
        pieces = pieces[np.lexsort((pieces, -cost[pieces]))]
        k = pieces.size
        vit_rank[pieces] = order[:k]
        loads = loads.copy()
        loads[:k] += cost[pieces]
        perm = np.argsort(loads, kind="stable")
        loads, order = loads[perm], order[perm]
        _sort_ties_by_index(loads, order)
    flush()
    final = np.empty(num_vit_ranks)
    final[order] = loads
    return vit_rank, final


# --- LPT over identical bins --------------------------------------------------------------------
def lpt_assign(costs: np.ndarray, num_bins: int,
               *, heap_below: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``(bin of each item, final load of each bin)`` when items arrive in the given order
    (normally decreasing cost) and each goes to the least-loaded bin, ties to the lowest index.

    Identical to the textbook heap loop (``lpt_assign_reference``), but it places a whole *window*
    of items per numpy step: with bins sorted by (load, index), the ``j``-th item of the window goes
    to the ``j``-th bin as long as that bin's load is strictly below the new load of every bin
    already given an item in this window. Ties end a window early and are resolved by a re-sort.
    Once windows shrink below ``heap_below`` items (small items filling the lowest bins one by one)
    the rest runs as the heap loop, which is faster there.
    """
    out, order, loads = _lpt_run(costs, np.arange(num_bins), np.zeros(num_bins),
                                 heap_below=heap_below)
    final = np.empty(num_bins)
    final[order] = loads
    return out, final


def _lpt_run(costs: np.ndarray, order: np.ndarray, loads: np.ndarray, *, heap_below: int = 16
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`lpt_assign` continued from a state: bins ``order`` with ``loads``, sorted by (load, bin).
    Returns (bin of each item, the new state)."""
    costs = np.asarray(costs, dtype=np.float64)
    n = costs.size
    num_bins = order.size
    out = np.empty(n, dtype=np.int64)
    pos = 0
    while pos < n:
        k = min(num_bins, n - pos)
        new = loads[:k] + costs[pos:pos + k]
        blocked = np.flatnonzero(loads[1:k] >= np.minimum.accumulate(new[:-1]))
        width = int(blocked[0]) + 1 if blocked.size else k
        if width < heap_below and width < n - pos:
            out[pos:], order, loads = _lpt_heap_tail(costs[pos:], order, loads)
            return out, order, loads
        out[pos:pos + width] = order[:width]
        loads = loads.copy()
        loads[:width] = new[:width]
        perm = np.argsort(loads, kind="stable")
        loads, order = loads[perm], order[perm]
        _sort_ties_by_index(loads, order)
        pos += width
    return out, order, loads


def _lpt_heap_tail(costs: np.ndarray, order: np.ndarray, loads: np.ndarray
                   ) -> tuple[list[int], np.ndarray, np.ndarray]:
    heap = list(zip(loads.tolist(), order.tolist(), strict=True))  # sorted, hence a heap
    chosen = []
    replace = heapq.heapreplace
    for c in costs.tolist():
        load, b = heap[0]
        replace(heap, (load + c, b))
        chosen.append(b)
    heap.sort()
    return (chosen, np.asarray([b for _, b in heap], dtype=np.int64),
            np.asarray([load for load, _ in heap], dtype=np.float64))


def _sort_ties_by_index(loads: np.ndarray, order: np.ndarray) -> None:
    """Inside runs of equal loads (already sorted by load), sort ``order`` ascending, in place."""
    eq = loads[1:] == loads[:-1]
    if not eq.any():
        return
    in_run = np.zeros(loads.size, dtype=bool)
    in_run[1:] |= eq
    in_run[:-1] |= eq
    rows = np.flatnonzero(in_run)
    order[rows] = order[rows][np.lexsort((order[rows], loads[rows]))]


def lpt_assign_reference(costs: Sequence[float], num_bins: int) -> tuple[list[int], list[float]]:
    """The textbook LPT loop (heap of (load, bin)); ``lpt_assign`` must return the same."""
    heap = [(0.0, b) for b in range(num_bins)]
    out = []
    for c in costs:
        load, b = heapq.heappop(heap)
        heapq.heappush(heap, (load + float(c), b))
        out.append(b)
    loads = [0.0] * num_bins
    for load, b in heap:
        loads[b] = load
    return out, loads


# --- LLM placement ------------------------------------------------------------------------------
def _place_samples(cost: np.ndarray, tokens: np.ndarray, ids: np.ndarray, num_replicas: int,
                   num_microbatches: int, cap: int | None, quota: int | None,
                   sizes: np.ndarray | None = None, names=None,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(replica, micro-batch, micro-batch costs) of every unit (positions as in ``ids``).

    Units are samples, or groups of ``sizes`` samples (None: one each) that count as that many
    samples against ``quota``; ``names(id)`` names a unit in errors (default: ``sample id``).
    When the greedy gets stuck with groups and a quota, it runs once more with the largest
    groups first (the single samples, placed last, then fill whatever counts are left) before
    the search."""
    order = np.argsort(-cost, kind="stable")  # ids are increasing: ties go to the smaller id
    placed = _greedy(cost, tokens, order, num_replicas, num_microbatches, cap, quota, sizes)
    if isinstance(placed, int) and quota is not None and sizes is not None:
        again = _greedy(cost, tokens, np.lexsort((-cost, -sizes)), num_replicas,
                        num_microbatches, cap, quota, sizes)
        placed = placed if isinstance(again, int) else again
    if isinstance(placed, int):
        replica, mb, mb_costs = _place_when_greedy_fails(
            cost[order], tokens[order], ids[order], num_replicas, num_microbatches, cap,
            quota, placed, None if sizes is None else sizes[order], names)
        rep_out = np.empty_like(replica)
        mb_out = np.empty_like(mb)
        rep_out[order] = replica
        mb_out[order] = mb
        return rep_out, mb_out, mb_costs
    return placed


def _greedy(cost: np.ndarray, tokens: np.ndarray, order: np.ndarray, num_replicas: int,
            num_microbatches: int, cap: int | None, quota: int | None,
            sizes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | int:
    """The greedy over the units in ``order``: (replica, micro-batch, micro-batch costs) of
    every unit (positions as in ``cost``), or the index in ``order`` where it got stuck."""
    sized = None if sizes is None else sizes[order]
    replica_cap = None if cap is None else cap * num_microbatches
    replica = _assign_replicas(cost[order], tokens[order], num_replicas, num_microbatches,
                               replica_cap, quota, sized)
    placed = None if replica is None else _assign_microbatches(
        cost[order], tokens[order], replica, num_replicas, num_microbatches, cap)
    if placed is None:
        # Some item found no room: redo with the joint (replica, micro-batch) check. It gives
        # the fast path's plan whenever that succeeds (a replica with a micro-batch that has room
        # also has total room), and otherwise fits more. If it too gets stuck, search.
        try:
            replica, mb, mb_costs = _place_joint(cost[order], tokens[order], num_replicas,
                                                 num_microbatches, cap, quota, sized)
        except _NoRoom as stuck:
            return stuck.index
    else:
        mb, mb_costs = placed
    rep_out = np.empty_like(replica)
    mb_out = np.empty_like(mb)
    rep_out[order] = replica
    mb_out[order] = mb
    return rep_out, mb_out, mb_costs


def _assign_replicas(cost: np.ndarray, tokens: np.ndarray, num_replicas: int,
                     num_microbatches: int, replica_cap: int | None,
                     quota: int | None, sizes: np.ndarray | None = None) -> np.ndarray | None:
    """Replica of each item (items in placement order) by constrained LPT on replica totals;
    None when an item finds no replica with total token room (or, for a group of ``sizes``
    samples, none with room left under ``quota``).

    Runs the unconstrained ``lpt_assign`` first; its assignment is the constrained one up to the
    first item where a constraint would bind (a full quota, a replica out of token room, or only as
    many items left as empty micro-batches). From there on a heap loop applies the constraints.
    """
    n = cost.size
    m = num_microbatches
    bins, _ = lpt_assign(cost, num_replicas)
    rank = _rank_within(bins, num_replicas)
    stops = [n]
    if quota is not None:
        if sizes is None:
            over = np.flatnonzero(rank >= quota)
        else:
            by_bin = np.argsort(bins, kind="stable")
            members = np.empty(n, dtype=np.int64)
            members[by_bin] = _group_cumsum(sizes[by_bin], bins[by_bin])
            over = np.flatnonzero(members > quota)
        if over.size:
            stops.append(int(over[0]))
    fills = np.concatenate(([0], np.cumsum(rank < m)[:-1]))  # empty micro-batches filled before i
    gap = (n - np.arange(n)) - (num_replicas * m - fills)
    if (tight := np.flatnonzero(gap == 0)).size:
        stops.append(int(tight[0]))
    if replica_cap is not None:
        by_bin = np.argsort(bins, kind="stable")
        used = np.empty(n, dtype=np.int64)
        used[by_bin] = _group_cumsum(tokens[by_bin], bins[by_bin])
        if (over := np.flatnonzero(used > replica_cap)).size:
            stops.append(int(over[0]))
    start = min(stops)
    if start == n:
        return bins

    prefix = bins[:start]
    counts = np.bincount(prefix, minlength=num_replicas).tolist()
    size = [1] * n if sizes is None else sizes.tolist()
    members = counts.copy() if sizes is None else _sum_by(prefix, sizes[:start],
                                                          num_replicas).tolist()
    loads = np.zeros(num_replicas)
    np.add.at(loads, prefix, cost[:start])  # in item order: the same additions as the greedy
    room = None
    if replica_cap is not None:
        room = (replica_cap - _sum_by(prefix, tokens[:start], num_replicas)).tolist()
    heap = [(load, r) for r, load in enumerate(loads.tolist())
            if quota is None or members[r] < quota]
    heapq.heapify(heap)
    deficit = sum(max(0, m - c) for c in counts)
    forced = False
    out = prefix.tolist() + [0] * (n - start)
    for i in range(start, n):
        c = float(cost[i])
        t = int(tokens[i])
        s = size[i]
        if not forced and n - i == deficit:
            forced, heap = True, _only_short(heap, counts, m)
        found, skipped = _pop_until(heap, lambda r, t=t, s=s: (
            (room is None or room[r] >= t) and (quota is None or members[r] + s <= quota)))
        if found is None:
            return None  # the joint path reaches the same item and reports it
        load, r = found
        counts[r] += 1
        members[r] += s
        if counts[r] <= m:
            deficit -= 1
        if room is not None:
            room[r] -= t
        out[i] = r
        if (quota is not None and members[r] == quota) or (forced and counts[r] == m):
            heapq.heappop(heap)
        else:
            heapq.heapreplace(heap, (load + c, r))
        for e in skipped:
            heapq.heappush(heap, e)
    return np.asarray(out, dtype=np.int64)


def _assign_microbatches(cost: np.ndarray, tokens: np.ndarray, replica: np.ndarray,
                         num_replicas: int, num_microbatches: int,
                         cap: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """LPT of each replica's items (in placement order) over its micro-batches, all replicas at
    once: round ``k`` places the ``k``-th item of every replica. None if an item fits nowhere."""
    n = cost.size
    rank_in_replica = _rank_within(replica, num_replicas)
    rounds = np.argsort(rank_in_replica, kind="stable")
    round_bounds = _offsets(rank_in_replica, int(rank_in_replica.max()) + 1)
    loads = np.zeros((num_replicas, num_microbatches))
    used = np.zeros((num_replicas, num_microbatches), dtype=np.int64)
    counts = np.zeros((num_replicas, num_microbatches), dtype=np.int64)
    mb = np.empty(n, dtype=np.int64)
    for k in range(round_bounds.size - 1):
        items = rounds[round_bounds[k]:round_bounds[k + 1]]
        reps = replica[items]
        key = np.where(counts[reps] == 0, -np.inf, loads[reps])
        if cap is not None:
            key[used[reps] + tokens[items, None] > cap] = np.inf
        j = np.argmin(key, axis=1)
        if cap is not None and np.isposinf(key[np.arange(items.size), j]).any():
            return None
        loads[reps, j] += cost[items]
        used[reps, j] += tokens[items]
        counts[reps, j] += 1
        mb[items] = j
    return mb, loads


def _only_short(heap: list[tuple[float, int]], counts: list[int], m: int):
    """Once only as many samples are left as there are empty micro-batches, they all go to
    replicas that still have fewer than ``m`` samples."""
    heap = [e for e in heap if counts[e[1]] < m]
    heapq.heapify(heap)
    return heap


def _pop_until(heap: list[tuple[float, int]], qualifies):
    """Pop least-loaded replicas until one ``qualifies``; it stays on top of the heap.

    Returns ``((load, replica) or None, popped)``; the caller pushes ``popped`` back.
    """
    popped = []
    while heap:
        if qualifies(heap[0][1]):
            return heap[0], popped
        popped.append(heapq.heappop(heap))
    return None, popped


def _place_joint(cost: np.ndarray, tokens: np.ndarray, num_replicas: int,
                 num_microbatches: int, cap: int | None, quota: int | None,
                 sizes: np.ndarray | None = None,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slow path of ``_place_samples``: a replica qualifies only if one of its micro-batches has
    room (and, for a group of ``sizes`` samples, its quota has room). Items are in placement
    order; ``_NoRoom`` if one fits nowhere."""
    n = cost.size
    m = num_microbatches
    limit = float("inf") if cap is None else cap
    mb_load = [[0.0] * m for _ in range(num_replicas)]
    mb_used = [[0] * m for _ in range(num_replicas)]
    mb_count = [[0] * m for _ in range(num_replicas)]
    counts = [0] * num_replicas
    members = [0] * num_replicas
    size = [1] * n if sizes is None else sizes.tolist()
    heap = [(0.0, r) for r in range(num_replicas)]
    deficit = num_replicas * m
    forced = False
    rep_out = [0] * n
    mb_out = [0] * n

    def best_mb(r: int, t: int) -> int | None:
        fits = [j for j in range(m) if mb_used[r][j] + t <= limit]
        if not fits:
            return None
        return min(fits, key=lambda j: (mb_count[r][j] > 0, mb_load[r][j], j))

    for i, (c, t) in enumerate(zip(cost.tolist(), tokens.tolist(), strict=True)):
        s = size[i]
        if not forced and n - i == deficit:
            forced, heap = True, _only_short(heap, counts, m)
        found, skipped = _pop_until(heap, lambda r, t=t, s=s: (
            (quota is None or members[r] + s <= quota) and best_mb(r, t) is not None))
        if found is None:
            raise _NoRoom(i)
        load, r = found
        j = best_mb(r, t)
        counts[r] += 1
        members[r] += s
        if counts[r] <= m:
            deficit -= 1
        mb_load[r][j] += c
        mb_used[r][j] += t
        mb_count[r][j] += 1
        rep_out[i], mb_out[i] = r, j
        if (quota is not None and members[r] == quota) or (forced and counts[r] == m):
            heapq.heappop(heap)
        else:
            heapq.heapreplace(heap, (load + c, r))
        for e in skipped:
            heapq.heappush(heap, e)
    return (np.asarray(rep_out, dtype=np.int64), np.asarray(mb_out, dtype=np.int64),
            np.asarray(mb_load, dtype=np.float64))


# --- when the greedy finds no room: a bound, a bounded exact search, a packing repair -----------
SEARCH_BUDGET = 300_000
"""Work limit of the exact search, in replicas and micro-batches examined (about 0.1 s on one
core). A count, not a clock: every rank stops at the same point and plans stay identical."""
_MEMO_BINS = 256
"""Failed search states are remembered only up to this many micro-batches (a state's key costs
O(micro-batches) to build)."""


class _NoRoom(Exception):
    """The greedy found no micro-batch with room for item ``index`` (in placement order)."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


def _place_when_greedy_fails(cost: np.ndarray, tokens: np.ndarray, ids: np.ndarray,
                             num_replicas: int, num_microbatches: int, cap: int | None,
                             quota: int | None, stuck: int, sizes: np.ndarray | None = None,
                             names=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Placement of items (in placement order) that the greedy could not fit under ``cap`` (or,
    for groups of ``sizes`` samples, under ``quota``); it stopped at item ``stuck``.

    Whether the items fit does not depend on costs: it is bin packing into ``num_replicas *
    num_microbatches`` micro-batches of ``cap`` tokens, none empty, with ``quota`` samples per
    replica when asked (a group counts its ``sizes``). In turn:

    1. a lower bound (`_bins_needed`; under a quota also the fewest tokens ``quota`` samples can
       hold against one replica's room) may prove that no placement exists;
    2. an exact depth-first search (`_search`) that tries the greedy's own preferences first,
       bounded by `SEARCH_BUDGET`: it finds a placement or proves there is none;
    3. if the search hit its limit and there is no quota, a packing repair (`_pack_first`):
       best-fit decreasing on tokens, then whole micro-batches dealt to replicas by cost.

    Raises ``ValueError`` that says "no placement exists" only when one of 1-2 proved it, and
    "gave up" otherwise, with the numbers either way.
    """
    n, bins = cost.size, num_replicas * num_microbatches
    unit = "" if sizes is None else " group"
    where = ((f"{n} samples" if sizes is None else f"{int(sizes.sum())} samples in {n} groups")
             + f" ({int(tokens.sum())} tokens, largest{unit} {int(tokens.max())}) in "
             f"num_replicas({num_replicas}) x num_microbatches({num_microbatches}) micro-batches"
             + (f" of at most max_tokens_per_microbatch({cap}) tokens" if cap is not None else "")
             + (f" with {quota} samples per replica" if quota is not None else ""))
    hint = ("raise the cap, add micro-batches or replicas, or shrink the batch" if cap is not None
            else "turn off equal_samples_per_replica or regroup the batch")
    need = 1 if cap is None else _bins_needed(tokens, cap)
    if need > bins:
        raise ValueError(
            f"no placement exists for {where}: they need at least {need} micro-batches "
            f"(Martello-Toth bin-packing lower bound) and there are {bins}; {hint}")
    if quota is not None and cap is not None:
        smallest = _fewest_tokens(tokens, sizes, quota)
        if smallest > num_microbatches * cap:
            held = (f"the {quota} smallest samples hold {smallest} tokens" if sizes is None else
                    f"any {quota} samples (groups whole) hold at least {smallest} tokens")
            raise ValueError(
                f"no placement exists for {where}: {held}, more than one replica's "
                f"num_microbatches({num_microbatches}) x max_tokens_per_microbatch({cap}) = "
                f"{num_microbatches * cap}; {hint}")
    placed, exhausted, work = _search(cost, tokens, num_replicas, num_microbatches, cap, quota,
                                      sizes)
    bound = "" if cap is None else f" (lower bound: {need} micro-batches of {bins})"
    if exhausted:
        raise ValueError(
            f"no placement exists for {where}: an exhaustive search ({work} steps) found "
            f"none{bound}; {hint}")
    if placed is None and quota is None:
        placed = _pack_first(cost, tokens, num_replicas, num_microbatches, cap)
    if placed is None:
        who = (f"sample {int(ids[stuck])} ({int(tokens[stuck])} tokens)" if names is None
               else names(int(ids[stuck])))
        raise ValueError(
            f"gave up placing {where}: the greedy found no micro-batch with room for {who}, an "
            f"exact search stopped at its limit of {SEARCH_BUDGET} steps"
            + ("" if quota is not None else " and best-fit packing found no room either")
            + f"; a placement may still exist{bound}; {hint}")
    replica, mb = placed
    mb_costs = np.zeros((num_replicas, num_microbatches))
    np.add.at(mb_costs, (replica, mb), cost)  # in placement order, as the greedy adds them
    return replica, mb, mb_costs


def _fewest_tokens(tokens: np.ndarray, sizes: np.ndarray | None, quota: int) -> int:
    """The fewest tokens that units holding ``quota`` samples in all can have: exact without
    groups (the ``quota`` smallest samples); with groups of ``sizes`` samples a lower bound, the
    ``quota`` samples with the fewest tokens when a group's are shared equally by its members."""
    if sizes is None:
        return int(np.sort(tokens)[:quota].sum())
    total, left = 0, quota
    for t, s in sorted(zip(tokens.tolist(), sizes.tolist(), strict=True),
                       key=lambda ts: Fraction(*ts)):
        if s >= left:
            return total + -(-t * left // s)
        total, left = total + t, left - s
    return total


def _search(cost: np.ndarray, tokens: np.ndarray, num_replicas: int, num_microbatches: int,
            cap: int | None, quota: int | None, sizes: np.ndarray | None = None,
            ) -> tuple[tuple[np.ndarray, np.ndarray] | None, bool, int]:
    """``(placement, exhausted, work)``: the placement (replica and micro-batch of each item)
    or None; ``exhausted`` when the whole search ran (then None proves that none exists) rather
    than stopping after `SEARCH_BUDGET` units of work.

    Depth-first over the items in decreasing token order; each item tries micro-batches in the
    greedy's preference (least-loaded replica by cost, then an empty or the least-loaded
    micro-batch), so its first dive follows the greedy. Pruned, all exactly: a micro-batch
    interchangeable with one already tried for this item (same tokens used; under a quota also
    a replica with the same count and micro-batch fillings); a state already known to fail (same
    remaining items and the same fillings up to those symmetries); more tokens left than room; a
    placement that leaves fewer items than empty micro-batches (of a replica, under a quota:
    fewer samples than its empty micro-batches). A group of ``sizes`` samples counts that many
    against ``quota``; no ``cap``: micro-batches without a token limit.
    """
    n, m, nr = cost.size, num_microbatches, num_replicas
    bins = nr * m
    if cap is None:
        cap = int(tokens.sum())
    order = np.lexsort((np.arange(n), -tokens)).tolist()
    size = tokens[order].tolist()
    weight = cost[order].tolist()
    members = [1] * n if sizes is None else sizes[order].tolist()
    rest = np.concatenate((np.cumsum(tokens[order][::-1])[::-1], [0])).tolist()
    used = [[0] * m for _ in range(nr)]
    mb_load = [[0.0] * m for _ in range(nr)]
    load = [0.0] * nr
    count = [0] * nr
    empty_in = [m] * nr
    empty = bins
    free = bins * cap
    work = 0
    memo = bins <= _MEMO_BINS
    failed: set = set()

    def key(i: int):
        if quota is None:
            return i, tuple(sorted(u for row in used for u in row))
        return i, tuple(sorted((count[r], tuple(sorted(used[r]))) for r in range(nr)))

    def options(i: int):
        """Candidate (replica, micro-batch) pairs for item ``i``, lazily; counts its work."""
        nonlocal work
        t, k = size[i], members[i]
        seen = set()
        work += nr
        for r in sorted(range(nr), key=lambda r: (load[r], r)):
            if quota is not None and count[r] + k > quota:
                continue
            row = used[r]
            shape = (count[r], tuple(sorted(row))) if quota is not None else None
            work += m
            for j in sorted(range(m), key=lambda j: (row[j] > 0, mb_load[r][j], j)):
                u = row[j]
                if u + t > cap or (shape, u) in seen:
                    continue
                if quota is None:
                    if u > 0 and n - i - 1 < empty:
                        continue  # the empty micro-batches could no longer all be filled
                elif quota - count[r] - k < empty_in[r] - (u == 0):
                    continue  # too few samples left for this replica's empty micro-batches
                seen.add((shape, u))
                yield r, j

    # choice[i] = (replica, micro-batch, load and micro-batch load before) of item i
    choice: list[tuple[int, int, float, float]] = []
    stack = [(options(0), key(0) if memo else None)]
    while stack and len(choice) < n and work <= SEARCH_BUDGET:
        i = len(choice)
        candidates, here = stack[-1]
        picked = next(candidates, None)
        if picked is None:  # every option of item i failed: back up
            if here is not None:
                failed.add(here)
            stack.pop()
            if choice:
                r, j, before, mb_before = choice.pop()
                t = size[i - 1]
                used[r][j] -= t
                load[r], mb_load[r][j] = before, mb_before
                count[r] -= members[i - 1]
                free += t
                if used[r][j] == 0:
                    empty_in[r] += 1
                    empty += 1
            continue
        r, j = picked
        t = size[i]
        choice.append((r, j, load[r], mb_load[r][j]))
        if used[r][j] == 0:
            empty_in[r] -= 1
            empty -= 1
        used[r][j] += t
        load[r] += weight[i]
        mb_load[r][j] += weight[i]
        count[r] += members[i]
        free -= t
        if i + 1 < n:
            nxt = key(i + 1) if memo else None
            work += bins if memo else 0
            if rest[i + 1] > free or (memo and nxt in failed):
                stack.append((iter(()), None))  # a dead end: backs up at once, records nothing
            else:
                stack.append((options(i + 1), nxt))
    if len(choice) < n:
        return None, not stack, work
    replica = np.empty(n, dtype=np.int64)
    mb = np.empty(n, dtype=np.int64)
    replica[order] = [c[0] for c in choice]
    mb[order] = [c[1] for c in choice]
    return (replica, mb), False, work


def _pack_first(cost: np.ndarray, tokens: np.ndarray, num_replicas: int,
                num_microbatches: int, cap: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Packing repair, tokens first and cost second (no quota): best-fit decreasing
    (`_best_fit`) over every micro-batch, then whole micro-batches are dealt to replicas,
    heaviest cost first, each to the least-loaded replica that has fewer than
    ``num_microbatches``. None if an item finds no room."""
    n, m = cost.size, num_microbatches
    order = np.lexsort((np.arange(n), -tokens)).tolist()
    members = _best_fit(order, tokens.tolist(), num_replicas * m, cap)
    if members is None:
        return None
    replica = np.empty(n, dtype=np.int64)
    mb = np.empty(n, dtype=np.int64)
    bin_cost = [float(np.sum(cost[sorted(group)])) for group in members]
    heap = [(0.0, r) for r in range(num_replicas)]
    filled = [0] * num_replicas
    for b in sorted(range(len(members)), key=lambda b: (-bin_cost[b], b)):
        load, r = heapq.heappop(heap)
        replica[members[b]], mb[members[b]] = r, filled[r]
        filled[r] += 1
        if filled[r] < m:
            heapq.heappush(heap, (load + bin_cost[b], r))
    return replica, mb


def _best_fit(order: list[int], size: list[int], bins: int, cap: int) -> list[list[int]] | None:
    """Items ``order`` (largest first, at least ``bins`` of them) packed into ``bins`` bins of
    ``cap``, each into the fullest bin with room (ties to the lowest bin), no bin left empty.
    None if an item finds no room.

    Once the items left only just suffice for the empty bins, the non-empty bins close and the
    last items go one to each empty bin (an item alone always fits). O(n log bins + bins).
    """
    room = [(cap, b) for b in range(bins)]  # open bins, sorted by (room left, bin)
    items: list[list[int]] = [[] for _ in range(bins)]
    empty, to_place, closed = bins, len(order), False
    for i in order:
        k = bisect.bisect_left(room, (size[i], -1))
        if k == len(room):
            return None
        left, b = room.pop(k)
        empty -= not items[b]
        items[b].append(i)
        to_place -= 1
        if not closed and to_place == empty:
            closed = True
            room = [(cap, c) for c in range(bins) if not items[c]]
        if not closed:
            bisect.insort(room, (left - size[i], b))
    return items


def _bins_needed(tokens: np.ndarray, cap: int) -> int:
    """Martello and Toth's lower bound L2 on the bins of size ``cap`` that hold ``tokens``
    (each <= cap). For every threshold ``k <= cap / 2``: items over ``cap - k`` need a bin each,
    so do items in ``(cap / 2, cap - k]``, and items in ``[k, cap / 2]`` fill what the latter
    leave free before they need more bins."""
    t = np.sort(np.asarray(tokens, dtype=np.int64))
    total = np.concatenate(([0], np.cumsum(t)))
    k = np.unique(np.concatenate(([0], t[2 * t <= cap])))
    half = np.searchsorted(t, cap // 2, side="right")      # items <= cap / 2
    lo = np.searchsorted(t, k, side="left")                 # first item >= k
    hi = np.searchsorted(t, cap - k, side="right")          # items <= cap - k
    over, mid = t.size - hi, hi - half
    spill = (total[half] - total[lo]) - (mid * cap - (total[hi] - total[half]))
    return int(np.max(over + mid + np.maximum(0, -(-spill // cap))))


def _place_for_pipeline(cost: np.ndarray, tokens: np.ndarray, ids: np.ndarray,
                        num_replicas: int, num_microbatches: int, cap: int | None,
                        quota: int | None, pipeline: PipelineSchedule,
                        sizes: np.ndarray | None = None, names=None,
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(replica, micro-batch, micro-batch costs) of every unit (see `_place_samples`) by the rule
    of `PipelineSchedule`."""
    best = None
    errors = []
    for m in pipeline.candidates(num_microbatches):
        if m * num_replicas > cost.size:
            continue
        try:
            replica, mb, mb_costs = _place_samples(cost, tokens, ids, num_replicas, m, cap, quota,
                                                   sizes, names)
        except ValueError as e:
            errors.append(e)
            continue
        mb, mb_costs = _pipeline_order(replica, mb, mb_costs, ids)
        perm, span = _swap_descent(mb_costs, pipeline)
        if best is None or span < best[0]:
            rows = np.arange(num_replicas)[:, None]
            slot = np.empty_like(perm)
            slot[rows, perm] = np.arange(m)  # slot[r, j]: new position of micro-batch j
            best = (span, replica, slot[replica, mb], mb_costs[rows, perm])
    if best is None:
        if errors:
            raise errors[-1]
        units = "samples" if sizes is None else "groups of samples"
        raise ValueError(f"PipelineSchedule: no micro-batch count in "
                         f"{pipeline.candidates(num_microbatches)} fits {cost.size} {units} on "
                         f"{num_replicas} replicas")
    return best[1], best[2], best[3]


def _swap_descent(mb_costs: np.ndarray, pipeline: PipelineSchedule
                  ) -> tuple[np.ndarray, float]:
    """``(perm[r, position] = micro-batch, slowest makespan)``: each replica's order improved by
    steepest descent over adjacent swaps of the simulated makespan."""
    r, m = mb_costs.shape
    perm = np.tile(np.arange(m), (r, 1))
    cur = mb_costs.copy()
    span = pipeline.makespans(cur)
    rows = np.arange(r)
    idx = np.arange(m - 1)
    for _ in range(pipeline.swap_rounds if m > 1 else 0):
        cand = np.repeat(cur[:, None, :], m - 1, axis=1)
        cand[:, idx, idx], cand[:, idx, idx + 1] = cur[:, idx + 1], cur[:, idx]
        spans = pipeline.makespans(cand)
        j = np.argmin(spans, axis=1)
        better = spans[rows, j] < span
        if not better.any():
            break
        b = rows[better]
        jb = j[better]
        cur[b] = cand[b, jb]
        span[b] = spans[b, jb]
        perm[b, jb], perm[b, jb + 1] = perm[b, jb + 1], perm[b, jb]
    return perm, float(span.max())


def plan_loongforge_style(
    samples: Sequence[SampleSpec],
    cost_model: CostModel,
    *,
    num_replicas: int,
    num_microbatches: int,
    num_vit_ranks: int,
    frames_per_chunk: int = DEFAULT_FRAMES_PER_CHUNK,
) -> BatchPlan:
    """A strong baseline in the style of LoongForge's data-parallel balancing.

    - LLM: the samples in data order (increasing id) are cut into ``num_microbatches``
      contiguous global micro-batches (the first ``n % num_microbatches`` one longer); inside
      global micro-batch ``j`` the samples go, by LPT on ``CostModel.llm_cost``, to the replica
      with the least cost so far counting its micro-batches ``0..j`` (LoongForge's
      cross-micro-batch balance), ties to the lowest index, the last ones only to replicas
      still empty in ``j``. Micro-batches keep the data order (no pipeline-aware order).
    - ViT: whole items (images, chunks of ``frames_per_chunk`` frames) by LPT over all
      ``num_vit_ranks`` ranks, as `plan_global_batch` without splitting.

    LoongForge balances each micro-batch only when it is imbalanced by 20% or more; here every
    one is balanced, which only makes the baseline stronger. Groups (`SampleSpec.group`) move as
    one sample of their summed cost; the position cut keeps them whole as in `plan_by_position`,
    with at least ``num_replicas`` units in every global micro-batch.
    """
    for name, value in (("num_replicas", num_replicas), ("num_microbatches", num_microbatches),
                        ("num_vit_ranks", num_vit_ranks), ("frames_per_chunk", frames_per_chunk)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    samples, ids, tokens, media_count, group, groups = _read_units(samples, num_replicas,
                                                                   num_microbatches)
    llm_cost = np.asarray(cost_model.llm_cost(tokens), dtype=np.float64)
    cost = groups.sum_cost(llm_cost)
    unit_mb = _position_split(groups.size, groups.count, num_microbatches, num_replicas)
    unit_replica = np.empty(groups.count, dtype=np.int64)
    load = [0.0] * num_replicas
    for j in range(num_microbatches):
        rows = np.flatnonzero(unit_mb == j)
        rows = rows[np.argsort(-cost[rows], kind="stable")]
        empty = set(range(num_replicas))
        for left, i in zip(range(rows.size, 0, -1), rows.tolist(), strict=True):
            pool = sorted(empty) if left == len(empty) else range(num_replicas)
            r = min(pool, key=lambda q: (load[q], q))
            unit_replica[i] = r
            load[r] += float(cost[i])
            empty.discard(r)
    replica, microbatch = groups.expand(unit_replica), groups.expand(unit_mb)
    mb_costs = np.zeros((num_replicas, num_microbatches))
    np.add.at(mb_costs, (replica, microbatch), llm_cost)
    chunks = _media_chunks(samples, ids, media_count, frames_per_chunk, cost_model)
    vit_rank, vit_loads = _place_vit(chunks, num_vit_ranks)
    return _assemble(ids, tokens, group, groups, llm_cost, cost, replica, microbatch, mb_costs,
                     chunks, vit_rank, vit_loads, num_replicas, num_microbatches, num_vit_ranks)


def _pipeline_order(replica: np.ndarray, microbatch: np.ndarray, mb_costs: np.ndarray,
                    ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber each replica's micro-batches: lightest first, second lightest last, and so on
    inwards, so the heaviest sit in the middle of the pipeline schedule (ties: smallest id)."""
    num_replicas, m = mb_costs.shape
    first_id = np.full(num_replicas * m, np.iinfo(np.int64).max)
    np.minimum.at(first_id, replica * m + microbatch, ids)
    first_id = first_id.reshape(num_replicas, m)
    rank = np.empty((num_replicas, m), dtype=np.int64)  # rank[r, j]: position of j by lightness
    rows = np.repeat(np.arange(num_replicas), m)
    by_light = np.lexsort((first_id.ravel(), mb_costs.ravel(), rows)).reshape(num_replicas, m) % m
    rank[rows.reshape(num_replicas, m), by_light] = np.arange(m)
    slot = np.where(rank % 2 == 0, rank // 2, m - 1 - rank // 2)
    new_costs = np.empty_like(mb_costs)
    new_costs[rows.reshape(num_replicas, m), slot] = mb_costs
    return slot[replica, microbatch], new_costs


# --- ViT items ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Chunks:
    """Column arrays of every ViT work item, in (sample id, media index, frame start, token
    start) order."""

    sample_id: np.ndarray
    media_index: np.ndarray
    frame_start: np.ndarray
    frame_stop: np.ndarray
    tokens: np.ndarray
    token_start: np.ndarray
    token_stop: np.ndarray
    split_group: np.ndarray
    cost: np.ndarray

    @property
    def size(self) -> int:
        return self.cost.size


def _media_chunks(samples: Sequence[SampleSpec], ids: np.ndarray, media_count: np.ndarray,
                  frames_per_chunk: int, cost_model: CostModel, *,
                  split_share: float | None = None, num_vit_ranks: int = 1) -> _Chunks:
    """Every chunk of ``frames_per_chunk`` consecutive frames of each media item (an image is one
    chunk), in (sample id, media index, frame start) order, with its ViT cost.

    With ``split_share`` (see `plan_global_batch`), items costing more than ``split_share *
    total / num_vit_ranks`` are split: a multi-frame chunk into single frames, and a frame still
    above it into ``k`` contiguous token slices (`_split_count`), each of cost
    ``CostModel.vit_piece_cost``."""
    nf = np.frombuffer(b"".join(map(_MEDIA_FRAMES_BYTES, samples)), dtype=_WIRE).astype(np.int64)
    if nf.size == 0:
        e = np.zeros(0, dtype=np.int64)
        return _Chunks(e, e, e, e, e, e, e, e, np.zeros(0))
    frame_tokens = np.frombuffer(b"".join(map(_FRAME_BYTES, samples)),
                                 dtype=_WIRE).astype(np.int64)
    media_sample = np.repeat(ids, media_count)
    media_first = np.repeat(np.cumsum(media_count) - media_count, media_count)
    media_index = np.arange(nf.size) - media_first
    media_frame0 = np.cumsum(nf) - nf  # offset of each media's first frame in frame_tokens

    per_media = -(-nf // frames_per_chunk)
    chunk_media = np.repeat(np.arange(nf.size), per_media)
    ordinal = np.arange(chunk_media.size) - np.repeat(np.cumsum(per_media) - per_media, per_media)
    start = ordinal * frames_per_chunk
    stop = np.minimum(start + frames_per_chunk, nf[chunk_media])
    tokens, cost = _chunk_cost(frame_tokens, media_frame0[chunk_media] + start, stop - start,
                               cost_model)
    token_start = np.zeros_like(tokens)
    token_stop = tokens.copy()
    group = np.full(tokens.size, -1, dtype=np.int64)

    if split_share is not None and cost.size:
        threshold = split_share * float(cost.sum()) / num_vit_ranks
        # 1. multi-frame chunks over the threshold become single frames
        reps = np.where((cost > threshold) & (stop - start > 1), stop - start, 1)
        if (reps > 1).any():
            row = np.repeat(np.arange(cost.size), reps)
            offset = np.arange(row.size) - np.repeat(np.cumsum(reps) - reps, reps)
            chunk_media, start = chunk_media[row], start[row] + offset
            stop = np.where(reps[row] > 1, start + 1, stop[row])
            tokens, cost = _chunk_cost(frame_tokens, media_frame0[chunk_media] + start,
                                       stop - start, cost_model)
        # 2. single frames over the threshold become k token slices on distinct ranks
        single = (stop - start == 1) & (cost > threshold)
        k = np.ones(cost.size, dtype=np.int64)
        k[single] = _split_count(tokens[single], cost_model, threshold, num_vit_ranks)
        row = np.repeat(np.arange(cost.size), k)
        piece = np.arange(row.size) - np.repeat(np.cumsum(k) - k, k)
        kr, whole = k[row], tokens[row]
        token_start = piece * whole // kr
        token_stop = (piece + 1) * whole // kr
        split = kr > 1
        group = np.where(split, np.cumsum(np.concatenate(([0], (k > 1)[:-1].astype(np.int64))))
                         [row], -1)
        chunk_media, start, stop = chunk_media[row], start[row], stop[row]
        cost = np.where(split, cost_model.vit_piece_cost(
            (token_stop - token_start) * cost_model.patches_per_token,
            whole * cost_model.patches_per_token), cost[row])
        tokens = token_stop - token_start
    return _Chunks(media_sample[chunk_media], media_index[chunk_media], start, stop, tokens,
                   token_start, token_stop, group, np.asarray(cost, dtype=np.float64))


def _chunk_cost(frame_tokens: np.ndarray, first: np.ndarray, count: np.ndarray,
                cost_model: CostModel) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, ViT cost) of runs of ``count`` frames starting at ``first`` in
    ``frame_tokens``, from exact integer sums."""
    ends = first + count
    cum = np.concatenate(([0], np.cumsum(frame_tokens)))
    patches = frame_tokens * cost_model.patches_per_token
    cum_p2 = np.concatenate(([0], np.cumsum(patches * patches)))
    tokens = cum[ends] - cum[first]
    sum_p = tokens * cost_model.patches_per_token
    sum_p2 = cum_p2[ends] - cum_p2[first]
    cost = np.asarray(cost_model.group_cost("vit", sum_p, sum_p2, count), dtype=np.float64)
    return tokens, cost


def _split_count(tokens: np.ndarray, cost_model: CostModel, threshold: float,
                 num_vit_ranks: int) -> np.ndarray:
    """Pieces for frames of ``tokens`` visual tokens: the fewest ``k`` whose equal slices each
    cost at most ``threshold`` (a slice of ``P/k`` patches costs ``D/k + c_v + x_v*P`` with
    ``D = a_v*P + b_v*P**2 - x_v*P``), at most ``min(num_vit_ranks, tokens)``; 1 when splitting
    cannot lower a slice's cost (``D <= 0``: the exchange costs more than the compute it
    spreads), the maximum when no ``k`` reaches the threshold."""
    p = tokens.astype(np.float64) * cost_model.patches_per_token
    a, b, c = cost_model.coefficients("vit")
    x = cost_model.vit_exchange
    spread = a * p + b * p * p - x * p
    room = threshold - c - x * p
    k_max = np.minimum(num_vit_ranks, tokens)
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.where(room > 0, np.ceil(spread / np.where(room > 0, room, 1.0)), np.inf)
    k = np.where(need >= k_max, k_max, np.maximum(need, 1)).astype(np.int64)
    return np.where(spread > 0, k, 1)


# --- helpers ------------------------------------------------------------------------------------
def _rank_within(keys: np.ndarray, size: int) -> np.ndarray:
    """``rank[i]``: how many earlier items share item ``i``'s key."""
    by_key = np.argsort(keys, kind="stable")
    starts = _offsets(keys, size)
    rank = np.empty(keys.size, dtype=np.int64)
    rank[by_key] = np.arange(keys.size) - np.repeat(starts[:-1], np.diff(starts))
    return rank


def _group_cumsum(values: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Running sum of integer ``values`` restarting at each new key (``sorted_keys`` grouped)."""
    total = np.cumsum(values)
    first = np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1]))
    base = np.maximum.accumulate(np.where(first, np.arange(values.size), 0))
    return total - (total[base] - values[base])


def _sum_by(keys: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """Exact integer sums of ``values`` per key."""
    out = np.zeros(size, dtype=np.int64)
    np.add.at(out, keys, values)
    return out


def _offsets(keys: np.ndarray, size: int) -> np.ndarray:
    """``offsets[b]:offsets[b + 1]`` is where key ``b`` sits once ``keys`` are sorted."""
    out = np.zeros(size + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=size), out=out[1:])
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else (1.0 if a == 0 else float("inf"))


def _preview(values: tuple, limit: int = 8) -> str:
    head = ", ".join(repr(v) for v in values[:limit])
    return f"({head}{', ...' if len(values) > limit else ''}) [{len(values)} values]"
