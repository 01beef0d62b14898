"""The reference Keye-VL example end to end: real files, a local I/O server, the resumable loader,
the balancer and the heterogeneous step on 4 gloo ranks; SIGKILL and --resume; stage transitions."""

from __future__ import annotations

import contextlib
import csv
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
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


def _command(manifest: Path, out: Path, *extra: str, ranks: int = 4,
             layout: tuple[str, ...] = ("--tp", "2", "--pp", "2")) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(ranks), "-m", "examples.keye_vl.train", "--data", str(manifest), *layout,
            "--steps", str(STEPS), "--save-every", "2", "--lr", "3e-3", "--global-batch", "8",
            "--out", str(out), "--no-progress", "--calibrate-every", "2", *extra]


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _parents() -> dict[int, int]:
    out = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                out[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (torchrun starts each rank in a session of its own, so a
    signal to torchrun's process group does not reach them)."""
    parents = _parents()
    found, frontier = [], [root]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def _io_server_tree(root: Path) -> list[int]:
    """PIDs of io-server daemons serving ``root`` and of their children (the workers)."""
    parents = _parents()
    daemons = [p for p in parents
               if "io_server" in _cmdline(p) and str(root.resolve()) in _cmdline(p)]
    return daemons + [p for p, pp in parents.items() if pp in daemons]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _run(cmd: list[str], *, kill_after_step: int | None = None, timeout: float = 300,
         on_kill: Callable[[], list[int]] | None = None) -> str:
    """Run ``cmd`` in its own process group; optionally SIGKILL the group once ``step N`` is
    logged. Returns the output. The group is always gone afterwards."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env=env, start_new_session=True)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    # A reader thread, so that a run that hangs without printing still meets the deadline.
    out: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=lambda: [*map(out.put, proc.stdout), out.put(None)],
                     daemon=True).start()
    try:
        while True:
            try:
                line = out.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError("training run did not finish in time:\n"
                                   + "".join(lines[-40:])) from None
            if line is None:
                break
            lines.append(line)
            if kill_after_step is not None and f" step {kill_after_step} loss" in line:
                spared = set(on_kill()) if on_kill is not None else set()
                # SIGKILL torchrun and every rank at once, as a node failure would; the spared
                # processes (the I/O server) must die on their own.
                victims = [p for p in _descendants(proc.pid) if p not in spared]
                for pid in [proc.pid, *victims]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            for pid in _descendants(proc.pid):  # the ranks run in sessions of their own
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if kill_after_step is None and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}:\n" + "".join(lines[-60:]))
    return "".join(lines)


def _losses(out: Path) -> list[tuple[int, float]]:
    with open(out / "metrics.csv", newline="") as f:
        return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def straight(manifest, tmp_path_factory) -> Path:
    """An uninterrupted run (stage 2, TP=2 x PP=2)."""
    out = tmp_path_factory.mktemp("straight")
    _run(_command(manifest, out))
    return out


def test_sigkill_then_resume_on_another_layout_continues_the_same_trajectory(
        manifest, straight, tmp_path):
    reference = dict(_losses(straight))
    assert sorted(reference) == list(range(STEPS))
    assert reference[STEPS - 1] < reference[0] - 0.3, reference  # it learns
    assert (straight / "final" / "model.safetensors.index.json").exists()

    crashed = tmp_path / "crashed"
    servers: list[int] = []

    def spare_the_server() -> list[int]:
        servers.extend(_io_server_tree(manifest.parent))
        return servers

    out = _run(_command(manifest, crashed), kill_after_step=4, on_kill=spare_the_server)
    assert "step 4 loss" in out and "step 5 loss" not in out
    # The auto-started I/O server and its workers die with the ranks, SIGKILL included.
    assert servers, "no io-server process was found while training"
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in servers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in servers if _alive(p)], "io-server processes outlived the ranks"
    assert (crashed / "ckpt" / "latest").read_text().strip() in ("2", "4")
    # Resume on 2 ranks with the LLM in PP=2 (the ViT on 2 ranks instead of 4).
    out = _run(_command(manifest, crashed, "--resume", ranks=2, layout=("--pp", "2")))
    assert "resume: continuing from" in out
    rows = _losses(crashed)
    assert [s for s, _ in rows] == list(range(STEPS))  # each step once, redone ones replaced
    for step, loss in rows:
        assert loss == pytest.approx(reference[step], rel=1e-4), step


# --- stage transitions, on the 4-rank pool --------------------------------------------------
def _stage_step(trainable: tuple[str, ...], rotary_base: float | None) -> dict:
    from examples.keye_vl.config import MODELS
    from examples.keye_vl.model import build_model
    from hetero_parallel import ParallelPlan, initialize, teardown
    from hetero_parallel.cpu_compat import cpu_compat
    from hetero_parallel.megatron_state import gather_full_state
    from hetero_parallel.synthetic import mixed_samples
    from hetero_parallel.trainer import HeteroTrainer, OptimizerConfig
    from tests import hetero_helpers as HH

    with cpu_compat():
        plan = ParallelPlan(world_size=dist.get_world_size(), pp=2)
        groups = initialize(plan, backend="gloo")
        try:
            model = MODELS["tiny"]
            vision, chunks = build_model(groups, model, trainable=trainable,
                                         rotary_base=rotary_base)
            trainer = HeteroTrainer(groups, vision=vision, llm_chunks=chunks,
                                    optim=OptimizerConfig(optimizer="sgd", lr=0.5))
            before_llm = gather_full_state(trainer.llm)
            before_vision = {k: v.clone() for k, v in trainer.vision.state_dict().items()}
            samples = mixed_samples(1, 12, model.llm.vocab_size)
            out = trainer.step(HH.toy_step(plan, groups.rank, samples, HH.step_config(2)))
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
    from examples.keye_vl.config import MODELS, STAGES
    from examples.keye_vl.model import build_model
    from hetero_parallel import ParallelPlan, initialize, teardown
    from hetero_parallel.cpu_compat import cpu_compat
    from hetero_parallel.export import SafetensorsSource
    from hetero_parallel.megatron_state import gather_full_state

    saved = SafetensorsSource(path)
    with cpu_compat():
        groups = initialize(ParallelPlan(world_size=dist.get_world_size(), pp=4), backend="gloo")
        try:
            vision, chunks = build_model(groups, MODELS["tiny"], init_from=path,
                                         rotary_base=STAGES[3].rotary_base)
            mine = gather_full_state(chunks)
            same_llm = all(torch.equal(v, saved.read(f"llm.{k}")) for k, v in mine.items())
            same_vision = all(torch.equal(v, saved.read(f"vision.{k}"))
                              for k, v in vision.state_dict().items())
            return {"names": sorted(mine), "same": same_llm and same_vision}
        finally:
            teardown(groups)


def test_final_export_starts_the_next_stage_in_another_layout(pool4, straight):
    """Stage 2 ran on TP=2 x PP=2; the next stage loads its export on PP=4 (--init-from)."""
    from hetero_parallel.export import SafetensorsSource

    final = straight / "final"
    names = sorted(n[len("llm."):] for n in SafetensorsSource(final).names()
                   if n.startswith("llm."))
    results = pool4.run(_load_in_another_layout, str(final))
    assert all(r["same"] for r in results)
    assert sorted(n for r in results for n in r["names"]) == names
