"""Checkpoints: the library's DCP manager vs the previous per-rank scheme, side by side.

The previous scheme (``torch.save`` of every rank's LLM shard, a full ViT and both optimizers)
writes the LLM once per data-parallel replica and the ViT once per rank, and can only resume on
the layout that wrote it. The manager (`hetero_parallel.checkpoint`) writes each tensor once,
spreads the writing over the ranks, checksums every file and reshards on load.

Measured on forked gloo ranks, for a ~10M-parameter Keye-shaped model (Adam state included):
bytes written per checkpoint / (model + optimizer bytes), save and load time, and the time to
resume under another layout; then the same byte ratio projected for Keye-VL-1.5-8B on 1,024 ranks.
Times on 4 ranks share 2 cores here: only their byte ratios are meaningful.

    python -m benchmarks.bench_checkpoint           # ~1-2 minutes on 2 cores
    python -m benchmarks.bench_checkpoint --quick   # 2-rank rows only
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks._ranks import run_on_ranks

BYTES_PER_PARAM = 12
"""fp32 weights + Adam's two moments."""


def _model():
    from examples.keye_vl.config import ModelConfig
    from examples.keye_vl.llm import LLMShape
    from examples.keye_vl.vision import VisionShape

    return ModelConfig(
        name="bench",
        llm=LLMShape(num_layers=4, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                     head_dim=64, ffn_hidden_size=768, vocab_size=8192,
                     max_sequence_length=2048),
        vision=VisionShape(hidden_size=192, num_layers=4, num_heads=3, ffn_hidden_size=768,
                           llm_hidden_size=256))


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _rank_job(plan_kwargs: dict, folder: str, mode: str) -> dict:
    """On every rank: build the model on ``plan_kwargs``, then ``mode``: "save" (new and old
    schemes, timed) or "resume" (load the new scheme's checkpoint, timed)."""
    import torch
    import torch.distributed as dist

    from examples.keye_vl.model import build_model
    from hetero_parallel import ParallelPlan, initialize, teardown
    from hetero_parallel.checkpoint import CheckpointConfig, CheckpointManager
    from hetero_parallel.cpu_compat import cpu_compat
    from hetero_parallel.trainer import HeteroTrainer, OptimizerConfig

    rank = dist.get_rank()
    root = Path(folder)
    with cpu_compat():
        plan = ParallelPlan(world_size=dist.get_world_size(), **plan_kwargs)
        groups = initialize(plan, backend="gloo", seed=1)
        try:
            vision, chunks = build_model(groups, _model())
            trainer = HeteroTrainer(groups, vision=vision, llm_chunks=chunks,
                                    optim=OptimizerConfig(lr=1e-4))
            manager = CheckpointManager(CheckpointConfig(folder=root / "new"), {"trainer": trainer},
                                        rank=rank)
            out: dict = {}
            if mode == "resume":
                dist.barrier()
                t0 = time.perf_counter()
                report = manager.load()
                dist.barrier()
                out["resume_s"] = time.perf_counter() - t0
                assert report.step == 1
                manager.close()
                return out
            # Logical bytes: every global tensor once.
            logical = {k: v.numel() * v.element_size() for k, v in trainer.state_dict().items()
                       if torch.is_tensor(v)}
            gathered = [None] * plan.world_size
            dist.all_gather_object(gathered, logical)
            out["logical_bytes"] = sum({k: v for g in gathered for k, v in g.items()}.values())
            dist.barrier()
            t0 = time.perf_counter()
            manager.save(1)
            dist.barrier()
            out["new_save_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            manager.load()
            dist.barrier()
            out["new_load_s"] = time.perf_counter() - t0
            # Async: training is blocked only while the state is copied to CPU memory.
            background = CheckpointManager(
                CheckpointConfig(folder=root / "async", async_save=True), {"trainer": trainer},
                rank=rank)
            dist.barrier()
            t0 = time.perf_counter()
            background.save(1)
            out["async_block_s"] = time.perf_counter() - t0
            background.close()
            dist.barrier()

            # The previous scheme, exactly as it was: one torch.save per rank.
            old = root / "old"
            if rank == 0:
                old.mkdir(parents=True, exist_ok=True)
            dist.barrier()
            state = {
                "llm": [m.state_dict() for m in trainer.llm],
                "llm_optimizer": trainer.llm_optimizer.state_dict(),
                "vision": trainer.vision.state_dict() if trainer.vision is not None else None,
                "vision_optimizer": (trainer.vision_optimizer.state_dict()
                                     if trainer.vision_optimizer is not None else None),
                "rng": torch.get_rng_state(),
            }
            t0 = time.perf_counter()
            torch.save(state, old / f"rank_{rank}.pt")
            dist.barrier()
            out["old_save_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            saved = torch.load(old / f"rank_{rank}.pt", map_location="cpu", weights_only=False)
            for module, sd in zip(trainer.llm, saved["llm"], strict=True):
                module.load_state_dict(sd)
            trainer.llm_optimizer.load_state_dict(saved["llm_optimizer"])
            if trainer.vision is not None:
                trainer.vision.load_state_dict(saved["vision"])
                trainer.vision_optimizer.load_state_dict(saved["vision_optimizer"])
            dist.barrier()
            out["old_load_s"] = time.perf_counter() - t0
            manager.close()
            return out
        finally:
            teardown(groups)


def _row(world: int, plan_kwargs: dict, resume_world: int, resume_kwargs: dict) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    try:
        res = run_on_ranks(world, _rank_job, plan_kwargs, str(folder), "save")[0]
        res["new_bytes"] = _dir_bytes(folder / "new")
        res["old_bytes"] = _dir_bytes(folder / "old")
        res["resume_s"] = run_on_ranks(resume_world, _rank_job, resume_kwargs, str(folder),
                                       "resume")[0]["resume_s"]
        return res
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _describe(kwargs: dict, world: int) -> str:
    dp = world // (kwargs.get("tp", 1) * kwargs.get("pp", 1))
    return f"{world}r tp{kwargs.get('tp', 1)}.pp{kwargs.get('pp', 1)}.dp{dp}"


def projection(world: int = 1024, tp: int = 4, pp: int = 4) -> tuple[float, float, float]:
    """(model+optimizer TB, previous scheme's ratio, the manager's ratio) for Keye-VL-1.5-8B."""
    llm, vit = 8_190_735_360, 0.45e9  # parameters (examples/keye_vl, checked in the tests)
    dp = world // (tp * pp)
    logical = (llm + vit) * BYTES_PER_PARAM
    previous = (dp * llm + world * vit) * BYTES_PER_PARAM
    return logical / 1e12, previous / logical, 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    rows = [(2, {}, 2, {"pp": 2}), (2, {"pp": 2}, 2, {})]
    if not args.quick:
        rows += [(4, {}, 2, {"pp": 2}), (4, {"tp": 2, "pp": 2}, 2, {})]
    print(f"{'layout':>18} | {'bytes/(model+optim)':>22} | {'save s (blocking)':>23} | "
          f"{'load s':>15} | {'resume elsewhere':>24}")
    print(f"{'':>18} | {'previous':>10} {'manager':>11} | {'prev':>7} {'mgr':>7} {'async':>7} | "
          f"{'prev':>7} {'mgr':>7} |")
    ratios = []
    for world, kwargs, rworld, rkwargs in rows:
        r = _row(world, kwargs, rworld, rkwargs)
        old_ratio = r["old_bytes"] / r["logical_bytes"]
        new_ratio = r["new_bytes"] / r["logical_bytes"]
        ratios.append(new_ratio)
        note = "" if world <= cores else "  (ranks > cores: times not meaningful)"
        print(f"{_describe(kwargs, world):>18} | {old_ratio:>10.3f} {new_ratio:>11.3f} | "
              f"{r['old_save_s']:>7.2f} {r['new_save_s']:>7.2f} {r['async_block_s']:>7.2f} | "
              f"{r['old_load_s']:>7.2f} "
              f"{r['new_load_s']:>7.2f} | {'n/a (same layout only)':>14} -> "
              f"{_describe(rkwargs, rworld)}: {r['resume_s']:.2f}s{note}")
        print(f"{'':>18}   model+optim {r['logical_bytes'] / 1e6:.1f} MB; previous wrote "
              f"{r['old_bytes'] / 1e6:.1f} MB, manager {r['new_bytes'] / 1e6:.1f} MB")
    tb, prev, _ = projection()
    mgr = max(ratios)
    print(f"\nprojected, Keye-VL-1.5-8B on 1,024 ranks (TP4 x PP4, dp 64, fp32 + Adam): "
          f"model+optimizer {tb:.2f} TB; previous scheme writes {prev:.0f}x that "
          f"({prev * tb:.1f} TB per checkpoint), the manager {mgr:.3f}x ({mgr * tb:.2f} TB) "
          f"-> {prev / mgr:.0f}x fewer bytes")
    print(f"summary ckpt_bytes_ratio_max={mgr:.3f} previous_ratio_1024={prev:.1f}")


if __name__ == "__main__":
    main()
