"""The heterogeneous step on 4 gloo ranks against a single-process reference.

Tiny ViT + projector + megatron-core LLM, ViT data parallel over all 4 ranks, LLM in four layouts,
on a batch of text, variable-size images and Slow-Fast videos: the loss, the gradients of the ViT,
the projector and the LLM, and every parameter after one SGD step must equal the reference's.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from hetero_parallel import ParallelPlan
from hetero_parallel.cpu_compat import cpu_compat
from hetero_parallel.step import StepOptions
from tests import hetero_helpers as HH
from tests.megatron_helpers import max_rel_diff

RTOL = 1e-5


def _run(plan_kwargs: dict, num_microbatches: int, recompute: bool,
         baseline: bool = False) -> dict:
    with cpu_compat():
        samples = HH.make_samples(seed=0)
        initial, ref = HH.reference(samples)
        plan = ParallelPlan(world_size=dist.get_world_size(), **plan_kwargs)
        if baseline:
            plan = plan.with_vit_on_first_stage()
        batch = HH.plan_batch(samples, plan, num_microbatches, baseline=baseline)
        got, timings = HH.hetero_step(plan, samples, initial, batch,
                                      StepOptions(recompute_vit=recompute))
        vision_after = torch.cat([v.flatten() for k, v in sorted(got.after.items())
                                  if k.startswith("vision.")]) if plan.vit_index(
            dist.get_rank()) is not None else None
        return {
            "ref_loss": ref.loss,
            "loss": got.loss,
            "grad_err": max_rel_diff(got.grads, ref.grads),
            "param_err": max_rel_diff(got.after, ref.after),
            "vision_after": vision_after,
            "timings": timings,
            "num_chunks": len(batch.media_chunks),
        }


LAYOUTS = [
    pytest.param({"tp": 2, "pp": 2}, 4, id="tp2-pp2"),
    pytest.param({"pp": 2}, 2, id="pp2-dp2"),
    pytest.param({"tp": 2}, 2, id="tp2-dp2"),
    pytest.param({"pp": 4}, 4, id="pp4"),
]


@pytest.mark.parametrize(("plan_kwargs", "num_microbatches"), LAYOUTS)
def test_hetero_step_equals_single_process(pool4, plan_kwargs, num_microbatches):
    results = pool4.run(_run, plan_kwargs, num_microbatches, False)
    _check(results)


def test_vit_recomputation_gives_the_same_step(pool4):
    _check(pool4.run(_run, {"tp": 2, "pp": 2}, 4, True))


@pytest.mark.parametrize(("plan_kwargs", "num_microbatches"), LAYOUTS)
def test_baseline_placement_equals_single_process(pool4, plan_kwargs, num_microbatches):
    """Megatron's LLaVA layout (ViT on stage 0, split by position) through the same code."""
    results = pool4.run(_run, plan_kwargs, num_microbatches, False, True)
    plan = ParallelPlan(world_size=4, **plan_kwargs).with_vit_on_first_stage()
    assert plan.vit_dp == plan.tp * plan.cp * plan.dp  # only stage-0 ranks host a ViT
    _check(results)
    for rank, r in enumerate(results):
        if plan.vit_index(rank) is None:
            assert r["vision_after"] is None


def _check(results: list[dict]) -> None:
    assert results[0]["num_chunks"] > 8  # images and video chunks really spread over ranks
    covered = set()
    for rank, r in enumerate(results):
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=RTOL), rank
        bad = {k: v for k, v in r["grad_err"].items() if v > RTOL}
        assert not bad, f"rank {rank}: gradients differ: {bad}"
        bad = {k: v for k, v in r["param_err"].items() if v > RTOL}
        assert not bad, f"rank {rank}: parameters after the step differ: {bad}"
        covered |= set(r["grad_err"])
        assert {"vit_forward", "route_forward", "llm", "route_backward", "vit_backward",
                "vit_grad_reduce"} <= set(r["timings"])
    # ViT, projector and every LLM tensor were checked somewhere.
    assert any(k.startswith("vision.vit.") for k in covered)
    assert any(k.startswith("vision.projector.") for k in covered)
    assert {"llm.output_layer.weight", "llm.embedding.word_embeddings.weight"} <= covered
    # ViT replicas are still identical.
    replicas = [r["vision_after"] for r in results if r["vision_after"] is not None]
    assert replicas
    for v in replicas[1:]:
        assert torch.equal(v, replicas[0])
