"""Move visual embeddings from the ViT ranks to the LLM first-stage ranks, and gradients back.

Inputs are the balancer's `BatchPlan` (which ViT rank encodes which frames; which replica and
micro-batch own which sample) and each sample's `SampleLayout` (where its visual tokens sit in its
token sequence). `build_routing` turns them, on every rank independently and identically, into this
rank's `RoutingTable`: which rows of its ViT output go to which rank, and where the rows it receives
go in its micro-batches. `route` then runs one variable-size all-to-all forward and its mirror image
backward.

Contracts:
- A ViT rank's output rows are its chunks' tokens: chunks in ``BatchPlan.chunks_for_vit_rank``
  order, frames in order inside a chunk, tokens row-major inside a frame.
- A first-stage rank of replica ``d`` with context-parallel coordinate ``c`` receives every visual
  token of its micro-batches that megatron's CP split puts on ``c``: the micro-batch's padded
  length ``S`` is cut into ``2 * cp`` equal parts and rank ``c`` keeps parts ``c`` and
  ``2 * cp - 1 - c`` (the load-balanced causal split). Every TP rank of that stage receives the
  same rows (megatron replicates activations over TP).
- Slots are ordered by (micro-batch, row in micro-batch, position); ``RoutingTable.slots`` says for
  each where it goes: the micro-batch, the row, and the position in this CP rank's local sequence.
- Backward: megatron leaves the full gradient of the replicated input on every TP rank, so only
  TP rank 0 of each stage sends gradients back; the ViT rank receives each token's gradient once.

All index arithmetic is numpy on this rank's own rows; no collective is needed to build the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from hetero_parallel.balancer import BatchPlan, MediaSpec, SampleSpec
from hetero_parallel.plan import ParallelPlan


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

    @property
    def num_visual_tokens(self) -> int:
        return sum(sum(t) for t in self.frame_tokens)

    def spec(self) -> SampleSpec:
        """The balancer's view of this sample: text tokens and per-frame visual tokens."""
        return SampleSpec(self.sample_id, self.seq_len - self.num_visual_tokens,
                          tuple(MediaSpec(t) for t in self.frame_tokens))


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


@dataclass(frozen=True)
class MicroBatchShape:
    """Samples of one micro-batch in row order, and its padded sequence length."""

    sample_ids: tuple[int, ...]
    seq_len: int


def microbatch_shapes(batch: BatchPlan, layouts: dict[int, SampleLayout], replica: int,
                      pad_multiple: int) -> list[MicroBatchShape]:
    """The micro-batches of ``replica`` in pipeline order."""
    shapes = []
    for ids in batch.samples_for_replica(replica):
        shapes.append(MicroBatchShape(
            ids, padded_length([layouts[s].seq_len for s in ids], pad_multiple) if ids else 0
        ))
    return shapes


@dataclass(frozen=True)
class RoutingTable:
    """This rank's part of one step's visual-token exchange (see the module docstring)."""

    group_ranks: tuple[int, ...]
    """Global ranks of the routing group, in group-rank order."""
    num_local_rows: int
    """Rows of this rank's ViT output."""
    send_index: torch.Tensor
    """Rows of the ViT output to send, grouped by destination (group-rank order)."""
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    grad_send_splits: tuple[int, ...]
    """Backward: rows this rank returns to each source (zero unless it is TP rank 0)."""
    grad_recv_splits: tuple[int, ...]
    """Backward: rows each destination returns (only TP-rank-0 destinations return any)."""
    grad_recv_rows: torch.Tensor
    """Backward: which rows of the send buffer the returned gradients belong to."""
    recv_to_slot: torch.Tensor
    """``slots[recv_to_slot[i]]`` is the slot of the ``i``-th received row."""
    slot_microbatch: np.ndarray
    slot_row: np.ndarray
    slot_position: np.ndarray
    """Position of each slot in this CP rank's local sequence."""
    microbatch_slot_offsets: np.ndarray
    """Slots of micro-batch ``j`` are ``[offsets[j], offsets[j + 1])``."""

    @property
    def num_slots(self) -> int:
        return int(self.slot_microbatch.size)


def _frame_rows(chunks, layouts: dict[int, SampleLayout]) -> np.ndarray:
    """Per frame of ``chunks``, in order: ``[sample id, first position, tokens, ViT rank]``."""
    out = []
    for ch in chunks:
        layout = layouts[ch.sample_id]
        toks = layout.frame_tokens[ch.media_index]
        poss = layout.frame_positions[ch.media_index]
        for f in range(ch.frame_start, ch.frame_stop):
            out.append((ch.sample_id, poss[f], toks[f], ch.vit_rank))
    return np.asarray(out, dtype=np.int64).reshape(-1, 4)


@dataclass(frozen=True)
class _Tokens:
    """Per visual token of a list of frames: where it comes from and where it goes."""

    position: np.ndarray
    vit_rank: np.ndarray
    replica: np.ndarray
    microbatch: np.ndarray
    row: np.ndarray
    cp_rank: np.ndarray
    local_position: np.ndarray


def _tokens(frames: np.ndarray, where: dict[int, tuple[int, int, int, int]], cp: int) -> _Tokens:
    sample, start, count, vit = frames.T
    # Per frame: replica, micro-batch, row, micro-batch length.
    info = np.asarray([where[s] for s in sample.tolist()], dtype=np.int64).reshape(-1, 4)
    first = np.cumsum(count) - count
    position = np.repeat(start, count) + np.arange(int(count.sum())) - np.repeat(first, count)
    replica, mb, row, seq_len = (np.repeat(info[:, k], count) for k in range(4))
    owner = np.zeros_like(position)
    local = position.copy()
    for length in np.unique(seq_len).tolist():
        sel = seq_len == length
        owner[sel], local[sel] = cp_split(position[sel], length, cp)
    return _Tokens(position, np.repeat(vit, count), replica, mb, row, owner, local)


def build_routing(plan: ParallelPlan, batch: BatchPlan, layouts: dict[int, SampleLayout],
                  rank: int, *, pad_multiple: int | None = None) -> RoutingTable:
    """This rank's `RoutingTable` for one global batch. Pure: same inputs, same table.

    ``pad_multiple`` (default ``2 * cp`` when ``cp > 1``, else 1) rounds each micro-batch's length;
    it must match how the micro-batches are padded for the LLM.
    """
    if batch.num_vit_ranks != plan.vit_dp:
        raise ValueError(f"the batch plan has {batch.num_vit_ranks} ViT ranks but the parallel "
                         f"plan has vit_dp={plan.vit_dp}")
    if batch.num_replicas != plan.dp:
        raise ValueError(f"the batch plan has {batch.num_replicas} replicas but the parallel "
                         f"plan has dp={plan.dp}")
    pad_multiple = pad_multiple or (2 * plan.cp if plan.cp > 1 else 1)
    group = plan.routing_ranks()
    group_index = {r: i for i, r in enumerate(group)}
    n_group = len(group)
    where: dict[int, tuple[int, int, int, int]] = {}
    for d in range(plan.dp):
        for j, mb in enumerate(microbatch_shapes(batch, layouts, d, pad_multiple)):
            for row, s in enumerate(mb.sample_ids):
                where[s] = (d, j, row, mb.seq_len)

    # --- sending side: my ViT output rows, to every TP rank of the owning CP rank ---
    send_lists = [np.zeros(0, np.int64)] * n_group
    num_local_rows = 0
    vit_index = plan.vit_index(rank)
    if vit_index is not None:
        t = _tokens(_frame_rows(batch.chunks_for_vit_rank(vit_index), layouts), where, plan.cp)
        num_local_rows = t.position.size
        order = np.lexsort((t.position, t.row, t.microbatch))  # the receivers' slot order
        dst = np.asarray([
            group_index[plan.rank_of(cp=c, dp=d)]
            for d, c in zip(t.replica[order].tolist(), t.cp_rank[order].tolist(), strict=True)
        ], dtype=np.int64)
        by_dst = order[np.argsort(dst, kind="stable")]
        counts = np.bincount(dst, minlength=n_group)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for i in range(n_group):
            rows = by_dst[bounds[i]:bounds[i + 1]]
            if rows.size:
                # The TP-0 rank's list also serves its TP peers (same CP coordinate).
                for tp in range(plan.tp):
                    c = plan.coords(group[i])
                    send_lists[group_index[plan.rank_of(tp=tp, cp=c.cp, dp=c.dp)]] = rows
    send_splits = tuple(int(x.size) for x in send_lists)
    send_index = np.concatenate(send_lists) if n_group else np.zeros(0, np.int64)
    returns_grad = [plan.coords(r).pp == 0 and plan.coords(r).tp == 0 for r in group]
    grad_recv_splits = tuple(
        n if ok else 0 for n, ok in zip(send_splits, returns_grad, strict=True)
    )
    offsets = np.concatenate([[0], np.cumsum(send_splits)]).astype(np.int64)
    grad_recv_rows = np.concatenate(
        [np.arange(offsets[i], offsets[i + 1]) for i in range(n_group) if returns_grad[i]]
        or [np.zeros(0, np.int64)]
    )

    # --- receiving side: my slots (first pipeline stage only) ---
    c = plan.coords(rank)
    recv_splits: list[int] = [0] * n_group
    slot_mb = slot_row = slot_pos = recv_to_slot = np.zeros(0, np.int64)
    mb_offsets = np.zeros(batch.num_microbatches + 1, np.int64)
    if c.pp == 0:
        mine = [s for ids in batch.samples_for_replica(c.dp) for s in ids]
        chunks = [ch for s in mine for ch in batch.chunks_for_sample(s)]
        t = _tokens(_frame_rows(chunks, layouts), where, plan.cp)
        keep = np.flatnonzero(t.cp_rank == c.cp)
        order = keep[np.lexsort((t.position[keep], t.row[keep], t.microbatch[keep]))]
        slot_mb, slot_row, slot_pos = t.microbatch[order], t.row[order], t.local_position[order]
        src = np.asarray([group_index[plan.vit_ranks[v]] for v in t.vit_rank[order].tolist()],
                         dtype=np.int64)
        # Rows arrive grouped by source, in slot order inside each source.
        recv_to_slot = np.argsort(src, kind="stable")
        recv_splits = np.bincount(src, minlength=n_group).tolist()
        mb_offsets = np.searchsorted(slot_mb, np.arange(batch.num_microbatches + 1))
    grad_send_splits = tuple(recv_splits) if c.pp == 0 and c.tp == 0 else (0,) * n_group

    return RoutingTable(
        group_ranks=group,
        num_local_rows=num_local_rows,
        send_index=torch.from_numpy(send_index.astype(np.int64)),
        send_splits=send_splits,
        recv_splits=tuple(int(x) for x in recv_splits),
        grad_send_splits=tuple(int(x) for x in grad_send_splits),
        grad_recv_splits=grad_recv_splits,
        grad_recv_rows=torch.from_numpy(grad_recv_rows.astype(np.int64)),
        recv_to_slot=torch.from_numpy(recv_to_slot.astype(np.int64)),
        slot_microbatch=slot_mb,
        slot_row=slot_row,
        slot_position=slot_pos,
        microbatch_slot_offsets=np.asarray(mb_offsets, dtype=np.int64),
    )


def _all_to_all(rows: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int],
                width: int, group: dist.ProcessGroup) -> torch.Tensor:
    out = rows.new_empty((sum(recv_splits), width))
    dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=list(recv_splits),
                           input_split_sizes=list(send_splits), group=group)
    return out


class _Exchange(torch.autograd.Function):
    """The all-to-all itself; backward returns gradients from TP rank 0 destinations only."""

    @staticmethod
    def forward(ctx, send_rows: torch.Tensor, table: RoutingTable, group: dist.ProcessGroup):
        ctx.table, ctx.group, ctx.num_send = table, group, send_rows.shape[0]
        return _all_to_all(send_rows, table.send_splits, table.recv_splits, send_rows.shape[1],
                           group)

    @staticmethod
    def backward(ctx, grad_recv: torch.Tensor):
        table = ctx.table
        width = grad_recv.shape[1]
        send = grad_recv if sum(table.grad_send_splits) else grad_recv[:0]
        returned = _all_to_all(send, table.grad_send_splits, table.grad_recv_splits, width,
                               ctx.group)
        grad_send = grad_recv.new_zeros((ctx.num_send, width))
        grad_send[table.grad_recv_rows.to(grad_send.device)] = returned
        return grad_send, None, None


def route(vit_output: torch.Tensor, table: RoutingTable,
          group: dist.ProcessGroup) -> torch.Tensor:
    """ViT output rows -> this rank's visual slots ``[num_slots, hidden]``, differentiably.

    Collective over the routing group: every member calls it (with zero rows if it has none), and
    so does the backward (``torch.autograd.backward`` on the result, on every member).
    """
    if vit_output.shape[0] != table.num_local_rows:
        raise ValueError(f"ViT output has {vit_output.shape[0]} rows but the routing table "
                         f"expects {table.num_local_rows}")
    index = table.send_index.to(vit_output.device)
    received = _Exchange.apply(vit_output[index], table, group)
    if received.shape[0] == 0:
        return received
    return torch.empty_like(received).index_copy(0, table.recv_to_slot.to(received.device),
                                                 received)
