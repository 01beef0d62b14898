"""Giant images and frames split over several ViT ranks (sequence-parallel ViT attention).

When the balancer splits one image or video frame into contiguous token ranges on distinct ViT
ranks (`BatchPlan.split_groups`), each rank of the frame's group computes only its piece: the
patch embedding, the MLPs and the projector of its own tokens, and in every attention layer its
queries against the keys and values of the *whole* frame. `SplitAttention.gather` provides those
whole-frame keys and values: one variable-size all-to-all over the ViT data-parallel group per
call, every member sending its piece's rows to the other members of its group; the backward
sends each piece's key/value gradients back to the rank that computed it and sums them there. The
attention over a frame is bidirectional, so the order of its keys does not matter and the result
is exact: the same tokens and gradients as one rank processing the whole frame.

Every ViT rank must make the same number of `gather` calls per step (e.g. one for the keys and
one for the values in each layer), pieces or not: the step hands a `SplitAttention` to every ViT
rank whenever the global batch has a split frame, and the ViT calls it in every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from hetero_parallel.balancer import BatchPlan


@dataclass(frozen=True, slots=True)
class FramePiece:
    """This rank's piece of a split frame."""

    frame: int
    """Index of the frame in this rank's ViT input (one entry per frame of its chunks, in
    ``chunks_for_vit_rank`` order)."""
    token_start: int
    token_stop: int
    """Its LLM tokens, row-major over the frame's 28-px grid."""
    frame_tokens: int
    """The whole frame's LLM tokens."""


@dataclass(frozen=True)
class _Plan:
    local_rows: int
    send_index: torch.Tensor
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    pieces: tuple[tuple[tuple[int, int, int], ...], ...]
    """Per local piece, the whole frame's rows as (source, start, stop): source -1 is this rank's
    own rows, any other source a range of the received rows."""


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, plan: _Plan, group) -> torch.Tensor:
        ctx.plan, ctx.group = plan, group
        out = local.new_empty((sum(plan.recv_splits), *local.shape[1:]))
        send = local[plan.send_index.to(local.device)]
        dist.all_to_all_single(out, send.contiguous(), output_split_sizes=list(plan.recv_splits),
                               input_split_sizes=list(plan.send_splits), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        plan = ctx.plan
        back = grad.new_empty((sum(plan.send_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), output_split_sizes=list(plan.send_splits),
                               input_split_sizes=list(plan.recv_splits), group=ctx.group)
        local = grad.new_zeros((plan.local_rows, *grad.shape[1:]))
        local.index_add_(0, plan.send_index.to(grad.device), back)
        return local, None, None


class SplitAttention:
    """What a ViT needs to run its pieces of split frames (see the module docstring).

    Args:
        batch: the step's placement; ``vit_rank``: this rank's index in the ViT group;
        group: the ViT data-parallel process group;
        rows_per_token: rows of the tensors passed to `gather` per LLM token (4 ViT patches).
    """

    def __init__(self, batch: BatchPlan, vit_rank: int, group,
                 rows_per_token: int = 4) -> None:
        self.group, self.rows_per_token = group, rows_per_token
        n = batch.num_vit_ranks
        chunks = batch.media_chunks
        frames_before: dict[tuple[int, int, int, int], int] = {}
        count = 0
        for ch in batch.chunks_for_vit_rank(vit_rank):
            frames_before[(ch.sample_id, ch.media_index, ch.frame_start, ch.token_start)] = count
            count += ch.frame_stop - ch.frame_start
        pieces: list[FramePiece] = []
        own_rows: list[int] = []  # first local row of each of my pieces
        send: list[list[torch.Tensor]] = [[] for _ in range(n)]
        recv_splits = [0] * n
        recv_parts: list[list[tuple[int, int, int]]] = []
        received_before = [0] * n  # rows expected from each source before the current group
        rows = 0
        # Groups in BatchPlan order: every rank walks them the same way, so what one rank sends to
        # another and what that one expects line up.
        for g in batch.split_groups():
            if vit_rank not in g.vit_ranks:
                continue
            me = g.vit_ranks.index(vit_rank)
            lo, hi = g.token_bounds[me], g.token_bounds[me + 1]
            ch = chunks[g.chunks[me]]
            pieces.append(FramePiece(
                frame=frames_before[(ch.sample_id, ch.media_index, ch.frame_start,
                                     ch.token_start)],
                token_start=lo, token_stop=hi, frame_tokens=g.frame_tokens))
            own_rows.append(rows)
            mine = torch.arange(rows, rows + (hi - lo) * rows_per_token)
            rows += (hi - lo) * rows_per_token
            parts = []
            for i, member in enumerate(g.vit_ranks):
                size = (g.token_bounds[i + 1] - g.token_bounds[i]) * rows_per_token
                if member == vit_rank:
                    parts.append((-1, own_rows[-1], own_rows[-1] + size))
                    continue
                send[member].append(mine)
                parts.append((member, received_before[member], received_before[member] + size))
                received_before[member] += size
                recv_splits[member] += size
            recv_parts.append(tuple(parts))
        # Received rows arrive grouped by source; turn (source, offset) into global offsets.
        starts = [0] * n
        for src in range(1, n):
            starts[src] = starts[src - 1] + recv_splits[src - 1]
        resolved = tuple(tuple((s, lo if s < 0 else starts[s] + lo, hi if s < 0 else starts[s] + hi)
                               for s, lo, hi in parts) for parts in recv_parts)
        send_index = torch.cat([t for lst in send for t in lst]) if any(send) else \
            torch.zeros(0, dtype=torch.long)
        self.pieces = tuple(pieces)
        self.plan = _Plan(rows, send_index, tuple(sum(t.numel() for t in lst) for lst in send),
                          tuple(recv_splits), resolved)

    @property
    def local_rows(self) -> int:
        """Rows of all this rank's pieces together (what `gather` takes)."""
        return self.plan.local_rows

    def gather(self, local: torch.Tensor) -> list[torch.Tensor]:
        """``local``: this rank's pieces' rows, pieces in `pieces` order, ``rows_per_token``
        rows per token. Returns, per piece, the whole frame's rows (the group's pieces in token
        order). Collective over the ViT group: every ViT rank calls it the same number of times."""
        if local.shape[0] != self.plan.local_rows:
            raise ValueError(f"SplitAttention.gather: {local.shape[0]} rows, this rank's pieces "
                             f"hold {self.plan.local_rows}")
        received = _Exchange.apply(local, self.plan, self.group)
        return [torch.cat([local[lo:hi] if src < 0 else received[lo:hi]
                           for src, lo, hi in parts])
                for parts in self.plan.pieces]


def pieces_by_frame(split: SplitAttention | None) -> dict[int, FramePiece]:
    """Input frame index -> its piece, for the frames of this rank that are pieces of split
    frames (empty without ``split``)."""
    return {} if split is None else {p.frame: p for p in split.pieces}

