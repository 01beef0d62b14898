"""`ParallelPlan` against megatron-core's own rank generator, in-process, without process groups."""

from __future__ import annotations

import itertools

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
        ({"world_size": 8, "order": "tp-dp-pp"}, "order 'tp-dp-pp' must name each of"),
        ({"world_size": 4, "vit_ranks": (0, 4)}, "vit_ranks [4] are outside [0, world_size(4))"),
        ({"world_size": 4, "vit_ranks": (2, 1)}, "vit_ranks must be strictly increasing"),
        ({"world_size": 4, "vit_ranks": ()}, "vit_ranks is empty"),
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
