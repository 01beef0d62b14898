"""The reference Keye-VL example end to end: real files, a local I/O server, the resumable loader,
the balancer and the heterogeneous step on 4 gloo ranks; SIGKILL and --resume; stage transitions."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from examples.keye_vl.make_data import make_dataset

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("keye_data"), videos=6, images=10, texts=6)


def _command(manifest: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
            str(ROOT / "examples/keye_vl/train.py"), "--data", str(manifest), "--tp", "2",
            "--pp", "2", "--steps", str(STEPS), "--save-every", "2", "--lr", "3e-3",
            "--global-batch", "8", "--out", str(out), "--no-progress", *extra]


def _run(cmd: list[str], *, kill_after_step: int | None = None, timeout: float = 300) -> str:
    """Run ``cmd`` in its own process group; optionally SIGKILL the group once ``step N`` is
    logged. Returns the output. The group is always gone afterwards."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env=env, start_new_session=True)
    lines = []
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if kill_after_step is not None and f" step {kill_after_step} loss" in line:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            if time.monotonic() > deadline:
                raise TimeoutError("training run did not finish:\n" + "".join(lines[-40:]))
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if kill_after_step is None and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}:\n" + "".join(lines[-60:]))
    return "".join(lines)


def _losses(out: Path) -> dict[int, float]:
    """Loss per step; a step logged twice (before a kill and after resuming) keeps the last."""
    with open(out / "metrics.csv", newline="") as f:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def straight(manifest, tmp_path_factory) -> Path:
    """An uninterrupted run (stage 2, TP=2 x PP=2)."""
    out = tmp_path_factory.mktemp("straight")
    _run(_command(manifest, out))
    return out


def test_sigkill_and_resume_continue_the_same_trajectory(manifest, straight, tmp_path):
    reference = _losses(straight)
    assert sorted(reference) == list(range(STEPS))
    assert reference[STEPS - 1] < reference[0] - 0.3, reference  # it learns
    assert (straight / "final" / "model.pt").exists()

    crashed = tmp_path / "crashed"
    out = _run(_command(manifest, crashed), kill_after_step=4)
    assert "step 4 loss" in out and "step 5 loss" not in out
    assert (crashed / "ckpt" / "latest").read_text() == "4"
    _run(_command(manifest, crashed, "--resume"))
    resumed = _losses(crashed)
    assert sorted(resumed) == list(range(STEPS))
    for step in range(STEPS):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step


# --- stage transitions, on the 4-rank pool --------------------------------------------------
def _stage_step(trainable: tuple[str, ...], rotary_base: float | None) -> dict:
    from examples.keye_vl.config import MODELS
    from examples.keye_vl.llm import gather_full_state
    from examples.keye_vl.trainer import KeyeTrainer, OptimConfig
    from hetero_parallel import ParallelPlan, initialize, teardown
    from hetero_parallel.cpu_compat import cpu_compat
    from tests import hetero_helpers as HH

    with cpu_compat():
        plan = ParallelPlan(world_size=dist.get_world_size(), pp=2)
        groups = initialize(plan, backend="gloo")
        try:
            trainer = KeyeTrainer.build(groups, MODELS["tiny"], trainable=trainable,
                                        rotary_base=rotary_base,
                                        optim=OptimConfig(optimizer="sgd", lr=0.5))
            before_llm = gather_full_state(trainer.llm)
            before_vision = {k: v.clone() for k, v in trainer.vision.state_dict().items()}
            samples = HH.make_samples(seed=1)
            batch = HH.plan_batch(samples, plan, 2)
            frames, micro = HH.step_inputs(groups, samples, batch)
            out = trainer.step(batch, {s.sample_id: s.layout for s in samples}, frames, micro,
                               HH.total_loss_tokens(samples))
            after_llm = gather_full_state(trainer.llm)
            after_vision = trainer.vision.state_dict()
            rope = trainer.llm[0]
            rope = getattr(rope, "module", rope).rotary_pos_emb.inv_freq.clone()
            moved = {k: not torch.equal(before_llm[k], after_llm[k]) for k in before_llm}
            moved |= {f"vision.{k}": not torch.equal(before_vision[k], after_vision[k])
                      for k in before_vision}
            return {"moved": moved, "loss": out.loss, "inv_freq": rope}
        finally:
            teardown(groups)


def test_stage1_trains_only_the_projector(pool4):
    for r in pool4.run(_stage_step, ("projector",), None):
        moved = r["moved"]
        assert all(moved[k] for k in moved if k.startswith("vision.projector.")), moved
        assert not any(moved[k] for k in moved if k.startswith("vision.vit.")), moved
        assert not any(moved[k] for k in moved if not k.startswith("vision.")), moved


def test_stage2_trains_everything_and_stage3_changes_the_rope_base(pool4):
    from examples.keye_vl.config import STAGES

    results = pool4.run(_stage_step, ("vision", "projector", "llm"), STAGES[3].rotary_base)
    for r in results:
        assert all(r["moved"].values()), [k for k, v in r["moved"].items() if not v]
        d = r["inv_freq"].numel() * 2
        expected = 1.0 / (8e6 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        torch.testing.assert_close(r["inv_freq"], expected)


def _load_in_another_layout(path: str) -> dict:
    from examples.keye_vl.checkpoint import load_unsharded
    from examples.keye_vl.config import MODELS, STAGES
    from examples.keye_vl.llm import gather_full_state
    from examples.keye_vl.trainer import KeyeTrainer, OptimConfig
    from hetero_parallel import ParallelPlan, initialize, teardown
    from hetero_parallel.cpu_compat import cpu_compat

    saved = load_unsharded(path)
    with cpu_compat():
        groups = initialize(ParallelPlan(world_size=dist.get_world_size(), pp=4), backend="gloo")
        try:
            trainer = KeyeTrainer.build(groups, MODELS["tiny"], optim=OptimConfig(),
                                        rotary_base=STAGES[3].rotary_base, initial_state=saved)
            mine = gather_full_state(trainer.llm)
            same_llm = all(torch.equal(v, saved["llm"][k]) for k, v in mine.items())
            same_vision = all(torch.equal(v, saved["vision"][k])
                              for k, v in trainer.vision.state_dict().items())
            return {"names": sorted(mine), "same": same_llm and same_vision}
        finally:
            teardown(groups)


def test_final_export_starts_the_next_stage_in_another_layout(pool4, straight):
    """Stage 2 ran on TP=2 x PP=2; the next stage loads its export on PP=4 (--init-from)."""
    saved = torch.load(straight / "final" / "model.pt", weights_only=True)
    results = pool4.run(_load_in_another_layout, str(straight / "final" / "model.pt"))
    assert all(r["same"] for r in results)
    assert sorted(n for r in results for n in r["names"]) == sorted(saved["llm"])
