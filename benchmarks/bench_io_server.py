"""I/O server: exact vs fast pixel path vs in-process decoding, and RGB vs YUV 4:2:0 on the wire.

    python benchmarks/bench_io_server.py --quick            # ~1-2 min on 2 CPU cores
    python benchmarks/bench_io_server.py                    # 12 clips 360p-1080p, 10-120 s
    python benchmarks/bench_io_server.py --quick --content textured

Every mode decodes every clip once per round, planning included (as in a first epoch: the server
runs with `--plan-cache-size 0`, the in-process client with `plan_cache_size=0`), on ONE decoding
core: in-process modes decode in this process (one FFmpeg thread, one request at a time); server
modes use one server with one worker process and one client with 2 requests in flight (so the
worker never waits for the client), i.e. processes <= cores for the throughput ratios.
- in-process exact / fast: `IOClient()` with `resize="exact"` (Keye's processor: RGB at source
  size + torch bilinear-antialias) or `resize="fast"` (FFmpeg's scaler);
- server exact / fast (RGB): the same two paths behind gRPC, zstd on the wire;
- server fast (YUV): `pixel_format="yuv420p"`: 4:2:0 planes on the wire, RGB made by the client.
Reported per mode: frames/s per decoding core, the ratio to in-process exact, CPU ms per frame of
the decoding process (decode + resize + zstd; steadier than wall clock on a shared host), and for
server modes the frame bytes per frame on the wire (after zstd) and before zstd (gRPC framing
excluded). Then the ratios: fast / exact throughput (in-process and server), server / in-process
per core, YUV / RGB bytes per frame (before and after zstd), the pixel difference of the fast
path from the exact one (max and mean |diff| in uint8 levels over every frame of every clip), and
the cost of the resize alone (decoding excluded) per source resolution.
Each mode runs `--rounds` times, interleaved; the table shows each mode's fastest round and its
smallest CPU time (other load only ever slows a round down).

`--content synthetic` (default) uses `io_server.synthetic.write_video` (flat coloured shapes, like
the project's test clips: zstd compresses them far better than camera footage); `--content
textured` pans 1/f ("pink") noise textures, whose statistics resemble natural images, under moving
shapes: a pessimistic bound for compression.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from io_server import synthetic
from io_server.backends import PyAVBackend
from io_server.client import DecodeItem, IOClient
from io_server.launch import ServerProcess, start_server


@dataclass(frozen=True)
class Clip:
    path: str
    height: int
    seconds: float


@dataclass(frozen=True)
class Result:
    mode: str
    seconds: float
    samples: int
    frames: int
    rgb_bytes: int
    """uint8 RGB bytes of the frames returned (what the caller gets)."""
    cpu_s: float
    """CPU seconds of the decoding process on the clips (in-process: this process; server: the
    worker's `worker_cpu_seconds` from `Stats`)."""
    raw_wire_bytes: int | None = None
    """Frame bytes the server sent before zstd (RGB: H*W*3; YUV: H*W*3/2)."""
    wire_bytes: int | None = None
    """Frame bytes the server sent after zstd."""

    @property
    def fps(self) -> float:
        return self.frames / self.seconds

    @property
    def cpu_ms_per_frame(self) -> float:
        return 1e3 * self.cpu_s / self.frames


SIZES = {360: 640, 720: 1280, 1080: 1920}
FULL_CLIPS = [(360, 10), (360, 20), (360, 45), (360, 120), (720, 10), (720, 20), (720, 30),
              (720, 60), (1080, 10), (1080, 15), (1080, 30), (1080, 60)]
"""Twelve clips, so that W workers are not bound by the longest one (a batch cannot finish before
its longest sample does: that bound shows when there are few samples per worker)."""
QUICK_CLIPS = [(360, 8)] * 4 + [(720, 8)] * 3 + [(1080, 8)]


def _pink_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """RGB noise with a 1/f amplitude spectrum (natural-image statistics), uint8."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    spec = (rng.standard_normal((3, h, w // 2 + 1))
            + 1j * rng.standard_normal((3, h, w // 2 + 1))) / f
    img = np.fft.irfft2(spec, s=(h, w)).astype(np.float32)
    img = (img - img.mean(axis=(1, 2), keepdims=True)) / img.std(axis=(1, 2), keepdims=True)
    return np.ascontiguousarray(np.clip(img.transpose(1, 2, 0) * 40 + 128, 0, 255)
                                .astype(np.uint8))


def write_textured_video(path: str, *, width: int, height: int, seconds: float, fps: float,
                         seed: int) -> None:
    """A pink-noise texture panning at 40 px/s with a moving square; new texture every 5 s."""
    rng = np.random.default_rng(seed)
    rate = Fraction(fps).limit_denominator(1001)
    pad = int(40 * 5) + 8
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=rate,
                                      options={"preset": "ultrafast", "crf": "20", "threads": "1"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        texture = None
        for i in range(int(round(seconds * fps))):
            t = i / fps
            if i % int(5 * fps) == 0:
                texture = _pink_texture(height, width + pad, rng)
            x0 = int(40 * (t % 5))
            frame = np.ascontiguousarray(texture[:, x0:x0 + width])
            side = height // 8
            y = int((height - side) * (0.5 + 0.4 * np.sin(t)))
            x = int((width - side) * (0.5 + 0.4 * np.cos(0.7 * t)))
            frame[y:y + side, x:x + side] = (240, 240, 240)
            vf = av.VideoFrame.from_ndarray(frame, "rgb24")
            vf.pts = i
            vf.time_base = 1 / rate
            container.mux(stream.encode(vf))
        container.mux(stream.encode(None))


def make_clips(root: str, specs: Sequence[tuple[int, float]], content: str,
               fps: float) -> list[Clip]:
    clips = []
    for k, (height, seconds) in enumerate(specs):
        path = os.path.join(root, f"{content}_{height}p_{seconds:g}s_{k}.mp4")
        width = SIZES[height]
        if content == "synthetic":
            synthetic.write_video(path, width=width, height=height, seconds=seconds, fps=fps,
                                  seed=100 + k, scene_cuts=[5.0 * j for j in range(1, 40)])
        else:
            write_textured_video(path, width=width, height=height, seconds=seconds, fps=fps,
                                 seed=100 + k)
        clips.append(Clip(path, height, seconds))
    return clips


def run_in_process(mode: str, clips: Sequence[Clip], resize: str, warmup: str) -> Result:
    client = IOClient(backend=PyAVBackend(threads=1, resize=resize), plan_cache_size=0)
    client.decode(warmup)
    frames = rgb = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for clip in clips:
        media = client.decode(clip.path)
        frames += len(media.frames)
        rgb += sum(f.nbytes for f in media.frames)
    return Result(mode, time.perf_counter() - t0, len(clips), frames, rgb,
                  time.process_time() - c0)


def run_server(mode: str, clips: Sequence[Clip], server: ServerProcess, resize: str,
               pixel_format: str) -> Result:
    client = IOClient([server.address], resize=resize, pixel_format=pixel_format,
                      deadline_s=600)
    before = client.stats()[server.address]

    def one(clip: Clip) -> tuple[int, int]:
        media = client.decode(clip.path)
        return len(media.frames), sum(f.nbytes for f in media.frames)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        out = list(pool.map(one, sorted(clips, key=lambda c: -c.height * c.seconds)))
    seconds = time.perf_counter() - t0
    after = client.stats()[server.address]
    client.close()
    return Result(mode, seconds, len(clips), sum(o[0] for o in out), sum(o[1] for o in out),
                  after.worker_cpu_seconds - before.worker_cpu_seconds,
                  after.raw_bytes_out - before.raw_bytes_out,
                  after.wire_bytes_out - before.wire_bytes_out)


def pixel_difference(clips: Sequence[Clip]) -> tuple[int, float, int]:
    """(max |diff|, mean |diff|, frames) of the fast path's frames from the exact path's, the
    same sampled frames (the exact plan) for both."""
    exact, fast = PyAVBackend(threads=1), PyAVBackend(threads=1, resize="fast")
    worst, total, count, frames = 0, 0.0, 0, 0
    for clip in clips:
        plan = exact.probe(clip.path)
        a = exact.decode(clip.path, plan=plan).frames
        b = fast.decode(clip.path, plan=plan).frames
        for x, y in zip(a, b, strict=True):
            d = np.abs(x.astype(np.int16) - y.astype(np.int16))
            worst = max(worst, int(d.max()))
            total += float(d.sum())
            count += d.size
            frames += 1
    return worst, total / count, frames


def resize_cost(clips: Sequence[Clip], frames_per_clip: int = 8) -> dict[int, tuple[float, float]]:
    """Per source height: (exact ms, fast ms) to turn one decoded frame into its planned slow
    frame (decoding excluded), best of 3 passes over a few frames of each clip."""
    from io_server import resize

    out: dict[int, tuple[float, float]] = {}
    for clip in {c.height: c for c in clips}.values():
        plan = PyAVBackend(threads=1).probe(clip.path)
        size = (plan.heights[0], plan.widths[0])
        with av.open(clip.path) as container:
            frames = [f for _, f in zip(range(frames_per_clip), container.decode(video=0),
                                        strict=False)]
        best = []
        for mode in ("exact", "fast"):
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                for f in frames:
                    resize.video_frame(f, size, mode, threads=1)
                times.append((time.perf_counter() - t0) / len(frames) * 1e3)
            best.append(min(times))
        out[clip.height] = (best[0], best[1])
    return out


def _best(results: Sequence[Result]) -> Result:
    best = min(results, key=lambda r: r.seconds)
    return Result(best.mode, best.seconds, best.samples, best.frames, best.rgb_bytes,
                  min(r.cpu_s for r in results), best.raw_wire_bytes, best.wire_bytes)


def print_table(results: Sequence[Result], base: Result) -> None:
    head = (f"{'mode (1 decoding core)':<26}{'frames/s':>10}{'x in-proc exact':>17}"
            f"{'cpu-ms/frame':>14}{'KB/frame wire':>15}{'KB/frame pre-zstd':>19}")
    print(head)
    print("-" * len(head))
    for r in results:
        wire = f"{r.wire_bytes / r.frames / 1e3:15.1f}" if r.wire_bytes is not None else \
            f"{'-':>15}"
        raw = f"{r.raw_wire_bytes / r.frames / 1e3:19.1f}" if r.raw_wire_bytes is not None \
            else f"{r.rgb_bytes / r.frames / 1e3:>15.1f} (RGB)"
        print(f"{r.mode:<26}{r.fps:>10.1f}{r.fps / base.fps:>17.2f}"
              f"{r.cpu_ms_per_frame:>14.2f}{wire}{raw}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="eight 8 s clips (~1-2 min)")
    p.add_argument("--content", choices=["synthetic", "textured"], default="synthetic")
    p.add_argument("--fps", type=float, default=24.0, help="frame rate of the clips")
    p.add_argument("--rounds", type=int, default=None,
                   help="repetitions of every mode (default 2 with --quick, else 3)")
    p.add_argument("--dir", default=None, help="where to write clips (default: a temp dir)")
    args = p.parse_args(argv)
    import torch

    # One decoding core: the in-process exact path resizes with torch in this process, so it gets
    # one intra-op thread, as the server's workers do (`init_worker`).
    torch.set_num_threads(1)
    rounds = args.rounds or (2 if args.quick else 3)
    root = args.dir or tempfile.mkdtemp(prefix="bench-io-")
    os.makedirs(root, exist_ok=True)
    specs = QUICK_CLIPS if args.quick else FULL_CLIPS
    t = time.perf_counter()
    clips = make_clips(root, specs, args.content, args.fps)
    print(f"{len(clips)} {args.content} H.264 clips at {args.fps:g} fps "
          f"({', '.join(f'{c.height}p {c.seconds:g}s' for c in clips)}) written in "
          f"{time.perf_counter() - t:.0f} s; {os.cpu_count()} CPU cores on this host", flush=True)
    os.makedirs(os.path.join(root, "warmup"), exist_ok=True)
    warmup = synthetic.write_video(os.path.join(root, "warmup", "warmup.mp4"), width=1280,
                                   height=720, seconds=2, fps=args.fps, seed=99).path
    server = start_server([root], workers=1, args=["--plan-cache-size", "0"])
    runs = [("server exact (RGB)", "exact", "rgb24"), ("server fast (RGB)", "fast", "rgb24"),
            ("server fast (YUV 4:2:0)", "fast", "yuv420p")]
    by_mode: dict[str, list[Result]] = {}
    try:
        with IOClient([server.address]) as client:  # a long-running daemon is warm
            client.decode_many([DecodeItem(warmup)] * 2)
        for k in range(rounds):
            for mode, resize in (("in-process exact", "exact"), ("in-process fast", "fast")):
                by_mode.setdefault(mode, []).append(run_in_process(mode, clips, resize, warmup))
            for mode, resize, pixel_format in runs:
                by_mode.setdefault(mode, []).append(
                    run_server(mode, clips, server, resize, pixel_format))
            print(f"  round {k + 1}/{rounds}: " + ", ".join(
                f"{m} {rs[-1].seconds:.1f} s" for m, rs in by_mode.items()), flush=True)
    finally:
        server.terminate()
        server.cleanup()
    results = {m: _best(rs) for m, rs in by_mode.items()}
    print()
    base = results["in-process exact"]
    print_table(list(results.values()), base)
    worst, mean, n = pixel_difference(clips)
    ie, if_ = results["in-process exact"], results["in-process fast"]
    se, sf, sy = (results["server exact (RGB)"], results["server fast (RGB)"],
                  results["server fast (YUV 4:2:0)"])
    assert sf.raw_wire_bytes and sy.raw_wire_bytes and sf.wire_bytes and sy.wire_bytes
    print(f"\nfast / exact, frames/s per core: in-process {if_.fps / ie.fps:.2f}x, "
          f"server {sf.fps / se.fps:.2f}x; CPU per frame {ie.cpu_ms_per_frame:.2f} ms exact vs "
          f"{if_.cpu_ms_per_frame:.2f} ms fast ({ie.cpu_ms_per_frame / if_.cpu_ms_per_frame:.2f}x)")
    print(f"server / in-process, frames/s per core: exact {se.fps / ie.fps:.2f}x, fast "
          f"{sf.fps / if_.fps:.2f}x")
    print(f"YUV / RGB bytes per frame: before zstd {sy.raw_wire_bytes / sf.raw_wire_bytes:.3f} "
          f"(goal <= 0.5), after zstd {sy.wire_bytes / sf.wire_bytes:.3f}; zstd / raw RGB "
          f"{sf.wire_bytes / sf.raw_wire_bytes:.3f}; YUV frames/s {sy.fps / sf.fps:.2f}x RGB")
    print(f"fast path pixels vs exact over {n} frames: max |diff| {worst} levels, mean "
          f"{mean:.2f} levels")
    for height, (exact_ms, fast_ms) in sorted(resize_cost(clips).items()):
        print(f"resize only, {height}p source -> its slow-frame size: exact {exact_ms:.2f} ms, "
              f"fast {fast_ms:.2f} ms per frame ({exact_ms / fast_ms:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
