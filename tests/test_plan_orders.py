"""`ParallelPlan.order` against megatron-core's own ``initialize_model_parallel``.

One process, torch's in-memory "fake" process-group backend (no sockets, no peers): for every
(sizes, order) pair megatron either builds its parallel state or raises; the plan must accept
exactly the same pairs, and where both accept, every group megatron creates and this rank's
coordinates must equal the plan's. megatron is imported once per test session (test_plan.py
imports it too); the whole grid runs in a few seconds.
"""

from __future__ import annotations

import itertools
import random

import pytest

from hetero_parallel.plan import ORDER_NAMES, ParallelPlan

# megatron group description -> the plan's group kind
KINDS = {
    "TENSOR_MODEL_PARALLEL_GROUP": "tp",
    "PIPELINE_MODEL_PARALLEL_GROUP": "pp",
    "CONTEXT_PARALLEL_GROUP": "cp",
    "DATA_PARALLEL_GROUP": "dp",
    "DATA_PARALLEL_GROUP_WITH_CP": "dp-cp",
    "MODEL_PARALLEL_GROUP": "tp-pp",
    "TENSOR_AND_CONTEXT_PARALLEL_GROUP": "tp-cp",
    "TENSOR_AND_DATA_PARALLEL_GROUP_WITH_CP": "tp-dp-cp",
    "TENSOR_AND_DATA_PARALLEL_GROUP": "tp-dp",
}


def _orders() -> list[str]:
    """Every arrangement of the dense names (each may be left out), with ``ep`` absent or last
    (megatron checks the string's ending); repeats; case; malformed strings; random strings."""
    out = set()
    for k in range(5):
        for names in itertools.permutations(("tp", "cp", "dp", "pp"), k):
            out.update(("-".join(names), "-".join((*names, "ep"))))
    out |= {
        # repeats: harmless at size 1 or after every dimension of size > 1; pp's first mention
        # decides whether megatron's two layouts keep the same pipeline groups
        "tp-tp-cp-ep-dp-pp", "tp-cp-ep-dp-pp-pp", "tp-cp-dp-pp-tp", "tp-cp-pp-dp-pp",
        "tp-pp-cp-dp-pp", "tp-pp-dp-cp-pp", "tp-dp-tp-dp-pp", "cp-cp-dp", "tp-ep-ep-cp-dp-pp",
        "dp-dp-tp-cp-pp", "tp-cp-dp-dp-pp", "pp-tp-cp-dp-pp", "ep-tp-cp-dp-pp", "ep-pp-dp-tp",
        # case: megatron lower-cases the names but checks the 'pp' ending as written
        "TP-CP-EP-DP-PP", "Tp-Cp-Dp-Pp", "tp-cp-dp-PP", "TP-CP-DP-pp",
        # malformed
        "", "-", "tp-cp-dp-pp-", "tp--cp-dp-pp", " tp-cp-dp-pp", "tp-cp-ep-dp-pp ", "tp_cp_dp_pp",
        "tpcp-dp-pp", "tp-cp-xp-dp-pp", "tp-cp-dp-ppp",
    }
    rng = random.Random(14)
    out.update("-".join(rng.choice(ORDER_NAMES) for _ in range(rng.randint(1, 7)))
               for _ in range(60))
    return sorted(out)


ORDERS = _orders()
# (tp, cp, dp, pp): each dimension 1 or not, then a few wider layouts (world up to 384).
SIZES = [s for s in itertools.product((1, 2), (1, 3), (1, 2), (1, 2))]
WIDE = [(4, 2, 12, 4), (8, 2, 3, 8), (2, 4, 16, 3)]
WIDE_ORDERS = ["tp-cp-ep-dp-pp", "tp-cp-ep-pp-dp", "tp-pp-cp-dp-pp", "tp-cp-pp-dp-pp",
               "pp-dp-cp-tp", "dp-cp-tp-pp", "tp-dp-cp-pp"]


@pytest.fixture(scope="module")
def megatron_init():
    """``init(world, rank, order, tp, cp, pp) -> (groups by kind, coords) or the exception``,
    running megatron's real initialisation on the fake backend and tearing it down again."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    created = []
    real_create_group = parallel_state.create_group

    def recording_create_group(ranks=None, *args, group_desc=None, **kwargs):
        created.append((group_desc, tuple(ranks)))
        return real_create_group(ranks, *args, group_desc=group_desc, **kwargs)

    def init(world, rank, order, tp, cp, pp):
        created.clear()
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                context_parallel_size=cp, order=order, create_gloo_process_groups=False)
            coords = {"tp": parallel_state.get_tensor_model_parallel_rank(),
                      "cp": parallel_state.get_context_parallel_rank(),
                      "dp": parallel_state.get_data_parallel_rank(),
                      "pp": parallel_state.get_pipeline_model_parallel_rank()}
        except Exception as exc:  # megatron refuses with RuntimeError, AssertionError, KeyError...
            return exc
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
        groups: dict[str, list[tuple[int, ...]]] = {}
        for desc, ranks in created:
            if desc in KINDS:
                groups.setdefault(KINDS[desc], []).append(ranks)
        return groups, coords

    parallel_state.create_group = recording_create_group
    try:
        yield init
    finally:
        parallel_state.create_group = real_create_group


def _compare(init, order, tp, cp, dp, pp, rank_seed):
    world = tp * cp * dp * pp
    rank = rank_seed % world
    try:
        plan = ParallelPlan(world_size=world, tp=tp, cp=cp, pp=pp, order=order)
    except ValueError as exc:
        plan, ours = None, exc
    theirs = init(world, rank, order, tp, cp, pp)
    where = f"order {order!r} tp={tp} cp={cp} dp={dp} pp={pp}"
    if isinstance(theirs, Exception):
        assert plan is None, f"{where}: megatron refuses ({theirs!r}) but the plan accepts"
        assert repr(order) in str(ours) and f"tp={tp}, cp={cp}, dp={dp}, pp={pp}" in str(ours)
        return "refused"
    assert plan is not None, f"{where}: megatron accepts but the plan refuses: {ours}"
    groups, coords = theirs
    assert sorted(groups) == sorted(KINDS.values()), where
    for kind, expected in groups.items():
        assert plan.all_groups(kind) == expected, f"{where}: {kind} groups"
    c = plan.coords(rank)
    assert coords == {"tp": c.tp, "cp": c.cp, "dp": c.dp, "pp": c.pp}, f"{where}: rank {rank}"
    return "accepted"


def test_orders_accepted_and_refused_exactly_as_megatron(megatron_init):
    assert len(ORDERS) > 200
    outcomes = {"accepted": 0, "refused": 0}
    for i, (order, (tp, cp, dp, pp)) in enumerate(itertools.product(ORDERS, SIZES)):
        outcomes[_compare(megatron_init, order, tp, cp, dp, pp, rank_seed=7 * i + 3)] += 1
    # Both outcomes are common: the grid is not trivially one-sided.
    assert min(outcomes.values()) > 1000, outcomes


def test_wide_layouts_agree_with_megatron(megatron_init):
    outcomes = [_compare(megatron_init, order, *sizes, rank_seed=1_000_003)
                for order in WIDE_ORDERS for sizes in WIDE]
    assert set(outcomes) == {"accepted", "refused"}


@pytest.mark.parametrize(("order", "tp", "cp", "dp", "pp", "message"), [
    # The cases: size-1 dimensions may be left out...
    ("tp-pp-dp", 2, 1, 4, 2, None),
    ("tp-dp-pp", 2, 1, 4, 2, None),
    ("tp-cp-dp", 2, 2, 4, 1, None),
    # ...and cp > 1 with pp > 1 needs an order ending in pp.
    ("tp-cp-ep-pp-dp", 1, 2, 4, 2, "must end in 'pp' when cp(2) > 1 and pp(2) > 1"),
    ("TP-CP-EP-DP-PP", 1, 2, 4, 2, "compares case-sensitively"),
    ("tp-pp-dp", 1, 2, 4, 1, "leaves out cp, but cp(2) > 1"),
    ("tp-cp-pp", 1, 2, 1, 2, "leaves out dp, but dp(1) * cp(2) = 2 > 1"),
    ("tp-tp-cp-dp-pp", 2, 1, 4, 1, "repeats tp before it names dp"),
    ("tp-cp-pp-dp-pp", 1, 2, 4, 2, "disagree on the pipeline groups"),
    ("tp-cp-xp-dp-pp", 1, 1, 4, 1, "unknown part(s) ['xp']"),
    (None, 1, 1, 4, 1, "order must be a str"),
])
def test_order_errors_name_the_order_and_sizes(order, tp, cp, dp, pp, message):
    world = tp * cp * dp * pp
    if message is None:
        assert ParallelPlan(world_size=world, tp=tp, cp=cp, pp=pp, order=order).dp == dp
        return
    with pytest.raises(ValueError) as excinfo:
        ParallelPlan(world_size=world, tp=tp, cp=cp, pp=pp, order=order)
    assert message in str(excinfo.value)
    assert repr(order) in str(excinfo.value)
