"""Step loading, resumption and bad samples: single process, a 4-rank fork pool, and real
processes killed with SIGKILL and resumed on 2 ranks.

The reference for every resumed run is an uninterrupted run of the same configuration; the
reference for "who fetches what" is the balancer's plan (`BatchPlan.chunks_for_vit_rank`,
`samples_for_replica`) and `ParallelPlan.data_role`.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from dataloader.loader import LoaderConfig, StepLoader
from dataloader.manifest import Manifest, load_manifest
from dataloader.state import IncompatibleStateError
from hetero_parallel.plan import ParallelPlan
from hetero_parallel.step_plan import StepConfig
from tests.dataloader_helpers import (
    PLAN_TP2,
    WEIGHTS,
    build_manifest,
    cost_model,
    rank_main,
    rank_steps,
    rank_steps_error,
    text_records,
    write_media,
)
from tests.distributed import free_port

STEPS = 8
WORLD1 = {"world_size": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dl_resume")
    folder = write_media(root / "media")
    path = build_manifest(folder, root / "manifest.jsonl", break_files=True)
    return {"root": root, "folder": folder, "manifest": str(path)}


@pytest.fixture(scope="module")
def reference(data):
    """The uninterrupted single-process run (global batches do not depend on the layout)."""
    return rank_steps(data["manifest"], WORLD1, STEPS, prefetch=0)


def _loader(manifest: Manifest, *, num_microbatches: int = 2, **overrides) -> StepLoader:
    config = dict(global_batch_size=8, seed=7, weights=WEIGHTS, prefetch=0,
                  step=StepConfig(num_microbatches=num_microbatches, frames_per_chunk=2))
    config.update(overrides)
    return StepLoader(manifest, LoaderConfig(**config), plan=ParallelPlan(world_size=1), rank=0,
                      cost_model=cost_model())


# --- single process ----------------------------------------------------------------------------
def test_bad_samples_are_skipped_counted_and_never_lose_good_ones(data, reference):
    manifest = load_manifest(data["manifest"])
    steps = reference["steps"]
    consumed = [p for s in steps for p in s["samples"]]
    skipped = [p for s in steps for p in s["skipped"]]
    assert skipped, "the run should meet the broken clip and the deleted image"
    assert len(consumed) == len(set(consumed)) == STEPS * 8
    # Consumed + skipped positions tile [0, cursor) exactly: nothing lost, nothing repeated.
    assert sorted(consumed + skipped) == list(range(reference["state"]["cursor"]))
    assert reference["state"]["skipped_samples"] == len(skipped)
    # The skipped ones are exactly the samples whose media are broken (checked independently).
    loader = _loader(manifest)
    broken = {"clip1.mp4", "img2.png"}
    for p in range(reference["state"]["cursor"]):
        rec = next(r for r in manifest.records if r.id == loader.sample_ref(p).record_id)
        assert (p in skipped) == any(Path(m.path).name in broken for m in rec.media), p
    loader.close()


@pytest.mark.parametrize("stop", [0, 1, 3, 5])
def test_resume_at_any_step_continues_the_same_batches(data, reference, stop):
    first = rank_steps(data["manifest"], WORLD1, stop, prefetch=2)
    rest = rank_steps(data["manifest"], WORLD1, STEPS - stop, state=first["state"], prefetch=2)
    got = [s["samples"] for s in first["steps"] + rest["steps"]]
    assert got == [s["samples"] for s in reference["steps"]]
    assert [s["digest"] for s in first["steps"] + rest["steps"]] == \
        [s["digest"] for s in reference["steps"]]
    assert rest["state"] == reference["state"]


def test_resume_across_an_epoch_boundary_of_the_whole_manifest(data):
    manifest = load_manifest(data["manifest"])
    n = len(manifest)
    # Small batches: the cursor crosses len(manifest) (epoch 0 -> 1) within a few steps.
    full = _loader(manifest, global_batch_size=4, num_microbatches=1)
    ref = [full.next_step().sample_ids for _ in range(n // 4 + 3)]
    full.close()
    for stop in (n // 4 - 1, n // 4, n // 4 + 1):
        a = _loader(manifest, global_batch_size=4, num_microbatches=1)
        head = [a.next_step().sample_ids for _ in range(stop)]
        state = a.state_dict()
        a.close()
        b = _loader(manifest, global_batch_size=4, num_microbatches=1, prefetch=3)
        b.load_state_dict(state)
        tail = [b.next_step().sample_ids for _ in range(len(ref) - stop)]
        b.close()
        assert head + tail == ref, stop
    assert state["epoch"] >= 1


def test_incompatible_states_are_rejected_naming_both_values(data):
    manifest = load_manifest(data["manifest"])
    a = _loader(manifest)
    a.next_step()
    state = a.state_dict()
    a.close()
    assert sorted(state) == sorted([
        "format_version", "seed", "epoch", "cursor", "step", "skipped_samples",
        "global_batch_size", "manifest_hash", "mixture_hash"])
    assert all(type(v) is int for v in state.values())
    with pytest.raises(IncompatibleStateError, match=r"seed: saved 7, this loader 8"):
        _loader(manifest, seed=8).load_state_dict(state)
    with pytest.raises(IncompatibleStateError,
                       match=r"global_batch_size: saved 8, this loader 6"):
        _loader(manifest, global_batch_size=6).load_state_dict(state)
    other = Manifest(tuple(manifest.records) + tuple(text_records(8)[7:]))
    with pytest.raises(IncompatibleStateError,
                       match=rf"manifest_hash: saved {state['manifest_hash']:016x}, this loader "
                             rf"{other.hash}"):
        _loader(other).load_state_dict(state)
    with pytest.raises(IncompatibleStateError, match="mixture_hash"):
        _loader(manifest, weights={"video": 1, "image": 1, "text": 1}).load_state_dict(state)
    with pytest.raises(IncompatibleStateError, match="format_version 99"):
        _loader(manifest).load_state_dict({**state, "format_version": 99})


# --- 4 ranks (fork pool) -----------------------------------------------------------------------
def _check_roles(plan_kwargs: dict, results: list[dict], steps: int, exact: bool) -> None:
    plan = ParallelPlan(**plan_kwargs)
    for step in range(steps):
        reps = [r["steps"][step] for r in results]
        assert len({tuple(r["samples"]) for r in reps}) == 1
        assert len({r["digest"] for r in reps}) == 1
        batch = set(reps[0]["samples"])
        # Every chunk of the plan is fetched by exactly one ViT rank.
        chunks = [tuple(c) for r in reps for c in r["vit_chunks"]]
        assert len(chunks) == len(set(chunks))
        assert {c[0] for c in chunks} <= batch
        for rank, r in enumerate(reps):
            role = plan.data_role(rank)
            assert len(r["frames"]) == sum(c[3] - c[2] for c in r["vit_chunks"])
            assert bool(r["vit_chunks"]) <= role.loads_pixels
            assert (r["microbatches"] is not None) == role.needs_tokens
        # Each replica's samples reach its TP/CP peers identically; replicas cover the batch.
        covered = []
        for ranks in plan.all_groups("tp-cp"):
            if not plan.data_role(ranks[0]).needs_tokens:
                continue
            views = {json.dumps([reps[k]["replica_samples"], reps[k]["microbatches"]])
                     for k in ranks}
            assert len(views) == 1, f"ranks {ranks} disagree on tokens at step {step}"
            if plan.coords(ranks[0]).pp == 0:
                covered += [p for mb in reps[ranks[0]]["replica_samples"] for p in mb]
        assert sorted(covered) == sorted(batch)
        # Loss tokens the step announces == loss positions of the micro-batches.
        first = [k for k in range(plan.world_size) if plan.data_role(k).loads_tokens
                 and plan.coords(k).pp == 0]
        assert sum(reps[k]["loss_positions"] for k in first) == reps[0]["total_loss_tokens"]
    for rank, r in enumerate(results):
        role, c = plan.data_role(rank), r["counters"]
        if not role.loads_pixels:
            assert c["decode_requests"] == c["frames_decoded"] == 0
        if not role.loads_tokens:
            assert c["token_loads"] == c["broadcasts_sent"] == 0
        if not role.needs_tokens:
            assert c["broadcasts_received"] == 0
        if exact:  # no prefetch, no bad sample: requests == the plan's chunks for this rank
            n_chunks = sum(len(s["vit_chunks"]) for s in r["steps"])
            assert c["decode_requests"] == n_chunks
            n_samples = sum(len(mb) for s in r["steps"] for mb in s["replica_samples"] or [])
            assert c["token_loads"] == (n_samples if role.loads_tokens else 0)
            tp_cp = plan.tp * plan.cp
            peers = role.needs_tokens and tp_cp > 1
            assert c["broadcasts_received"] == (steps if peers and not role.loads_tokens else 0)
            assert c["broadcasts_sent"] == (steps if peers and role.loads_tokens else 0)


@pytest.mark.parametrize("plan_kwargs", [
    {"world_size": 4, "tp": 2, "vit_ranks": (0, 2)},
    {"world_size": 4, "pp": 4, "vit_ranks": (0, 3)},
    {"world_size": 4, "tp": 2, "pp": 2, "vit_ranks": (1, 2)},
], ids=["tp2-vit02", "pp4-vit03", "tp2pp2-vit12"])
def test_only_ranks_that_need_data_fetch_it(pool4, data, plan_kwargs):
    steps = 3
    results = pool4.run(rank_steps, data["manifest"], plan_kwargs, steps, prefetch=0,
                        good_only_folder=str(data["folder"]))
    _check_roles(plan_kwargs, results, steps, exact=True)
    plan = ParallelPlan(**plan_kwargs)
    idle = [k for k in range(4) if not plan.data_role(k).loads_pixels
            and not plan.data_role(k).loads_tokens]
    if plan.pp != 2:
        assert idle  # these layouts are chosen so that some ranks load nothing
    for k in idle:
        c = results[k]["counters"]
        assert c["decode_requests"] == c["token_loads"] == c["broadcasts_sent"] == 0


@pytest.fixture(scope="module")
def uninterrupted4(pool4, data):
    return pool4.run(rank_steps, data["manifest"], PLAN_TP2, STEPS)


def test_four_ranks_match_the_single_process_order(uninterrupted4, reference):
    _check_roles(PLAN_TP2, uninterrupted4, STEPS, exact=False)
    for r in uninterrupted4:
        assert [s["samples"] for s in r["steps"]] == [s["samples"] for s in reference["steps"]]
        assert r["state"] == reference["state"]


def test_fetching_through_a_real_io_server_gives_the_same_steps(data, reference):
    from io_server.launch import start_server

    with start_server([str(data["folder"])], workers=1) as server:
        got = rank_steps(data["manifest"], WORLD1, STEPS, servers=(server.address,))
    for mine, ref in zip(got["steps"], reference["steps"], strict=True):
        assert (mine["samples"], mine["skipped"], mine["frames"]) == \
            (ref["samples"], ref["skipped"], ref["frames"])
    assert got["state"] == reference["state"]


def test_an_io_failure_on_one_rank_stops_every_rank_instead_of_hanging(pool4, data):
    # Only rank 0 hosts a ViT and its only server is dead: every rank must raise, none hang.
    dead = f"127.0.0.1:{free_port()}"
    plan = {"world_size": 4, "tp": 2, "vit_ranks": (0,)}
    errors = pool4.run(rank_steps_error, data["manifest"], plan, 2, servers=(dead,),
                       timeout_s=60)
    assert all("step 0: loading failed on some rank" in e for e in errors), errors
    assert dead in errors[0]


# --- real processes, SIGKILL, resume on 2 ranks --------------------------------------------------
def _spawn(world: int, data: dict, plan_kwargs: dict, out: Path, steps: int, **kw) -> list:
    ctx = mp.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=rank_main, daemon=True,
                         args=(rank, world, port, data["manifest"], plan_kwargs, str(out), steps,
                               kw.get("checkpoint_after"), kw.get("hang_at"),
                               kw.get("state_path")))
             for rank in range(world)]
    for p in procs:
        p.start()
    return procs


def _kill(procs) -> None:
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
        p.join(timeout=10)


def _read(out: Path, rank: int) -> list[dict]:
    path = out / f"rank{rank}.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _wait(cond, procs, timeout_s: float, what: str, *, deaths_fail: bool = True) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        dead = [(i, p.exitcode) for i, p in enumerate(procs) if not p.is_alive()]
        if deaths_fail and dead and not cond():
            raise AssertionError(f"ranks died before {what}: {dead}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_sigkill_mid_step_then_resume_on_two_ranks(tmp_path, data, uninterrupted4):
    checkpoint_after, hang_at = 3, 5
    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    run1.mkdir()
    run2.mkdir()
    procs = _spawn(4, data, PLAN_TP2, run1, STEPS, checkpoint_after=checkpoint_after,
                   hang_at=hang_at)
    try:
        _wait(lambda: all((run1 / f"busy{r}").exists() for r in range(4)), procs, 60,
              f"all 4 ranks to be inside step {hang_at}")
        assert all(p.is_alive() for p in procs)
    finally:
        _kill(procs)
    assert [p.exitcode for p in procs] == [-signal.SIGKILL] * 4
    state = json.loads((run1 / "ckpt.json").read_text())
    assert state["step"] == checkpoint_after

    plan2 = {"world_size": 2, "tp": 2}
    procs = _spawn(2, data, plan2, run2, STEPS - checkpoint_after,
                   state_path=str(run1 / "ckpt.json"))
    try:
        _wait(lambda: all(not p.is_alive() for p in procs), procs, 60, "the resumed run",
              deaths_fail=False)
    finally:
        _kill(procs)
    assert [p.exitcode for p in procs] == [0, 0]

    before = [_read(run1, r) for r in range(4)]
    after = [_read(run2, r) for r in range(2)]
    # The killed run got past the checkpoint (steps 3 and 4 are lost work, redone on resume).
    assert all(len(b) == hang_at for b in before)
    consumed = [s["samples"] for s in before[0][:checkpoint_after]] + \
        [s["samples"] for s in after[0]]
    expected = [s["samples"] for s in uninterrupted4[0]["steps"]]
    assert consumed == expected
    flat = [p for b in consumed for p in b]
    assert sorted(flat) == sorted(p for b in expected for p in b)
    assert len(flat) == len(set(flat))
    # Both resumed ranks (one TP group) saw identical tokens, and the same as each other.
    for s0, s1 in zip(after[0], after[1], strict=True):
        assert s0["microbatches"] == s1["microbatches"]
        assert s0["samples"] == s1["samples"]
    # Skipped bad samples after the resume are those of the uninterrupted run.
    assert [s["skipped"] for s in after[0]] == \
        [s["skipped"] for s in uninterrupted4[0]["steps"][checkpoint_after:]]
    counters = [json.loads((run2 / f"counters{r}.json").read_text()) for r in range(2)]
    _check_roles(plan2, [{"steps": a, "counters": c} for a, c in zip(after, counters,
                                                                      strict=True)],
                 len(after[0]), exact=False)
