"""Shared pieces of the dataloader tests: tiny real media, manifests, and what one rank runs.

`write_media` writes real H.264 clips (56x56 px, 2 s) and PNG images with `io_server.synthetic`;
`build_manifest` indexes them with the real prober, then breaks files *after* indexing (one clip
corrupted, one image deleted) so the loader meets bad samples at training time.

`rank_steps` is what every rank runs, in the fork pool (`tests.distributed.DistributedPool`) and in
the separate processes of the SIGKILL test (`rank_main`): it builds the tensor-and-context groups of
the plan with plain ``dist.new_group`` (the same membership as megatron's ``tp-cp`` group, without
importing megatron-core), runs the loader and reports, per step, what this rank saw.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from dataloader.index import collect_items, index_items
from dataloader.manifest import Manifest, Record, Turn, open_manifest, write_jsonl

WEIGHTS = {"video": 24, "image": 50, "text": 26}
PLAN_TP2 = {"world_size": 4, "tp": 2}
"""The 4-rank layout of the resume tests: TP groups {0, 1} and {2, 3}, two LLM replicas."""


def cost_model():
    from hetero_parallel.cost_model import CostModel

    return CostModel(vit_linear=1.0, vit_quadratic=0.01, llm_linear=1.0, llm_quadratic=0.001)


def write_media(folder: Path, videos: int = 5, images: int = 6) -> Path:
    from io_server.synthetic import write_image, write_video

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(videos):
        write_video(folder / f"clip{i}.mp4", width=56, height=56, seconds=1.0 + (i % 2),
                    fps=4, seed=i)
        (folder / f"clip{i}.txt").write_text(f"caption of clip {i}", encoding="utf-8")
    for i in range(images):
        write_image(folder / f"img{i}.png", 56 + 28 * (i % 3), 56, seed=i)
    return folder


def text_records(n: int) -> list[Record]:
    return [Record(f"text{i}", "text",
                   (Turn("text", f"plain text sample number {i}." * (1 + i % 3)),))
            for i in range(n)]


def build_manifest(folder: Path, out: Path, *, break_files: bool = True) -> Path:
    """Index ``folder`` (datasets "video" and "image"), add text records, write JSONL, then break
    clip1 (corrupt) and img2 (deleted) when asked."""
    from io_server.synthetic import write_corrupted

    items = collect_items(folder)
    records, bad = index_items(items, workers=1, progress=False)
    assert not bad, bad
    write_jsonl(records + text_records(7), out)
    if break_files:
        clip = folder / "clip1.mp4"
        write_corrupted(clip, folder / "clip1.tmp", seed=3, start_fraction=0.0)
        os.replace(folder / "clip1.tmp", clip)
        os.remove(folder / "img2.png")
    return out


def good_only(manifest: Manifest, folder: Path) -> Manifest:
    """The records whose media all exist and open (for exact fetch counting)."""
    return Manifest(tuple(r for r in manifest.records
                          if all(Path(m.path).name not in ("clip1.mp4", "img2.png")
                                 for m in r.media)))


def tp_cp_group(plan, rank: int):
    """This rank's tensor-and-context group; every rank creates every group, in order."""
    import torch.distributed as dist

    mine = None
    for ranks in plan.all_groups("tp-cp"):
        g = dist.new_group(list(ranks))
        if rank in ranks:
            mine = g
    return mine


def _digest(t) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def step_report(loader, data) -> dict[str, Any]:
    """What one rank saw in one step (JSON-serialisable)."""
    batch = data.batch
    rep: dict[str, Any] = {
        "step": data.step,
        "samples": list(data.sample_ids),
        "keys": [[s.dataset, s.epoch, s.index] for s in data.samples],
        "skipped": [s.position for s in data.skipped],
        "digest": batch.digest(),
        "vit_chunks": [],
        "frames": [_digest(f) for f in data.vision_frames],
        "replica_samples": None,
        "microbatches": None,
        "total_loss_tokens": data.total_loss_tokens,
    }
    if loader.vit_index is not None:
        rep["vit_chunks"] = [[c.sample_id, c.media_index, c.frame_start, c.frame_stop]
                             for c in batch.chunks_for_vit_rank(loader.vit_index)]
    if data.microbatches is not None:
        rep["replica_samples"] = [list(mb) for mb in
                                  batch.samples_for_replica(loader.role.llm_replica)]
        rep["microbatches"] = [[_digest(mb.input_ids), _digest(mb.labels), _digest(mb.loss_mask)]
                               for mb in data.microbatches]
        rep["loss_positions"] = int(sum(mb.loss_mask.sum() for mb in data.microbatches))
    return rep


def make_loader(manifest_path: str, plan_kwargs: dict, rank: int, *, seed: int = 7,
                batch_size: int = 8, prefetch: int = 2, manifest: Manifest | None = None,
                client=None):
    from dataloader.loader import LoaderConfig, StepLoader
    from hetero_parallel.plan import ParallelPlan
    from hetero_parallel.step_plan import StepConfig

    plan = ParallelPlan(**plan_kwargs)
    group = tp_cp_group(plan, rank) if plan.world_size > 1 else None
    config = LoaderConfig(global_batch_size=batch_size, seed=seed, weights=WEIGHTS,
                          step=StepConfig(num_microbatches=2, frames_per_chunk=2),
                          prefetch=prefetch)
    return StepLoader(manifest or open_manifest(manifest_path), config, plan=plan, rank=rank,
                      cost_model=cost_model(), token_group=group, client=client)


def rank_steps(manifest_path: str, plan_kwargs: dict, steps: int, *, state: dict | None = None,
               prefetch: int = 2, good_only_folder: str | None = None, seed: int = 7,
               batch_size: int = 8, servers: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run ``steps`` steps on this rank (inside an initialised process group, or alone).

    ``servers``: fetch pixels through I/O servers (``IOClient(servers, max_attempts=1)``)
    instead of decoding in-process.
    """
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    manifest = open_manifest(manifest_path)
    if good_only_folder is not None:
        manifest = good_only(manifest, Path(good_only_folder))
    client = None
    if servers is not None:
        from io_server.client import IOClient

        client = IOClient(servers, deadline_s=5.0, max_attempts=1)
    loader = make_loader(manifest_path, plan_kwargs, rank, prefetch=prefetch, manifest=manifest,
                         seed=seed, batch_size=batch_size, client=client)
    try:
        if state is not None:
            loader.load_state_dict(state)
        reports = [step_report(loader, loader.next_step()) for _ in range(steps)]
        return {"rank": rank, "steps": reports, "state": loader.state_dict(),
                "counters": loader.counters.snapshot()}
    finally:
        loader.close()
        if client is not None:
            client.close()


def rank_steps_error(*args: Any, **kwargs: Any) -> str:
    """`rank_steps`, returning the error message instead of raising (for failure tests)."""
    try:
        rank_steps(*args, **kwargs)
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def rank_main(rank: int, world: int, port: int, manifest_path: str, plan_kwargs: dict,
              out_dir: str, steps: int, checkpoint_after: int | None, hang_at: int | None,
              state_path: str | None) -> None:
    """One rank of a real multi-process run (the SIGKILL test's child process).

    Appends one JSON line per finished step to ``out_dir/rank{rank}.jsonl``; rank 0 writes the
    loader state after ``checkpoint_after`` steps to ``out_dir/ckpt.json`` (atomically); at step
    ``hang_at`` the rank loads the batch, writes ``out_dir/busy{rank}`` and then "trains" forever
    (until it is killed).
    """
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    state = json.loads(Path(state_path).read_text()) if state_path else None
    loader = make_loader(manifest_path, plan_kwargs, rank)
    if state is not None:
        loader.load_state_dict(state)
    log = open(Path(out_dir) / f"rank{rank}.jsonl", "a", encoding="utf-8")  # noqa: SIM115
    first = loader.state_dict()["step"]
    for step in range(first, first + steps):
        data = loader.next_step()
        if hang_at is not None and step == hang_at:
            (Path(out_dir) / f"busy{rank}").write_text(str(step))
            while True:  # mid-step: the batch is loaded, the "training" never ends
                time.sleep(0.1)
        log.write(json.dumps(step_report(loader, data)) + "\n")
        log.flush()
        os.fsync(log.fileno())
        if rank == 0 and checkpoint_after is not None and step + 1 == checkpoint_after:
            tmp = Path(out_dir) / "ckpt.tmp"
            tmp.write_text(json.dumps(loader.state_dict()))
            os.replace(tmp, Path(out_dir) / "ckpt.json")
    loader.close()
    (Path(out_dir) / f"counters{rank}.json").write_text(json.dumps(loader.counters.snapshot()))
    dist.barrier()
    dist.destroy_process_group()
