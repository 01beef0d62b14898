"""Real megatron-core on 4 gloo ranks through the CPU compatibility layer.

Every parallel layout is compared against a single-model reference (TP=1, PP=1, the whole batch,
computed on each rank without communication) on the same weights and batch: the loss, every
gradient after megatron's DDP reduction, and every parameter after one optimizer step.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from hetero_parallel import ParallelPlan, initialize, teardown
from hetero_parallel.cpu_compat import cpu_compat
from tests import megatron_helpers as H
from tests.tiny_models import NUM_LAYERS

RTOL = 1e-5


def _compare_step(plan_kwargs: dict, num_microbatches: int) -> dict:
    with cpu_compat():
        batch = H.global_batch(seed=0)
        ref = H.single_model_reference(batch)
        plan = ParallelPlan(world_size=dist.get_world_size(), **plan_kwargs)
        got = H.megatron_train_step(plan, batch, ref.initial, num_microbatches=num_microbatches)
        return {
            "ref_loss": ref.loss,
            "loss": got.loss,
            "grad_err": H.max_rel_diff(got.grads, ref.grads),
            "param_err": H.max_rel_diff(got.after_step, ref.after_step),
            "moved": H.max_rel_diff(got.after_step, ref.initial),
            "ref_names": sorted(ref.grads),
        }


def _check(results: list[dict], plan_kwargs: dict) -> None:
    plan = ParallelPlan(world_size=4, **plan_kwargs)
    covered = set()
    losses = {r["loss"] for r in results}
    assert len(losses) == 1, f"ranks disagree on the loss: {losses}"
    for rank, r in enumerate(results):
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=RTOL), (rank, r["loss"], r["ref_loss"])
        bad = {k: v for k, v in r["grad_err"].items() if v > RTOL}
        assert not bad, f"rank {rank}: gradients differ from the reference: {bad}"
        bad = {k: v for k, v in r["param_err"].items() if v > RTOL}
        assert not bad, f"rank {rank}: parameters after the step differ: {bad}"
        # The step really moved the weights (so equality above is not vacuous).
        assert max(r["moved"].values()) > 1e-3
        covered.update(r["grad_err"])
        # Each rank holds exactly its pipeline stage's share of the layers.
        stage = plan.coords(rank).pp
        layers = {k.split(".")[2] for k in r["grad_err"] if k.startswith("decoder.layers.")}
        assert len(layers) == NUM_LAYERS // plan.pp, (rank, stage, layers)
    # Together the ranks cover every parameter of the single model.
    assert sorted(covered) == results[0]["ref_names"]


@pytest.mark.parametrize(
    ("plan_kwargs", "num_microbatches"),
    [
        pytest.param({"tp": 2}, 2, id="tp2-dp2"),
        pytest.param({"pp": 2}, 4, id="pp2-dp2-1f1b"),
        pytest.param({"pp": 4}, 4, id="pp4-1f1b"),
        pytest.param({"tp": 2, "pp": 2}, 4, id="tp2-pp2"),
        pytest.param({"pp": 2, "vpp": 2}, 4, id="pp2-vpp2-interleaved"),
        pytest.param({}, 1, id="dp4"),
    ],
)
def test_parallel_step_equals_single_model(pool4, plan_kwargs, num_microbatches):
    _check(pool4.run(_compare_step, plan_kwargs, num_microbatches), plan_kwargs)


def _megatron_groups(plan_kwargs: dict) -> dict:
    from megatron.core import parallel_state as ps

    def ranks(group):
        return tuple(dist.get_process_group_ranks(group)) if group is not None else None

    with cpu_compat():
        plan = ParallelPlan(world_size=dist.get_world_size(), **plan_kwargs)
        groups = initialize(plan, backend="gloo")
        try:
            rank = dist.get_rank()
            got = {
                "tp": ranks(ps.get_tensor_model_parallel_group()),
                "pp": ranks(ps.get_pipeline_model_parallel_group()),
                "cp": ranks(ps.get_context_parallel_group()),
                "dp": ranks(ps.get_data_parallel_group()),
                "dp-cp": ranks(ps.get_data_parallel_group(with_context_parallel=True)),
                "tp-pp": ranks(ps.get_model_parallel_group()),
                "tp-cp": ranks(groups.token_broadcast),
                "vit": ranks(groups.vit),
                "routing": ranks(groups.routing),
                "coords": (
                    ps.get_tensor_model_parallel_rank(),
                    ps.get_context_parallel_rank(),
                    ps.get_data_parallel_rank(),
                    ps.get_pipeline_model_parallel_rank(),
                ),
            }
            c = plan.coords(rank)
            routing = plan.routing_ranks()
            expected = {
                "tp": plan.tp_group(rank),
                "pp": plan.pp_group(rank),
                "cp": plan.cp_group(rank),
                "dp": plan.dp_group(rank),
                "dp-cp": plan.dp_group(rank, with_context_parallel=True),
                "tp-pp": plan.model_parallel_group(rank),
                "tp-cp": plan.group(rank, "tp-cp"),
                "vit": plan.vit_group() if c.vit is not None else None,
                "routing": routing if rank in routing else None,
                "coords": (c.tp, c.cp, c.dp, c.pp),
            }
            return {"got": got, "expected": expected}
        finally:
            teardown(groups)


@pytest.mark.parametrize(
    "plan_kwargs",
    [
        {},
        {"tp": 2},
        {"pp": 2},
        {"tp": 2, "pp": 2},
        {"pp": 4},
        {"tp": 4},
        {"cp": 2},
        {"tp": 2, "cp": 2},
        {"pp": 2, "order": "tp-cp-ep-pp-dp"},
        {"tp": 2, "vit_ranks": (0, 3)},
        {"pp": 2, "vit_ranks": (2, 3)},
    ],
    ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()) or "dp4",
)
def test_initialize_builds_the_groups_the_plan_predicts(pool4, plan_kwargs):
    for rank, r in enumerate(pool4.run(_megatron_groups, plan_kwargs)):
        assert r["got"] == r["expected"], f"rank {rank}"


def _initialize_wrong_world() -> tuple[str, bool]:
    from megatron.core import parallel_state as ps

    try:
        initialize(ParallelPlan(world_size=8, tp=2), backend="gloo")
    except ValueError as e:
        return str(e), ps.model_parallel_is_initialized()
    return "", ps.model_parallel_is_initialized()


def test_initialize_rejects_a_plan_for_another_world_size(pool4):
    for message, initialized in pool4.run(_initialize_wrong_world):
        assert "running world size is 4" in message and "world_size=8" in message
        assert not initialized
