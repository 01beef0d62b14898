"""The step plan: one pure function for placement, routing table and micro-batch shapes, and the
one-time check of materialised micro-batches against the table. No processes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hetero_parallel import ParallelPlan
from hetero_parallel.cost_model import CostModel
from hetero_parallel.layout import make_microbatch
from hetero_parallel.step_plan import StepConfig, check_microbatches, plan_step
from hetero_parallel.synthetic import FRAME, PAD_VISUAL, mixed_samples

COST = CostModel(vit_linear=1.0, vit_quadratic=0.01, llm_linear=1.0, llm_quadratic=0.001)
SAMPLES = mixed_samples(seed=3, count=16, vocab_size=300)


def _microbatches(step, samples=SAMPLES):
    by_id = {s.sample_id: s for s in samples}
    return [make_microbatch([by_id[i].tokens for i in mb.sample_ids],
                            [by_id[i].is_target for i in mb.sample_ids], mb)
            for mb in step.shapes]


@pytest.mark.parametrize("kwargs", [
    {"world_size": 8, "tp": 2, "pp": 2},
    {"world_size": 8, "cp": 2, "pp": 2},
    {"world_size": 8, "tp": 2, "cp": 2, "sequence_parallel": True},
])
@pytest.mark.parametrize("pad_to", [None, 24])
def test_every_rank_plans_the_same_step_and_its_micro_batches_match(kwargs, pad_to):
    plan = ParallelPlan(**kwargs)
    config = StepConfig(num_microbatches=2, frames_per_chunk=2, pad_to_multiple_of=pad_to)
    layouts = [s.layout for s in SAMPLES]
    steps = [plan_step(plan, r, layouts, COST, config) for r in range(plan.world_size)]
    assert len({s.batch.digest() for s in steps}) == 1
    divisor = pad_to or plan.seq_len_divisor
    for r, step in enumerate(steps):
        assert step.divisor == divisor
        assert all(mb.seq_len % divisor == 0 for mb in step.shapes)
        # Every rank of one replica agrees on its micro-batch shapes.
        assert step.shapes == steps[plan.rank_of(dp=plan.coords(r).dp)].shapes
        check_microbatches(step, _microbatches(step), {PAD_VISUAL})
    # Every visual token has one slot on each receiving TP rank (one TP rank under SP).
    first_stage_slots = sum(s.table.num_slots for r, s in enumerate(steps)
                            if plan.coords(r).pp == 0
                            and (plan.sequence_parallel or plan.coords(r).tp == 0))
    assert first_stage_slots == sum(s.layout.num_visual_tokens for s in SAMPLES)


def test_a_table_and_micro_batch_that_disagree_are_refused():
    plan = ParallelPlan(world_size=2)
    step = plan_step(plan, 0, [s.layout for s in SAMPLES], COST,
                     StepConfig(num_microbatches=2, frames_per_chunk=2))
    good = _microbatches(step)
    check_microbatches(step, good, {PAD_VISUAL})

    # A placeholder where the table expects none, and a slot on a text token.
    j = next(j for j in range(len(good)) if step.table.microbatch_slot_offsets[j + 1]
             > step.table.microbatch_slot_offsets[j])
    lo = int(step.table.microbatch_slot_offsets[j])
    row, pos = int(step.table.slot_row[lo]), int(step.table.slot_sequence_position[lo])
    moved = good[j].input_ids.clone()
    moved[row, pos] = FRAME
    bad = list(good)
    bad[j] = dataclasses.replace(good[j], input_ids=moved)
    with pytest.raises(ValueError, match=r"micro-batch \d+ slot 0 \(row \d+, position \d+\) "
                                         r"holds token 2, not a visual placeholder \[3\]"):
        check_microbatches(step, bad, {PAD_VISUAL})

    extra = good[j].input_ids.clone()
    assert int(extra[row, -1]) != PAD_VISUAL  # the last position is text or padding
    extra[row, -1] = PAD_VISUAL
    bad[j] = dataclasses.replace(good[j], input_ids=extra)
    with pytest.raises(ValueError, match=r"holds \d+ visual placeholders on this rank's share "
                                         r"\(CP rank 0\) but the routing table fills \d+ slots"):
        check_microbatches(step, bad, {PAD_VISUAL})

    short = dataclasses.replace(good[0], input_ids=good[0].input_ids[:, :-1])
    with pytest.raises(ValueError, match=r"micro-batch 0 has shape \(\d+, \d+\), the step plan "
                                         r"says"):
        check_microbatches(step, [short, *good[1:]], {PAD_VISUAL})
    with pytest.raises(ValueError, match="1 micro-batches, the step plan has 2"):
        check_microbatches(step, good[:1], {PAD_VISUAL})


def test_step_config_refuses_a_pad_multiple_that_breaks_the_layout():
    plan = ParallelPlan(world_size=4, cp=2)
    with pytest.raises(ValueError, match=r"pad_to_multiple_of\(6\) is not a multiple of the "
                                         r"plan's seq_len_divisor\(4\)"):
        plan_step(plan, 0, [s.layout for s in SAMPLES], COST,
                  StepConfig(pad_to_multiple_of=6))
    for bad in ({"num_microbatches": 0}, {"frames_per_chunk": True},
                {"pad_to_multiple_of": 0}, {"placement": "random"}):
        with pytest.raises(ValueError, match="StepConfig"):
            StepConfig(**bad)


def test_the_baseline_needs_the_vit_on_the_first_stage():
    plan = ParallelPlan(world_size=4, pp=2)
    layouts = [s.layout for s in SAMPLES]
    with pytest.raises(ValueError, match="needs the ViT on exactly the first-stage ranks"):
        plan_step(plan, 0, layouts, COST, StepConfig(placement="by_position"))
    base = plan.with_vit_on_first_stage()
    step = plan_step(base, 0, layouts, COST, StepConfig(placement="by_position"))
    # Megatron's split by position: replica 0 takes the first half of the ids.
    ids = sorted(i for mb in step.batch.samples_for_replica(0) for i in mb)
    assert ids == list(range(len(SAMPLES) // 2))


def test_text_only_batches_plan_without_slots():
    plan = ParallelPlan(world_size=2, pp=2)
    text = [s for s in SAMPLES if s.layout.num_visual_tokens == 0]
    step = plan_step(plan, 0, [s.layout for s in text], COST, StepConfig())
    assert step.table.num_slots == 0 and step.table.num_local_rows == 0
    check_microbatches(step, _microbatches(step, text), {PAD_VISUAL})
    assert torch.is_tensor(step.table.send_index)
