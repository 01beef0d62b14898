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

The loss is an `hetero_parallel.objectives.Objective` of per-sample sums on the last stage: by
default the mean token loss over the whole global batch (pre-training, SFT), or e.g. the MPO loss
of preference pairs. Every step also returns each sample's summed log-probability of its
loss-carrying tokens (`StepOutput.sample_logps`), under any TP/PP/CP layout: the building block of
preference and RL objectives and of reference log-probs. ``forward_only`` runs phases 1-3 without
gradients (reference log-probs, evaluation). The optimizer steps (LLM and ViT) are the caller's,
after this function returns.
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
from hetero_parallel.layout import MicroBatch, MicroBatchShape, microbatch_on_cp_rank
from hetero_parallel.objectives import Objective, SampleSums, TokenCrossEntropy
from hetero_parallel.routing import route
from hetero_parallel.routing_table import RoutingTable
from hetero_parallel.step_plan import StepPlan
from hetero_parallel.vit_split import SplitAttention


@dataclass(frozen=True)
class StepOptions:
    recompute_vit: bool = False
    """Run the ViT forward without keeping activations and recompute it for the backward."""


@dataclass
class StepOutput:
    loss: float
    """The objective's loss over the global batch (the same value on every rank)."""
    num_loss_tokens: int
    """The objective's normaliser over the global batch (loss tokens, or pairs for MPO)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase on this rank."""
    llm_forward_s: list[float] = field(default_factory=list)
    """Forward seconds of each micro-batch on this rank's pipeline stage (all its virtual
    chunks), for calibrating the cost model (a stage's backward is about twice its forward)."""
    sample_logps: dict[int, float] = field(default_factory=dict)
    """Sample id -> sum of ``log p(token)`` over its loss-carrying tokens, for every sample of
    the global batch (the same on every rank)."""
    sample_tokens: dict[int, int] = field(default_factory=dict)
    """Sample id -> its number of loss-carrying tokens."""


class _ForwardClock:
    """Times each micro-batch's model forward on this stage: CUDA events on a GPU (read once,
    at the end of the step), wall clock on a CPU."""

    def __init__(self, num_microbatches: int) -> None:
        self.cuda = torch.cuda.is_available()
        self.spans: list[list] = [[] for _ in range(num_microbatches)]

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, j: int, started) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.spans[j].append((started, end))
        else:
            self.spans[j].append(time.perf_counter() - started)

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [sum(a.elapsed_time(b) / 1e3 for a, b in s) for s in self.spans]
        return [float(sum(s)) for s in self.spans]


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


def _sample_sums(per_token_loss: torch.Tensor, mb: MicroBatch, shape: MicroBatchShape,
                 cp: int) -> SampleSums:
    """Per-sample sums of ``-per_token_loss`` (``log p(label)``) and of the loss mask over this
    CP rank's tokens: a padded row is one sample; a packed row holds each sample's
    ``packed_lengths[i] / cp`` local tokens in order (`microbatch_on_cp_rank`)."""
    mask = mb.loss_mask.to(torch.float32)
    logp = -(per_token_loss.float() * mask)
    if not shape.packed:
        return SampleSums(shape.sample_ids, logp.sum(1), mask.sum(1))
    local = torch.tensor([n // cp for n in shape.packed_lengths], device=logp.device)
    segment = torch.repeat_interleave(torch.arange(len(local), device=logp.device), local)
    n = len(shape.sample_ids)
    return SampleSums(shape.sample_ids,
                      logp.new_zeros(n).index_add(0, segment, logp[0]),
                      mask.new_zeros(n).index_add(0, segment, mask[0]))


def _lm_forward_step_with_visual(microbatches: Sequence[MicroBatch],
                                 shapes: Sequence[MicroBatchShape], table: RoutingTable | None,
                                 visual_slots: Sequence[torch.Tensor], device,
                                 clock: _ForwardClock,
                                 position_ids: Sequence[torch.Tensor] | None,
                                 objective: Objective, cp_group, cp: int, cp_rank: int,
                                 sums_out: dict[int, tuple[torch.Tensor, torch.Tensor]]
                                 ) -> Callable:
    """megatron ``forward_step_func``; the iterator yields micro-batch indices. On the last
    stage the loss is ``objective``'s, and each micro-batch's per-sample sums (detached) go to
    ``sums_out[j]``."""

    def cp_reduce(t: torch.Tensor) -> torch.Tensor:
        if cp == 1:
            return t
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(t, group=cp_group)  # differentiable: its backward all-reduces too

    def forward_step(data_iterator, model):
        j = next(data_iterator)
        started = clock.start()
        packed = _packed_seq_params(shapes[j], device)
        if not microbatches:
            # A middle pipeline stage: its input arrives from the previous stage (a multimodal
            # rotary embedding still needs the positions).
            positions = position_ids[j].to(device) if position_ids is not None else None
            output = model(None, positions, None, packed_seq_params=packed)
            clock.stop(j, started)
            return output, None
        mb = microbatches[j]
        gpt = _unwrap(model)
        decoder_input = None
        if gpt.pre_process:
            # Rotary positions (1D or multimodal) stay whole under CP: megatron picks this rank's
            # part of the rotary embedding itself; only a learned position embedding reads them
            # here, and it needs them to match the local tokens.
            local_positions = mb.position_ids if mb.position_ids.shape == mb.input_ids.shape \
                else None
            decoder_input = gpt.embedding(input_ids=mb.input_ids, position_ids=local_positions)
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
                       labels=mb.labels, packed_seq_params=packed)
        clock.stop(j, started)

        def loss_func(per_token_loss):
            sums = _sample_sums(per_token_loss, mb, shapes[j], cp)
            sums_out[j] = (sums.logp.detach(), sums.tokens)
            loss, count = objective.microbatch_loss(sums, cp_reduce, cp, cp_rank)
            count = count.to(torch.int)
            return loss, count, {"loss": torch.stack([loss.detach().float().clone(),
                                                      count.float()])}

        return output, loss_func

    return forward_step


def _packed_seq_params(shape: MicroBatchShape, device):
    """megatron's ``PackedSeqParams`` of a packed micro-batch (None when padded); every pipeline
    stage builds them from the step plan, so no stage needs the tokens for them."""
    if not shape.packed:
        return None
    from megatron.core.packed_seq_params import PackedSeqParams

    cu, cu_padded = (t.to(device) for t in shape.cu_seqlens())
    longest = max(shape.packed_lengths)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           cu_seqlens_q_padded=cu_padded, cu_seqlens_kv_padded=cu_padded,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def hetero_train_step(
    *,
    groups: ParallelGroups,
    step: StepPlan,
    vision: nn.Module | None,
    vision_frames: Sequence[torch.Tensor],
    llm: list[nn.Module],
    microbatches: Sequence[MicroBatch] | None,
    total_loss_tokens: int,
    options: StepOptions = StepOptions(),
    position_ids: Sequence[torch.Tensor] | None = None,
    objective: Objective | None = None,
    forward_only: bool = False,
) -> StepOutput:
    """Run one step's forward and backward; gradients end up in the ViT and megatron buffers.

    ``step`` is this rank's `StepPlan` (its routing table and micro-batch shapes). ``vision`` is
    this rank's ViT replica (None if it hosts none) and ``vision_frames`` the frames of its chunks
    in ``BatchPlan.chunks_for_vit_rank`` order; the ViT maps them to ``[tokens, hidden]`` rows.
    ``llm`` is this rank's list of megatron model chunks (DDP-wrapped when they train);
    ``microbatches`` this replica's micro-batches in pipeline order (needed on the first and last
    stage, None elsewhere); ``position_ids`` their rotary positions (needed on middle stages for
    multimodal rope; 1D rope derives them). The LLM's `TransformerConfig` must have
    ``calculate_per_token_loss=True`` and ``variable_seq_lengths=True``. As with megatron, the
    caller zeroes the gradients (ViT ``.grad``, megatron's grad buffers) before the step. A batch
    without any visual token (text only, or every media sample skipped) is fine: the ViT then gets
    zero gradients.

    ``objective`` (default `TokenCrossEntropy`) turns each micro-batch's per-sample sums into its
    loss; ``total_loss_tokens`` is the global total of its normaliser (loss tokens, or pairs for
    MPO), checked against what the LLM counted. ``forward_only`` computes the loss and the
    per-sample log-probs without any gradient (nothing is written to gradient buffers).
    """
    from megatron.core.utils import get_model_config

    plan, rank = groups.plan, groups.rank
    if step.rank != rank or step.plan != plan:
        raise ValueError(f"the step plan is for rank {step.rank} of {step.plan.describe()}, this "
                         f"is rank {rank} of {plan.describe()}")
    config = get_model_config(llm[0])
    if not config.calculate_per_token_loss or not config.variable_seq_lengths:
        raise ValueError("hetero_train_step needs a TransformerConfig with "
                         "calculate_per_token_loss=True and variable_seq_lengths=True, got "
                         f"{config.calculate_per_token_loss} and {config.variable_seq_lengths}")
    with torch.no_grad() if forward_only else contextlib.nullcontext():
        return _run_step(groups, step, vision, vision_frames, llm, microbatches,
                         total_loss_tokens, options, position_ids,
                         objective or TokenCrossEntropy(), forward_only, config.hidden_size)


def _run_step(groups: ParallelGroups, step: StepPlan, vision: nn.Module | None,
              vision_frames: Sequence[torch.Tensor], llm: list[nn.Module],
              microbatches: Sequence[MicroBatch] | None, total_loss_tokens: int,
              options: StepOptions, position_ids: Sequence[torch.Tensor] | None,
              objective: Objective, forward_only: bool, hidden_size: int) -> StepOutput:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    plan, rank, table = groups.plan, groups.rank, step.table
    num_mb = len(table.microbatch_slot_offsets) - 1
    timer = _PhaseTimer()
    in_routing = groups.routing is not None
    device = next(llm[0].parameters()).device
    train_vit = not forward_only

    # 1. ViT forward (with split frames, every ViT rank exchanges keys and values per layer)
    split = None
    if vision is not None and step.batch.split_groups():
        if not getattr(vision, "supports_split_frames", False):
            raise ValueError(f"the step splits frames over ViT ranks but {type(vision).__name__} "
                             "does not support it (supports_split_frames); turn "
                             "StepConfig.split_vit_items off")
        split = SplitAttention(step.batch, plan.vit_index(rank), groups.vit,
                               rows_per_token=vision.rows_per_token)

    def run_vit():
        frames = list(vision_frames)
        return vision(frames) if split is None else vision(frames, split=split)

    with timer("vit_forward"):
        if vision is not None:
            with torch.set_grad_enabled(train_vit and not options.recompute_vit):
                vit_out = run_vit()
        else:
            vit_out = torch.zeros(0, hidden_size, device=device)
        vit_leaf = vit_out.detach().requires_grad_(train_vit)

    # 2. route forward
    with timer("route_forward"):
        slots = route(vit_leaf, table, groups.routing) if in_routing else vit_leaf[:0]
        offsets = table.microbatch_slot_offsets.tolist()
        slot_leaves = [
            slots[offsets[j]:offsets[j + 1]].detach().requires_grad_(train_vit)
            for j in range(num_mb)
        ]

    # 3. LLM pipeline, on this CP rank's share of each micro-batch
    c = plan.coords(rank)
    local = [microbatch_on_cp_rank(mb, shape, plan.cp, c.cp)
             for mb, shape in zip(microbatches or [], step.shapes, strict=False)]
    sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with timer("llm"):
        clock = _ForwardClock(num_mb)
        forward_step = _lm_forward_step_with_visual(
            local, step.shapes, table, slot_leaves, device, clock, position_ids, objective,
            ps.get_context_parallel_group() if plan.cp > 1 else None, plan.cp, c.cp, sums)
        iterators = [iter(range(num_mb)) for _ in llm]
        lengths = [mb.input_ids.shape[1] for mb in local]
        sizes = [mb.input_ids.shape[0] for mb in local]
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(llm) > 1 else iterators[0],
            model=llm if len(llm) > 1 else llm[0],
            num_microbatches=num_mb,
            seq_length=max(lengths, default=1),
            micro_batch_size=max(sizes, default=1),
            forward_only=forward_only,
        )

    if not forward_only:
        _backward(groups, vision, slots, slot_leaves, vit_out, vit_leaf, run_vit, options,
                  total_loss_tokens, timer, in_routing)

    # The loss and the per-sample sums, summed over the last stage's TP-0 ranks of every replica
    # (each CP rank holds its own share of the tokens), in one all-reduce.
    ids = step.batch.sample_ids.tolist()
    index = {s: i for i, s in enumerate(ids)}
    totals = torch.zeros(2 + 2 * len(ids), dtype=torch.float64, device=device)
    if ps.is_pipeline_last_stage(ignore_virtual=True) and c.tp == 0:
        for d in losses:
            totals[:2] += d["loss"].to(totals)
        for j, (logp, tokens) in sums.items():
            at = torch.tensor([2 + 2 * index[s] for s in step.shapes[j].sample_ids],
                              device=device)
            totals.index_add_(0, at, logp.to(totals))
            totals.index_add_(0, at + 1, tokens.to(totals))
    dist.all_reduce(totals)
    if int(totals[1].item()) != total_loss_tokens:
        raise RuntimeError(f"the LLM counted {int(totals[1].item())} loss tokens (the "
                           f"objective's normaliser), the caller said {total_loss_tokens}")
    per_sample = totals[2:].view(-1, 2).cpu()
    return StepOutput(loss=(totals[0] / totals[1]).item(), num_loss_tokens=total_loss_tokens,
                      timings=timer.timings, llm_forward_s=clock.seconds(),
                      sample_logps=dict(zip(ids, per_sample[:, 0].tolist(), strict=True)),
                      sample_tokens=dict(zip(ids, per_sample[:, 1].round().long().tolist(),
                                             strict=True)))


def _backward(groups: ParallelGroups, vision: nn.Module | None, slots: torch.Tensor,
              slot_leaves: list[torch.Tensor], vit_out: torch.Tensor, vit_leaf: torch.Tensor,
              run_vit: Callable[[], torch.Tensor], options: StepOptions, total_loss_tokens: int,
              timer: _PhaseTimer, in_routing: bool) -> None:
    """Phases 4-6: the visual slots' gradients back to the ViT ranks, the ViT backward, and the
    ViT gradient reduction."""
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
                vit_out = run_vit()
            # No visual token in this rank's share (or none at all): nothing to differentiate.
            if vit_out.requires_grad and vit_leaf.grad is not None:
                vit_out.backward(vit_leaf.grad)

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
