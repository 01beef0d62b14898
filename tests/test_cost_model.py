"""Cost model: FLOPs formulas against FACTS.md, NNLS against brute force, calibration, JSON."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest

from hetero_parallel.cost_model import (
    QWEN3_8B,
    SIGLIP_400M,
    CostModel,
    PhaseMeasurement,
    TransformerShape,
    nnls,
)


def test_shapes_reproduce_the_facts_numbers():
    # FACTS.md: Qwen3-8B linear ~1.39e10 FLOPs per token forward, causal attention ~294,912 L^2;
    # SigLIP-400M ~8.2e8 per patch, attention ~124,416 P^2 per image / frame.
    assert QWEN3_8B.linear_flops_per_token() == pytest.approx(1.39e10, rel=5e-3)
    assert QWEN3_8B.attention_flops_coefficient() == 294_912
    assert SIGLIP_400M.linear_flops_per_token() == pytest.approx(8.2e8, rel=5e-3)
    assert SIGLIP_400M.attention_flops_coefficient() == 124_416


def test_linear_flops_by_hand_for_a_small_shape():
    # 2 layers, d=8, 2 heads x 4, 1 KV group, FFN 16 gated: Q 8x8, K,V 8x4 each, O 8x8, MLP 3x8x16.
    shape = TransformerShape(num_layers=2, hidden_size=8, num_attention_heads=2, head_dim=4,
                             num_query_groups=1, ffn_hidden_size=16, gated_mlp=True, causal=True,
                             vocab_size=10)
    per_layer = 64 + 32 + 32 + 64 + 3 * 8 * 16
    assert shape.linear_flops_per_token() == 2 * 2 * per_layer
    assert shape.attention_flops_coefficient() == 4 * 8 * 2 / 2
    assert shape.lm_head_flops_per_token() == 2 * 8 * 10


def test_from_model_shapes_is_three_times_forward_over_rate():
    rate = 4e14
    model = CostModel.from_model_shapes(flops_per_second=rate, include_lm_head=False)
    assert model.vit_linear == pytest.approx(3 * SIGLIP_400M.linear_flops_per_token() / rate)
    assert model.vit_quadratic == pytest.approx(3 * 124_416 / rate)
    assert model.llm_linear == pytest.approx(3 * QWEN3_8B.linear_flops_per_token() / rate)
    assert model.llm_quadratic == pytest.approx(3 * 294_912 / rate)
    with_head = CostModel.from_model_shapes(flops_per_second=rate)
    assert with_head.llm_linear - model.llm_linear == pytest.approx(3 * 2 * 4096 * 151_936 / rate)
    # A max-size image (20,480 tokens = 81,920 patches) costs more in the ViT than in the LLM.
    assert with_head.vit_cost_of_tokens(20_480) > with_head.llm_cost(20_480)


def test_group_cost_is_the_sum_of_item_costs():
    model = CostModel(vit_linear=2.0, vit_quadratic=0.5, vit_constant=3.0, llm_linear=1.0,
                      llm_quadratic=0.25, llm_constant=7.0)
    sizes = [1, 5, 9]
    assert model.group_cost("vit", 15, 107, 3) == pytest.approx(sum(model.vit_cost(sizes)))
    assert model.group_cost("llm", 15, 107, 3) == pytest.approx(sum(model.llm_cost(sizes)))
    assert model.vit_cost_of_tokens(3) == model.vit_cost(12)


# --- NNLS --------------------------------------------------------------------------------------
def brute_force_nnls(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float]:
    """Best least-squares solution over every support set whose solution is non-negative."""
    best, best_res = np.zeros(a.shape[1]), float(np.sum(b * b))
    for k in range(1, a.shape[1] + 1):
        for support in itertools.combinations(range(a.shape[1]), k):
            cols = list(support)
            z = np.linalg.lstsq(a[:, cols], b, rcond=None)[0]
            if (z >= 0).all():
                x = np.zeros(a.shape[1])
                x[cols] = z
                res = float(np.sum((a @ x - b) ** 2))
                if res < best_res:
                    best, best_res = x, res
    return best, best_res


@pytest.mark.parametrize("seed", range(30))
def test_nnls_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    rows, cols = int(rng.integers(3, 12)), int(rng.integers(1, 5))
    a = rng.normal(size=(rows, cols)) * 10.0 ** rng.integers(-3, 6, size=cols)
    b = rng.normal(size=rows)
    x = nnls(a, b)
    want, want_res = brute_force_nnls(a, b)
    assert (x >= 0).all()
    assert float(np.sum((a @ x - b) ** 2)) == pytest.approx(want_res, rel=1e-7, abs=1e-12)
    assert x == pytest.approx(want, rel=1e-5, abs=1e-9 * np.abs(want).max(initial=1.0))


# --- calibration ------------------------------------------------------------------------------
def _records(model: CostModel, rng: np.random.Generator, count: int) -> list[PhaseMeasurement]:
    out = []
    for _ in range(count):
        vit = rng.integers(16, 80_000, size=int(rng.integers(1, 12))).tolist()
        llm = rng.integers(1, 65_536, size=int(rng.integers(1, 12))).tolist()
        out.append(PhaseMeasurement("vit", vit, float(np.sum(model.vit_cost(vit)))))
        out.append(PhaseMeasurement("llm", llm, float(np.sum(model.llm_cost(llm)))))
    return out


@pytest.mark.parametrize("zero", [None, "vit_constant", "llm_quadratic"])
def test_calibration_recovers_known_coefficients(zero):
    true = dict(vit_linear=3.1e-12, vit_quadratic=7.7e-16, vit_constant=2e-5,
                llm_linear=1.2e-10, llm_quadratic=3.3e-15, llm_constant=4e-4)
    if zero:
        true[zero] = 0.0
    model = CostModel(**true)
    fitted = CostModel.calibrate(_records(model, np.random.default_rng(1), 40))
    for name, value in true.items():
        assert getattr(fitted, name) == pytest.approx(value, rel=1e-6, abs=1e-9 * max(
            true.values())), name


def test_calibration_keeps_coefficients_non_negative():
    # Times that shrink with size: unconstrained least squares would fit a negative slope.
    records = [PhaseMeasurement("llm", [s], 10.0 - s) for s in (1, 2, 3, 4, 5)]
    records += [PhaseMeasurement("llm", [1, 1], 12.0)]
    fitted = CostModel.calibrate(records, fallback=CostModel.from_model_shapes(
        flops_per_second=1e15))
    assert min(fitted.coefficients("llm")) >= 0
    assert fitted.coefficients("vit") == CostModel.from_model_shapes(
        flops_per_second=1e15).coefficients("vit")


def test_calibration_errors_name_the_problem():
    with pytest.raises(ValueError, match="no 'vit' measurements and no fallback"):
        CostModel.calibrate([PhaseMeasurement("llm", [1, 2], 1.0)] * 3)
    same = [PhaseMeasurement("llm", [100], 1.0)] * 5
    with pytest.raises(ValueError, match=r"'llm' measurements determine only 1 of 3 coefficients "
                                         r"\(5 records, 1 distinct"):
        CostModel.calibrate(same, fallback=CostModel.from_model_shapes(flops_per_second=1e15))
    with pytest.raises(ValueError, match="phase must be one of"):
        PhaseMeasurement("gpu", [1], 1.0)
    with pytest.raises(ValueError, match="sizes must be ints >= 1, got 2.5"):
        PhaseMeasurement("vit", [4, 2.5], 1.0)
    with pytest.raises(ValueError, match="seconds must be finite and >= 0, got -1.0"):
        PhaseMeasurement("vit", [1], -1.0)


# --- validation and serialisation -------------------------------------------------------------
def test_bad_coefficients_are_named():
    with pytest.raises(ValueError, match=r"CostModel.llm_quadratic must be a finite number >= 0, "
                                         r"got -1.0"):
        CostModel(vit_linear=1.0, vit_quadratic=1.0, llm_linear=1.0, llm_quadratic=-1.0)
    with pytest.raises(ValueError, match="flops_per_second must be a finite number > 0, got 0"):
        CostModel.from_model_shapes(flops_per_second=0)
    with pytest.raises(ValueError, match=r"num_query_groups\(3\) must divide"):
        TransformerShape(num_layers=1, hidden_size=8, num_attention_heads=4, head_dim=2,
                         num_query_groups=3, ffn_hidden_size=8, gated_mlp=False, causal=False)


def test_json_round_trip_is_exact(tmp_path):
    model = CostModel.calibrate(_records(CostModel.from_model_shapes(flops_per_second=3.3e14),
                                         np.random.default_rng(5), 10))
    assert CostModel.from_json(model.to_json()) == model
    path = tmp_path / "cost.json"
    model.save(path)
    assert CostModel.load(path) == model
    assert json.loads(path.read_text())["format"] == "hetero_parallel.CostModel/1"
    with pytest.raises(ValueError, match="not a saved CostModel: format is None"):
        CostModel.from_json('{"vit_linear": 1}')


# --- split frames, exchange, online refit -----------------------------------------------------
def test_piece_cost_and_exchange_by_hand():
    model = CostModel(vit_linear=2.0, vit_quadratic=0.5, vit_constant=3.0, llm_linear=1.0,
                      llm_quadratic=0.0, vit_exchange=0.25)
    # A slice of 4 patches of a 10-patch frame: 2*4 + 0.5*4*10 + 3 + 0.25*6.
    assert model.vit_piece_cost(4, 10) == 8 + 20 + 3 + 1.5
    assert model.vit_piece_cost(10, 10) == model.vit_cost(10)
    # Slices of one frame add up to the whole frame plus k-1 constants and the exchange.
    slices = [3, 3, 4]
    assert sum(model.vit_piece_cost(s, 10) for s in slices) == pytest.approx(
        model.vit_cost(10) + 2 * 3.0 + 0.25 * (3 * 10 - 10))
    # SigLIP: keys and values of 27 layers x 1152 wide in bf16, gathered forward and reduced
    # backward, at 50 GB/s.
    flops = CostModel.from_model_shapes(flops_per_second=4e14)
    assert flops.vit_exchange == pytest.approx(2 * (2 * 1152 * 27 * 2) / 50e9)
    fast = CostModel.from_model_shapes(flops_per_second=4e14, exchange_bytes_per_second=4e11)
    assert fast.vit_exchange == pytest.approx(flops.vit_exchange / 8)


def test_measurement_of_split_frames():
    m = PhaseMeasurement("vit", [4, 6, 10], 1.0, frame_sizes=[10, 10, 10])
    assert m.design_row() == (20, 4 * 10 + 6 * 10 + 100, 3)
    assert m.exchanged() == 6 + 4
    with pytest.raises(ValueError, match="a slice of 12 patches is larger than its frame of 10"):
        PhaseMeasurement("vit", [12], 1.0, frame_sizes=[10])
    with pytest.raises(ValueError, match="needs phase 'vit' and one entry per item"):
        PhaseMeasurement("llm", [4], 1.0, frame_sizes=[10])
    # The modelled exchange is taken off before fitting.
    true = CostModel(vit_linear=1e-3, vit_quadratic=1e-6, vit_constant=1e-2, llm_linear=1.0,
                     llm_quadratic=0.0, vit_exchange=1e-4)
    rng = np.random.default_rng(2)
    records = []
    for _ in range(30):
        frames = rng.integers(100, 5_000, size=4)
        sizes = [int(f // 2) for f in frames]
        seconds = float(sum(true.vit_piece_cost(s, f) for s, f in zip(sizes, frames,
                                                                         strict=True)))
        records.append(PhaseMeasurement("vit", sizes, seconds, frame_sizes=frames.tolist()))
    prior = CostModel(vit_linear=2e-3, vit_quadratic=5e-7, vit_constant=0.0, llm_linear=1.0,
                      llm_quadratic=0.0, vit_exchange=1e-4)
    fitted = prior.refit(records, strength=1e-8)
    assert fitted.coefficients("vit") == pytest.approx(true.coefficients("vit"), rel=1e-3)


def test_refit_follows_the_data_and_keeps_the_prior_where_it_says_nothing():
    prior = CostModel.from_model_shapes(flops_per_second=4e14)
    true = CostModel(vit_linear=2 * prior.vit_linear, vit_quadratic=3 * prior.vit_quadratic,
                     vit_constant=1e-3, llm_linear=prior.llm_linear,
                     llm_quadratic=prior.llm_quadratic, llm_constant=5e-3)
    records = _records(true, np.random.default_rng(4), 40)
    fitted = prior.refit(records, strength=1e-6)
    for name in ("vit_linear", "vit_quadratic", "llm_linear", "llm_quadratic"):
        assert getattr(fitted, name) == pytest.approx(getattr(true, name), rel=1e-2), name
    # Per-item constants are a tiny share of these records' seconds: barely determined, they
    # move from the prior (0) towards the truth without overshooting.
    assert 0 < fitted.vit_constant <= true.vit_constant
    assert 0 < fitted.llm_constant <= true.llm_constant
    # Every ViT record one image of the same size: linear, quadratic and constant cannot be told
    # apart. NNLS alone would keep one term and drop the others; the refit makes the least change
    # to the prior that explains the records: with 8 equal rows r = (P, P^2, 1) the objective is
    # 8 (r.x - t)^2 + s * sum 8 r_i^2 (x_i - p_i)^2, so each term's share of the prediction,
    # r_i x_i, grows by the same (t - r.p) / (3 + s).
    same = [PhaseMeasurement("vit", [1_000], 0.05)] * 8
    strength = 0.01
    fitted = prior.refit(same, strength=strength)
    row = np.array([1_000.0, 1e6, 1.0])
    gap = 0.05 - float(row @ prior.coefficients("vit"))
    grew = row * (np.array(fitted.coefficients("vit")) - prior.coefficients("vit"))
    assert grew == pytest.approx([gap / (3 + strength)] * 3, rel=1e-6)
    assert fitted.coefficients("llm") == prior.coefficients("llm")  # no LLM records: kept
    with pytest.raises(ValueError, match="strength must be a finite number > 0, got 0"):
        prior.refit(same, strength=0)


def test_refit_is_bit_identical_in_any_record_order():
    prior = CostModel.from_model_shapes(flops_per_second=4e14)
    records = _records(CostModel.from_model_shapes(flops_per_second=1e14),
                       np.random.default_rng(6), 25)
    a = prior.refit(records, strength=0.05)
    shuffled = list(records)
    np.random.default_rng(7).shuffle(shuffled)
    b = prior.refit(shuffled, strength=0.05)
    assert a.to_json() == b.to_json()


def test_json_keeps_the_exchange_and_reads_older_files():
    model = CostModel.from_model_shapes(flops_per_second=4e14)
    assert CostModel.from_json(model.to_json()) == model
    old = json.loads(model.to_json())
    del old["vit_exchange"]
    assert CostModel.from_json(json.dumps(old)).vit_exchange == 0.0


def test_online_refit_converges_to_balanced_vit_phases():
    """The ViT's true attention cost is 3x the FLOPs prior. Each step is planned with the current
    model, "measured" (true per-rank seconds + 2% noise), and the model refitted on every
    measurement so far; the plan's true slowest rank approaches that of a plan made with the
    true model within a few refits, and a resumed model plans identically."""
    from hetero_parallel.balancer import MediaSpec, SampleSpec, plan_global_batch

    prior = CostModel.from_model_shapes(flops_per_second=4e14)
    true = dataclasses.replace(prior, vit_quadratic=3 * prior.vit_quadratic)
    rng = np.random.default_rng(0)
    model, history, ratios = prior, [], []
    for _ in range(6):
        sizes = np.concatenate([rng.integers(3_000, 5_000, 4), rng.integers(100, 1_500, 80)])
        samples = [SampleSpec(i, 20, (MediaSpec((int(t),)),)) for i, t in enumerate(sizes)]

        def run(cost_model, samples=samples, sizes=sizes):
            plan = plan_global_batch(samples, cost_model, num_replicas=2, num_microbatches=2,
                                     num_vit_ranks=8)
            patches = [[] for _ in range(8)]
            for c in plan.media_chunks:
                patches[c.vit_rank].append(4 * int(sizes[c.sample_id]))
            seconds = [float(np.sum(true.vit_cost(np.asarray(p)))) for p in patches]
            return plan, patches, seconds

        plan, patches, seconds = run(model)
        ratios.append(max(seconds) / max(run(true)[2]))
        history += [PhaseMeasurement("vit", p, s * (1 + 0.02 * rng.standard_normal()))
                    for p, s in zip(patches, seconds, strict=True)]
        model = model.refit(history, prior=prior, strength=0.01)
        resumed = CostModel.from_json(model.to_json())
        assert plan_global_batch(samples, resumed, num_replicas=2, num_microbatches=2,
                                 num_vit_ranks=8).digest() == run(model)[0].digest()
    assert ratios[0] > 1.05, ratios  # the prior's plan is measurably off
    assert max(ratios[3:]) < 1.03, ratios  # balanced after three refits
    assert model.vit_quadratic == pytest.approx(true.vit_quadratic, rel=0.1)
