"""Dataloader benchmark: resume at position 10^9, throughput vs raw decoding, state size.

Run (CPU only, about a minute; ``--quick`` takes ~15 s)::

    python benchmarks/bench_dataloader.py [--quick]

Three tables, ours and the baseline side by side:

1. Resume at global position 10^9 of a video:image:text = 24:50:26 mixture of datasets with 2.4e8,
   5e8 and 2.6e8 samples: ours locates the next global batch (256 samples) directly
   (`Mixture.locate_many`), and a real `StepLoader` restores a state at cursor 10^9 and derives
   its first batch's samples. The baseline replays the order from position 0 (what a loader
   without O(1) access must do to reach the same sample): the cheapest possible replay, our own
   vectorised order without loading anything, is timed over ``--replay`` positions and
   extrapolated linearly to 10^9.
2. Throughput on the same synthetic H.264 clips and images: the raw decode rate (one
   ``IOClient.decode`` per media item, back to back, in-process) vs `StepLoader` on one rank
   (planning, Keye tokenization, micro-batches, decoding in its prefetch thread), in samples/s,
   best of several interleaved runs; CPU seconds (all threads) are reported too, as wall time on
   a shared machine is noisy.
   ``frames_per_chunk`` covers a whole clip so both issue one request per media item (the
   in-process client re-probes on every request, so more chunks would cost more probes).
3. State size: our `state_dict` (integers, as JSON) vs a sampler that stores its epoch's
   permutation (8 bytes per sample; computed for 10^9 samples, not allocated).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from dataloader.index import collect_items, index_items
from dataloader.loader import LoaderConfig, StepLoader
from dataloader.manifest import Manifest, Record, Turn
from dataloader.mixture import Mixture
from dataloader.order import epoch_permutation
from hetero_parallel.cost_model import CostModel
from hetero_parallel.plan import ParallelPlan
from hetero_parallel.step_plan import StepConfig

POSITION = 10**9
BATCH = 256
COST = CostModel(vit_linear=1.0, vit_quadratic=0.01, llm_linear=1.0, llm_quadratic=0.001)


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _table(title: str, rows: list[tuple[str, str, str, str]]) -> None:
    print(f"\n{title}")
    header = ("metric", "ours", "baseline", "ratio")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for r in [header, *rows]:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def bench_resume(replay: int, manifest: Manifest) -> None:
    mix = Mixture.create({"video": 24, "image": 50, "text": 26},
                         {"video": 240_000_000, "image": 500_000_000, "text": 260_000_000}, 0)
    positions = np.arange(POSITION, POSITION + BATCH)
    def locate() -> None:
        epoch_permutation.cache_clear()  # cold: no permutation key cached from a previous run
        mix.locate_many(positions)

    ours = _best(locate, 5)

    loader = StepLoader(manifest, LoaderConfig(global_batch_size=BATCH // 32, seed=0,
                                               prefetch=0),
                        plan=ParallelPlan(world_size=1), rank=0, cost_model=COST)
    state = {**loader.state_dict(), "cursor": POSITION, "epoch": POSITION // len(manifest),
             "step": POSITION // (BATCH // 32)}

    def restore() -> None:
        epoch_permutation.cache_clear()
        loader.load_state_dict(state)
        [loader.sample_ref(p) for p in range(POSITION, POSITION + BATCH // 32)]

    ours_loader = _best(restore, 5)
    loader.close()

    chunk = 1 << 16

    def do_replay() -> None:
        for start in range(0, replay, chunk):
            mix.locate_many(np.arange(start, min(start + chunk, replay)))

    replay_s = _best(do_replay, 1) * POSITION / replay
    _table(f"1. Resume at position 10^9 (replay measured over {replay:,} positions, "
           "extrapolated)", [
        ("next 256 samples located (ms)", f"{ours * 1e3:.2f}", f"{replay_s * 1e3:,.0f}",
         f"{replay_s / ours:,.0f}x faster"),
        ("StepLoader restore + first batch (ms)", f"{ours_loader * 1e3:.2f}",
         f"{replay_s * 1e3:,.0f}", f"{replay_s / ours_loader:,.0f}x faster"),
        ("target", "< 10 ms", "", "met" if max(ours, ours_loader) < 0.01 else "MISSED"),
    ])


def _media_manifest(folder: Path, clips: int, images: int) -> Manifest:
    from io_server.synthetic import write_image, write_video

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(clips):
        write_video(folder / f"clip{i}.mp4", width=224, height=168, seconds=4, fps=8, seed=i)
    for i in range(images):
        write_image(folder / f"img{i}.png", 224, 224, seed=i)
    records, bad = index_items(collect_items(folder), workers=1, progress=False)
    assert not bad, bad
    return Manifest(tuple(records))


def bench_throughput(manifest: Manifest, steps: int, repeats: int) -> None:
    from io_server.client import IOClient

    client = IOClient()
    frames_max = max(m.num_frames for r in manifest.records for m in r.media)
    batch = 8
    by_id = {r.id: r for r in manifest.records}
    raw_best = ours_best = raw_cpu = ours_cpu = float("inf")
    requests = 0
    def config(rep: int) -> LoaderConfig:
        return LoaderConfig(global_batch_size=batch, seed=rep, prefetch=2,
                            step=StepConfig(num_microbatches=2, frames_per_chunk=frames_max))

    def run_ours(rep: int) -> None:
        nonlocal ours_best, ours_cpu, requests
        # From construction to `steps` global batches: no head start for the prefetch thread.
        t0, c0 = time.perf_counter(), time.process_time()
        loader = StepLoader(manifest, config(rep), plan=ParallelPlan(world_size=1), rank=0,
                            cost_model=COST, client=client)
        consumed = [s.record_id for _ in range(steps) for s in loader.next_step().samples]
        ours_best = min(ours_best, time.perf_counter() - t0)
        ours_cpu = min(ours_cpu, time.process_time() - c0)
        requests = loader.counters.decode_requests
        loader.close()
        assert consumed == expected[rep], "the loader consumed other samples than the order"

    def run_raw(rep: int) -> None:
        nonlocal raw_best, raw_cpu
        # The media of exactly the same samples, decoded back to back.
        t0, c0 = time.perf_counter(), time.process_time()
        for rid in expected[rep]:
            for m in by_id[rid].media:
                client.decode(m.path)
        raw_best = min(raw_best, time.perf_counter() - t0)
        raw_cpu = min(raw_cpu, time.process_time() - c0)

    expected = {}
    for rep in range(repeats):
        probe = StepLoader(manifest, config(rep), plan=ParallelPlan(world_size=1), rank=0,
                           cost_model=COST, client=client)
        expected[rep] = [probe.sample_ref(p).record_id for p in range(steps * batch)]
        # Interleaved, alternating which goes first (the first run also warms FFmpeg).
        for run in ((run_ours, run_raw) if rep % 2 else (run_raw, run_ours)):
            run(rep)
    n = steps * batch
    raw, ours = n / raw_best, n / ours_best
    _table(f"2. Throughput, one rank, {n} samples of 224 px media per run, best of {repeats} "
           "(in-process decode)", [
        ("samples/s", f"{ours:.1f}", f"{raw:.1f} (raw decode)", f"{ours / raw:.2f}x"),
        ("CPU ms per sample (all threads)", f"{ours_cpu / n * 1e3:.1f}",
         f"{raw_cpu / n * 1e3:.1f}", f"{ours_cpu / raw_cpu:.2f}x"),
        ("decode requests (incl. prefetched)", str(requests), str(n), ""),
        ("target", ">= 0.9x", "", "met" if ours / raw >= 0.9 else "MISSED"),
    ])


def bench_state(manifest: Manifest) -> None:
    loader = StepLoader(manifest, LoaderConfig(global_batch_size=4, prefetch=0),
                        plan=ParallelPlan(world_size=1), rank=0, cost_model=COST)
    state = {**loader.state_dict(), "cursor": POSITION}
    loader.close()
    ours = len(json.dumps(state).encode())
    base = 8 * POSITION
    _table("3. Checkpoint state size", [
        ("bytes (10^9-sample epoch)", f"{ours}", f"{base:,} (int64 permutation)",
         f"{base / ours:,.0f}x smaller"),
        ("fields", f"{len(state)} integers", "", ""),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--replay", type=int, default=None)
    args = parser.parse_args()
    replay = args.replay or (1 << 20 if args.quick else 1 << 23)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = _media_manifest(Path(tmp) / "media", 6 if args.quick else 16,
                                   6 if args.quick else 16)
        text = tuple(Record(f"t{i}", "text", (Turn("text", f"sample {i} " * 20),))
                     for i in range(8))
        bench_resume(replay, Manifest(manifest.records + text))
        bench_throughput(manifest, 4 if args.quick else 12, 2 if args.quick else 5)
        bench_state(manifest)


if __name__ == "__main__":
    main()
