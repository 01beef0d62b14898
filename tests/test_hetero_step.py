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
         baseline: bool = False, packed: bool = True, mrope: bool = False,
         giant: int = 0) -> dict:
    with cpu_compat():
        samples = HH.make_samples(seed=0, giant=giant)
        initial, ref = HH.reference(samples, mrope=mrope)
        plan = ParallelPlan(world_size=dist.get_world_size(), **plan_kwargs)
        if baseline:
            plan = plan.with_vit_on_first_stage()
        config = HH.step_config(num_microbatches, baseline, packed=packed, split=giant > 0)
        got, timings = HH.hetero_step(plan, samples, initial, config,
                                      StepOptions(recompute_vit=recompute), mrope=mrope)
        batch = HH.toy_step(plan, 0, samples, config).plan.batch
        num_chunks = len(batch.media_chunks)
        split_ranks = [len(g.vit_ranks) for g in batch.split_groups()]
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
            "num_chunks": num_chunks,
            "split_ranks": split_ranks,
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


@pytest.mark.parametrize(("plan_kwargs", "packed"), [
    pytest.param({"cp": 2}, True, id="cp2-dp2"),
    pytest.param({"cp": 4}, True, id="cp4"),
    pytest.param({"tp": 2, "cp": 2}, True, id="tp2-cp2"),
    pytest.param({"pp": 2, "cp": 2}, True, id="pp2-cp2"),
    pytest.param({"cp": 2}, False, id="cp2-padded"),
    pytest.param({"tp": 2, "sequence_parallel": True}, True, id="tp2-sp"),
    pytest.param({"tp": 2, "sequence_parallel": True}, False, id="tp2-sp-padded"),
    pytest.param({"tp": 2, "pp": 2}, False, id="tp2-pp2-padded"),
])
def test_context_and_sequence_parallel_packed_or_padded_equal_single_process(
        pool4, plan_kwargs, packed):
    """CP through the CPU core attention (K/V gathered over the CP group), SP, and packed (THD)
    vs padded micro-batches: all equal the single-process reference, so packed == padded."""
    _check(pool4.run(_run, plan_kwargs, 2, False, False, packed))


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


@pytest.mark.parametrize(("plan_kwargs", "packed"), [
    pytest.param({"pp": 4}, True, id="pp4-packed"),
    pytest.param({"cp": 2, "tp": 2}, False, id="tp2-cp2-padded"),
    pytest.param({"cp": 2, "pp": 2}, True, id="pp2-cp2-packed"),
])
def test_multimodal_rope_positions_reach_every_stage(pool4, plan_kwargs, packed):
    """3-axis rotary positions (megatron's mrope) on middle pipeline stages and under CP."""
    _check(pool4.run(_run, plan_kwargs, 2, False, False, packed, True))


@pytest.mark.parametrize(("plan_kwargs", "recompute"), [
    pytest.param({"pp": 2}, False, id="pp2-dp2"),
    pytest.param({"tp": 2, "pp": 2}, True, id="tp2-pp2-recompute"),
])
def test_a_giant_image_split_over_vit_ranks_equals_single_process(pool4, plan_kwargs, recompute):
    """Sequence-parallel ViT attention: a 144-token image split over several ViT ranks (keys and
    values gathered per layer) gives the single-process loss, gradients and weights."""
    results = pool4.run(_run, plan_kwargs, 2, recompute, False, True, False, 144)
    assert results[0]["split_ranks"] and max(results[0]["split_ranks"]) > 1
    _check(results)


def _three_steps(plan_kwargs: dict, distributed: bool) -> dict:
    from hetero_parallel import initialize, teardown
    from hetero_parallel.megatron_state import gather_full_state
    from hetero_parallel.trainer import OptimizerConfig

    with cpu_compat():
        initial = HH.standalone_initial_weights(0)
        plan = ParallelPlan(world_size=dist.get_world_size(), **plan_kwargs)
        groups = initialize(plan, backend="gloo", seed=1)
        try:
            # Adam (the distributed optimizer's only choice) with a large epsilon: its default
            # turns 1e-7 differences of near-zero gradients (reduce-scatter vs all-reduce sum
            # order) into full-size updates; with eps 1e-3 the update is smooth in the gradient.
            trainer = HH.build_trainer(groups, initial, OptimizerConfig(
                lr=1e-2, adam_eps=1e-3, clip_grad=1.0, distributed=distributed))
            losses = [trainer.step(HH.toy_step(plan, groups.rank, HH.make_samples(seed),
                                               HH.step_config(2))).loss for seed in range(3)]
            return {"losses": losses, "after": gather_full_state(trainer.llm)}
        finally:
            teardown(groups)


@pytest.mark.parametrize("plan_kwargs", [pytest.param({"tp": 2}, id="tp2-dp2"),
                                         pytest.param({"pp": 2}, id="pp2-dp2")])
def test_distributed_optimizer_equals_the_plain_one_over_three_steps(pool4, plan_kwargs):
    plain = pool4.run(_three_steps, plan_kwargs, False)
    sharded = pool4.run(_three_steps, plan_kwargs, True)
    for rank, (a, b) in enumerate(zip(plain, sharded, strict=True)):
        assert b["losses"] == pytest.approx(a["losses"], rel=RTOL), rank
        bad = {k: v for k, v in max_rel_diff(b["after"], a["after"]).items() if v > RTOL}
        assert not bad, f"rank {rank}: weights differ after 3 steps: {bad}"
    assert plain[0]["losses"][2] != plain[0]["losses"][0]


def _text_only_step() -> dict:
    """A global batch without any visual token (a text-only manifest, or every media sample
    skipped): the step runs, the ViT gets zero gradients and its replicas stay identical."""
    with cpu_compat():
        samples = [s for s in HH.make_samples(seed=0, count=24)
                   if s.layout.num_visual_tokens == 0][:8]
        initial, ref = HH.reference(samples)
        plan = ParallelPlan(world_size=dist.get_world_size(), pp=2)
        got, _ = HH.hetero_step(plan, samples, initial, HH.step_config(2))
        vision_grads = [v for k, v in got.grads.items() if k.startswith("vision.")]
        return {"loss": got.loss, "ref_loss": ref.loss,
                "grad_err": max_rel_diff({k: v for k, v in got.grads.items()
                                          if k.startswith("llm.")}, ref.grads),
                "vision_grad_max": max((float(g.abs().max()) for g in vision_grads),
                                       default=None)}


def test_a_batch_without_visual_tokens_steps(pool4):
    for rank, r in enumerate(pool4.run(_text_only_step)):
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=RTOL), rank
        assert max(r["grad_err"].values()) <= RTOL, rank
        assert r["vision_grad_max"] == 0.0, rank
