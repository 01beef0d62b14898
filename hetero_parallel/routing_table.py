"""Routing tables: which visual token goes from which ViT rank to which LLM slot. Pure numpy.

Inputs are the balancer's `BatchPlan` (which ViT rank encodes which frames; which replica and
micro-batch own which sample) and each sample's `SampleLayout` (where its visual tokens sit in its
token sequence). `build_routing` turns them, on every rank independently and identically, into this
rank's `RoutingTable`: which rows of its ViT output go to which rank, and where the rows it receives
go in its micro-batches. `hetero_parallel.routing.route` runs the exchange the table describes.

Contracts:
- A ViT rank's output rows are its chunks' tokens: chunks in ``BatchPlan.chunks_for_vit_rank``
  order, frames in order inside a chunk, tokens row-major inside a frame; a piece of a split
  frame yields only its token range.
- A first-stage rank of replica ``d`` with context-parallel coordinate ``c`` receives every visual
  token of its micro-batches that megatron's CP split puts on ``c``: a padded row of length ``S``
  (or, packed, each sample's padded span) is cut into ``2 * cp`` equal parts and rank ``c`` keeps
  parts ``c`` and ``2 * cp - 1 - c`` (the load-balanced causal split; `layout.token_places`).
  Without sequence parallelism every TP rank of that stage receives the same rows (megatron
  replicates activations over TP); with it, only the TP rank whose sequence chunk holds the token.
- Slots are ordered by (micro-batch, row, position in the row); ``RoutingTable`` says for each
  where it goes: the micro-batch, the row, and the position in the receiving rank's local
  sequence (and in the whole row, for checks).
- Backward: each token's gradient returns exactly once: from TP rank 0 when activations are
  replicated over TP (megatron leaves the full gradient on every TP rank), else from the one TP
  rank that received it.

All index arithmetic is numpy on this rank's own rows; no collective is needed to build the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hetero_parallel.balancer import BatchPlan
from hetero_parallel.layout import MicroBatchShape, SampleLayout, token_places
from hetero_parallel.plan import ParallelPlan


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
    """Position of each slot in this rank's local sequence (after the CP and SP splits)."""
    slot_sequence_position: np.ndarray
    """Position of each slot in its micro-batch row, before any split."""
    microbatch_slot_offsets: np.ndarray
    """Slots of micro-batch ``j`` are ``[offsets[j], offsets[j + 1])``."""

    @property
    def num_slots(self) -> int:
        return int(self.slot_microbatch.size)


def _frame_rows(chunks, layouts: dict[int, SampleLayout],
                twins: dict[int, list[int]]) -> np.ndarray:
    """Per frame (or part of a frame) of ``chunks``, in order: ``[sample id, first position,
    tokens, ViT rank, first ViT output row]``. A chunk covers tokens ``[token_start,
    token_stop)`` of its frames laid end to end (a piece of a split frame covers part of one
    frame). Each row is repeated for the samples that share its sample's media (``twins``),
    at their own positions, with the same ViT output rows."""
    out = []
    vit_row = 0
    for ch in chunks:
        for f, start, n in ch.frame_slices(layouts[ch.sample_id].frame_tokens[ch.media_index]):
            for s in (ch.sample_id, *twins.get(ch.sample_id, ())):
                pos = layouts[s].frame_positions[ch.media_index][f]
                out.append((s, pos + start, n, ch.vit_rank, vit_row))
            vit_row += n
    return np.asarray(out, dtype=np.int64).reshape(-1, 5)


def _twins(layouts: dict[int, SampleLayout]) -> dict[int, list[int]]:
    """Sample id -> the samples that share its media (`SampleLayout.media_from`)."""
    out: dict[int, list[int]] = {}
    for s, layout in sorted(layouts.items()):
        if layout.media_from is not None:
            src = layouts.get(layout.media_from)
            if src is None or src.frame_tokens != layout.frame_tokens:
                raise ValueError(f"sample {s} shares the media of sample {layout.media_from}, "
                                 "which is not in the batch or has other frames")
            out.setdefault(layout.media_from, []).append(s)
    return out


@dataclass(frozen=True)
class _Tokens:
    """Per visual token of a list of frames: where it comes from and where it goes."""

    vit_row: np.ndarray
    """The row of the source ViT rank's output that holds it."""
    row_position: np.ndarray
    """Position in its micro-batch row (before any CP split): what the slot check reads."""
    vit_rank: np.ndarray
    replica: np.ndarray
    microbatch: np.ndarray
    row: np.ndarray
    cp_rank: np.ndarray
    tp_rank: np.ndarray
    """The TP rank that holds the token under sequence parallelism (0 without it)."""
    slot_position: np.ndarray
    """Position in the receiving rank's local sequence (after the CP and SP splits)."""


def _tokens(frames: np.ndarray, where: dict[int, tuple[int, int, int]],
            shapes: Sequence[Sequence[MicroBatchShape]], plan: ParallelPlan) -> _Tokens:
    sample, start, count, vit, vit_row0 = frames.T
    first = np.cumsum(count) - count
    within = np.arange(int(count.sum())) - np.repeat(first, count)
    position = np.repeat(start, count) + within
    vit_row = np.repeat(vit_row0, count) + within
    token_sample = np.repeat(sample, count)
    n = position.size
    replica, mb, row, owner, tp_rank, full, local = (np.zeros(n, np.int64) for _ in range(7))
    for s in np.unique(token_sample).tolist():
        sel = np.flatnonzero(token_sample == s)
        d, j, i = where[s]
        shape = shapes[d][j]
        r, full[sel], owner[sel], local[sel] = token_places(shape, i, position[sel], plan.cp)
        replica[sel], mb[sel], row[sel] = d, j, r
        if plan.sequence_parallel:
            chunk = shape.seq_len // plan.cp // plan.tp
            tp_rank[sel] = local[sel] // chunk
            local[sel] %= chunk
    return _Tokens(vit_row, full, np.repeat(vit, count), replica, mb, row, owner, tp_rank, local)


def build_routing(plan: ParallelPlan, batch: BatchPlan, layouts: dict[int, SampleLayout],
                  rank: int, *, shapes: Sequence[Sequence[MicroBatchShape]]) -> RoutingTable:
    """This rank's `RoutingTable` for one global batch. Pure: same inputs, same table.

    ``shapes[d]`` are replica ``d``'s micro-batch shapes, exactly as its micro-batches are laid
    out (`hetero_parallel.step_plan.plan_step` derives both from one rule). Without sequence
    parallelism every TP rank of the owning CP rank receives a token (megatron replicates
    activations over TP) and TP rank 0 returns its gradient; with it, the one TP rank whose
    sequence chunk holds the token receives it and returns its gradient.
    """
    if batch.num_vit_ranks != plan.vit_dp:
        raise ValueError(f"the batch plan has {batch.num_vit_ranks} ViT ranks but the parallel "
                         f"plan has vit_dp={plan.vit_dp}")
    if batch.num_replicas != plan.dp or len(shapes) != plan.dp:
        raise ValueError(f"the batch plan has {batch.num_replicas} replicas and shapes for "
                         f"{len(shapes)}, but the parallel plan has dp={plan.dp}")
    for d, replica_shapes in enumerate(shapes):
        for j, shape in enumerate(replica_shapes):
            if shape.seq_len % plan.seq_len_divisor:
                raise ValueError(f"replica {d} micro-batch {j}: length {shape.seq_len} is not a "
                                 f"multiple of the plan's seq_len_divisor "
                                 f"{plan.seq_len_divisor}")
    sp = plan.sequence_parallel
    group = plan.routing_ranks()
    group_index = {r: i for i, r in enumerate(group)}
    n_group = len(group)
    twins = _twins(layouts)
    where: dict[int, tuple[int, int, int]] = {}
    for d in range(plan.dp):
        for j, mb in enumerate(shapes[d]):
            for i, s in enumerate(mb.sample_ids):
                where[s] = (d, j, i)

    # --- sending side: my ViT output rows, to the rank(s) that own each token ---
    send_lists = [np.zeros(0, np.int64)] * n_group
    num_local_rows = 0
    vit_index = plan.vit_index(rank)
    if vit_index is not None:
        t = _tokens(_frame_rows(batch.chunks_for_vit_rank(vit_index), layouts, twins), where,
                    shapes, plan)
        num_local_rows = int(t.vit_row.max()) + 1 if t.vit_row.size else 0
        order = np.lexsort((t.row_position, t.row, t.microbatch))  # the receivers' slot order
        dst = np.asarray([
            group_index[plan.rank_of(tp=tp, cp=c, dp=d)]
            for d, c, tp in zip(t.replica[order].tolist(), t.cp_rank[order].tolist(),
                                t.tp_rank[order].tolist(), strict=True)
        ], dtype=np.int64)
        by_dst = order[np.argsort(dst, kind="stable")]
        counts = np.bincount(dst, minlength=n_group)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for i in range(n_group):
            rows = t.vit_row[by_dst[bounds[i]:bounds[i + 1]]]
            if not rows.size:
                continue
            if sp:
                send_lists[i] = rows
                continue
            # The TP-0 rank's list also serves its TP peers (same CP coordinate).
            c = plan.coords(group[i])
            for tp in range(plan.tp):
                send_lists[group_index[plan.rank_of(tp=tp, cp=c.cp, dp=c.dp)]] = rows
    send_splits = tuple(int(x.size) for x in send_lists)
    send_index = np.concatenate(send_lists) if n_group else np.zeros(0, np.int64)
    returns_grad = [plan.coords(r).pp == 0 and (sp or plan.coords(r).tp == 0) for r in group]
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
    slot_mb = slot_row = slot_pos = slot_seq = recv_to_slot = np.zeros(0, np.int64)
    mb_offsets = np.zeros(batch.num_microbatches + 1, np.int64)
    if c.pp == 0:
        mine = [s for ids in batch.samples_for_replica(c.dp) for s in ids]
        chunks = [ch for s in mine for ch in batch.chunks_for_sample(s)]
        t = _tokens(_frame_rows(chunks, layouts, twins), where, shapes, plan)
        keep = np.flatnonzero((t.cp_rank == c.cp) & (t.tp_rank == (c.tp if sp else 0)))
        order = keep[np.lexsort((t.row_position[keep], t.row[keep], t.microbatch[keep]))]
        slot_mb, slot_row, slot_pos = t.microbatch[order], t.row[order], t.slot_position[order]
        slot_seq = t.row_position[order]
        src = np.asarray([group_index[plan.vit_ranks[v]] for v in t.vit_rank[order].tolist()],
                         dtype=np.int64)
        # Rows arrive grouped by source, in slot order inside each source.
        recv_to_slot = np.argsort(src, kind="stable")
        recv_splits = np.bincount(src, minlength=n_group).tolist()
        mb_offsets = np.searchsorted(slot_mb, np.arange(batch.num_microbatches + 1))
    returns = c.pp == 0 and (sp or c.tp == 0)
    grad_send_splits = tuple(recv_splits) if returns else (0,) * n_group

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
        slot_sequence_position=slot_seq,
        microbatch_slot_offsets=np.asarray(mb_offsets, dtype=np.int64),
    )


