"""Post-training with the reference example, end to end on gloo ranks: SFT on multi-turn chats,
then MPO from the SFT model (the reference pass first), interrupted mid-epoch and resumed on
another layout."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

from examples.keye_vl.make_data import make_dataset
from tests.test_keye_train import _losses, _run

pytestmark = pytest.mark.slow

SFT_STEPS = 50
SFT_FINAL_LOSS = 0.2
"""The stated overfitting target: six chats, 50 steps, mean token loss below this."""
MPO_STEPS = 4


def _train(data: Path, out: Path, *extra: str, ranks: int = 1, steps: int,
           layout: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(ranks), "-m", "examples.keye_vl.train", "--data", str(data), *layout,
            "--steps", str(steps), "--out", str(out), "--no-progress", "--calibrate-every", "0",
            "--io-server", "none", *extra]


def _metrics(out: Path) -> dict[int, dict[str, float]]:
    with open(out / "metrics.csv", newline="") as f:
        return {int(r["step"]): {k: float(v) for k, v in r.items() if v not in ("", None)}
                for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> Path:
    """SFT of the tiny model on six multi-turn chats (image, video, text), from scratch."""
    root = tmp_path_factory.mktemp("sft")
    # workers=1 probes in a thread: a second process pool of the indexer in one long pytest
    # process has hung in ProcessPoolExecutor.shutdown (CPython 3.11.7), after earlier tests.
    data = make_dataset(root / "data", videos=1, images=3, texts=2, kind="chat", workers=1)
    out = root / "run"
    _run(_train(data, out, "--stage", "sft", "--global-batch", "6", "--microbatches", "1",
                "--lr", "1e-2", "--save-every", "0", steps=SFT_STEPS), timeout=240)
    return out


def test_sft_overfits_a_small_chat_set(sft):
    losses = dict(_losses(sft))
    assert sorted(losses) == list(range(SFT_STEPS))
    assert losses[SFT_STEPS - 1] < SFT_FINAL_LOSS < losses[0], losses
    assert (sft / "final" / "model.safetensors.index.json").exists()


def test_mpo_from_sft_resumes_mid_epoch_on_another_layout(sft, tmp_path):
    data = make_dataset(tmp_path / "data", videos=2, images=4, texts=4, kind="preference",
                        workers=1)
    rows = len(data.read_text(encoding="utf-8").splitlines())
    hints = tmp_path / "hints.npy"
    np.save(hints, (np.arange(rows) % 5 + 1).astype(np.int8))  # hint levels L1..L5
    common = ("--stage", "mpo", "--init-from", str(sft / "final"), "--global-batch", "4",
              "--microbatches", "2", "--lr", "1e-3", "--save-every", "2", "--prompt-state",
              "--prompt-state-from", str(hints))
    # The reference pass (forward only, the SFT model) on two ranks, beside the manifest.
    _run(_train(data, tmp_path / "ref", "--stage", "mpo", "--reference-pass", "--init-from",
                str(sft / "final"), "--global-batch", "4", ranks=2, steps=1,
                layout=("--pp", "2")), timeout=240)
    assert (Path(str(data) + ".reference") / "logps.npy").exists()

    straight = tmp_path / "straight"
    _run(_train(data, straight, *common, ranks=4, steps=MPO_STEPS, layout=("--tp", "2", "--pp",
                                                                            "2")), timeout=240)
    crashed = tmp_path / "crashed"
    _run(_train(data, crashed, *common, ranks=4, steps=MPO_STEPS,
                layout=("--tp", "2", "--pp", "2")),
         kill_after_step=2, timeout=240)
    out = _run(_train(data, crashed, *common, "--resume", ranks=2, steps=MPO_STEPS,
                      layout=("--pp", "2")), timeout=240)
    assert "resume: continuing from" in out and "(step 2)" in out
    want, got = _metrics(straight), _metrics(crashed)
    assert sorted(got) == list(range(MPO_STEPS))
    for step in range(MPO_STEPS):
        for key in ("loss", "reward_mean", "prompt_state_mean", "tokens"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4), (step, key)
    # MPO moves the model: the preference loss of the first step is not the last one's.
    assert want[MPO_STEPS - 1]["loss"] != want[0]["loss"]
    assert want[1]["prompt_state_mean"] > 0
