"""Train Keye-VL-1.5 with every component of the toolkit: plan -> load -> ViT -> route -> LLM.

One process per GPU (NCCL) or per CPU rank (gloo + the megatron-core CPU compatibility layer):

    python examples/keye_vl/make_data.py --out data/keye_tiny
    python -m torch.distributed.run --standalone --nproc-per-node 4 examples/keye_vl/train.py \\
        --data data/keye_tiny/manifest.jsonl --model tiny --stage 2 --tp 2 --pp 2 \\
        --steps 50 --out runs/keye_tiny
    # after a crash: the same command with --resume continues at the exact next sample

Per step: the resumable dataloader derives the global batch, the cost-model balancer places samples
(LLM replicas, micro-batches) and media chunks (ViT ranks), the I/O path decodes only this rank's
frames (a local I/O server is started when none is given), the heterogeneous step runs, and rank 0
logs loss, samples/s, tokens/s, per-phase time per rank and imbalance to the console and to
``<out>/metrics.csv``. Every ``--save-every`` steps model, optimizer and loader state are saved;
at the end ``<out>/final/model.pt`` holds the unsharded weights for the next stage
(``--init-from``) or ``merge.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dataloader.loader import LoaderConfig, StepLoader  # noqa: E402
from dataloader.manifest import load_manifest  # noqa: E402
from examples.keye_vl.checkpoint import (  # noqa: E402
    export_unsharded,
    latest_step,
    load_checkpoint,
    load_unsharded,
    save_checkpoint,
)
from examples.keye_vl.config import MODELS, STAGES, cost_model_for  # noqa: E402
from examples.keye_vl.trainer import KeyeTrainer, OptimConfig  # noqa: E402
from hetero_parallel import ParallelPlan, default_backend, initialize, teardown  # noqa: E402
from hetero_parallel.cost_model import CostModel  # noqa: E402
from hetero_parallel.cpu_compat import cpu_compat  # noqa: E402
from hetero_parallel.step import StepOptions  # noqa: E402

logger = logging.getLogger("keye_vl.train")
PHASES = ("vit_forward", "route_forward", "llm", "route_backward", "vit_backward",
          "vit_grad_reduce")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="manifest (.jsonl or .parquet)")
    p.add_argument("--model", default="tiny", choices=sorted(MODELS))
    p.add_argument("--stage", type=int, default=2, choices=sorted(STAGES))
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--microbatches", type=int, default=2, help="per LLM replica")
    p.add_argument("--frames-per-chunk", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="default: the stage's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/keye")
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt/latest")
    p.add_argument("--init-from", default=None, help="unsharded model.pt of a previous stage")
    p.add_argument("--io-server", default="auto",
                   help="'auto' starts a local daemon; 'none' decodes in-process; or host:port,...")
    p.add_argument("--cost-model", default=None, help="calibrated CostModel JSON")
    p.add_argument("--recompute-vit", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _io_client(spec: str, data_root: str, stack: contextlib.ExitStack, rank: int):
    from io_server.client import IOClient

    if spec == "none":
        return IOClient()
    if spec == "auto":
        # One local daemon, started by rank 0; every rank gets its address.
        address = [None]
        if rank == 0:
            from io_server.launch import start_server

            server = stack.enter_context(start_server([data_root], workers=2))
            address[0] = server.address
        dist.broadcast_object_list(address, src=0)
        return stack.enter_context(IOClient([address[0]]))
    return stack.enter_context(IOClient(spec.split(",")))


def _gpu_stats() -> str:
    if not torch.cuda.is_available():
        return ""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        util = pynvml.nvmlDeviceGetUtilizationRates(h)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        return f" gpu {util.gpu}% mem {mem.used / 2**30:.1f}/{mem.total / 2**30:.0f} GiB"
    except Exception as e:  # noqa: BLE001 - monitoring must never stop training
        return f" (pynvml: {e})"


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    stage = STAGES[args.stage]
    model = MODELS[args.model]
    backend = default_backend()
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    plan = ParallelPlan(world_size=world, tp=args.tp, pp=args.pp, cp=args.cp)
    out = Path(args.out)
    manifest = load_manifest(args.data)
    cost = (CostModel.load(args.cost_model) if args.cost_model else cost_model_for(model))

    with contextlib.ExitStack() as stack, cpu_compat():
        groups = initialize(plan, backend=backend, seed=1234 + args.seed)
        stack.callback(teardown, groups, destroy_world=True)
        client = _io_client(args.io_server, str(Path(args.data).resolve().parent), stack, rank)
        loader = stack.enter_context(StepLoader(
            manifest,
            LoaderConfig(global_batch_size=args.global_batch, seed=args.seed,
                         weights=stage.mixture, num_microbatches=args.microbatches,
                         frames_per_chunk=args.frames_per_chunk),
            plan=plan, rank=rank, cost_model=cost, client=client,
            token_group=groups.token_broadcast,
        ))
        initial = load_unsharded(args.init_from) if args.init_from else None
        trainer = KeyeTrainer.build(
            groups, model, optim=OptimConfig(lr=args.lr or stage.lr), trainable=stage.trainable,
            rotary_base=stage.rotary_base,
            init_seed=args.seed, initial_state=initial)
        start = 0
        if args.resume:
            step = latest_step(out)
            if step is None:
                raise SystemExit(f"--resume: no checkpoint under {out / 'ckpt'}")
            load_checkpoint(out, step, trainer, loader, rank)
            start = step
        if rank == 0:
            logger.info("%s; stage %d (%s) trains %s; %d samples in %s", plan.describe(),
                        stage.stage, stage.name, sorted(stage.trainable), len(manifest),
                        sorted(manifest.datasets.items()))
            out.mkdir(parents=True, exist_ok=True)
        metrics = _Metrics(out / "metrics.csv", rank, resume=args.resume)
        progress = None
        if rank == 0 and not args.no_progress:
            from tqdm import tqdm

            progress = tqdm(total=args.steps, initial=start, desc="train", file=sys.stderr)
        options = StepOptions(recompute_vit=args.recompute_vit)
        for step in range(start, args.steps):
            t0 = time.perf_counter()
            data = loader.next_step()
            t_load = time.perf_counter() - t0
            result = trainer.step(data.batch, data.layouts, data.vision_frames,
                                  data.microbatches, data.total_loss_tokens, options)
            elapsed = time.perf_counter() - t0
            timings = {"load": t_load, **result.timings}
            per_rank = [None] * world
            dist.all_gather_object(per_rank, timings)
            tokens = int(data.batch.sample_tokens.sum())
            metrics.log(step, result.loss, len(data.samples), tokens, elapsed, per_rank,
                        data.batch, len(data.skipped))
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{result.loss:.4f}")
            if rank == 0:
                busy = [sum(t[p] for p in PHASES if p in t) for t in per_rank]
                logger.info(
                    "step %d loss %.4f | %.1f samples/s %.0f tokens/s | step %.2fs load %.2fs | "
                    "vit max %.0f ms llm max %.0f ms | imbalance max/mean %.2f%s", step,
                    result.loss, len(data.samples) / elapsed, tokens / elapsed, elapsed,
                    max(t["load"] for t in per_rank),
                    1e3 * max(t.get("vit_forward", 0) + t.get("vit_backward", 0)
                              for t in per_rank),
                    1e3 * max(t.get("llm", 0) for t in per_rank),
                    max(busy) / (sum(busy) / len(busy)), _gpu_stats())
            if args.save_every and (step + 1) % args.save_every == 0:
                save_checkpoint(out, step + 1, trainer, loader, rank)
        if progress is not None:
            progress.close()
        export_unsharded(out / "final", trainer, rank)
        metrics.close()
        if rank == 0:
            (out / "final" / "config.json").write_text(json.dumps(
                {"model": args.model, "stage": stage.stage, "steps": args.steps}, indent=1))


class _Metrics:
    """``metrics.csv`` on rank 0: one row per step (appending when resuming)."""

    def __init__(self, path: Path, rank: int, *, resume: bool) -> None:
        self.rank = rank
        self.file = None
        if rank != 0:
            return
        exists = path.exists() and resume
        self.file = open(path, "a" if exists else "w", newline="")  # noqa: SIM115
        self.writer = csv.writer(self.file)
        if not exists:
            self.writer.writerow(["step", "loss", "samples", "tokens", "step_s", "samples_per_s",
                                  "tokens_per_s", "vit_imbalance", "llm_imbalance", "skipped"]
                                 + [f"{p}_max_s" for p in PHASES])

    def log(self, step, loss, samples, tokens, elapsed, per_rank, batch, skipped) -> None:
        if self.file is None:
            return
        row = [step, f"{loss:.6f}", samples, tokens, f"{elapsed:.4f}",
               f"{samples / elapsed:.3f}", f"{tokens / elapsed:.1f}",
               f"{batch.vit_report.max_over_mean:.4f}", f"{batch.llm_report.max_over_mean:.4f}",
               skipped]
        row += [f"{max(t.get(p, 0.0) for t in per_rank):.4f}" for p in PHASES]
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


if __name__ == "__main__":
    main()
