"""Online calibration through real step plans, with phase times produced by a known "true" cost
model (wall-clock times would make the test depend on the machine): the refits converge to
balanced ViT work, a calibrator restored from its checkpoint state continues with exactly the
placements of the uninterrupted run, and on real gloo ranks every rank refits the same model."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch.distributed as dist

from hetero_parallel.calibration import CalibrationConfig, OnlineCalibrator, local_record
from hetero_parallel.cost_model import QWEN3_8B, SIGLIP_400M, CostModel
from hetero_parallel.plan import ParallelPlan
from hetero_parallel.step_plan import StepConfig, plan_batch, plan_step
from hetero_parallel.workload import KeyeWorkload

PRIOR = CostModel.from_model_shapes(SIGLIP_400M, QWEN3_8B, flops_per_second=4e14)
TRUE = dataclasses.replace(PRIOR, vit_quadratic=3 * PRIOR.vit_quadratic)
"""The machine's real costs: ViT attention 3x what the FLOPs prior says."""
WORLD = ParallelPlan(world_size=32, tp=2, pp=2)
"""32 ranks: ViT data parallel over all of them, LLM TP2 x PP2 x DP8."""


def _layouts(step: int):
    from hetero_parallel.layout import SampleLayout

    specs = KeyeWorkload().sample(64, seed=step)
    out = []
    for s in specs:
        pos, toks, poss = s.text_tokens, [], []
        for m in s.media:
            toks.append(m.tokens_per_frame)
            p = []
            for t in m.tokens_per_frame:
                p.append(pos)
                pos += t
            poss.append(tuple(p))
        out.append(SampleLayout(s.sample_id, pos, tuple(toks), tuple(poss)))
    return out


def _true_timings(step_plan, rank: int) -> tuple[dict, list[float]]:
    plan = step_plan.plan
    vit = 0.0
    for ch in step_plan.batch.chunks_for_vit_rank(plan.vit_index(rank)):
        toks = step_plan.layouts[ch.sample_id].frame_tokens[ch.media_index]
        offset = 0
        for f in range(ch.frame_start, ch.frame_stop):
            lo, hi = max(ch.token_start, offset), min(ch.token_stop, offset + toks[f])
            if hi > lo:
                vit += float(TRUE.vit_piece_cost(4 * (hi - lo), 4 * toks[f]))
            offset += toks[f]
    forward = [float(np.sum(TRUE.llm_cost(np.asarray(s.sample_lengths)))) / 3 / plan.pp
               for s in step_plan.shapes]
    return {"vit_forward": vit / 3, "vit_backward": 2 * vit / 3}, forward


def _simulate(steps: int, resume_at: int | None = None, plan: ParallelPlan = WORLD) -> dict:
    """A run of ``plan`` simulated in one process: every rank's step plan and true timings, the
    calibrator fed all ranks' records (what `OnlineCalibrator.observe` all-gathers)."""
    config = StepConfig(num_microbatches=2, split_vit_items=True)
    cal = OnlineCalibrator(CalibrationConfig(every=2, skip_first=0), PRIOR)
    digests, imbalance = [], []
    for step in range(steps):
        if step == resume_at:  # a fresh calibrator from the checkpointed state
            state = json.loads(json.dumps(cal.state_dict()))
            cal = OnlineCalibrator(CalibrationConfig(every=2, skip_first=0), PRIOR)
            cal.load_state_dict(state)
        layouts = _layouts(step)
        batch = plan_batch(plan, layouts, cal.current, config)
        first = plan_step(plan, 0, layouts, cal.current, config, batch=batch)
        # Records only need each rank's coordinates (routing tables are not measured).
        plans = [dataclasses.replace(first, rank=r) for r in range(plan.world_size)]
        records, loads = [], []
        for r, step_plan in enumerate(plans):
            timings, forward = _true_timings(step_plan, r)
            loads.append(timings["vit_forward"] + timings["vit_backward"])
            records.append(local_record(step_plan, timings, forward))
        digests.append(batch.digest())
        imbalance.append(max(loads) / float(np.mean(loads)))
        cal.observe_records(plans[0], records)
    return {"digests": digests, "imbalance": imbalance, "model": cal.current}


def test_refits_learn_the_true_vit_attention_cost_and_balance_the_vit():
    r = _simulate(8)
    # Planned with the FLOPs prior, the ViT ranks' true work is far from balanced ...
    assert min(r["imbalance"][:2]) > 1.2
    # ... after the first refit (step 2 on) it is balanced, and the refitted attention
    # coefficient is near the truth (the prior keeps it from fitting every last bit).
    assert max(r["imbalance"][2:]) < 1.2 and np.mean(r["imbalance"][2:]) < 1.1
    assert r["model"].vit_quadratic == pytest.approx(TRUE.vit_quadratic, rel=0.1)
    assert abs(r["model"].vit_quadratic - TRUE.vit_quadratic) < \
        abs(PRIOR.vit_quadratic - TRUE.vit_quadratic) / 5


def test_a_resumed_calibrator_places_exactly_as_the_uninterrupted_one():
    straight = _simulate(7)
    resumed = _simulate(7, resume_at=5)
    assert resumed["digests"] == straight["digests"]
    assert resumed["model"] == straight["model"]


def _observe_on_ranks(steps: int) -> str:
    plan = ParallelPlan(world_size=dist.get_world_size(), pp=2)
    cal = OnlineCalibrator(CalibrationConfig(every=2, skip_first=0), PRIOR)
    config = StepConfig(num_microbatches=2)
    for step in range(steps):
        step_plan = plan_step(plan, dist.get_rank(), _layouts(step), cal.current, config)
        cal.observe(step_plan, *_true_timings(step_plan, dist.get_rank()))
    return cal.current.to_json()


@pytest.mark.slow
def test_every_rank_refits_the_same_model(pool4):
    models = pool4.run(_observe_on_ranks, 4)
    assert len(set(models)) == 1
    assert CostModel.from_json(models[0]) != PRIOR
