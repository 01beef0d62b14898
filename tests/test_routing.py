"""Routing tables, checked without processes: every rank's table is built, the all-to-all is
simulated in-process, and each slot must hold exactly the token a brute-force placement says."""

from __future__ import annotations

import numpy as np
import pytest

from hetero_parallel import ParallelPlan
from hetero_parallel.balancer import plan_global_batch
from hetero_parallel.cost_model import CostModel
from hetero_parallel.layout import MicroBatchShape, SampleLayout, cp_split
from hetero_parallel.routing_table import build_routing
from hetero_parallel.step_plan import StepConfig, plan_batch, plan_step

COST = CostModel(vit_linear=1.0, vit_quadratic=0.01, llm_linear=1.0, llm_quadratic=0.001)


def _layouts(seed: int, count: int) -> dict[int, SampleLayout]:
    rng = np.random.default_rng(seed)
    out = {}
    for sid in range(count):
        pos = int(rng.integers(1, 4))
        frame_tokens, frame_positions = [], []
        for _ in range(int(rng.integers(0, 3))):
            toks, poss = [], []
            for _ in range(int(rng.integers(1, 6))):
                n = int(rng.integers(1, 9))
                pos += 1  # a frame marker
                poss.append(pos)
                toks.append(n)
                pos += n
            frame_tokens.append(tuple(toks))
            frame_positions.append(tuple(poss))
        seq_len = pos + int(rng.integers(1, 10))
        out[sid] = SampleLayout(sid, seq_len, tuple(frame_tokens), tuple(frame_positions))
    return out


def _megatron_cp_chunks(seq_len: int, cp: int, cp_rank: int) -> list[int]:
    """Global positions held by ``cp_rank``, in local order, as megatron splits a sequence."""
    parts = np.array_split(np.arange(seq_len), 2 * cp)
    return list(parts[cp_rank]) + list(parts[2 * cp - 1 - cp_rank])


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_cp_split_matches_megatron_layout(cp):
    seq_len = 8 * cp * 3
    positions = np.arange(seq_len)
    owner, local = cp_split(positions, seq_len, cp)
    for r in range(cp):
        held = _megatron_cp_chunks(seq_len, cp, r)
        for i, p in enumerate(held):
            assert owner[p] == r and local[p] == i
    with pytest.raises(ValueError, match="not divisible by 2 \\* cp = 4"):
        cp_split(positions[:3], 10, 2)


def _simulate(plan: ParallelPlan, layouts: dict[int, SampleLayout], num_mb: int,
              pad_to: int | None = None, packed: bool = True):
    config = StepConfig(num_microbatches=num_mb, frames_per_chunk=2, pad_to_multiple_of=pad_to,
                        packed=packed)
    batch = plan_batch(plan, list(layouts.values()), COST, config)
    steps = {r: plan_step(plan, r, list(layouts.values()), COST, config, batch=batch)
             for r in range(plan.world_size)}
    tables = {r: steps[r].table for r in range(plan.world_size)}
    group = plan.routing_ranks()
    # Each ViT row is labelled by the token it encodes: (sample, global position).
    labels = {}
    for r in range(plan.world_size):
        v = plan.vit_index(r)
        rows = []
        if v is not None:
            for ch in batch.chunks_for_vit_rank(v):
                lay = layouts[ch.sample_id]
                for f in range(ch.frame_start, ch.frame_stop):
                    p0 = lay.frame_positions[ch.media_index][f]
                    n = lay.frame_tokens[ch.media_index][f]
                    rows += [(ch.sample_id, p0 + t) for t in range(n)]
        labels[r] = rows
        assert tables[r].num_local_rows == len(rows)
    # Forward all-to-all.
    inbox = {r: [] for r in group}
    for src in group:
        t = tables[src]
        send = [labels[src][i] for i in t.send_index.tolist()]
        bounds = np.cumsum([0, *t.send_splits])
        for j, dst in enumerate(group):
            inbox[dst].append(send[bounds[j]:bounds[j + 1]])
    slots = {}
    for dst in group:
        t = tables[dst]
        for j, src in enumerate(group):
            assert len(inbox[dst][j]) == t.recv_splits[j], (src, dst)
        received = [x for part in inbox[dst] for x in part]
        placed = [None] * len(received)
        for i, slot in enumerate(t.recv_to_slot.tolist()):
            placed[slot] = received[i]
        slots[dst] = placed
    return batch, tables, slots, labels, steps


def _brute_force_row(plan: ParallelPlan, layouts, lengths: list[int], packed: bool,
                     seq_len: int, cp_rank: int, tp_rank: int) -> dict[tuple[int, int], int]:
    """(row, position in row) -> position in the rank's local sequence, walked by hand: megatron's
    CP chunks of each row (padded) or of each sample's span (packed), then the SP chunk."""
    local: list[tuple[int, int]] = []
    if packed:
        start = 0
        for n in lengths:
            local += [(0, start + p) for p in _megatron_cp_chunks(n, plan.cp, cp_rank)]
            start += n
    else:
        for row in range(len(lengths)):
            local += [(row, p) for p in _megatron_cp_chunks(seq_len, plan.cp, cp_rank)]
    if packed:
        per_row = [local]
    else:
        per_row = [[x for x in local if x[0] == row] for row in range(len(lengths))]
    out = {}
    for items in per_row:
        chunk = len(items) // plan.tp if plan.sequence_parallel else len(items)
        lo = tp_rank * chunk if plan.sequence_parallel else 0
        for i, key in enumerate(items[lo:lo + chunk]):
            out[key] = i
    return out


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize(
    ("kwargs", "num_mb", "pad_to"),
    [
        ({"world_size": 4, "tp": 2}, 2, None),
        ({"world_size": 4, "pp": 2}, 3, None),
        ({"world_size": 4, "pp": 4}, 4, None),
        ({"world_size": 8, "tp": 2, "cp": 2, "pp": 2}, 2, None),
        ({"world_size": 16, "tp": 2, "cp": 4}, 3, None),
        ({"world_size": 8, "pp": 2, "vit_ranks": (1, 2, 6)}, 2, None),
        # A custom pad multiple with cp > 1 (the old loader padded with it, the table did not).
        ({"world_size": 8, "tp": 2, "cp": 2, "pp": 2}, 2, 12),
        ({"world_size": 8, "tp": 2, "cp": 2, "sequence_parallel": True}, 2, None),
        ({"world_size": 4, "tp": 4, "sequence_parallel": True}, 2, None),
    ],
)
def test_every_visual_token_lands_in_its_slot(kwargs, num_mb, pad_to, packed):
    plan = ParallelPlan(**kwargs)
    layouts = _layouts(seed=plan.world_size + num_mb, count=14)
    batch, tables, slots, _, steps = _simulate(plan, layouts, num_mb, pad_to, packed)
    divisor = pad_to or plan.seq_len_divisor
    for rank in range(plan.world_size):
        c = plan.coords(rank)
        t = tables[rank]
        if c.pp != 0:
            assert t.num_slots == 0 and sum(t.recv_splits) == 0
            continue
        # Brute force: this replica's micro-batches laid out by hand, and the positions
        # megatron's CP split (and SP) give this rank.
        expected = []
        for j, ids in enumerate(batch.samples_for_replica(c.dp)):
            lengths = [layouts[s].seq_len for s in ids]
            shape = steps[rank].shapes[j]
            if packed:
                spans = [-(-n // plan.sample_len_divisor) * plan.sample_len_divisor
                         for n in lengths]
                spans[-1] += -sum(spans) % divisor
                assert shape.packed_lengths == tuple(spans)
            else:
                spans = lengths
                assert shape.seq_len == -(-max(lengths) // divisor) * divisor
            local_of = _brute_force_row(plan, layouts, spans, packed, shape.seq_len, c.cp,
                                        c.tp)
            starts = np.cumsum([0, *spans[:-1]]) if packed else [0] * len(ids)
            for i, sid in enumerate(ids):
                row = 0 if packed else i
                lay = layouts[sid]
                for poss, toks in zip(lay.frame_positions, lay.frame_tokens, strict=True):
                    for p0, n in zip(poss, toks, strict=True):
                        for p in range(p0, p0 + n):
                            key = (row, int(starts[i]) + p)
                            if key in local_of:
                                expected.append((j, row, local_of[key], (sid, p)))
        got = [(int(m), int(r), int(p), slots[rank][k]) for k, (m, r, p) in
               enumerate(zip(t.slot_microbatch, t.slot_row, t.slot_position, strict=True))]
        assert got == expected, rank
        offsets = t.microbatch_slot_offsets
        assert all(t.slot_microbatch[offsets[j]:offsets[j + 1]].tolist() == [j] * int(
            offsets[j + 1] - offsets[j]) for j in range(num_mb))


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_gradients_return_once_per_token(sequence_parallel):
    plan = ParallelPlan(world_size=8, tp=2, cp=2, pp=2, sequence_parallel=sequence_parallel)
    layouts = _layouts(seed=3, count=12)
    _, tables, slots, labels, _ = _simulate(plan, layouts, 2)
    group = plan.routing_ranks()
    # Backward: every first-stage rank sends back its received rows' "gradients" (the labels),
    # in received order; without SP only TP rank 0 may send anything.
    returned = {r: [] for r in group}
    for dst in group:
        t = tables[dst]
        received_order = [None] * len(slots[dst])
        for i, slot in enumerate(t.recv_to_slot.tolist()):
            received_order[i] = slots[dst][slot]
        bounds = np.cumsum([0, *t.grad_send_splits])
        if plan.coords(dst).tp != 0 and not sequence_parallel:
            assert sum(t.grad_send_splits) == 0
        for j, src in enumerate(group):
            returned[src].append(received_order[bounds[j]:bounds[j + 1]])
    for src in group:
        t = tables[src]
        for j in range(len(group)):
            assert len(returned[src][j]) == t.grad_recv_splits[j]
        flat = [x for part in returned[src] for x in part]
        rows = t.send_index[t.grad_recv_rows].tolist()
        # Each ViT row gets exactly one gradient, its own.
        assert sorted(rows) == list(range(len(labels[src])))
        assert [labels[src][r] for r in rows] == flat


def test_mismatched_plans_are_rejected():
    layouts = _layouts(seed=0, count=4)
    specs = [layout.spec() for layout in layouts.values()]
    batch = plan_global_batch(specs, COST, num_replicas=2, num_microbatches=1, num_vit_ranks=4)
    shapes = [tuple(MicroBatchShape(ids, 4 * len(ids) + 2) for ids in
                    batch.samples_for_replica(d)) for d in range(2)]
    with pytest.raises(ValueError, match="4 ViT ranks but the parallel plan has vit_dp=2"):
        build_routing(ParallelPlan(world_size=4, tp=2, vit_ranks=(0, 1)), batch, layouts, 0,
                      shapes=shapes)
    with pytest.raises(ValueError, match="2 replicas and shapes for 2, but the parallel plan "
                                         "has dp=4"):
        build_routing(ParallelPlan(world_size=4), batch, layouts, 0, shapes=shapes)
    with pytest.raises(ValueError, match=r"replica 0 micro-batch 0: length \d+ is not a multiple "
                                         "of the plan's seq_len_divisor 4"):
        build_routing(ParallelPlan(world_size=4, cp=2, vit_ranks=(0, 1, 2, 3)), batch, layouts,
                      0, shapes=shapes)


def test_layout_validation_names_the_sample():
    with pytest.raises(ValueError, match="sample 7: visual tokens end at 12, past its seq_len 10"):
        SampleLayout(7, 10, ((4,),), ((8,),))
    with pytest.raises(ValueError, match="sample 7 media 0: frame at 2 with 4 tokens overlaps"):
        SampleLayout(7, 20, ((4, 4),), ((1, 2),))


def test_routing_is_a_pure_function():
    plan = ParallelPlan(world_size=8, tp=2, pp=2)
    layouts = _layouts(seed=5, count=10)
    a = _simulate(plan, layouts, 2)[1]
    b = _simulate(plan, dict(reversed(list(layouts.items()))), 2)[1]
    for r in range(8):
        assert a[r].send_index.tolist() == b[r].send_index.tolist()
        assert a[r].recv_to_slot.tolist() == b[r].recv_to_slot.tolist()
