"""Train Keye-VL-1.5 with every component of the toolkit: plan -> load -> ViT -> route -> LLM.

One process per GPU (NCCL) or per CPU rank (gloo + the megatron-core CPU compatibility layer);
run from the repository root:

    python -m examples.keye_vl.make_data --out data/keye_tiny
    python -m torch.distributed.run --standalone --nproc-per-node 4 -m examples.keye_vl.train \\
        --data data/keye_tiny/manifest.jsonl --model tiny --stage 2 --tp 2 --pp 2 \\
        --steps 50 --out runs/keye_tiny
    # after a crash: the same command with --resume continues at the exact next sample, on this
    # or on another layout (--tp/--pp/--cp and the number of processes may change)

From released weights: ``python -m examples.keye_vl.convert from-hf ... --out CKPT``, then
``--model keye-vl-1.5-8b --init-from CKPT --tokenizer KEYE_OR_QWEN3_DIR`` (the byte tokenizer is
the offline default); ``convert to-hf`` turns ``<out>/final`` back into a Hugging Face folder.
The LLM's multimodal rotary positions come from each sample's layout
(`examples.keye_vl.rope.keye_position_ids`).

Post-training, from the previous stage's ``final/``:

    # SFT on multi-turn chats (loss on assistant turns, packed under the stage's token budget)
    ... -m examples.keye_vl.train --stage sft --data data/keye_sft/manifest.jsonl \\
        --init-from runs/stage3/final --out runs/sft
    # MPO: first the reference log-probs of every answer (forward only, resumable), then MPO
    ... -m examples.keye_vl.train --stage mpo --reference-pass \\
        --data data/keye_mpo/manifest.jsonl --init-from runs/sft/final
    ... -m examples.keye_vl.train --stage mpo --data data/keye_mpo/manifest.jsonl \\
        --init-from runs/sft/final --out runs/mpo

With ``--tokenizer`` a post-training stage first checks that the tokenizer's chat template renders
conversations exactly as the dataloader does (`examples.keye_vl.chat_template`).

Per step: the resumable dataloader derives the global batch and its step plan (the balancer's
placement of samples on LLM replicas and micro-batches and of media chunks on ViT ranks, this
rank's routing table), the I/O path decodes only this rank's frames (a local I/O server is started
when none is given), and `hetero_parallel.trainer.HeteroTrainer` runs the heterogeneous step and
the optimizers. Rank 0 logs loss, samples/s, tokens/s, per-phase time and imbalance to the
console, ``<out>/metrics.csv`` and TensorBoard (``<out>/tensorboard``). Every ``--save-every``
steps a checkpoint (model, optimizer, loader state, cost model; each tensor once, checksummed)
goes to ``<out>/ckpt``; at the end ``<out>/final`` holds the unsharded model for the next stage
(``--init-from``), ``merge`` or conversion.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dataloader.loader import LoaderConfig, StepLoader
from dataloader.manifest import open_manifest
from dataloader.reference_logps import ReferenceLogps, compute_reference_logps
from examples.keye_vl.config import MODELS, STAGES, cost_model_for, transformer_shapes
from examples.keye_vl.model import build_model
from examples.keye_vl.rope import keye_position_ids
from hetero_parallel import ParallelPlan, default_backend, initialize, teardown
from hetero_parallel.calibration import (
    CalibrationConfig,
    OnlineCalibrator,
    predicted_step_seconds,
)
from hetero_parallel.checkpoint import CheckpointConfig, CheckpointManager
from hetero_parallel.cost_model import CostModel
from hetero_parallel.cpu_compat import cpu_compat
from hetero_parallel.export import export_model
from hetero_parallel.flops import mfu, step_flops
from hetero_parallel.llm_chunks import packing_supported
from hetero_parallel.metrics import MetricsLogger
from hetero_parallel.objectives import MixedPreferenceObjective, MPOConfig
from hetero_parallel.step import StepOptions
from hetero_parallel.step_plan import StepConfig
from hetero_parallel.trainer import HeteroTrainer, OptimizerConfig

logger = logging.getLogger("keye_vl.train")
PHASES = ("vit_forward", "route_forward", "llm", "route_backward", "vit_backward",
          "vit_grad_reduce", "optimizer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True,
                   help="manifest: a columnar folder (python -m dataloader index/convert), or "
                        "a .jsonl / .parquet file")
    p.add_argument("--media-root", default=None,
                   help="where the manifest's relative media paths resolve (default: its folder)")
    p.add_argument("--model", default="tiny", choices=sorted(MODELS))
    p.add_argument("--stage", type=_stage, default=2, choices=list(STAGES),
                   help="pre-training 1, 2, 3, or post-training sft, mpo")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--sequence-parallel", action="store_true",
                   help="megatron sequence parallelism over the TP group (needs --tp > 1)")
    p.add_argument("--use-distributed-optimizer", action="store_true",
                   help="megatron's distributed optimizer: LLM optimizer state sharded over DP")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 weights and compute (default: on with CUDA, off on CPU)")
    p.add_argument("--split-vit-items", action=argparse.BooleanOptionalAction, default=True,
                   help="split an image or frame costing more than a ViT rank's fair share over "
                        "several ViT ranks (sequence-parallel ViT attention)")
    p.add_argument("--packed", action=argparse.BooleanOptionalAction, default=None,
                   help="pack each micro-batch's samples into one THD row (default: wherever "
                        "the attention supports it: TransformerEngine, or the CPU layers)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--microbatches", type=int, default=2, help="per LLM replica")
    p.add_argument("--frames-per-chunk", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="default: the stage's")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="default: the stage's warm-up fraction of --steps")
    p.add_argument("--max-tokens-per-microbatch", type=int, default=None,
                   help="packing budget per micro-batch (default: the stage's)")
    p.add_argument("--clip-grad", type=float, default=1.0, help="global norm; 0 disables")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/keye")
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--async-save", action="store_true",
                   help="write checkpoints in the background while training continues")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint under <out>/ckpt")
    p.add_argument("--init-from", default=None,
                   help="unsharded model folder or .safetensors file (a previous stage's final/)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="a Hugging Face tokenizer folder with Keye-VL-1.5's special tokens "
                        "(default: the byte tokenizer, for offline demos)")
    p.add_argument("--io-server", default="auto",
                   help="'auto' starts a local daemon; 'none' decodes in-process; or host:port,...")
    p.add_argument("--cost-model", default=None,
                   help="initial CostModel JSON (default: the FLOPs model of --model)")
    p.add_argument("--calibrate-every", type=int, default=20,
                   help="refit the cost model to the measured phase times every K steps "
                        "(identically on every rank; 0: never)")
    p.add_argument("--pipeline-aware", action="store_true",
                   help="choose each step's micro-batch count and order by simulating the "
                        "pipeline (up to --microbatches)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="per-GPU peak for MFU (default: 989 on CUDA = H100 BF16 dense)")
    p.add_argument("--recompute-vit", action="store_true")
    mpo = p.add_argument_group("MPO (--stage mpo)")
    mpo.add_argument("--reference", default=None, metavar="DIR",
                     help="reference log-probs of the manifest's answers (default: beside the "
                          "manifest, <data>.reference)")
    mpo.add_argument("--reference-pass", action="store_true",
                     help="compute them (forward only) with the --init-from model, resumable, "
                          "then exit")
    mpo.add_argument("--mpo-beta", type=float, default=MPOConfig().beta)
    mpo.add_argument("--mpo-weights", default="0.8,0.2,1.0", metavar="PREF,QUAL,GEN",
                     help="weights of the preference (DPO sigmoid), quality (BCO pair) and "
                          "generation (SFT on chosen) terms")
    p.add_argument("--prompt-state", action="store_true",
                   help="keep a per-record int8 state column in the loader (e.g. hint levels), "
                        "checkpointed with the run")
    p.add_argument("--prompt-state-from", default=None, metavar="FILE.npy",
                   help="with --prompt-state: int8 [manifest rows] values applied at the start "
                        "of every epoch (written by whatever grades the prompts, e.g. a "
                        "rollout engine raising hint levels)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _stage(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def _reference_folder(args: argparse.Namespace) -> Path:
    return Path(args.reference) if args.reference else Path(str(Path(args.data)) + ".reference")


def _mpo_config(args: argparse.Namespace) -> MPOConfig:
    try:
        pref, qual, gen = (float(x) for x in args.mpo_weights.split(","))
    except ValueError:
        raise SystemExit(f"--mpo-weights: expected three numbers PREF,QUAL,GEN, got "
                         f"{args.mpo_weights!r}") from None
    return MPOConfig(beta=args.mpo_beta, preference_weight=pref, quality_weight=qual,
                     generation_weight=gen)


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
    if args.reference_pass and stage.objective != "mpo":
        raise SystemExit("--reference-pass computes the reference log-probs of --stage mpo")
    if args.prompt_state_from and not args.prompt_state:
        raise SystemExit("--prompt-state-from needs --prompt-state")
    backend = default_backend()
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    plan = ParallelPlan(world_size=world, tp=args.tp, pp=args.pp, cp=args.cp,
                        sequence_parallel=args.sequence_parallel)
    bf16 = torch.cuda.is_available() if args.bf16 is None else args.bf16
    packed = packing_supported() if args.packed is None else args.packed
    out = Path(args.out)
    manifest = open_manifest(args.data, media_root=args.media_root)
    tokenizer = None
    if args.tokenizer is not None:
        from examples.keye_vl.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer, vocab_size=model.llm.vocab_size)
        if isinstance(stage.stage, str):
            from examples.keye_vl.chat_template import check_chat_template

            # Chat data: the model is later prompted through this template.
            check_chat_template(tokenizer)
    prior = cost_model_for(model)
    cost = CostModel.load(args.cost_model) if args.cost_model else prior
    vit_shape, llm_shape = transformer_shapes(model)
    peak = (args.peak_tflops or (989.0 if torch.cuda.is_available() else 0.0)) * 1e12
    preference = stage.objective == "mpo"
    reference = None
    if preference and not args.reference_pass:
        reference = ReferenceLogps.open(_reference_folder(args))
        if not reference.meta["complete"]:
            raise SystemExit(f"{reference.folder}: the reference pass is not complete; run it "
                             "again with --reference-pass")

    with contextlib.ExitStack() as stack, cpu_compat():
        groups = initialize(plan, backend=backend, seed=1234 + args.seed)
        stack.callback(teardown, groups, destroy_world=True)
        # The auto-started I/O server serves the folder the manifest's media resolve against.
        media_root = (args.media_root or getattr(manifest, "media_root", None)
                      or str(Path(args.data).resolve().parent))
        client = _io_client(args.io_server, str(Path(media_root).resolve()), stack, rank)
        budget = args.max_tokens_per_microbatch or stage.token_budget
        loader = stack.enter_context(StepLoader(
            manifest,
            LoaderConfig(global_batch_size=args.global_batch, seed=args.seed,
                         weights=stage.mixture,
                         step=StepConfig(num_microbatches=args.microbatches,
                                         max_tokens_per_microbatch=budget,
                                         frames_per_chunk=args.frames_per_chunk,
                                         packed=packed,
                                         split_vit_items=args.split_vit_items,
                                         pipeline_aware=args.pipeline_aware),
                         preference=preference, prompt_state=args.prompt_state),
            plan=plan, rank=rank, cost_model=cost, client=client, tokenizer=tokenizer,
            token_group=groups.token_broadcast, positions=keye_position_ids,
            reference=reference,
        ))
        trainable = frozenset() if args.reference_pass else stage.trainable
        vision, chunks = build_model(groups, model, trainable=trainable,
                                     rotary_base=stage.rotary_base, init_seed=args.seed,
                                     init_from=args.init_from,
                                     params_dtype=torch.bfloat16 if bf16 else torch.float32)
        lr = args.lr or stage.lr
        warmup = (args.warmup_steps if args.warmup_steps is not None
                  else round(stage.warmup_ratio * args.steps))
        trainer = HeteroTrainer(
            groups, vision=vision, llm_chunks=chunks,
            optim=OptimizerConfig(lr=lr, warmup_steps=warmup,
                                  decay_steps=max(0, args.steps - warmup),
                                  min_lr=stage.min_lr_ratio * lr, clip_grad=args.clip_grad,
                                  distributed=args.use_distributed_optimizer),
            step_options=StepOptions(recompute_vit=args.recompute_vit),
            objective=MixedPreferenceObjective(_mpo_config(args)) if reference else None)
        if args.reference_pass:
            _reference_pass(args, loader, trainer, rank)
            return
        calibrator = OnlineCalibrator(CalibrationConfig(every=args.calibrate_every), prior,
                                      current=cost)
        ckpt = CheckpointManager(
            CheckpointConfig(folder=out / "ckpt", keep_last=args.keep_checkpoints,
                             async_save=args.async_save),
            {"trainer": trainer, "loader": loader, "calibration": calibrator}, rank=rank)
        stack.callback(ckpt.close)
        start = 0
        if args.resume:
            report = ckpt.load()
            if report.step is None:
                raise SystemExit(f"--resume: no checkpoint under {out / 'ckpt'}"
                                 + "".join(f"\n  {n}" for n in report.skipped))
            start = report.step
            loader.set_cost_model(calibrator.current)  # the model the run planned with
            if rank == 0:
                for note in report.skipped:
                    print(f"resume: skipped {note}", file=sys.stderr)
                print(f"resume: continuing from {report.path} (step {start}) on "
                      f"{plan.describe()}", file=sys.stderr)
        if rank == 0:
            logger.info("%s; stage %s (%s) trains %s; %d samples in %s", plan.describe(),
                        stage.stage, stage.name, sorted(stage.trainable), len(manifest),
                        sorted(manifest.datasets.items()))
        metrics = MetricsLogger(out, enabled=rank == 0, start_step=start)
        stack.callback(metrics.close)
        progress = None
        if rank == 0 and not args.no_progress:
            from tqdm import tqdm

            progress = tqdm(total=args.steps, initial=start, desc="train", file=sys.stderr)
        epoch = None if start == 0 else loader.epoch
        for step in range(start, args.steps):
            if args.prompt_state_from and loader.epoch != epoch:
                epoch = loader.epoch
                _apply_prompt_state(loader, args.prompt_state_from)
            t0 = time.perf_counter()
            data = loader.next_step()
            t_load = time.perf_counter() - t0
            result = trainer.step(data)
            elapsed = time.perf_counter() - t0
            predicted = predicted_step_seconds(data.plan, calibrator.current, plan.vpp or 1)
            refitted = calibrator.observe(data.plan, result.timings, result.llm_forward_s)
            if refitted is not None:
                loader.set_cost_model(refitted)
            flops = step_flops([layout.spec() for layout in data.layouts.values()],
                               vit_shape=vit_shape, llm_shape=llm_shape,
                               recompute_vit=args.recompute_vit,
                               vit_training="train" if "vision" in stage.trainable else "frozen",
                               llm_training="train" if "llm" in stage.trainable else "input_grad")
            per_rank = [None] * world
            dist.all_gather_object(per_rank, {"load": t_load, **result.timings})
            tokens = int(data.batch.sample_tokens.sum())
            phase_max = {p: max(t.get(p, 0.0) for t in per_rank) for p in PHASES}
            load_max = max(t["load"] for t in per_rank)
            step_mfu = mfu(flops.model, elapsed, peak, world) if peak else 0.0
            extra = {}
            if reference is not None:
                extra["reward_mean"] = trainer.objective.reward_mean
            if args.prompt_state:
                extra["prompt_state_mean"] = (sum(data.prompt_state) / len(data.prompt_state)
                                              if data.prompt_state else 0.0)
            metrics.log(step, {
                "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                "samples": len(data.samples), "tokens": tokens, "step_s": elapsed,
                "samples_per_s": len(data.samples) / elapsed, "tokens_per_s": tokens / elapsed,
                "vit_imbalance": data.batch.vit_report.max_over_mean,
                "llm_imbalance": data.batch.llm_report.max_over_mean,
                "skipped": len(data.skipped), "load_max_s": load_max,
                "predicted_step_s": predicted, "model_tflops": flops.model / 1e12,
                "model_tflops_per_s": flops.model / elapsed / 1e12,
                "hardware_tflops": flops.hardware / 1e12,
                "mfu": step_mfu,
                **extra, **{f"{p}_max_s": v for p, v in phase_max.items()}})
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{result.loss:.4f}")
            if rank == 0:
                busy = [sum(t.get(p, 0.0) for p in PHASES) for t in per_rank]
                logger.info(
                    "step %d loss %.4f | %.1f samples/s %.0f tokens/s | step %.2fs (predicted "
                    "%.2fs) load %.2fs | vit max %.0f ms llm max %.0f ms | imbalance max/mean "
                    "%.2f | %.3g model TFLOP/s%s%s", step,
                    result.loss, len(data.samples) / elapsed, tokens / elapsed, elapsed,
                    predicted, load_max,
                    1e3 * max(t.get("vit_forward", 0) + t.get("vit_backward", 0)
                              for t in per_rank),
                    1e3 * phase_max["llm"], max(busy) / (sum(busy) / len(busy)),
                    flops.model / elapsed / 1e12,
                    f" MFU {step_mfu:.1%}" if peak else "",
                    _gpu_stats())
            if args.save_every and (step + 1) % args.save_every == 0:
                ckpt.save(step + 1)
        if progress is not None:
            progress.close()
        ckpt.wait()
        export_model(out / "final", groups=groups, vision=trainer.vision,
                     llm_chunks=trainer.llm,
                     metadata={"model": args.model, "stage": str(stage.stage),
                               "steps": str(args.steps),
                               "rotary_base": str(stage.rotary_base)})
        if rank == 0:
            # `examples.keye_vl.convert to-hf` reads the model and its RoPE base from here.
            (out / "final" / "config.json").write_text(json.dumps(
                {"model": args.model, "stage": stage.stage, "steps": args.steps,
                 "rotary_base": stage.rotary_base}, indent=1))


def _apply_prompt_state(loader: StepLoader, path: str) -> None:
    """The per-record states of ``path`` (int8 ``[manifest rows]``), for the coming epoch."""
    import numpy as np

    values = np.load(path, allow_pickle=False)
    if values.shape != (len(loader.manifest),):
        raise SystemExit(f"{path}: expected {len(loader.manifest)} per-record states, got "
                         f"shape {values.shape}")
    loader.set_prompt_state(np.arange(values.size), values)


def _reference_pass(args: argparse.Namespace, loader: StepLoader, trainer: HeteroTrainer,
                    rank: int) -> None:
    """Fill the reference store with the frozen --init-from model's log-probs (resumable)."""
    if not args.init_from:
        raise SystemExit("--reference-pass needs --init-from (the SFT model)")
    folder = _reference_folder(args)
    store = compute_reference_logps(
        loader, lambda data: trainer.evaluate(data).sample_logps, folder, rank=rank,
        source=str(Path(args.init_from).resolve()), barrier=dist.barrier)
    if rank == 0:
        logger.info("reference log-probs of %d records in %s (%d skipped for bad media)",
                    len(store.values), folder, len(store.meta["skipped_rows"]))


if __name__ == "__main__":
    main()
