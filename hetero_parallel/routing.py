"""Move visual embeddings from the ViT ranks to the LLM first-stage ranks, and gradients back.

`route` runs one variable-size all-to-all over the routing group (ViT ranks and LLM first-stage
ranks) as this rank's `RoutingTable` (`hetero_parallel.routing_table`) describes it, inside an
autograd function whose backward is the mirror-image exchange: only TP rank 0 of each first stage
returns gradients, so every ViT row receives its gradient exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from hetero_parallel.routing_table import RoutingTable


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
