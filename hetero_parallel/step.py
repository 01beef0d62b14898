"""One heterogeneous training step: ViT data parallel -> route -> megatron pipeline -> back.

Phases, in order, on every rank (each timed):

1. ``vit_forward``   the ViT replicas encode their balanced share of frames (optionally without
                     keeping activations, ``StepOptions.recompute_vit``);
2. ``route_forward`` one all-to-all moves each visual token to the first-stage ranks that own it;
3. ``llm``           megatron-core's schedule runs the LLM; on the first stage a hook scatters the
                     routed tokens into the visual slots of each micro-batch's input embeddings;
4. ``route_backward`` the slots' gradients go back to the ViT ranks (from TP rank 0 only);
5. ``vit_backward``  the ViT backward (recomputing its forward first if asked);
6. ``vit_grad_reduce`` ViT gradients are summed over the ViT data-parallel group and divided by
                     the global number of loss tokens, the same normalisation megatron applies to
                     the LLM with ``calculate_per_token_loss`` (summed over its own DP group).

The loss is the mean token loss over the whole global batch. The optimizer steps (LLM and ViT) are
the caller's, after this function returns.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from hetero_parallel.groups import ParallelGroups
from hetero_parallel.routing import RoutingTable, route


@dataclass(frozen=True)
class MicroBatch:
    """One LLM micro-batch of this replica, padded: every tensor is ``[b, S]``.

    ``input_ids`` hold a placeholder at visual slots (their embedding is replaced); ``loss_mask``
    is 0 at visual slots, padding and anything else that carries no loss.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor


@dataclass(frozen=True)
class StepOptions:
    recompute_vit: bool = False
    """Run the ViT forward without keeping activations and recompute it for the backward."""


@dataclass
class StepOutput:
    loss: float
    """Mean token loss over the global batch (the same value on every rank)."""
    num_loss_tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase on this rank."""


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _PhaseTimer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        _sync()
        start = time.perf_counter()
        yield
        _sync()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def _unwrap(module: nn.Module) -> nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module


def _lm_forward_step_with_visual(microbatches: Sequence[MicroBatch], table: RoutingTable | None,
                                 visual_slots: Sequence[torch.Tensor]) -> Callable:
    """megatron ``forward_step_func``; the iterator yields micro-batch indices."""

    def forward_step(data_iterator, model):
        j = next(data_iterator)
        if not microbatches:
            # A middle pipeline stage: its input arrives from the previous stage.
            return model(None, None, None), None
        mb = microbatches[j]
        gpt = _unwrap(model)
        decoder_input = None
        if gpt.pre_process:
            decoder_input = gpt.embedding(input_ids=mb.input_ids, position_ids=mb.position_ids)
            if not decoder_input.requires_grad:
                # A frozen LLM (alignment stage) still has to pass gradients through to the
                # visual tokens, and megatron's backward needs an output that requires grad.
                decoder_input = decoder_input.detach().requires_grad_(True)
            if visual_slots[j].shape[0]:
                lo, hi = table.microbatch_slot_offsets[j], table.microbatch_slot_offsets[j + 1]
                rows = torch.from_numpy(table.slot_row[lo:hi]).to(mb.input_ids.device)
                positions = torch.from_numpy(table.slot_position[lo:hi]).to(mb.input_ids.device)
                decoder_input = decoder_input.index_put(  # [S, b, H]
                    (positions, rows), visual_slots[j].to(decoder_input.dtype))
        output = model(mb.input_ids, mb.position_ids, None, decoder_input=decoder_input,
                       labels=mb.labels)

        def loss_func(per_token_loss):
            mask = mb.loss_mask.to(per_token_loss.dtype)
            loss_sum = (per_token_loss.float() * mask).sum()
            num_tokens = mask.sum().to(torch.int)
            return loss_sum, num_tokens, {"loss": torch.stack([loss_sum.detach().clone(),
                                                               num_tokens.float()])}

        return output, loss_func

    return forward_step


def hetero_train_step(
    *,
    groups: ParallelGroups,
    table: RoutingTable,
    vision: nn.Module | None,
    vision_frames: Sequence[torch.Tensor],
    llm: list[nn.Module],
    microbatches: Sequence[MicroBatch] | None,
    total_loss_tokens: int,
    hidden_size: int,
    options: StepOptions = StepOptions(),
) -> StepOutput:
    """Run one step's forward and backward; gradients end up in the ViT and megatron buffers.

    ``vision`` is this rank's ViT replica (None if it hosts none) and ``vision_frames`` the frames
    of its chunks in ``BatchPlan.chunks_for_vit_rank`` order. ``llm`` is this rank's list of
    megatron DDP model chunks; ``microbatches`` this replica's micro-batches in pipeline order
    (needed on the first and last stage, None elsewhere). The LLM's `TransformerConfig` must have
    ``calculate_per_token_loss=True`` and ``variable_seq_lengths=True``. As with megatron, the
    caller zeroes the gradients (ViT ``.grad``, megatron's grad buffers) before the step.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    plan, rank = groups.plan, groups.rank
    config = get_model_config(llm[0])
    if not config.calculate_per_token_loss or not config.variable_seq_lengths:
        raise ValueError("hetero_train_step needs a TransformerConfig with "
                         "calculate_per_token_loss=True and variable_seq_lengths=True, got "
                         f"{config.calculate_per_token_loss} and {config.variable_seq_lengths}")
    num_mb = len(table.microbatch_slot_offsets) - 1
    timer = _PhaseTimer()
    in_routing = groups.routing is not None
    device = next(llm[0].parameters()).device

    # 1. ViT forward
    with timer("vit_forward"):
        if vision is not None:
            with torch.set_grad_enabled(not options.recompute_vit):
                vit_out = vision(list(vision_frames))
        else:
            vit_out = torch.zeros(0, hidden_size, device=device)
        vit_leaf = vit_out.detach().requires_grad_(True)

    # 2. route forward
    with timer("route_forward"):
        slots = route(vit_leaf, table, groups.routing) if in_routing else vit_leaf[:0]
        offsets = table.microbatch_slot_offsets.tolist()
        slot_leaves = [
            slots[offsets[j]:offsets[j + 1]].detach().requires_grad_(True) for j in range(num_mb)
        ]

    # 3. LLM pipeline
    with timer("llm"):
        forward_step = _lm_forward_step_with_visual(microbatches or [], table, slot_leaves)
        iterators = [iter(range(num_mb)) for _ in llm]
        lengths = [mb.input_ids.shape[1] for mb in microbatches or []]
        sizes = [mb.input_ids.shape[0] for mb in microbatches or []]
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(llm) > 1 else iterators[0],
            model=llm if len(llm) > 1 else llm[0],
            num_microbatches=num_mb,
            seq_length=max(lengths, default=1),
            micro_batch_size=max(sizes, default=1),
            forward_only=False,
        )

    # 4. route backward
    with timer("route_backward"):
        if in_routing:
            grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                     for leaf in slot_leaves]
            grad_slots = torch.cat(grads) if grads else slots.new_zeros(slots.shape)
            torch.autograd.backward(slots, grad_slots)

    # 5. ViT backward
    vit_params = [p for p in vision.parameters() if p.requires_grad] if vision is not None else []
    with timer("vit_backward"):
        if vit_params:
            if options.recompute_vit:
                vit_out = vision(list(vision_frames))
            grad = vit_leaf.grad if vit_leaf.grad is not None else torch.zeros_like(vit_leaf)
            vit_out.backward(grad)

    # 6. ViT gradient reduction
    with timer("vit_grad_reduce"):
        if vit_params:
            for p in vit_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            # One all-reduce for all ViT gradients.
            flat = torch._utils._flatten_dense_tensors([p.grad for p in vit_params])
            dist.all_reduce(flat, group=groups.vit)
            flat /= total_loss_tokens
            for p, g in zip(vit_params, torch._utils._unflatten_dense_tensors(flat, vit_params),
                            strict=True):
                p.grad.copy_(g)

    # The loss, summed over the last stage's TP-0/CP-0 ranks of every replica.
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    c = plan.coords(rank)
    if ps.is_pipeline_last_stage(ignore_virtual=True) and c.tp == 0 and c.cp == 0:
        for d in losses:
            totals += d["loss"].to(totals)
    dist.all_reduce(totals)
    if int(totals[1].item()) != total_loss_tokens:
        raise RuntimeError(f"the LLM counted {int(totals[1].item())} loss tokens, the caller "
                           f"said {total_loss_tokens}")
    return StepOutput(loss=(totals[0] / totals[1]).item(), num_loss_tokens=total_loss_tokens,
                      timings=timer.timings)


def make_microbatch(token_ids: Sequence[torch.Tensor], is_target: Sequence[torch.Tensor],
                    seq_len: int, pad_id: int = 0) -> MicroBatch:
    """Pad samples (in row order) to ``seq_len`` and derive next-token labels and the loss mask.

    ``is_target[i][p]`` says whether token ``p`` of sample ``i`` is predicted (text: yes; visual
    placeholders and markers: no); position ``p`` carries loss iff token ``p + 1`` is a target.
    """
    b = len(token_ids)
    inputs = torch.full((b, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((b, seq_len), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((b, seq_len), dtype=torch.float32)
    for row, (ids, target) in enumerate(zip(token_ids, is_target, strict=True)):
        n = ids.shape[0]
        if n > seq_len:
            raise ValueError(f"row {row} has {n} tokens, more than the micro-batch length "
                             f"{seq_len}")
        inputs[row, :n] = ids
        labels[row, :n - 1] = ids[1:]
        loss_mask[row, :n - 1] = target[1:].float()
    positions = torch.arange(seq_len).expand(b, seq_len).contiguous()
    return MicroBatch(inputs, labels, loss_mask, positions)
