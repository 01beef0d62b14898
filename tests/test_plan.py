"""`ParallelPlan` against megatron-core's own rank generator, in-process, without process groups."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from hetero_parallel import ParallelPlan

GROUP_KINDS = ("tp", "pp", "cp", "dp", "dp-cp", "tp-pp", "tp-cp", "tp-dp-cp", "tp-dp")
ORDERS = ("tp-cp-ep-dp-pp", "tp-cp-ep-pp-dp")


def _megatron_groups(plan: ParallelPlan, kind: str) -> list[tuple[int, ...]]:
    from megatron.core.parallel_state import RankGenerator

    gen = RankGenerator(
        tp=plan.tp, ep=1, dp=plan.dp, pp=plan.pp, cp=plan.cp, order=plan.order, rank_offset=0
    )
    return [tuple(g) for g in gen.get_ranks(kind)]


def _layouts():
    for world in (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96):
        for tp, cp, pp in itertools.product((1, 2, 4, 8), (1, 2, 4), (1, 2, 3, 4)):
            if world % (tp * cp * pp) == 0:
                yield world, tp, cp, pp


LAYOUTS = list(_layouts())


@pytest.mark.parametrize("order", ORDERS)
def test_every_group_matches_megatron_rank_generator(order):
    assert len(LAYOUTS) > 150
    for world, tp, cp, pp in LAYOUTS:
        if cp > 1 and pp > 1 and not order.endswith("pp"):
            # megatron's initialize_model_parallel refuses these (test_plan_orders.py).
            with pytest.raises(ValueError, match="must end in 'pp'"):
                ParallelPlan(world_size=world, tp=tp, cp=cp, pp=pp, order=order)
            continue
        plan = ParallelPlan(world_size=world, tp=tp, cp=cp, pp=pp, order=order)
        for kind in GROUP_KINDS:
            expected = _megatron_groups(plan, kind)
            assert plan.all_groups(kind) == expected, (world, tp, cp, pp, kind)
            for group in expected:
                for rank in group:
                    assert plan.group(rank, kind) == group


@pytest.mark.parametrize(
    ("world", "tp", "cp", "pp", "order"),
    [
        (100_000, 8, 2, 10, "tp-cp-ep-dp-pp"),
        (98_304, 8, 4, 16, "tp-cp-ep-dp-pp"),
        (65_536, 4, 1, 4, "tp-cp-ep-pp-dp"),
    ],
)
def test_large_layouts_match_megatron(world, tp, cp, pp, order):
    plan = ParallelPlan(world_size=world, tp=tp, cp=cp, pp=pp, order=order)
    for kind in ("tp", "pp", "dp-cp"):
        assert plan.all_groups(kind) == _megatron_groups(plan, kind), kind
    # Spot-check coordinates of ranks spread over the whole range.
    pp_groups = _megatron_groups(plan, "pp")
    tp_groups = _megatron_groups(plan, "tp")
    for rank in range(0, world, 997):
        c = plan.coords(rank)
        assert plan.rank_of(tp=c.tp, cp=c.cp, dp=c.dp, pp=c.pp) == rank
        pp_group = next(g for g in pp_groups if g[0] <= rank and rank in g)
        assert pp_group.index(rank) == c.pp
        assert tp_groups[rank // tp].index(rank) == c.tp


def test_coordinates_roundtrip_and_match_groups():
    plan = ParallelPlan(world_size=48, tp=2, cp=2, pp=3)
    assert plan.dp == 4
    seen = set()
    for rank in range(plan.world_size):
        c = plan.coords(rank)
        assert plan.rank_of(tp=c.tp, cp=c.cp, dp=c.dp, pp=c.pp) == rank
        assert plan.tp_group(rank).index(rank) == c.tp
        assert plan.cp_group(rank).index(rank) == c.cp
        assert plan.dp_group(rank).index(rank) == c.dp
        assert plan.pp_group(rank).index(rank) == c.pp
        seen.add((c.tp, c.cp, c.dp, c.pp))
    assert len(seen) == plan.world_size


def test_data_roles():
    plan = ParallelPlan(world_size=16, tp=2, cp=2, pp=2)
    roles = [plan.data_role(r) for r in range(16)]
    assert all(r.loads_pixels for r in roles)  # ViT on every rank by default
    for replica in range(plan.dp):
        first = plan.first_stage_ranks(replica)
        assert len(first) == plan.tp * plan.cp
        assert all(plan.coords(r).pp == 0 and plan.coords(r).dp == replica for r in first)
        last = plan.group(plan.rank_of(dp=replica, pp=plan.pp - 1), "tp-cp")
        loaders = [
            r for r in range(16) if roles[r].loads_tokens and roles[r].llm_replica == replica
        ]
        assert tuple(loaders) == plan.token_loaders(replica)
        assert loaders[0] in first and loaders[1] in last
        # Each loader broadcasts to exactly the ranks of its stage in its replica.
        assert plan.group(loaders[0], "tp-cp") == first
        assert plan.group(loaders[1], "tp-cp") == last
        needs = {r for r in range(16) if roles[r].needs_tokens and roles[r].llm_replica == replica}
        assert needs == set(first) | set(last)
        mine = [r for r in range(16) if roles[r].llm_replica == replica]
        assert tuple(r for r in mine if roles[r].receives_visual) == first


def test_vit_placement():
    plan = ParallelPlan(world_size=8, pp=4, vit_ranks=(0, 1, 4, 5))
    assert plan.vit_dp == 4
    assert [plan.vit_index(r) for r in range(8)] == [0, 1, None, None, 2, 3, None, None]
    assert not plan.data_role(2).loads_pixels
    assert plan.routing_ranks() == (0, 1, 4, 5)  # first stage is ranks 0 and 1 here
    default = ParallelPlan(world_size=8, tp=2)
    assert default.vit_group() == tuple(range(8)) and default.vit_dp == 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"world_size": 24, "tp": 2, "cp": 2, "pp": 4},
         "tp(2) * cp(2) * pp(4) = 16 does not divide world_size(24)"),
        ({"world_size": 8, "tp": 0}, "tp must be a positive integer, got 0"),
        ({"world_size": -4}, "world_size must be a positive integer, got -4"),
        ({"world_size": 8, "pp": 1, "vpp": 2}, "vpp(2) needs pipeline parallelism, but pp is 1"),
        ({"world_size": 8, "cp": 2, "order": "tp-dp-pp"},
         "order 'tp-dp-pp' leaves out cp, but cp(2) > 1"),
        ({"world_size": 8, "pp": 2, "vpp": True},
         "vpp must be None or a positive integer, got True"),
        ({"world_size": 8, "tp": 2.0}, "tp must be a positive integer, got 2.0"),
        ({"world_size": 8, "sequence_parallel": True},
         "sequence_parallel=True needs tensor parallelism, but tp is 1"),
        ({"world_size": 8, "tp": 2, "sequence_parallel": 1},
         "sequence_parallel must be a bool, got 1"),
        ({"world_size": 4, "vit_ranks": (0, 4)}, "vit_ranks [4] are outside [0, world_size(4))"),
        ({"world_size": 4, "vit_ranks": (2, 1)},
         "vit_ranks must be strictly increasing: vit_ranks[0] = 2 is followed by 1"),
        ({"world_size": 4, "vit_ranks": ()}, "vit_ranks is empty"),
        ({"world_size": 4, "vit_ranks": (0, 1.5, 3)},
         "vit_ranks must be integer ranks; 1 value(s) are not: [1.5]"),
        ({"world_size": 4, "vit_ranks": (0, True)},
         "vit_ranks must be integer ranks; 1 value(s) are not: [True]"),
        ({"world_size": 4, "vit_ranks": ("0", "1")},
         "vit_ranks must be integer ranks; 2 value(s) are not: ['0', '1']"),
        ({"world_size": 4, "vit_ranks": "01"}, "vit_ranks must be a sequence of integer ranks"),
        ({"world_size": 4, "vit_ranks": {0, 1}}, "vit_ranks must be a sequence of integer ranks"),
        ({"world_size": 4, "vit_ranks": (0, 2, 2, 3)},
         "vit_ranks has duplicate ranks [2] (1 duplicate entries among 4)"),
    ],
)
def test_impossible_layouts_are_value_errors(kwargs, message):
    with pytest.raises(ValueError) as excinfo:
        ParallelPlan(**kwargs)
    assert message in str(excinfo.value)


def test_bad_queries_name_the_value():
    plan = ParallelPlan(world_size=8, tp=2)
    with pytest.raises(ValueError, match=r"rank 8 is outside \[0, world_size\(8\)\)"):
        plan.coords(8)
    with pytest.raises(ValueError, match=r"tp coordinate 2 is outside \[0, tp\(2\)\)"):
        plan.rank_of(tp=2)
    with pytest.raises(ValueError, match="bad group dims 'tp-ep'"):
        plan.group(0, "tp-ep")


def test_vit_rank_errors_stay_short_at_100k_ranks():
    world = 100_000
    ranks = list(range(world))
    ranks[70_000] = 69_999  # one duplicate
    with pytest.raises(ValueError) as excinfo:
        ParallelPlan(world_size=world, vit_ranks=tuple(ranks))
    message = str(excinfo.value)
    assert "duplicate ranks [69999] (1 duplicate entries among 100000)" in message
    assert len(message) < 300

    cases = {
        "outside": [r + 50_000 for r in range(world)],       # 50,000 out of range
        "increasing": list(range(world))[::-1],               # sorted the wrong way
        "integer": [r + 0.5 for r in range(world)],            # all fractional
    }
    for word, bad in cases.items():
        with pytest.raises(ValueError) as excinfo:
            ParallelPlan(world_size=world, vit_ranks=bad)
        message = str(excinfo.value)
        assert word in message and len(message) < 300, message
    assert "(50000 in all)" in str(pytest.raises(
        ValueError, ParallelPlan, world_size=world, vit_ranks=cases["outside"]).value)


def test_numpy_integers_are_accepted_and_stored_as_int():
    plan = ParallelPlan(world_size=np.int64(16), tp=np.int32(2), pp=np.int64(2), cp=np.uint8(2),
                        vpp=np.int64(3), vit_ranks=np.arange(0, 16, 2))
    plain = ParallelPlan(world_size=16, tp=2, pp=2, cp=2, vpp=3, vit_ranks=tuple(range(0, 16, 2)))
    assert plan == plain
    for name in ("world_size", "tp", "pp", "cp", "vpp"):
        assert type(getattr(plan, name)) is int, name
    assert all(type(r) is int for r in plan.vit_ranks)
    assert plan.describe() == plain.describe()
    assert ParallelPlan(world_size=4, vit_ranks=[np.int64(1), np.int16(3)]).vit_ranks == (1, 3)
    with pytest.raises(ValueError, match=r"integer ranks; 2 value\(s\) are not"):
        ParallelPlan(world_size=4, vit_ranks=np.array([True, False]))


@pytest.mark.parametrize(("tp", "cp", "sequence_parallel", "divisor"), [
    (1, 1, False, 1), (8, 1, False, 1), (8, 1, True, 8), (1, 2, False, 4), (1, 3, False, 6),
    (4, 2, False, 4), (4, 2, True, 16), (2, 3, True, 12),
])
def test_seq_len_divisor_by_hand(tp, cp, sequence_parallel, divisor):
    plan = ParallelPlan(world_size=tp * cp * 2, tp=tp, cp=cp,
                        sequence_parallel=sequence_parallel)
    assert plan.seq_len_divisor == divisor
    assert ("sequence parallel" in plan.describe()) == sequence_parallel
    if sequence_parallel:
        assert f"multiple of {divisor}" in plan.describe()


def test_seq_len_divisor_pads_as_megatron_multimodal_does():
    # megatron-core's own padding rule for multimodal sequences under SP and CP: padding every
    # length to a multiple of the divisor must give exactly megatron's padded length.
    from megatron.core.models.multimodal.context_parallel import get_padding

    for tp, cp, sp in itertools.product((1, 2, 4, 8), (1, 2, 3, 4), (False, True)):
        if sp and tp == 1:
            continue
        plan = ParallelPlan(world_size=tp * cp, tp=tp, cp=cp, sequence_parallel=sp)
        d = plan.seq_len_divisor
        for length in range(1, 3 * d + 2):
            ours = -(-length // d) * d
            assert length + get_padding(length, cp, tp, sp) == ours, (tp, cp, sp, length)
