"""Step loading: global step -> this rank's share of the global batch, fetched only where needed.

For global step ``s`` every rank, independently and identically:

1. takes the next ``global_batch_size`` positions of the global order from the cursor
   (`dataloader.mixture.Mixture`: position -> dataset, epoch, sample) and reads their planning
   sizes from the manifest (``Manifest.planning_sizes``: only those rows; a columnar manifest
   reads them from memory-mapped columns, without the conversation text);
2. plans the step (`hetero_parallel.step_plan.plan_step`, keyed by position as sample id): the
   balancer's placement, this rank's routing table and its replica's micro-batch shapes;
3. fetches what its role needs (`ParallelPlan.data_role`): a ViT rank decodes the frames of its
   chunks (``IOClient.decode(path, frame_start, frame_stop)``, one request per chunk); a token
   loader (``tp == cp == 0`` on the first / last stage) tokenizes its replica's samples; nobody
   else fetches anything.

Steps 1-3 run ahead in a background thread (``LoaderConfig.prefetch`` steps, bounded queue). The
calling thread then runs this step's collectives, in this order on every rank:

4. **Bad-sample agreement** (the contract). A media error (`io_server.media.MediaError`: missing,
   corrupt, or sizes that no longer match the manifest) marks the sample bad on the rank that saw
   it. One all-reduce (MAX) of a ``global_batch_size + 1`` int32 vector over ``verdict_group``
   (default: the world) gives every rank the same bad set (the last entry flags a fatal error, e.g.
   every I/O server down, so that all ranks raise together instead of hanging). If any sample is
   bad, it is dropped, the batch is refilled with the next positions of the order, re-planned and
   re-fetched (chunks fetched before stay cached), and agreed again, until no candidate is bad.
   The step's batch is therefore *the first ``global_batch_size`` good positions at or after the
   cursor*, and the cursor moves past the last one. Whether a sample is bad depends only on its
   files (every chunk of every candidate is fetched by some rank in every layout), so resumed,
   re-sharded and uninterrupted runs agree; a good sample is never dropped or repeated.
5. **Token broadcast**: each token loader broadcasts its replica's token ids (with the target
   flags packed in) over its tensor-and-context group (``token_group``); the peers allocate the
   buffer from the layouts they computed in step 1.

Finally the micro-batches are built from the broadcast tokens and checked against the step plan's
routing table (`hetero_parallel.step_plan.check_microbatches`). `StepData` then holds exactly what
``hetero_parallel.trainer.HeteroTrainer.step`` consumes.

The state (`state_dict`) counts only batches returned by `next_step`, never prefetched ones.

Post-training additions:

- **Preference mode** (``LoaderConfig.preference``): each position is a (prompt, chosen, rejected)
  record, loaded as samples ``2p`` and ``2p + 1`` (`dataloader.manifest.Record.answers`) of one
  balancer group (same replica and micro-batch, so the pair's loss is complete on one last stage)
  with the rejected answer sharing the chosen one's media (``SampleLayout.media_from``: decoded
  and encoded once). Bad media drop the whole pair. `StepData.pairs` lists the pairs, and with a
  reference store (`dataloader.reference_logps`) `StepData.reference_logps` their reference
  log-probs.
- **Per-prompt state** (``LoaderConfig.prompt_state``): an int8 column by manifest row (e.g. a
  hint level L1-L5 for progressive hint sampling, set between epochs with `set_prompt_state`),
  reported per record in `StepData.prompt_state` and saved in the state as a tensor, so a
  checkpoint stores it once and restores it on any layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from dataloader.manifest import Manifest, Record
from dataloader.mixture import Mixture
from dataloader.sequence import (
    IMAGE_PAD,
    VIDEO_PAD,
    ByteTokenizer,
    SampleSizes,
    Tokenizer,
    sample_sizes,
    tokenize,
)
from dataloader.state import STATE_VERSION, IncompatibleStateError, LoaderState
from hetero_parallel.balancer import BatchPlan
from hetero_parallel.cost_model import CostModel
from hetero_parallel.layout import MicroBatch, SampleLayout, lay_out_positions, make_microbatch
from hetero_parallel.plan import ParallelPlan
from hetero_parallel.step_plan import StepConfig, StepPlan, check_microbatches, plan_step

if TYPE_CHECKING:
    from dataloader.reference_logps import ReferenceLogps
    from io_server.client import IOClient

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """What determines the global batches (the first four) and how they are planned and loaded."""

    global_batch_size: int
    """Samples per global batch (over all data-parallel replicas)."""
    seed: int = 0
    """Seeds every shuffle."""
    weights: Mapping[str, float] | None = None
    """Mixture weights by dataset name (e.g. video 24, image 50, text 26); None: proportional to
    the datasets' sizes."""
    step: StepConfig = StepConfig()
    """How each global batch is split into work (micro-batches, ViT chunks, padding); its
    ``frames_per_chunk`` is also the frames per decode request."""
    prefetch: int = 2
    """Steps loaded ahead in a background thread; 0 loads in the calling thread."""
    max_replacement_rounds: int = 64
    """Bad-sample rounds per step before giving up (a dataset that is mostly broken)."""
    preference: bool = False
    """Preference mode: every record is a prompt with a chosen and a rejected answer
    (`dataloader.manifest.Record.answers`); position ``p`` becomes samples ``2p`` (chosen) and
    ``2p + 1`` (rejected), one balancer group (same replica and micro-batch), the rejected one
    sharing the chosen one's media (the ViT encodes them once). ``global_batch_size`` counts
    pairs."""
    prompt_state: bool = False
    """Keep a per-record int8 state column (e.g. a hint level set between epochs,
    `StepLoader.set_prompt_state`): reported per sample in `StepData.prompt_state` and saved
    in the loader's state (a tensor: the checkpoint stores it once, for any layout)."""

    def __post_init__(self) -> None:
        if not isinstance(self.step, StepConfig):
            raise ValueError(f"LoaderConfig.step must be a StepConfig, got {self.step!r}")
        for name in ("global_batch_size", "max_replacement_rounds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LoaderConfig.{name} must be an int >= 1, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"LoaderConfig.seed must be an int >= 0, got {self.seed!r}")
        if not isinstance(self.prefetch, int) or self.prefetch < 0:
            raise ValueError(f"LoaderConfig.prefetch must be an int >= 0, got {self.prefetch!r}")
        for name in ("preference", "prompt_state"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LoaderConfig.{name} must be a bool, got "
                                 f"{getattr(self, name)!r}")


@dataclass(frozen=True)
class SampleRef:
    """Where a global position's sample comes from."""

    position: int
    """Global position in the order; the balancer's and the layouts' sample id."""
    dataset: str
    epoch: int
    """The dataset's epoch."""
    index: int
    """Sample index in the dataset."""
    record_id: str
    row: int
    """The record's row in the manifest (what per-record state and stores are keyed by)."""


@dataclass(frozen=True)
class SkippedSample:
    position: int
    record_id: str
    reason: str
    """The media error, on the rank(s) that saw it; elsewhere "reported by another rank"."""


@dataclass(frozen=True)
class StepData:
    """One global step, as this rank needs it (see the module docstring)."""

    step: int
    samples: tuple[SampleRef, ...]
    """The global batch's records, by increasing position (the same on every rank)."""
    plan: StepPlan
    """The step plan of this rank: placement, routing table, micro-batch shapes."""
    total_loss_tokens: int
    """Loss-carrying positions of the whole global batch."""
    vision_frames: tuple[torch.Tensor, ...]
    """uint8 ``[H, W, 3]`` frames of this rank's chunks in ``batch.chunks_for_vit_rank`` order;
    empty on a rank without a ViT replica."""
    microbatches: tuple[MicroBatch, ...] | None
    """This replica's micro-batches in pipeline order on its first and last stage, else None."""
    position_ids: tuple[torch.Tensor, ...] | None = None
    """With a ``positions`` function: this replica's micro-batches' rotary positions, laid out as
    the micro-batches (on every rank: multimodal rope needs them on middle stages too)."""
    skipped: tuple[SkippedSample, ...] = ()
    pairs: Mapping[int, int] = field(default_factory=dict)
    """Preference mode: chosen sample id -> rejected sample id, for every pair of the batch."""
    reference_logps: Mapping[int, float] | None = None
    """With a reference store: sample id -> the reference model's summed log-prob of its
    answer (`dataloader.reference_logps`)."""
    prompt_state: tuple[int, ...] = ()
    """With ``LoaderConfig.prompt_state``: each record's state, aligned with ``samples``."""

    @property
    def sample_ids(self) -> tuple[int, ...]:
        """Every sample of the global batch, increasing (the position itself, or ``2p`` and
        ``2p + 1`` in preference mode)."""
        return tuple(self.plan.batch.sample_ids.tolist())

    @property
    def batch(self) -> BatchPlan:
        return self.plan.batch

    @property
    def layouts(self) -> Mapping[int, SampleLayout]:
        """Every sample of the global batch, by position."""
        return self.plan.layouts


@dataclass
class FetchCounters:
    """What this rank fetched (including prefetched steps not yet consumed)."""

    decode_requests: int = 0
    """``IOClient.decode`` calls (one per chunk)."""
    frames_decoded: int = 0
    bytes_decoded: int = 0
    token_loads: int = 0
    """Samples tokenized for the token path (token loaders only)."""
    broadcasts_sent: int = 0
    broadcasts_received: int = 0
    bad_media_seen: int = 0
    """Media errors this rank saw itself."""

    def snapshot(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class _Round:
    """One planning + fetching round of a step (the prefetched unit)."""

    step: int
    positions: list[int]
    generation: int
    refs: dict[int, SampleRef] = field(default_factory=dict)
    sizes: dict[int, SampleSizes] = field(default_factory=dict)
    plan: StepPlan | None = None
    pixels: dict[tuple[int, int, int, int], list[torch.Tensor]] = field(default_factory=dict)
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)
    bad: dict[int, str] = field(default_factory=dict)
    fatal: str | None = None


class StepLoader:
    """Loads global step after global step for one rank of ``plan``; resumable to the sample.

    Args:
        manifest: ``dataloader.manifest.open_manifest``'s JSONL (in memory) or columnar
            (memory-mapped) manifest; only the rows of each global batch are read, and the text
            and media of a row only by the ranks that need them.
        config: batch size, seed, mixture weights, planning and prefetch options.
        plan: the parallel layout; ``rank`` is this process's rank in it.
        cost_model: the balancer's cost model (the same on every rank).
        client: fetches pixels (ViT ranks only); default ``IOClient()`` decodes in-process.
        tokenizer: default `ByteTokenizer`.
        token_group: this rank's tensor-and-context group (``ParallelGroups.token_broadcast``);
            needed when ``tp * cp > 1``.
        positions: the model's rotary positions of a sample, ``[seq_len]`` or ``[axes, seq_len]``
            int64 from its `SampleLayout` (e.g. multimodal (t, h, w) positions); default
            ``0 .. seq_len - 1``. Computed by the ranks that build micro-batches.
        verdict_group: the group that agrees on bad samples: every rank of the plan (default: the
            default process group). With ``plan.world_size == 1`` no collective is run.
        reference: preference mode: the reference model's log-probs of every record's answers
            (`dataloader.reference_logps.ReferenceLogps`), attached to each step.

    Every rank of the plan must call `next_step` the same number of times (it is collective).
    """

    def __init__(
        self,
        manifest: Manifest,
        config: LoaderConfig,
        *,
        plan: ParallelPlan,
        rank: int,
        cost_model: CostModel,
        client: IOClient | None = None,
        tokenizer: Tokenizer | None = None,
        token_group: dist.ProcessGroup | None = None,
        verdict_group: dist.ProcessGroup | None = None,
        positions: Callable[[SampleLayout], np.ndarray] | None = None,
        reference: ReferenceLogps | None = None,
    ) -> None:
        if not 0 <= rank < plan.world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size({plan.world_size}))")
        mbs = config.step.num_microbatches
        if config.global_batch_size < plan.dp * mbs:
            raise ValueError(
                f"global_batch_size({config.global_batch_size}) < dp({plan.dp}) * "
                f"num_microbatches({mbs}): every micro-batch needs a sample")
        config.step.divisor(plan)  # a bad pad_to_multiple_of fails here, before any step
        if config.step.equal_samples_per_replica and config.global_batch_size % plan.dp:
            raise ValueError(f"equal_samples_per_replica: global_batch_size("
                             f"{config.global_batch_size}) is not a multiple of dp({plan.dp})")
        sizes = manifest.datasets
        weights = dict(config.weights) if config.weights is not None else sizes
        unknown = sorted(set(weights) - set(sizes))
        if unknown:
            raise ValueError(f"mixture weights name datasets {unknown} that the manifest does not "
                             f"have (it has {sorted(sizes)})")
        if config.weights is None:
            logger.info("mixture weights default to the dataset sizes: %s", sizes)
        self.manifest = manifest
        self.config = config
        self.plan = plan
        self.rank = rank
        self.role = plan.data_role(rank)
        self.vit_index = plan.vit_index(rank)
        self.cost_model = cost_model
        self.tokenizer = tokenizer or ByteTokenizer()
        self._visual_ids = {self.tokenizer.special_id(IMAGE_PAD),
                            self.tokenizer.special_id(VIDEO_PAD)}
        self.mixture = Mixture.create(weights, {k: sizes[k] for k in weights}, config.seed)
        self._rows = [manifest.dataset_rows(n) for n in self.mixture.names]
        self.token_group = token_group
        self.verdict_group = verdict_group
        self.positions = positions
        c = plan.coords(rank)
        self._token_src = plan.rank_of(tp=0, cp=0, dp=c.dp, pp=c.pp)
        if self.role.needs_tokens and plan.tp * plan.cp > 1 and token_group is None:
            raise ValueError(f"rank {rank} needs token ids from rank {self._token_src} but no "
                             "token_group was given (pass ParallelGroups.token_broadcast)")
        if client is None and self.vit_index is not None:
            from io_server.client import IOClient

            client = IOClient()
        self.client = client
        if reference is not None and not config.preference:
            raise ValueError("reference log-probs are per preference pair: set "
                             "LoaderConfig.preference=True")
        if reference is not None:
            reference.check_manifest(manifest)
        self.reference = reference
        self._per_record = 2 if config.preference else 1
        self._prompt_state = np.zeros(len(manifest) if config.prompt_state else 0, np.int8)
        self.counters = FetchCounters()
        self._lock = threading.Lock()
        self._cursor = 0
        self._step = 0
        self._skipped = 0
        self._generation = 0
        self._queue: queue.Queue[_Round] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- order -------------------------------------------------------------------------------

    def sample_ref(self, position: int) -> SampleRef:
        """The sample at global position ``position`` (pure, O(1))."""
        d = self.mixture.locate(position)
        row = int(self._rows[d.dataset][d.index])
        return SampleRef(position, self.mixture.names[d.dataset], d.epoch, d.index,
                         self.manifest.record_id(row), row)

    def _refs(self, positions: list[int]) -> dict[int, tuple[SampleRef, int]]:
        """Position -> (its reference, its manifest row)."""
        ds, epoch, index = self.mixture.locate_many(np.asarray(positions, dtype=np.int64))
        out = {}
        for p, d, e, i in zip(positions, ds.tolist(), epoch.tolist(), index.tolist(),
                              strict=True):
            row = int(self._rows[d][i])
            out[p] = (SampleRef(p, self.mixture.names[d], e, i, self.manifest.record_id(row),
                                row), row)
        return out

    # -- state -------------------------------------------------------------------------------

    def _state(self, cursor: int, step: int, skipped: int) -> LoaderState:
        return LoaderState(
            format_version=STATE_VERSION, seed=self.config.seed,
            epoch=cursor // len(self.manifest), cursor=cursor, step=step,
            skipped_samples=skipped, global_batch_size=self.config.global_batch_size,
            manifest_hash=int(self.manifest.hash, 16),
            mixture_hash=int(self.mixture.fingerprint(), 16),
        )

    def state_dict(self) -> dict[str, int | torch.Tensor]:
        """Integers (reflecting the batches returned so far, not the prefetched ones); with
        ``LoaderConfig.prompt_state`` also the state column (``prompt_state``, an int8 tensor
        sharing the loader's memory, so a checkpoint loads into it in place) and its CRC-32
        (``prompt_state_crc``: equal on every rank, which the checkpoint manager checks)."""
        out: dict[str, int | torch.Tensor] = dict(
            self._state(self._cursor, self._step, self._skipped).to_dict())
        if self.config.prompt_state:
            out["prompt_state"] = torch.from_numpy(self._prompt_state)
            out["prompt_state_crc"] = zlib.crc32(self._prompt_state)
        return out

    def load_state_dict(self, state: Mapping[str, int | torch.Tensor]) -> None:
        """Continue after the last batch of the run that saved ``state``.

        Raises `dataloader.state.IncompatibleStateError` (a ``ValueError``) naming the saved and
        the current value when the seed, global batch size, manifest or mixture differ, or when
        the prompt-state column is missing, of another length or fails its CRC.
        """
        state = dict(state)
        column = state.pop("prompt_state", None)
        crc = state.pop("prompt_state_crc", None)
        saved = LoaderState.from_dict(state)
        saved.check_compatible(self._state(0, 0, 0))
        if self.config.prompt_state:
            if column is None or crc is None:
                raise IncompatibleStateError("the loader state has no prompt-state column (saved "
                                             "without LoaderConfig.prompt_state)")
            values = np.asarray(column.numpy() if torch.is_tensor(column) else column, np.int8)
            if values.shape != self._prompt_state.shape:
                raise IncompatibleStateError(f"the saved prompt-state column has {values.size} "
                                             f"rows, the manifest {self._prompt_state.size}")
            if zlib.crc32(values) != crc:
                raise IncompatibleStateError(f"the saved prompt-state column fails its CRC-32 "
                                             f"({zlib.crc32(values)} != {crc})")
            if values.ctypes.data != self._prompt_state.ctypes.data:
                self._prompt_state[:] = values
        self._restart(saved.cursor, saved.step)
        self._skipped = saved.skipped_samples

    @property
    def epoch(self) -> int:
        """The epoch of the whole manifest the next step starts in (``cursor // len``)."""
        return self._cursor // len(self.manifest)

    @property
    def prompt_state(self) -> np.ndarray:
        """The per-record state column (int8, by manifest row; read-only view)."""
        view = self._prompt_state.view()
        view.flags.writeable = False
        return view

    def set_prompt_state(self, rows: np.ndarray | list[int], values: np.ndarray | list[int]
                         ) -> None:
        """Set the state of manifest ``rows`` (e.g. raise the hint level of prompts the policy
        failed, between epochs). Every rank must make the same calls; the steps returned from
        now on report the new values."""
        if not self.config.prompt_state:
            raise ValueError("no prompt-state column: set LoaderConfig.prompt_state=True")
        rows = np.asarray(rows, np.int64)
        values = np.broadcast_to(np.asarray(values), rows.shape)
        bad = rows[(rows < 0) | (rows >= self._prompt_state.size)]
        if bad.size:
            raise ValueError(f"prompt-state rows {bad[:4].tolist()} are outside the manifest's "
                             f"[0, {self._prompt_state.size})")
        if values.size and (values.min() < -128 or values.max() > 127):
            raise ValueError(f"prompt-state values must fit int8 [-128, 127], got "
                             f"[{values.min()}, {values.max()}]")
        self._prompt_state[rows] = values.astype(np.int8)

    # -- fetching (background thread or calling thread) ----------------------------------------

    def _sample_ids(self, position: int) -> range:
        """The samples of the record at ``position``: itself, or its two answers."""
        k = self._per_record
        return range(position * k, position * k + k)

    def _record(self, row: int, sample_id: int) -> Record:
        """The conversation that is sample ``sample_id`` (an answer of a preference record)."""
        record = self.manifest.record(row)
        if not self.config.preference:
            return record
        if not record.is_preference:
            raise ValueError(f"manifest row {row} (record {record.id!r}, dataset "
                             f"{record.dataset!r}) is not a preference record (its last two "
                             "turns must be 'chosen' and 'rejected'), but the loader is in "
                             "preference mode")
        return record.answers()[sample_id % 2]

    def _plan(self, rnd: _Round, refs: dict[int, tuple[SampleRef, int]]) -> None:
        missing = []
        for p in rnd.positions:
            rnd.refs[p] = refs[p][0]
            if p * self._per_record not in rnd.sizes:
                missing.append(p)
        if missing and not self.config.preference:
            rows = np.asarray([refs[p][1] for p in missing], dtype=np.int64)
            sizes = self.manifest.planning_sizes(rows, missing, self.tokenizer)
            rnd.sizes.update(zip(missing, sizes, strict=True))
        for p in missing if self.config.preference else ():
            # Both answers from the record (the planning columns describe the chosen one only);
            # the rejected answer reuses the chosen one's media, in the pair's group.
            chosen, rejected = (sample_sizes(self._record(refs[p][1], s), s, self.tokenizer)
                                for s in self._sample_ids(p))
            rnd.sizes[2 * p] = dataclasses.replace(
                chosen, layout=dataclasses.replace(chosen.layout, group=p))
            rnd.sizes[2 * p + 1] = dataclasses.replace(
                rejected, layout=dataclasses.replace(rejected.layout, group=p, media_from=2 * p))
        rnd.plan = plan_step(self.plan, self.rank,
                             [rnd.sizes[s].layout for p in rnd.positions
                              for s in self._sample_ids(p)],
                             self.cost_model, self.config.step)

    def _fetch(self, rnd: _Round, rows: dict[int, int]) -> None:
        from io_server.client import IOServerError
        from io_server.media import MediaError

        assert rnd.plan is not None
        batch = rnd.plan.batch
        k = self._per_record
        if self.vit_index is not None:
            for ch in batch.chunks_for_vit_rank(self.vit_index):
                key = (ch.sample_id, ch.media_index, ch.frame_start, ch.frame_stop)
                position = ch.sample_id // k
                if key in rnd.pixels or position in rnd.bad:
                    continue
                media = self.manifest.media(rows[position])[ch.media_index]
                with self._lock:
                    self.counters.decode_requests += 1
                try:
                    assert self.client is not None
                    decoded = self.client.decode(media.path, ch.frame_start, ch.frame_stop)
                    frames = list(decoded.frames)
                    want = [(media.heights[f], media.widths[f], 3)
                            for f in range(ch.frame_start, ch.frame_stop)]
                    got = [tuple(a.shape) for a in frames]
                    if got != want or any(a.dtype != np.uint8 for a in frames):
                        raise MediaError(media.path, f"frames {ch.frame_start}..{ch.frame_stop} "
                                         f"have shapes {got}, the manifest says {want} (the file "
                                         "changed since it was indexed)")
                except MediaError as exc:
                    rnd.bad[position] = f"{type(exc).__name__}: {exc}"
                    with self._lock:
                        self.counters.bad_media_seen += 1
                    continue
                except IOServerError as exc:
                    rnd.fatal = f"rank {self.rank}: {exc}"
                    return
                with self._lock:
                    self.counters.frames_decoded += len(frames)
                    self.counters.bytes_decoded += sum(a.nbytes for a in frames)
                rnd.pixels[key] = [torch.from_numpy(a) for a in frames]
        if self.role.loads_tokens:
            for mb in batch.samples_for_replica(self.role.llm_replica):
                for s in mb:
                    if s not in rnd.tokens:
                        t = tokenize(self._record(rows[s // k], s), s, self.tokenizer)
                        rnd.tokens[s] = torch.from_numpy(t.token_ids * 2 + t.is_target)
                        with self._lock:
                            self.counters.token_loads += 1

    def _run_round(self, rnd: _Round) -> _Round:
        try:
            refs = self._refs(rnd.positions)
            self._plan(rnd, refs)
            self._fetch(rnd, {p: row for p, (_, row) in refs.items()})
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it in the agreement
            logger.exception("rank %d: loading step %d failed", self.rank, rnd.step)
            rnd.fatal = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        return rnd

    def _first_round(self, step: int, cursor: int, generation: int) -> _Round:
        positions = list(range(cursor, cursor + self.config.global_batch_size))
        return self._run_round(_Round(step, positions, generation))

    def _producer(self, q: queue.Queue[_Round], step: int, cursor: int, generation: int) -> None:
        while not self._stop.is_set() and generation == self._generation:
            rnd = self._first_round(step, cursor, generation)
            while not self._stop.is_set() and generation == self._generation:
                try:
                    q.put(rnd, timeout=0.05)
                    break
                except queue.Full:
                    continue
            step += 1
            cursor += self.config.global_batch_size

    def _restart(self, cursor: int, step: int) -> None:
        """Drop everything prefetched and continue from ``cursor`` (the old thread exits)."""
        self._generation += 1
        self._cursor, self._step = cursor, step
        self._queue = None
        self._thread = None

    def _next_round(self) -> _Round:
        if self.config.prefetch == 0:
            return self._first_round(self._step, self._cursor, self._generation)
        if self._thread is None or not self._thread.is_alive() or self._queue is None:
            self._queue = queue.Queue(maxsize=self.config.prefetch)
            self._thread = threading.Thread(
                target=self._producer, name=f"dataloader-prefetch-r{self.rank}", daemon=True,
                args=(self._queue, self._step, self._cursor, self._generation))
            self._thread.start()
        while True:
            try:
                rnd = self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError(f"rank {self.rank}: the prefetch thread stopped") from None
                continue
            if rnd.generation == self._generation and rnd.step == self._step \
                    and rnd.positions[0] == self._cursor:
                return rnd

    # -- collectives (calling thread) -----------------------------------------------------------

    def _agree(self, rnd: _Round) -> tuple[set[int], bool]:
        """(bad positions, fatal) agreed by every rank."""
        flags = torch.zeros(len(rnd.positions) + 1, dtype=torch.int32)
        index = {p: i for i, p in enumerate(rnd.positions)}
        for p in rnd.bad:
            flags[index[p]] = 1
        flags[-1] = int(rnd.fatal is not None)
        if self.plan.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.verdict_group)
        bad = {rnd.positions[i] for i in torch.nonzero(flags[:-1]).flatten().tolist()}
        return bad, bool(flags[-1])

    def _tokens(self, rnd: _Round, layouts: Mapping[int, SampleLayout]
                ) -> list[torch.Tensor] | None:
        """This replica's packed token ids (id * 2 + is_target) per sample, in micro-batch order."""
        if not self.role.needs_tokens:
            return None
        assert rnd.plan is not None
        batch = rnd.plan.batch
        order = [p for mb in batch.samples_for_replica(self.role.llm_replica) for p in mb]
        lengths = [layouts[p].seq_len for p in order]
        if self.role.loads_tokens:
            flat = torch.cat([rnd.tokens[p] for p in order])
        else:
            flat = torch.empty(sum(lengths), dtype=torch.int64)
        if self.plan.tp * self.plan.cp > 1:
            dist.broadcast(flat, src=self._token_src, group=self.token_group)
            with self._lock:
                if self.role.loads_tokens:
                    self.counters.broadcasts_sent += 1
                else:
                    self.counters.broadcasts_received += 1
        return list(torch.split(flat, lengths))

    def set_cost_model(self, cost_model: CostModel) -> None:
        """Plan the steps from the next one on with ``cost_model`` (online calibration): steps
        already prefetched are planned again. Every rank must switch at the same step."""
        self.cost_model = cost_model
        self._restart(self._cursor, self._step)

    def _positions(self, step_plan: StepPlan, ids: tuple[int, ...]
                   ) -> list[torch.Tensor] | None:
        if self.positions is None:
            return None
        return [torch.from_numpy(np.asarray(self.positions(step_plan.layouts[p]), np.int64))
                for p in ids]

    def next_step(self) -> StepData:
        """The next global step (collective over the plan's ranks)."""
        if self._stop.is_set():
            raise RuntimeError("the loader is closed")
        rnd = self._next_round()
        step = self._step
        skipped: list[SkippedSample] = []
        for attempt in range(self.config.max_replacement_rounds + 1):
            bad, fatal = self._agree(rnd)
            if fatal:
                raise RuntimeError(f"step {step}: loading failed on some rank"
                                   + (f" ({rnd.fatal})" if rnd.fatal else "")
                                   + "; every rank stops here")
            if not bad:
                break
            if attempt == self.config.max_replacement_rounds:
                raise RuntimeError(
                    f"step {step}: still {len(bad)} bad samples after "
                    f"{self.config.max_replacement_rounds} replacement rounds (positions "
                    f"{sorted(bad)[:8]}...): is the dataset mostly broken?")
            for p in sorted(bad):
                reason = rnd.bad.get(p)
                skipped.append(SkippedSample(p, rnd.refs[p].record_id,
                                             reason or "reported by another rank"))
                if reason is not None:
                    logger.warning("rank %d, step %d: skipping the sample at position %d "
                                   "(record %s): %s", self.rank, step, p, rnd.refs[p].record_id,
                                   reason)
            good = [p for p in rnd.positions if p not in bad]
            nxt = rnd.positions[-1] + 1
            keep = set(good)
            k = self._per_record
            rnd = _Round(step, good + list(range(nxt, nxt + len(bad))), rnd.generation,
                         sizes={s: v for s, v in rnd.sizes.items() if s // k in keep},
                         pixels={key: v for key, v in rnd.pixels.items()
                                 if key[0] // k in keep},
                         tokens={s: t for s, t in rnd.tokens.items() if s // k in keep})
            self._run_round(rnd)
        step_plan = rnd.plan
        assert step_plan is not None
        batch = step_plan.batch
        packed = self._tokens(rnd, step_plan.layouts)
        microbatches = None
        if packed is not None:
            by_pos = dict(zip([p for mb in batch.samples_for_replica(self.role.llm_replica)
                               for p in mb], packed, strict=True))
            microbatches = tuple(
                make_microbatch([by_pos[p] // 2 for p in mb.sample_ids],
                                [(by_pos[p] % 2).bool() for p in mb.sample_ids], mb,
                                self.tokenizer.pad_id, self._positions(step_plan, mb.sample_ids))
                for mb in step_plan.shapes)
            check_microbatches(step_plan, microbatches, self._visual_ids)
        position_ids = None
        if self.positions is not None:
            position_ids = tuple(
                mb.position_ids for mb in microbatches) if microbatches is not None else tuple(
                lay_out_positions(shape, self._positions(step_plan, shape.sample_ids))
                for shape in step_plan.shapes)
        frames: list[torch.Tensor] = []
        if self.vit_index is not None:
            for ch in batch.chunks_for_vit_rank(self.vit_index):
                frames.extend(rnd.pixels[(ch.sample_id, ch.media_index, ch.frame_start,
                                          ch.frame_stop)])
        end = rnd.positions[-1] + 1
        if skipped:
            logger.info("step %d: skipped %d bad samples; batch ends at position %d", step,
                        len(skipped), end)
            self._restart(end, step + 1)
        else:
            self._cursor, self._step = end, step + 1
        self._skipped += len(skipped)
        samples = tuple(rnd.refs[p] for p in rnd.positions)
        return StepData(
            step=step,
            samples=samples,
            plan=step_plan,
            position_ids=position_ids,
            total_loss_tokens=sum(rnd.sizes[s].loss_tokens for p in rnd.positions
                                  for s in self._sample_ids(p)),
            vision_frames=tuple(frames),
            microbatches=microbatches,
            skipped=tuple(skipped),
            pairs={2 * p: 2 * p + 1 for p in rnd.positions} if self.config.preference else {},
            reference_logps=self._reference_logps(samples),
            prompt_state=tuple(self._prompt_state[[r.row for r in samples]].tolist())
            if self.config.prompt_state else (),
        )

    def _reference_logps(self, samples: tuple[SampleRef, ...]) -> dict[int, float] | None:
        if self.reference is None:
            return None
        values = self.reference.lookup(np.asarray([r.row for r in samples], np.int64),
                                       [r.record_id for r in samples])
        return {2 * r.position + j: float(values[i, j]) for i, r in enumerate(samples)
                for j in range(2)}

    def __iter__(self) -> StepLoader:
        return self

    def __next__(self) -> StepData:
        return self.next_step()

    def close(self) -> None:
        """Stops the prefetch thread (the client is the caller's to close)."""
        self._stop.set()
        thread = self._thread
        self._restart(self._cursor, self._step)
        if thread is not None:
            with contextlib.suppress(RuntimeError):
                thread.join(timeout=30)

    def __enter__(self) -> StepLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
