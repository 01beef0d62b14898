"""Sample layouts and LLM micro-batches: pure shapes, no process groups.

The vocabulary every other module speaks about one step's sequences:

- `SampleLayout`: where one sample's visual tokens sit in its token sequence (from lengths only,
  so every rank can size a whole global batch without building token ids);
- `MicroBatchShape` / `microbatch_shapes`: the samples of one micro-batch in row order and its
  padded length, for one LLM replica, from the balancer's `BatchPlan`;
- `MicroBatch` / `make_microbatch`: the materialised tensors of one micro-batch (token loaders and
  their TP/CP peers build them);
- `cp_split`: megatron's load-balanced context-parallel split of a sequence.

The padding rule has one owner, ``ParallelPlan.seq_len_divisor``; the step plan
(`hetero_parallel.step_plan`) passes it here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hetero_parallel.balancer import BatchPlan, MediaSpec, SampleSpec


@dataclass(frozen=True)
class SampleLayout:
    """Where one sample's visual tokens are in its token sequence.

    ``frame_positions[m][f]`` is the position of the first token of frame ``f`` of media ``m``;
    its ``frame_tokens[m][f]`` tokens are contiguous from there. Frames are in increasing position.
    """

    sample_id: int
    seq_len: int
    frame_tokens: tuple[tuple[int, ...], ...]
    frame_positions: tuple[tuple[int, ...], ...]
    frame_grids: tuple[tuple[tuple[int, int], ...], ...] = ()
    """Per media, per frame: ``(rows, cols)`` of its visual tokens, row-major (one token per
    28-px cell after the 2x2 merge); empty when unknown. Multimodal rotary positions use it."""
    group: int | None = None
    """Samples of one group (a preference pair, a rollout group) go to the same LLM replica and
    micro-batch (the balancer's group constraint)."""
    media_from: int | None = None
    """The sample whose media this one shares (the rejected answer of a preference pair shares
    the prompt's media with the chosen one, in the same group): the ViT encodes them once, for
    that sample; the routing sends the same visual tokens to this sample's slots too. The frames
    described here must equal that sample's."""

    def __post_init__(self) -> None:
        if len(self.frame_tokens) != len(self.frame_positions):
            raise ValueError(
                f"sample {self.sample_id}: frame_tokens and frame_positions differ in media "
                f"count ({len(self.frame_tokens)} vs {len(self.frame_positions)})"
            )
        end = 0
        for m, (toks, poss) in enumerate(zip(self.frame_tokens, self.frame_positions, strict=True)):
            if len(toks) != len(poss):
                raise ValueError(f"sample {self.sample_id} media {m}: {len(toks)} frame sizes but "
                                 f"{len(poss)} frame positions")
            for t, p in zip(toks, poss, strict=True):
                if p < end or t < 1:
                    raise ValueError(f"sample {self.sample_id} media {m}: frame at {p} with {t} "
                                     "tokens overlaps the previous frame or is empty")
                end = p + t
        if end > self.seq_len:
            raise ValueError(f"sample {self.sample_id}: visual tokens end at {end}, past its "
                             f"seq_len {self.seq_len}")
        if self.frame_grids:
            shapes = [len(g) for g in self.frame_grids]
            if shapes != [len(t) for t in self.frame_tokens]:
                raise ValueError(f"sample {self.sample_id}: frame_grids has {shapes} frames per "
                                 f"media, frame_tokens {[len(t) for t in self.frame_tokens]}")
            for m, (grids, toks) in enumerate(zip(self.frame_grids, self.frame_tokens,
                                                  strict=True)):
                for f, ((rows, cols), t) in enumerate(zip(grids, toks, strict=True)):
                    if rows < 1 or cols < 1 or rows * cols != t:
                        raise ValueError(f"sample {self.sample_id} media {m} frame {f}: grid "
                                         f"{rows}x{cols} does not hold its {t} tokens")

    @classmethod
    def unchecked(cls, sample_id: int, seq_len: int, frame_tokens: tuple[tuple[int, ...], ...],
                  frame_positions: tuple[tuple[int, ...], ...],
                  frame_grids: tuple[tuple[tuple[int, int], ...], ...] = (),
                  group: int | None = None, media_from: int | None = None) -> SampleLayout:
        """A layout from sizes validated elsewhere, without the per-frame checks (about a
        microsecond per frame, ~0.2 s for a 16K-sample Keye batch): for a columnar manifest,
        which checks its planning columns when it writes them and again when it reads them."""
        layout = object.__new__(cls)
        for name, value in (("sample_id", sample_id), ("seq_len", seq_len),
                            ("frame_tokens", frame_tokens), ("frame_positions", frame_positions),
                            ("frame_grids", frame_grids), ("group", group),
                            ("media_from", media_from)):
            object.__setattr__(layout, name, value)
        return layout

    @property
    def num_visual_tokens(self) -> int:
        return sum(sum(t) for t in self.frame_tokens)

    def visual_positions(self) -> np.ndarray:
        """Positions of every visual token, in increasing order (int64)."""
        starts = [p for poss in self.frame_positions for p in poss]
        counts = [t for toks in self.frame_tokens for t in toks]
        if not counts:
            return np.zeros(0, np.int64)
        starts_a, counts_a = np.asarray(starts, np.int64), np.asarray(counts, np.int64)
        first = np.cumsum(counts_a) - counts_a
        return np.repeat(starts_a - first, counts_a) + np.arange(int(counts_a.sum()))

    def spec(self) -> SampleSpec:
        """The balancer's view of this sample: text tokens and per-frame visual tokens (none for
        a sample that shares another's media: its visual tokens cost the LLM only)."""
        grouped = {"group": self.group} if self.group is not None else {}
        if self.media_from is not None:
            return SampleSpec(self.sample_id, self.seq_len, (), **grouped)
        return SampleSpec(self.sample_id, self.seq_len - self.num_visual_tokens,
                          tuple(MediaSpec(t) for t in self.frame_tokens), **grouped)


def padded_length(seq_lens: Sequence[int], multiple: int) -> int:
    """A micro-batch's sequence length: its longest sample, rounded up to ``multiple``."""
    longest = max(seq_lens)
    return -(-longest // multiple) * multiple


def cp_split(positions: np.ndarray, seq_len: int, cp: int) -> tuple[np.ndarray, np.ndarray]:
    """megatron's load-balanced CP split: (owning CP rank, position in its local sequence).

    ``seq_len`` must be divisible by ``2 * cp``; part ``i`` of ``2 * cp`` belongs to rank ``i`` for
    ``i < cp`` and to rank ``2 * cp - 1 - i`` otherwise; each rank lays its two parts end to end.
    """
    if cp == 1:
        return np.zeros_like(positions), positions.copy()
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 * cp = {2 * cp}")
    part_len = seq_len // (2 * cp)
    part = positions // part_len
    first_half = part < cp
    owner = np.where(first_half, part, 2 * cp - 1 - part)
    offset = positions - part * part_len
    local = np.where(first_half, offset, part_len + offset)
    return owner, local


def cp_local_positions(length: int, cp: int, rank: int) -> np.ndarray:
    """Positions of a sequence of ``length`` that CP rank ``rank`` holds, in its local order:
    parts ``rank`` and ``2 * cp - 1 - rank`` of ``2 * cp`` equal parts (the inverse of
    `cp_split`)."""
    if cp == 1:
        return np.arange(length, dtype=np.int64)
    if length % (2 * cp):
        raise ValueError(f"sequence length {length} is not divisible by 2 * cp = {2 * cp}")
    part = length // (2 * cp)
    return np.concatenate([np.arange(rank * part, (rank + 1) * part),
                           np.arange((2 * cp - 1 - rank) * part, (2 * cp - rank) * part)]
                          ).astype(np.int64)


@dataclass(frozen=True, slots=True)
class MicroBatchShape:
    """Samples of one micro-batch in order, and how they are laid out.

    Padded (BSHD): one row per sample, every row ``seq_len`` long (the longest sample rounded up
    to the divisor). Packed (THD): one row holding the samples end to end, sample ``i`` in
    ``[offsets[i], offsets[i] + packed_lengths[i])``, each length rounded up to the per-sample
    multiple and the last one extended so that the row (``seq_len``) is a multiple of the divisor.
    """

    sample_ids: tuple[int, ...]
    seq_len: int
    """Padded: each row's length; packed: the packed row's length (0 if empty)."""
    packed_lengths: tuple[int, ...] = ()
    """Packed only: each sample's padded length in the row (they sum to ``seq_len``)."""
    sample_lengths: tuple[int, ...] = ()
    """Packed only: each sample's real length."""

    @property
    def packed(self) -> bool:
        return bool(self.packed_lengths)

    def cu_seqlens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed only: cumulative real and padded lengths (int32 ``[n + 1]``), as megatron's
        ``PackedSeqParams`` (``cu_seqlens_q`` / ``cu_seqlens_q_padded``) take them."""
        return (torch.tensor(np.cumsum([0, *self.sample_lengths]), dtype=torch.int32),
                torch.tensor(np.cumsum([0, *self.packed_lengths]), dtype=torch.int32))

    @property
    def rows(self) -> int:
        return 1 if self.packed else len(self.sample_ids)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each sample in its row (0 for every sample when padded)."""
        if not self.packed:
            return (0,) * len(self.sample_ids)
        return tuple(int(x) for x in np.cumsum((0, *self.packed_lengths[:-1])))

    def rows_and_offsets(self) -> tuple[list[int], list[int]]:
        """Row and start of each sample (in order)."""
        if self.packed:
            return [0] * len(self.sample_ids), list(self.offsets)
        return list(range(len(self.sample_ids))), [0] * len(self.sample_ids)


def packed_shape(ids: Sequence[int], lengths: Sequence[int], divisor: int,
                 sample_divisor: int) -> MicroBatchShape:
    """One packed row: each sample rounded up to ``sample_divisor``, the row to ``divisor``."""
    padded = [-(-n // sample_divisor) * sample_divisor for n in lengths]
    total = sum(padded)
    padded[-1] += -(-total // divisor) * divisor - total
    return MicroBatchShape(tuple(ids), sum(padded), tuple(padded), tuple(lengths))


def microbatch_shapes(batch: BatchPlan, layouts: Mapping[int, SampleLayout], replica: int,
                      divisor: int, *, packed: bool = False, sample_divisor: int = 1
                      ) -> tuple[MicroBatchShape, ...]:
    """The micro-batches of ``replica`` in pipeline order: padded rows to a multiple of
    ``divisor``, or packed rows (`packed_shape`)."""
    shapes = []
    for ids in batch.samples_for_replica(replica):
        lengths = [layouts[s].seq_len for s in ids]
        if not ids:
            shapes.append(MicroBatchShape(ids, 0))
        elif packed:
            shapes.append(packed_shape(ids, lengths, divisor, sample_divisor))
        else:
            shapes.append(MicroBatchShape(ids, padded_length(lengths, divisor)))
    return tuple(shapes)


def token_places(shape: MicroBatchShape, index: int, positions: np.ndarray, cp: int
                 ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Where positions of sample ``index`` of ``shape`` sit: (row, position in the row, owning CP
    rank, position in that CP rank's local row). Padded rows are split by CP as a whole, packed
    rows sample by sample (TransformerEngine's THD layout)."""
    if not shape.packed:
        owner, local = cp_split(positions, shape.seq_len, cp)
        return index, positions, owner, local
    offset = shape.offsets[index]
    owner, local = cp_split(positions, shape.packed_lengths[index], cp)
    return 0, positions + offset, owner, local + offset // cp


def row_places(shape: MicroBatchShape, row_positions: np.ndarray, cp: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """(owning CP rank, position in its local row) of positions of a row of ``shape``."""
    if not shape.packed:
        return cp_split(row_positions, shape.seq_len, cp)
    starts = np.asarray(shape.offsets, np.int64)
    lengths = np.asarray(shape.packed_lengths, np.int64)
    sample = np.searchsorted(starts, row_positions, side="right") - 1
    owner, local = np.zeros_like(row_positions), np.zeros_like(row_positions)
    for i in np.unique(sample).tolist():
        sel = sample == i
        owner[sel], local[sel] = cp_split(row_positions[sel] - starts[i], int(lengths[i]), cp)
        local[sel] += starts[i] // cp
    return owner, local


@dataclass(frozen=True)
class MicroBatch:
    """One LLM micro-batch of this replica. ``input_ids``, ``labels`` and ``loss_mask`` are
    ``[rows, S]`` (rows: one per sample, or one packed row); ``position_ids`` are ``[rows, S]``
    (1D rotary positions) or ``[3, rows, S]`` (multimodal (t, h, w) rotary positions).

    ``input_ids`` hold a placeholder at visual slots (their embedding is replaced); ``loss_mask``
    is 0 at visual slots, padding and anything else that carries no loss. Where the samples sit
    (and, packed, their ``cu_seqlens``) is the `MicroBatchShape`'s to say.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor


def make_microbatch(token_ids: Sequence[torch.Tensor], is_target: Sequence[torch.Tensor],
                    shape: MicroBatchShape, pad_id: int = 0,
                    position_ids: Sequence[torch.Tensor] | None = None) -> MicroBatch:
    """Lay samples out as ``shape`` says and derive next-token labels and the loss mask.

    ``is_target[i][p]`` says whether token ``p`` of sample ``i`` is predicted (text: yes; visual
    placeholders and markers: no); position ``p`` carries loss iff token ``p + 1`` is a target of
    the same sample. ``position_ids[i]`` (``[n_i]`` or ``[axes, n_i]``) are sample ``i``'s rotary
    positions; default ``0 .. n_i - 1`` (restarting for every packed sample). Padding gets
    position 0.
    """
    if len(token_ids) != len(shape.sample_ids):
        raise ValueError(f"{len(token_ids)} samples for a micro-batch of {len(shape.sample_ids)}")
    rows, starts = shape.rows_and_offsets()
    room = shape.packed_lengths or (shape.seq_len,) * len(token_ids)
    if position_ids is None:
        position_ids = [torch.arange(ids.shape[0]) for ids in token_ids]
    b, seq = shape.rows, shape.seq_len
    inputs = torch.full((b, seq), pad_id, dtype=torch.long)
    labels = torch.full((b, seq), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((b, seq), dtype=torch.float32)
    for i, (ids, target) in enumerate(zip(token_ids, is_target, strict=True)):
        n, row, start = ids.shape[0], rows[i], starts[i]
        if n > room[i]:
            raise ValueError(f"sample {shape.sample_ids[i]} has {n} tokens, more than its "
                             f"{room[i]} in the micro-batch")
        if shape.packed and n != shape.sample_lengths[i]:
            raise ValueError(f"sample {shape.sample_ids[i]} has {n} tokens, its layout "
                             f"{shape.sample_lengths[i]}")
        if position_ids[i].shape[-1] != n:
            raise ValueError(f"sample {shape.sample_ids[i]}: {position_ids[i].shape[-1]} "
                             f"positions for {n} tokens")
        inputs[row, start:start + n] = ids
        labels[row, start:start + n - 1] = ids[1:]
        loss_mask[row, start:start + n - 1] = target[1:].float()
    return MicroBatch(inputs, labels, loss_mask, lay_out_positions(shape, position_ids))


def lay_out_positions(shape: MicroBatchShape, position_ids: Sequence[torch.Tensor]
                      ) -> torch.Tensor:
    """Samples' rotary positions (``[n_i]`` or ``[axes, n_i]`` each) laid out as ``shape`` lays
    out their tokens: ``[rows, S]`` or ``[axes, rows, S]``, padding at 0. Every pipeline stage
    can build them from the step plan (multimodal rotary embeddings need them on every stage)."""
    axes = {tuple(p.shape[:-1]) for p in position_ids}
    if len(axes) != 1 or len(position_ids) != len(shape.sample_ids):
        raise ValueError(f"position_ids need one [n] or [axes, n] tensor per sample with the "
                         f"same axes, got shapes {[tuple(p.shape) for p in position_ids]}")
    (lead,) = axes
    rows, starts = shape.rows_and_offsets()
    out = torch.zeros((*lead, shape.rows, shape.seq_len), dtype=torch.long)
    for pos, row, start in zip(position_ids, rows, starts, strict=True):
        out[..., row, start:start + pos.shape[-1]] = pos
    return out


def microbatch_on_cp_rank(mb: MicroBatch, shape: MicroBatchShape, cp: int, rank: int
                          ) -> MicroBatch:
    """This CP rank's share of ``mb`` (`cp_local_positions` of every row, or of every packed
    sample). Position ids stay whole: megatron's rotary embedding picks the rank's part itself."""
    if cp == 1:
        return mb
    if shape.packed:
        index = np.concatenate([off + cp_local_positions(n, cp, rank)
                                for off, n in zip(shape.offsets, shape.packed_lengths,
                                                  strict=True)])
    else:
        index = cp_local_positions(shape.seq_len, cp, rank)
    idx = torch.from_numpy(index)
    return MicroBatch(mb.input_ids[:, idx], mb.labels[:, idx], mb.loss_mask[:, idx],
                      mb.position_ids)
