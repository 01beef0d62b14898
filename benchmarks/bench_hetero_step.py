"""Heterogeneous placement + balancer vs Megatron's LLaVA layout: measured, then simulated at scale.

1. Measured (4 gloo ranks on this machine, small ViT + megatron LLM, the same Keye-like batches
   for both): step time of the heterogeneous placement (ViT data parallel over all 4 ranks, balanced
   by the cost model) vs the baseline run through the same code (ViT only on the pipeline-stage-0
   ranks, samples split by position), with per-phase times per rank. The measured baseline runs its
   ViT as a phase before the pipeline; Megatron's LLaVA runs it inside stage 0's micro-batches,
   which the at-scale simulation (3) models instead.
2. Validation: a cost model calibrated on the measured per-rank phase times of a PP=1 run, fed to
   the pipeline-timeline simulator, predicts the measured PP=2 step times of both placements.
3. Simulated at scale: Keye-VL-1.5-8B shapes (SigLIP-400M + Qwen3-8B) at H100 rates (FLOPs, 40%
   MFU), TP=4 x PP=4, 64 / 256 / 1,024 GPUs, on the synthetic Keye-like workload: predicted step
   time of both placements, the speedup and the idle fraction per pipeline stage.

Absolute CPU times mean little; the ratios, measured side by side in one run, are the point.

    python benchmarks/bench_hetero_step.py            # ~2-3 minutes on 2 cores
    python benchmarks/bench_hetero_step.py --quick    # fewer steps and scales
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hetero_parallel.balancer import (  # noqa: E402
    SampleSpec,
    plan_by_position,
    plan_global_batch,
)
from hetero_parallel.cost_model import QWEN3_8B, SIGLIP_400M, CostModel, PhaseMeasurement  # noqa: E402
from hetero_parallel.plan import ParallelPlan  # noqa: E402
from hetero_parallel.simulator import predict_baseline_step, predict_hetero_step  # noqa: E402
from hetero_parallel.workload import KeyeWorkload  # noqa: E402

SAMPLES_PER_REPLICA = 8
H100_BF16 = 989e12


def bench_model():
    """The tiny LLM with a wider ViT, so that the ViT is a visible share of a CPU step (as the
    400M-parameter ViT is of a Keye-VL-1.5-8B step on image-heavy batches)."""
    from examples.keye_vl.config import MODELS, ModelConfig
    from examples.keye_vl.vision import VisionShape

    tiny = MODELS["tiny"]
    return ModelConfig(name="bench", llm=tiny.llm, vision=VisionShape(
        hidden_size=128, num_layers=4, num_heads=4, ffn_hidden_size=512,
        llm_hidden_size=tiny.llm.hidden_size))


# --- Keye-like batches at CPU scale ------------------------------------------------------------
def cpu_scale(spec: SampleSpec, *, text_div: int = 64, visual_div: int = 32,
              max_frames: int = 12) -> tuple[list[list[int]], int]:
    """A workload sample shrunk for a CPU run: (visual tokens per frame per media, text tokens)."""
    media = []
    for m in spec.media:
        frames = m.tokens_per_frame
        if len(frames) > max_frames:  # keep the Slow-Fast mix, fewer frames
            idx = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
            frames = tuple(frames[i] for i in idx)
        media.append([max(1, min(16, t // visual_div)) for t in frames])
    return media, max(4, spec.text_tokens // text_div)


def cpu_batches(seed: int, steps: int, batch_size: int):
    import torch

    from examples.keye_vl.config import MODELS
    from examples.keye_vl.toy_batch import build_sample

    specs = KeyeWorkload().sample(steps * batch_size, seed=seed)
    g = torch.Generator().manual_seed(seed)
    vocab = MODELS["tiny"].llm.vocab_size
    return [
        [build_sample(spec.sample_id, *cpu_scale(spec), vocab, g)
         for spec in specs[s * batch_size:(s + 1) * batch_size]]
        for s in range(steps)
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- one measured run on 4 ranks -----------------------------------------------------------------
def _worker(rank: int, port: int, config: dict, out) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=config["world"])
    from examples.keye_vl.trainer import KeyeTrainer, OptimConfig, replica_microbatch_shapes
    from hetero_parallel import initialize, teardown
    from hetero_parallel.cpu_compat import cpu_compat
    from hetero_parallel.step import make_microbatch

    plan = ParallelPlan(world_size=config["world"], tp=config["tp"], pp=config["pp"])
    if config["baseline"]:
        plan = plan.with_vit_on_first_stage()
    batches = cpu_batches(config["seed"], config["steps"] + 1, plan.dp * SAMPLES_PER_REPLICA)
    cost = CostModel.from_json(config["cost"])
    with cpu_compat():
        groups = initialize(plan, backend="gloo")
        trainer = KeyeTrainer.build(groups, bench_model(), optim=OptimConfig(lr=1e-3))
        records = []
        for step, samples in enumerate(batches):
            specs = [s.layout.spec() for s in samples]
            if config["baseline"]:
                batch = plan_by_position(
                    specs, cost, num_replicas=plan.dp, num_microbatches=config["microbatches"],
                    replica_vit_ranks=[plan.replica_vit_indices(d) for d in range(plan.dp)])
            else:
                batch = plan_global_batch(specs, cost, num_replicas=plan.dp,
                                          num_microbatches=config["microbatches"],
                                          num_vit_ranks=plan.vit_dp,
                                          equal_samples_per_replica=config["equal"])
            by_id = {s.sample_id: s for s in samples}
            layouts = {s.sample_id: s.layout for s in samples}
            frames, patches = [], []
            v = plan.vit_index(rank)
            if v is not None:
                for ch in batch.chunks_for_vit_rank(v):
                    fs = by_id[ch.sample_id].frames[ch.media_index][ch.frame_start:ch.frame_stop]
                    frames.extend(fs)
                    patches.extend((f.shape[0] // 14) * (f.shape[1] // 14) for f in fs)
            micro = None
            if plan.data_role(rank).needs_tokens:
                micro = [make_microbatch([by_id[i].tokens for i in mb.sample_ids],
                                         [by_id[i].is_target for i in mb.sample_ids], mb.seq_len)
                         for mb in replica_microbatch_shapes(groups, batch, layouts)]
            dist.barrier()
            start = time.perf_counter()
            result = trainer.step(batch, layouts, frames, micro,
                                  sum(s.num_loss_tokens for s in samples))
            elapsed = time.perf_counter() - start
            c = plan.coords(rank)
            records.append({
                "step": step, "seconds": elapsed, "timings": result.timings, "loss": result.loss,
                "vit_patches": patches,
                "mb_tokens": [[by_id[s].layout.seq_len for s in mb]
                              for mb in batch.samples_for_replica(c.dp)],
                "vit_mb_patches": [[sum((f.shape[0] // 14) * (f.shape[1] // 14)
                                        for m in by_id[s].frames for f in m) for s in mb]
                                   for mb in batch.samples_for_replica(c.dp)],
            })
        teardown(groups, destroy_world=True)
    out.put((rank, records))


def measure(config: dict) -> list[list[dict]]:
    """Run ``config`` on forked ranks; per-rank step records (the first step is warm-up)."""
    world = config["world"]
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, config, out)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=600) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r][1:] for r in range(world)]


def step_seconds(runs: list[list[dict]]) -> float:
    """Median over steps of the slowest rank's step time."""
    return statistics.median(max(r[i]["seconds"] for r in runs) for i in range(len(runs[0])))


def phase_table(name: str, runs: list[list[dict]]) -> None:
    phases = ["vit_forward", "route_forward", "llm", "route_backward", "vit_backward",
              "vit_grad_reduce"]
    print(f"  {name}: per-phase ms per rank (median over steps)")
    print("    rank " + " ".join(f"{p:>15}" for p in phases))
    for rank, recs in enumerate(runs):
        cells = [statistics.median(r["timings"].get(p, 0.0) for r in recs) * 1e3 for p in phases]
        print(f"    {rank:>4} " + " ".join(f"{v:15.1f}" for v in cells))


# --- calibration and simulation ----------------------------------------------------------------
def padded(mb_tokens: list[int]) -> list[int]:
    """On CPU a micro-batch is padded to its longest sample: b rows of that length."""
    return [max(mb_tokens)] * len(mb_tokens)


def calibrate(runs: list[list[dict]]) -> CostModel:
    """Fit ViT and LLM coefficients from a PP=1 run's per-rank phase times."""
    records = []
    for recs in runs:
        for r in recs:
            vit = r["timings"]["vit_forward"] + r["timings"]["vit_backward"]
            if r["vit_patches"]:
                records.append(PhaseMeasurement("vit", tuple(r["vit_patches"]), vit))
            sizes = tuple(t for mb in r["mb_tokens"] for t in padded(mb))
            records.append(PhaseMeasurement("llm", sizes, r["timings"]["llm"]))
    return CostModel.calibrate(records, patches_per_token=4)


def predict_measured(cost: CostModel, runs: list[list[dict]], plan: ParallelPlan) -> float:
    """Simulated step time of a measured run (median over its steps).

    Both measured placements run the ViT as a phase before the pipeline (the baseline only on
    the stage-0 ranks), so both are predicted with `predict_hetero_step` from the ViT work each
    rank actually had. Per micro-batch and stage: the per-sample constant (schedule overhead,
    paid by every stage) plus the stage's share of the size-dependent work.
    """
    a, b, c = cost.coefficients("llm")
    preds = []
    for i in range(len(runs[0])):
        fwd, bwd = [], []
        for d in range(plan.dp):
            mb_tokens = runs[plan.rank_of(dp=d)][i]["mb_tokens"]
            work = np.array([sum(a * t + b * t * t for t in padded(mb)) for mb in mb_tokens])
            count = np.array([len(mb) for mb in mb_tokens])
            per_stage = np.tile(c * count + work / plan.pp, (plan.pp, 1))
            fwd.append(per_stage / 3)
            bwd.append(per_stage * 2 / 3)
        vit_rank = [cost.vit_cost(np.array(recs[i]["vit_patches"] or [0])).sum()
                    if recs[i]["vit_patches"] else 0.0 for recs in runs]
        preds.append(predict_hetero_step(np.array(fwd), np.array(bwd),
                                         np.array(vit_rank)).step_s)
    return statistics.median(preds)


def simulate_at_scale(gpus: int, batches: int, seed: int) -> dict:
    tp, pp, m = 4, 4, 8
    dp = gpus // (tp * pp)
    cost = CostModel.from_model_shapes(SIGLIP_400M, QWEN3_8B, flops_per_second=0.4 * H100_BF16)
    workload = KeyeWorkload()
    hidden_bytes = QWEN3_8B.hidden_size * 2  # bf16 visual embeddings
    link = 25e9  # bytes/s per GPU for the all-to-all across nodes
    out = {"base": [], "hetero": [], "base_idle": [], "hetero_idle": []}
    for b in range(batches):
        specs = workload.sample(dp * 2 * m, seed=seed + b, first_id=b * dp * 2 * m)
        hetero = plan_global_batch(specs, cost, num_replicas=dp, num_microbatches=m,
                                   num_vit_ranks=gpus)
        base = plan_by_position(specs, cost, num_replicas=dp, num_microbatches=m,
                                replica_vit_ranks=[[d] for d in range(dp)])
        chunk_vit = cost.vit_cost_of_tokens  # per frame; sum over a chunk's frames below
        for name, batch in (("hetero", hetero), ("base", base)):
            mb = batch.microbatch_costs / (tp * pp)  # [dp, m] per stage, TP splits the work
            fwd = np.repeat(mb[:, None, :] / 3, pp, axis=1)
            bwd = np.repeat(mb[:, None, :] * 2 / 3, pp, axis=1)
            if name == "hetero":
                vit = np.asarray(batch.vit_report.loads)
                tokens = np.zeros(gpus)
                np.add.at(tokens, batch.chunk_vit_rank, batch.chunk_tokens)
                route = tokens.max() * hidden_bytes / link
                pred = predict_hetero_step(fwd, bwd, vit, route_s=route)
            else:
                vit_mb = np.zeros((dp, m))
                by_id = {s.sample_id: s for s in specs}
                for sid, r, j in zip(batch.sample_ids.tolist(), batch.replica.tolist(),
                                     batch.microbatch.tolist(), strict=True):
                    frames = [t for md in by_id[sid].media for t in md.tokens_per_frame]
                    vit_mb[r, j] = float(np.sum(chunk_vit(np.array(frames or [0]))))
                pred = predict_baseline_step(fwd, bwd, vit_mb / tp)  # ViT TP-sharded on stage 0
            out[name].append(pred.step_s)
            out[f"{name}_idle"].append(pred.pipeline.idle_fraction)
    return {k: (np.mean(v, axis=0) if "idle" in k else float(np.mean(v))) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps = 2 if args.quick else 4
    flops_cost = CostModel.from_model_shapes(SIGLIP_400M, QWEN3_8B, flops_per_second=1e12)

    print("## 1. Measured: gloo ranks on this machine, small ViT + tiny megatron LLM, the same "
          f"Keye-like batches for both ({SAMPLES_PER_REPLICA} samples per replica, {steps} steps "
          "after warm-up)")
    print("  Note: 4 ranks share 2 cores here, so 4 ViT replicas run at half speed each; the "
          "2-rank rows (one rank per core) show the placement without that handicap.")
    rows = []
    measured = ((4, ({"tp": 1, "pp": 2}, {"tp": 2, "pp": 2})), (2, ({"tp": 1, "pp": 2},)))
    for world, layouts in measured:
        # One sample per micro-batch, as in the measured runs: the per-sample constant is then
        # the per-micro-batch overhead of the schedule.
        calib_runs = measure({"world": world, "tp": 1, "pp": 1, "baseline": False, "seed": 1,
                              "steps": steps, "cost": flops_cost.to_json(),
                              "microbatches": SAMPLES_PER_REPLICA, "equal": True})
        cpu_cost = calibrate(calib_runs)
        print(f"  calibrated on a PP=1 run on {world} ranks: "
              + ", ".join(f"{k}={v:.3g}" for k, v in json.loads(cpu_cost.to_json()).items()
                          if k != "format"))
        for layout in layouts:
            plan = ParallelPlan(world_size=world, **layout)
            res = {}
            for baseline in (True, False):
                res[baseline] = measure({**layout, "world": world, "baseline": baseline,
                                         "seed": 7, "steps": steps, "cost": cpu_cost.to_json(),
                                         "microbatches": SAMPLES_PER_REPLICA, "equal": True})
                label = "baseline (ViT on stage 0, by position)" if baseline else \
                    "hetero + balancer"
                phase_table(f"{world} ranks {layout} {label}", res[baseline])
            name = f"{world} ranks tp{plan.tp} pp{plan.pp} dp{plan.dp}"
            rows.append((name, step_seconds(res[True]), step_seconds(res[False]),
                         predict_measured(cpu_cost, res[True], plan),
                         predict_measured(cpu_cost, res[False], plan)))
    print("\n  layout                 baseline s   hetero s   speedup | predicted: baseline  "
          "hetero  speedup")
    for name, base_s, het_s, pb, ph in rows:
        print(f"  {name:<22} {base_s:10.3f} {het_s:10.3f} {base_s / het_s:8.2f}x | "
              f"{pb:17.3f} {ph:7.3f} {pb / ph:7.2f}x")
    print("\n## 2. Simulator vs measured (cost model calibrated on the PP=1 run of the same "
          "world size)")
    print("  layout                 placement   measured s  predicted s  predicted/measured")
    for name, base_s, het_s, pb, ph in rows:
        print(f"  {name:<22} {'baseline':<10} {base_s:11.3f} {pb:12.3f} {pb / base_s:19.2f}")
        print(f"  {name:<22} {'hetero':<10} {het_s:11.3f} {ph:12.3f} {ph / het_s:19.2f}")

    print("\n## 3. Simulated at scale: Keye-VL-1.5-8B shapes, H100 at 40% MFU, TP=4 x PP=4, "
          "8 micro-batches x 2 samples per replica, Keye-like workload")
    print("  GPUs   dp   baseline s   hetero s   speedup   idle per stage baseline -> hetero")
    scales = (64, 256) if args.quick else (64, 256, 1024)
    for gpus in scales:
        r = simulate_at_scale(gpus, batches=3 if args.quick else 5, seed=11)
        idle = " ".join(f"{a:.2f}->{b:.2f}" for a, b in zip(r["base_idle"], r["hetero_idle"],
                                                              strict=True))
        print(f"  {gpus:>4} {gpus // 16:>4} {r['base']:12.2f} {r['hetero']:10.2f} "
              f"{r['base'] / r['hetero']:8.2f}x   {idle}")


if __name__ == "__main__":
    main()
