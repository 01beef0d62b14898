"""Checkpoints: resume across layout changes, and every corrupt or hostile case.

The layout chain trains the tiny model with the real dataloader (real media, bad samples skipped)
and resumes 4 ranks pp2.dp2 (distributed optimizer) -> 2 ranks tp1.pp2 -> 4 ranks tp2.pp2 ->
2 ranks dp2 (distributed optimizer), against one uninterrupted run on 4 ranks pp4: the same losses,
the same samples at every step, identical ViT replicas. The corruption tests use a small tensor
part on 2 ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed import DistributedPool

STEPS = 8
CHAIN = [  # (world size, plan, distributed optimizer, steps run in this segment)
    (4, {"pp": 2}, True, 2),
    (2, {"pp": 2}, False, 2),
    (4, {"tp": 2, "pp": 2}, False, 2),
    (2, {}, True, 2),
]


@pytest.fixture(scope="module")
def pools():
    made: dict[int, DistributedPool] = {}

    def get(world: int) -> DistributedPool:
        if world not in made:
            made[world] = DistributedPool(world)
        return made[world]

    yield get
    for pool in made.values():
        pool.close()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    from tests.dataloader_helpers import build_manifest, write_media

    folder = tmp_path_factory.mktemp("media")
    write_media(folder)
    return str(build_manifest(folder, folder / "manifest.jsonl"))


def _segment(manifest: str, plan_kwargs: dict, out: str, steps: int, resume: bool,
             distributed: bool = False) -> dict:
    """Train ``steps`` steps on this rank's layout (after resuming from ``out`` if asked), then
    save. Returns per-step losses and sample positions, and this rank's ViT digest."""
    from hetero_parallel import ParallelPlan, initialize, teardown
    from hetero_parallel.checkpoint import CheckpointConfig, CheckpointManager, JsonPart
    from hetero_parallel.cost_model import CostModel
    from hetero_parallel.cpu_compat import cpu_compat
    from hetero_parallel.trainer import OptimizerConfig
    from tests import hetero_helpers as HH
    from tests.dataloader_helpers import make_loader

    with cpu_compat():
        # A resumed run starts from other weights: the checkpoint must overwrite all of them.
        initial = HH.standalone_initial_weights(init_seed=9 if resume else 0)
        plan = ParallelPlan(world_size=dist.get_world_size(), **plan_kwargs)
        groups = initialize(plan, backend="gloo", seed=1)
        rank = groups.rank
        loader = make_loader(manifest, {"world_size": plan.world_size, **plan_kwargs}, rank)
        try:
            trainer = HH.build_trainer(groups, initial, OptimizerConfig(
                lr=3e-3, warmup_steps=2, decay_steps=STEPS, clip_grad=0.5,
                distributed=distributed))
            manager = CheckpointManager(
                CheckpointConfig(folder=Path(out), keep_last=2, async_save=True),
                {"trainer": trainer, "loader": loader,
                 "cost_model": JsonPart(lambda: {"json": loader.cost_model.to_json()},
                                        lambda s: setattr(loader, "cost_model",
                                                          CostModel.from_json(s["json"])))},
                rank=rank)
            start = 0
            if resume:
                report = manager.load()
                assert report.step is not None and not report.skipped, report
                start = report.step
            log = {}
            for _ in range(steps):
                data = loader.next_step()
                result = trainer.step(data)
                assert result.step == data.step
                log[data.step] = (result.loss, list(data.sample_ids), len(data.skipped))
            manager.save(start + steps)
            manager.close()
            vit = None
            if trainer.vision is not None:
                flat = torch.cat([p.detach().flatten() for p in trainer.vision.parameters()])
                vit = hashlib.sha256(flat.numpy().tobytes()).hexdigest()
            return {"log": log, "vit": vit}
        finally:
            loader.close()
            teardown(groups)


def test_resume_across_layout_changes_continues_the_same_run(pools, manifest, tmp_path):
    straight = pools(4).run(_segment, manifest, {"pp": 4}, str(tmp_path / "a"), STEPS, False,
                            timeout_s=300)
    reference = straight[0]["log"]
    assert sorted(reference) == list(range(STEPS))
    assert sum(n for _, _, n in reference.values()) > 0  # bad samples were met and skipped

    out = str(tmp_path / "b")
    got: dict[int, tuple] = {}
    for i, (world, plan_kwargs, distributed, steps) in enumerate(CHAIN):
        results = pools(world).run(_segment, manifest, plan_kwargs, out, steps, i > 0,
                                   distributed, timeout_s=300)
        for r in results:
            assert r["log"] == results[0]["log"]  # every rank saw the same steps
        vits = {r["vit"] for r in results if r["vit"] is not None}
        assert len(vits) == 1, f"ViT replicas differ after segment {i}: {vits}"
        got.update(results[0]["log"])
    assert sorted(got) == list(range(STEPS))
    for step in range(STEPS):
        loss, samples, skipped = got[step]
        ref_loss, ref_samples, ref_skipped = reference[step]
        assert samples == ref_samples and skipped == ref_skipped, step
        assert loss == pytest.approx(ref_loss, rel=1e-4), (step, loss, ref_loss)
    assert reference[STEPS - 1][0] < reference[0][0]  # it trains


# --- corrupt and hostile checkpoints, on a small tensor part --------------------------------------
class _Part:
    """Two tensors (one sharded by rank) and a JSON value."""

    def __init__(self, value: float) -> None:
        self.w = torch.full((4, 3), value)
        self.b = torch.arange(3.0) * value
        self.note = {"value": value}

    def state_dict(self) -> dict:
        return {"w": self.w, "b": self.b, "value": self.note["value"]}

    def load_state_dict(self, state: dict) -> None:
        self.note = {"value": state["value"]}


def _manager(folder: str, value: float):
    from hetero_parallel.checkpoint import CheckpointConfig, CheckpointManager

    part = _Part(value)
    return part, CheckpointManager(CheckpointConfig(folder=Path(folder), keep_last=3),
                                   {"part": part}, rank=dist.get_rank())


def _save_two(folder: str) -> None:
    for step, value in ((1, 1.0), (2, 2.0)):
        _, manager = _manager(folder, value)
        manager.save(step)
        manager.close()


def _load(folder: str) -> dict:
    from hetero_parallel.checkpoint import CheckpointError

    part, manager = _manager(folder, 0.0)
    try:
        report = manager.load()
    except CheckpointError as exc:
        return {"error": str(exc)}
    finally:
        manager.close()
    return {"step": report.step, "skipped": report.skipped, "w": part.w[0, 0].item(),
            "value": part.note["value"]}


def _distcp_files(folder: Path, step: int) -> list[Path]:
    return sorted(p for p in (folder / f"step_{step:08d}").glob("*.distcp") if p.stat().st_size)


def _corrupt(folder: Path, how: str) -> str:
    """Damage step 2 as ``how`` says; returns a fragment the report must contain."""
    step2 = folder / "step_00000002"
    if how == "truncated":
        f = _distcp_files(folder, 2)[0]
        f.write_bytes(f.read_bytes()[:-100])
        return f"{f}: "
    if how == "flipped":
        f = _distcp_files(folder, 2)[-1]
        data = bytearray(f.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
        f.write_bytes(bytes(data))
        return f"{f}: SHA-256 differs"
    if how == "missing":
        f = _distcp_files(folder, 2)[0]
        f.unlink()
        return f"{f}: missing"
    if how == "partial":
        (step2 / "checksums.json").unlink()
        return f"{step2}: incomplete"
    if how in ("crafted_pickle", "bytes_entry"):
        marker = folder / "PWNED"
        if how == "crafted_pickle":
            class Evil:
                def __reduce__(self):
                    return (os.system, (f"touch {marker}",))

            payload = pickle.dumps(Evil())
        else:
            from torch.distributed.checkpoint import metadata as md

            meta = pickle.loads((step2 / ".metadata").read_bytes())
            meta.state_dict_metadata["part/w"] = md.BytesStorageMetadata()
            payload = pickle.dumps(meta)
        (step2 / ".metadata").write_bytes(payload)
        # The attacker also rewrites the checksums: integrity checks alone would not stop it.
        sums = json.loads((step2 / "checksums.json").read_text())
        sums["files"][".metadata"] = {"size": len(payload),
                                      "sha256": hashlib.sha256(payload).hexdigest()}
        (step2 / "checksums.json").write_text(json.dumps(sums))
        return "refusing to unpickle" if how == "crafted_pickle" else "is a BytesStorageMetadata"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "flipped", "missing", "partial", "crafted_pickle",
                                 "bytes_entry"])
def test_a_bad_newest_checkpoint_is_reported_and_the_previous_one_used(pools, tmp_path, how):
    pool = pools(2)
    pool.run(_save_two, str(tmp_path))
    expected = _corrupt(tmp_path, how)
    for r in pool.run(_load, str(tmp_path)):
        assert r.get("error") is None, r
        assert r["step"] == 1 and r["w"] == 1.0 and r["value"] == 1.0
        assert any(expected in note for note in r["skipped"]), r["skipped"]
    assert not (tmp_path / "PWNED").exists()


def test_a_bad_latest_pointer_is_reported_and_the_newest_complete_one_used(pools, tmp_path):
    pool = pools(2)
    pool.run(_save_two, str(tmp_path))
    (tmp_path / "latest").write_text("twelve")
    for r in pool.run(_load, str(tmp_path)):
        assert r["step"] == 2 and r["w"] == 2.0
        assert any("latest: holds 'twelve', not a step number" in n for n in r["skipped"])


def test_no_usable_checkpoint_is_an_error_that_names_each_one(pools, tmp_path):
    pool = pools(2)
    pool.run(_save_two, str(tmp_path))
    for step in (1, 2):
        for f in _distcp_files(tmp_path, step):
            f.write_bytes(b"garbage")
    for r in pool.run(_load, str(tmp_path)):
        assert "no checkpoint under" in r["error"]
        assert "step_00000001" in r["error"] and "step_00000002" in r["error"]


def test_a_checkpoint_of_another_model_names_the_tensor_and_both_shapes(pools, tmp_path):
    pool = pools(2)
    pool.run(_save_two, str(tmp_path))
    for r in pool.run(_load_other_shape, str(tmp_path)):
        assert "tensor 'part/w' has shape (4, 3) in the checkpoint but (5, 3) here" in r


def _load_other_shape(folder: str) -> str:
    from hetero_parallel.checkpoint import CheckpointError

    part, manager = _manager(folder, 0.0)
    part.w = torch.zeros(5, 3)
    with pytest.raises(CheckpointError) as info:
        manager.load()
    manager.close()
    return str(info.value)


def test_restricted_unpickler_refuses_everything_but_metadata_types(tmp_path):
    from hetero_parallel.checkpoint import CheckpointError, read_metadata

    (tmp_path / ".metadata").write_bytes(pickle.dumps({"a": [1, 2]}))
    with pytest.raises(CheckpointError, match="holds a dict, not checkpoint metadata"):
        read_metadata(tmp_path)
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Path("/etc")) + b"")
    with pytest.raises(CheckpointError, match="not checkpoint metadata"):
        read_metadata(tmp_path)
    (tmp_path / ".metadata").write_bytes(pickle.dumps(print))
    with pytest.raises(CheckpointError, match=r"refusing to unpickle builtins\.print"):
        read_metadata(tmp_path)
    (tmp_path / ".metadata").write_bytes(b"\x80\x04junk")
    with pytest.raises(CheckpointError, match="unreadable checkpoint metadata"):
        read_metadata(tmp_path)


class _ByName:
    """Pickles as ``getattr(owner, name)``: how some Pythons (3.11.2) pickle an enum member."""

    def __init__(self, owner, name: str) -> None:
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def test_metadata_enum_members_pickled_by_name_load_and_nothing_else_does(tmp_path):
    from torch.distributed.checkpoint import metadata as md

    from hetero_parallel.checkpoint import CheckpointError, _MetadataUnpickler

    member = md._MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        data = pickle.dumps(_ByName(md._MEM_FORMAT_ENCODING, member.name), protocol=protocol)
        assert b"getattr" in data
        assert _MetadataUnpickler(data, tmp_path).load() is member
    for owner, name in ((md.Metadata, "__init__"), (md._MEM_FORMAT_ENCODING, "__class__"),
                        (md._MEM_FORMAT_ENCODING, "_member_map_")):
        with pytest.raises(CheckpointError, match="refusing getattr"):
            _MetadataUnpickler(pickle.dumps(_ByName(owner, name)), tmp_path).load()
    with pytest.raises(CheckpointError, match="refusing to unpickle posix.system"):
        _MetadataUnpickler(pickle.dumps(_ByName(os.system, "__call__")), tmp_path).load()
