"""Objectives on the heterogeneous step: per-sample log-probs and MPO.

Pure tests check the MPO formulas against the same formulas written out with ``math`` and the
per-sample sums against brute force; the 4-rank tests check, against a single-process model that
runs one sample at a time, that every sample's log-prob is the same under TP/PP/CP layouts
(forward only, nothing updated) and that one MPO step (loss, gradients, weights) is the same under
tp2·pp2, pp2·dp2 and cp2·dp2.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from hetero_parallel import ParallelPlan, initialize, teardown
from hetero_parallel.cpu_compat import cpu_compat
from hetero_parallel.layout import cp_local_positions, make_microbatch, packed_shape
from hetero_parallel.objectives import (
    MixedPreferenceObjective,
    MPOConfig,
    SampleSums,
    TokenCrossEntropy,
    mpo_pair_loss,
)
from hetero_parallel.step import _sample_sums
from hetero_parallel.synthetic import preference_pairs
from tests import hetero_helpers as HH
from tests.megatron_helpers import max_rel_diff
from tests.tiny_models import VOCAB

RTOL = 1e-5


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _mpo_written_out(c: float, r: float, rc: float, rr: float, n_c: int, delta: float,
                     beta: float = 0.1, w=(0.8, 0.2, 1.0)) -> float:
    """The MPO loss of one pair from the paper's formulas, in plain floats."""
    reward_c, reward_r = beta * (c - rc), beta * (r - rr)
    preference = -_log_sigmoid(reward_c - reward_r)
    quality = -_log_sigmoid(reward_c - delta) - _log_sigmoid(-(reward_r - delta))
    generation = -c / n_c
    return w[0] * preference + w[1] * quality + w[2] * generation


def test_mpo_pair_loss_equals_the_formulas_written_out():
    g = np.random.default_rng(0)
    for _ in range(20):
        c, r, rc, rr = (float(x) for x in g.normal(-30, 10, 4))
        n, delta = int(g.integers(1, 50)), float(g.normal(0, 0.5))
        config = MPOConfig(beta=float(g.uniform(0.05, 1)), preference_weight=0.8,
                           quality_weight=0.2, generation_weight=1.0)
        got = mpo_pair_loss(config, *(torch.tensor([x], dtype=torch.float64)
                                      for x in (c, r, rc, rr)),
                            torch.tensor([float(n)], dtype=torch.float64), delta)
        assert got.item() == pytest.approx(
            _mpo_written_out(c, r, rc, rr, n, delta, config.beta), rel=1e-12)


def test_published_mpo_defaults_and_bad_configs():
    config = MPOConfig()
    assert (config.beta, config.preference_weight, config.quality_weight,
            config.generation_weight) == (0.1, 0.8, 0.2, 1.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        MPOConfig(beta=0.0)
    with pytest.raises(ValueError, match="quality_weight must be a finite number >= 0"):
        MPOConfig(quality_weight=float("nan"))


class _Data:
    def __init__(self, pairs, reference, total=0):
        self.pairs, self.reference_logps, self.total_loss_tokens = pairs, reference, total


def test_mpo_microbatch_loss_reward_shift_and_state():
    objective = MixedPreferenceObjective()
    objective.load_state_dict({"reward_mean": 0.25, "reward_count": 6})
    reference = {0: -10.0, 1: -12.0, 2: -7.0, 3: -6.5}
    data = _Data({0: 1, 2: 3}, reference)
    bound, count = objective.for_step(data)
    assert count == 2
    logp = torch.tensor([-9.0, -13.0, -8.0, -5.0], dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([4.0, 6.0, 3.0, 2.0], dtype=torch.float64)
    loss, n = bound.microbatch_loss(SampleSums((0, 1, 2, 3), logp, tokens), lambda t: t, 1, 0)
    want = sum(_mpo_written_out(logp[c].item(), logp[r].item(), reference[c], reference[r],
                                int(tokens[c]), 0.25) for c, r in ((0, 1), (2, 3)))
    assert loss.item() == pytest.approx(want, rel=1e-12) and int(n) == 2
    # After the step, the four rewards join the six earlier ones in the running mean.
    objective.after_step(data, {s: logp[s].item() for s in range(4)})
    rewards = [0.1 * (logp[s].item() - reference[s]) for s in range(4)]
    assert objective.state_dict() == pytest.approx(
        {"reward_mean": (0.25 * 6 + sum(rewards)) / 10, "reward_count": 10})
    # A pair whose answers are in different micro-batches cannot be computed there.
    with pytest.raises(ValueError, match="rejected answers \\[3\\] are not in the micro-batch"):
        bound.microbatch_loss(SampleSums((2,), logp[:1], tokens[:1]), lambda t: t, 1, 0)
    with pytest.raises(ValueError, match="no reference log-probs for samples \\[3\\]"):
        objective.for_step(_Data({2: 3}, {2: 0.0}))
    with pytest.raises(ValueError, match="holds no MPO state"):
        MixedPreferenceObjective().load_state_dict({})


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_per_sample_sums_of_a_packed_row_on_each_cp_rank(cp):
    """`_sample_sums` over each CP rank's share of a packed row adds up to brute-force sums."""
    g = torch.Generator().manual_seed(cp)
    lengths = [5, 17, 9, 1 + 2 * cp]
    shape = packed_shape((10, 11, 12, 13), lengths, 2 * cp, 2 * cp)
    ids = [torch.randint(4, 100, (n,), generator=g) for n in lengths]
    target = [torch.rand(n, generator=g) > 0.3 for n in lengths]
    mb = make_microbatch(ids, target, shape)
    per_token = torch.rand(mb.labels.shape, generator=g, dtype=torch.float64)
    want_logp = [-(per_token[0, o:o + n] * mb.loss_mask[0, o:o + n]).sum().item()
                 for o, n in zip(shape.offsets, shape.packed_lengths, strict=True)]
    got = torch.zeros(len(lengths), dtype=torch.float64)
    for rank in range(cp):
        index = torch.from_numpy(np.concatenate([
            o + cp_local_positions(n, cp, rank)
            for o, n in zip(shape.offsets, shape.packed_lengths, strict=True)]))
        local = type(mb)(mb.input_ids[:, index], mb.labels[:, index], mb.loss_mask[:, index],
                         mb.position_ids)
        got += _sample_sums(per_token[:, index], local, shape, cp).logp
    assert got.tolist() == pytest.approx(want_logp, rel=1e-6)
    assert TokenCrossEntropy().microbatch_loss(
        SampleSums(shape.sample_ids, got, got), lambda t: t, 1, 0)[0].item() == \
        pytest.approx(-sum(want_logp))


# -- 4 ranks ---------------------------------------------------------------------------------

def _pairs_batch():
    samples = preference_pairs(seed=3, count=6, vocab_size=VOCAB)
    pairs = {s.sample_id: s.sample_id + 1 for s in samples if s.sample_id % 2 == 0}
    return samples, pairs


def _renumbered(sample, sample_id: int):
    return dataclasses.replace(sample, sample_id=sample_id,
                               layout=dataclasses.replace(sample.layout, sample_id=sample_id))


def _logps_run(plan_kwargs: dict, packed: bool) -> dict:
    with cpu_compat():
        samples, _ = _pairs_batch()
        samples += [_renumbered(s, 100 + s.sample_id) for s in HH.make_samples(seed=5, count=6)]
        initial, ref = HH.reference_logps(samples)
        plan = ParallelPlan(world_size=dist.get_world_size(), **plan_kwargs)
        groups = initialize(plan, backend="gloo", seed=1)
        try:
            trainer = HH.build_trainer(groups, initial)
            data = HH.toy_step(plan, groups.rank, samples, HH.step_config(2, packed=packed))
            out = trainer.evaluate(data)
            from hetero_parallel.megatron_state import gather_full_state

            unchanged = max(max_rel_diff(gather_full_state(trainer.llm),
                                         initial["llm"]).values())
            grads = gather_full_state(trainer.llm, grads=True)
            return {"ref": ref, "got": out.sample_logps, "tokens": out.sample_tokens,
                    "want_tokens": {s.sample_id: s.num_loss_tokens for s in samples},
                    "unchanged": unchanged,
                    "grad_abs": max(float(v.abs().max()) for v in grads.values())}
        finally:
            teardown(groups)


@pytest.mark.slow
@pytest.mark.parametrize(("plan_kwargs", "packed"), [
    pytest.param({"tp": 2, "pp": 2}, True, id="tp2-pp2"),
    pytest.param({"pp": 2, "cp": 2}, True, id="pp2-cp2"),
    pytest.param({"tp": 2, "cp": 2}, False, id="tp2-cp2-padded"),
])
def test_per_sample_logps_equal_a_single_process_model(pool4, plan_kwargs, packed):
    for r in pool4.run(_logps_run, plan_kwargs, packed):
        assert set(r["got"]) == set(r["ref"])
        for s, want in r["ref"].items():
            assert r["got"][s] == pytest.approx(want, rel=RTOL), s
        assert r["tokens"] == r["want_tokens"]
        assert r["unchanged"] == 0.0 and r["grad_abs"] == 0.0  # forward only


def _mpo_run(plan_kwargs: dict) -> dict:
    with cpu_compat():
        samples, pairs = _pairs_batch()
        g = torch.Generator().manual_seed(11)
        # Reference log-probs away from the policy's (as after some MPO steps).
        offsets = torch.randn(len(samples), generator=g, dtype=torch.float64) * 3
        config = MPOConfig()
        delta = 0.05

        def independent_mpo(logps: list[torch.Tensor]) -> torch.Tensor:
            total = torch.zeros((), dtype=torch.float64)
            for c, r in pairs.items():
                lc, lr = logps[c].double(), logps[r].double()
                rc, rr = reference[c], reference[r]
                reward_c, reward_r = config.beta * (lc - rc), config.beta * (lr - rr)
                n_c = samples[c].num_loss_tokens
                total = total + 0.8 * -torch.nn.functional.logsigmoid(reward_c - reward_r) \
                    + 0.2 * (-torch.nn.functional.logsigmoid(reward_c - delta)
                             - torch.nn.functional.logsigmoid(-(reward_r - delta))) \
                    + 1.0 * (-lc / n_c)
            return (total / len(pairs)).float()

        initial, policy = HH.reference_logps(samples)
        reference = {s: v + offsets[s].item() for s, v in policy.items()}
        _, ref = HH.reference(samples, loss_fn=independent_mpo)
        objective = MixedPreferenceObjective(config)
        objective.load_state_dict({"reward_mean": delta, "reward_count": 12})
        plan = ParallelPlan(world_size=dist.get_world_size(), **plan_kwargs)
        got, _ = HH.hetero_step(plan, samples, initial, HH.step_config(2), objective=objective,
                                pairs=pairs, reference_logps=reference)
        return {"ref_loss": ref.loss, "loss": got.loss,
                "grad_err": max(max_rel_diff(got.grads, ref.grads).values()),
                "param_err": max(max_rel_diff(got.after, ref.after).values()),
                "state": objective.state_dict()}


@pytest.mark.slow
@pytest.mark.parametrize("plan_kwargs", [
    pytest.param({"tp": 2, "pp": 2}, id="tp2-pp2"),
    pytest.param({"pp": 2}, id="pp2-dp2"),
    pytest.param({"cp": 2}, id="cp2-dp2"),
])
def test_an_mpo_step_equals_an_independent_single_process_mpo(pool4, plan_kwargs):
    results = pool4.run(_mpo_run, plan_kwargs)
    for r in results:
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=RTOL)
        assert r["grad_err"] < RTOL and r["param_err"] < RTOL
        assert r["state"]["reward_count"] == 12 + 12  # six pairs, two rewards each
    assert len({r["state"]["reward_mean"] for r in results}) == 1
