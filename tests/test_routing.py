"""Routing tables, checked without processes: every rank's table is built, the all-to-all is
simulated in-process, and each slot must hold exactly the token a brute-force placement says."""

from __future__ import annotations

import numpy as np
import pytest

from hetero_parallel import ParallelPlan
from hetero_parallel.balancer import plan_global_batch
from hetero_parallel.cost_model import CostModel
from hetero_parallel.routing import (
    SampleLayout,
    build_routing,
    cp_split,
    microbatch_shapes,
)

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


def _simulate(plan: ParallelPlan, layouts: dict[int, SampleLayout], num_mb: int):
    specs = [layout.spec() for layout in layouts.values()]
    batch = plan_global_batch(specs, COST, num_replicas=plan.dp, num_microbatches=num_mb,
                              num_vit_ranks=plan.vit_dp, frames_per_chunk=2)
    tables = {r: build_routing(plan, batch, layouts, r) for r in range(plan.world_size)}
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
    return batch, tables, slots, labels


@pytest.mark.parametrize(
    ("kwargs", "num_mb"),
    [
        ({"world_size": 4, "tp": 2}, 2),
        ({"world_size": 4, "pp": 2}, 3),
        ({"world_size": 4, "pp": 4}, 4),
        ({"world_size": 8, "tp": 2, "cp": 2, "pp": 2}, 2),
        ({"world_size": 16, "tp": 2, "cp": 4}, 3),
        ({"world_size": 8, "pp": 2, "vit_ranks": (1, 2, 6)}, 2),
    ],
)
def test_every_visual_token_lands_in_its_slot(kwargs, num_mb):
    plan = ParallelPlan(**kwargs)
    layouts = _layouts(seed=plan.world_size + num_mb, count=14)
    batch, tables, slots, _ = _simulate(plan, layouts, num_mb)
    pad = 2 * plan.cp if plan.cp > 1 else 1
    for rank in range(plan.world_size):
        c = plan.coords(rank)
        t = tables[rank]
        if c.pp != 0:
            assert t.num_slots == 0 and sum(t.recv_splits) == 0
            continue
        # Brute force: walk this replica's micro-batches and keep the positions megatron's CP
        # split gives this rank.
        expected = []
        for j, mb in enumerate(microbatch_shapes(batch, layouts, c.dp, pad)):
            held = _megatron_cp_chunks(mb.seq_len, plan.cp, c.cp)
            local_of = {p: i for i, p in enumerate(held)}
            for row, sid in enumerate(mb.sample_ids):
                lay = layouts[sid]
                for poss, toks in zip(lay.frame_positions, lay.frame_tokens, strict=True):
                    for p0, n in zip(poss, toks, strict=True):
                        for p in range(p0, p0 + n):
                            if p in local_of:
                                expected.append((j, row, local_of[p], (sid, p)))
        got = [(int(m), int(r), int(p), slots[rank][k]) for k, (m, r, p) in
               enumerate(zip(t.slot_microbatch, t.slot_row, t.slot_position, strict=True))]
        assert got == expected, rank
        offsets = t.microbatch_slot_offsets
        assert all(t.slot_microbatch[offsets[j]:offsets[j + 1]].tolist() == [j] * int(
            offsets[j + 1] - offsets[j]) for j in range(num_mb))


def test_gradients_return_once_per_token():
    plan = ParallelPlan(world_size=8, tp=2, cp=2, pp=2)
    layouts = _layouts(seed=3, count=12)
    _, tables, slots, labels = _simulate(plan, layouts, 2)
    group = plan.routing_ranks()
    # Backward: every first-stage rank sends back its received rows' "gradients" (the labels),
    # in received order; only TP rank 0 may send anything.
    returned = {r: [] for r in group}
    for dst in group:
        t = tables[dst]
        received_order = [None] * len(slots[dst])
        for i, slot in enumerate(t.recv_to_slot.tolist()):
            received_order[i] = slots[dst][slot]
        bounds = np.cumsum([0, *t.grad_send_splits])
        if plan.coords(dst).tp != 0:
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
    with pytest.raises(ValueError, match="4 ViT ranks but the parallel plan has vit_dp=2"):
        build_routing(ParallelPlan(world_size=4, tp=2, vit_ranks=(0, 1)), batch, layouts, 0)
    with pytest.raises(ValueError, match="2 replicas but the parallel plan has dp=4"):
        build_routing(ParallelPlan(world_size=4), batch, layouts, 0)


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
