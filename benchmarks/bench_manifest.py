"""The columnar manifest against the JSONL manifest, side by side: open time, RSS, gather time,
conversion and indexing throughput.

Run::

    python benchmarks/bench_manifest.py            # columnar at 10^6 and 10^7, JSONL at 10^6
    python benchmarks/bench_manifest.py --quick    # columnar at 10^5 and 10^6, JSONL at 2*10^4

**How the records are generated.** Straight into columns, chunk by chunk with numpy (no Python
object per record), and appended with `ColumnarWriter.add_columns`, which checks every chunk like
any other (`check_chunk`). Keye-like sizes: 20% videos (frames: lognormal around 24, 2% long
videos of 600-1,365 frames; slow frames up to 768 tokens, fast frames ~30% of that, 2 fps
timestamps), 50% images (4 to ~20,000 tokens), 30% plain text (lognormal around 200 bytes);
captions lognormal around 60 bytes. The planning columns are computed with the prompt format's
arithmetic for `ByteTokenizer`, and checked against `dataloader.sequence.sample_sizes` on 2,000
random rows of every generated manifest (the benchmark stops on any difference).

**What is measured.** Open time and RSS (anonymous and file-backed, from /proc) in a fresh process
per manifest. Gathering the planning layout of a 16K-sample global batch of random rows, both as
flat arrays (`planning_columns`) and as the loader's `SampleSizes` objects (`planning_sizes`),
first with the files dropped from the page cache (``posix_fadvise(DONTNEED)``, "cold") then
warm. The JSONL baseline: `load_manifest` (parse + validate into Python objects), its content hash
and `planning_sizes` (which runs `sample_sizes` per sample), side by side with the columnar folder
converted from the same JSONL (same records, same hash, checked). Conversion: the first records of
the generated manifest exported to JSONL, and that JSONL converted back (``python -m dataloader
convert``, one process). Indexing: real tiny media probed by 2 worker processes into the columnar
format, against the in-memory `index_items` + `write_jsonl` path. Generated files are deleted at
the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dataloader.columnar import _ranges
from dataloader.columnar_writer import ColumnarWriter
from dataloader.index import PROMPTS

BATCH = 16384
CHUNK = 1 << 18
VIDEO, IMAGE, TEXT = 0, 1, 2
_KIND_CODE = {VIDEO: 1, IMAGE: 0}  # index into dataloader.manifest.KINDS
_POOL = np.frombuffer(np.random.default_rng(0).choice(
    np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ,.", dtype=np.uint8), 1 << 20).tobytes(),
    dtype=np.uint8)
_PROMPT_POOL = np.frombuffer((PROMPTS["video"] + PROMPTS["image"]).encode(), dtype=np.uint8)


def _digits(values: np.ndarray, width: int) -> np.ndarray:
    """uint8 ``[n, width]`` ASCII digits of non-negative ints, zero-padded."""
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((values[:, None] // powers) % 10 + 48).astype(np.uint8)


def _fixed_strings(prefix: np.ndarray, body: np.ndarray, suffix: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and bytes of ``prefix[i] + body[i] + suffix[i]`` (uint8 rows of fixed widths)."""
    rows = np.concatenate([prefix, body, suffix], axis=1)
    offsets = np.arange(rows.shape[0] + 1, dtype=np.uint64) * np.uint64(rows.shape[1])
    return offsets, rows.reshape(-1)


def _segment_cumsum(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Cumulative sums restarting at each segment of ``counts`` entries."""
    total = np.cumsum(values)
    starts = np.cumsum(counts) - counts
    before = np.repeat(np.where(starts > 0, total[np.maximum(starts - 1, 0)], 0), counts)
    return total - before


def generate_chunk(rng: np.random.Generator, start: int, n: int) -> dict[str, np.ndarray]:
    """``n`` Keye-like records as columns with local offsets (module docstring)."""
    kind = rng.choice(3, n, p=[0.2, 0.5, 0.3])
    c: dict[str, np.ndarray] = {}
    # ids "s0000000042"
    c["id.offsets"], c["id.bytes"] = _fixed_strings(
        np.full((n, 1), ord("s"), np.uint8), _digits(np.arange(start, start + n), 10),
        np.zeros((n, 0), np.uint8))
    c["dataset"] = kind.astype("<u4")  # names: video, image, text
    # turns: text -> [text]; media -> [user prompt, assistant caption]
    has_media = kind != TEXT
    nturns = np.where(has_media, 2, 1)
    c["turn.offsets"] = np.concatenate([[0], np.cumsum(nturns)]).astype("<u8")
    t_total = int(nturns.sum())
    first = np.cumsum(nturns) - nturns  # index of each record's first turn
    roles = np.full(t_total, 3, np.uint8)  # "text"
    roles[first[has_media]] = 1  # user
    roles[first[has_media] + 1] = 2  # assistant
    c["turn.role"] = roles
    text_len = np.clip(rng.lognormal(np.log(200), 0.8, n), 20, 4000).astype(np.int64)
    caption = np.clip(rng.lognormal(np.log(60), 0.5, n), 5, 600).astype(np.int64)
    prompt = np.where(kind == VIDEO, 0, len(PROMPTS["video"]))
    lengths = np.zeros(t_total, np.int64)
    source = np.zeros(t_total, np.int64)
    lengths[first[~has_media]] = text_len[~has_media]
    lengths[first[has_media]] = len(PROMPTS["image"])
    lengths[first[has_media] + 1] = caption[has_media]
    pool_start = rng.integers(0, _POOL.size - 4000, t_total)
    source[:] = pool_start + _PROMPT_POOL.size
    source[first[has_media]] = prompt[has_media]
    pool = np.concatenate([_PROMPT_POOL, _POOL])
    c["turn.text.offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype("<u8")
    c["turn.text.bytes"] = pool[_ranges(source, lengths)]
    # media: one per video / image record
    nmedia = has_media.astype(np.int64)
    c["media.offsets"] = np.concatenate([[0], np.cumsum(nmedia)]).astype("<u8")
    mk = kind[has_media]
    m = mk.size
    c["media.kind"] = np.where(mk == VIDEO, _KIND_CODE[VIDEO], _KIND_CODE[IMAGE]).astype("u1")
    video_prefix = np.frombuffer(b"video/", np.uint8)
    image_prefix = np.frombuffer(b"image/", np.uint8)
    prefix = np.where((mk == VIDEO)[:, None], video_prefix, image_prefix)
    suffix = np.where((mk == VIDEO)[:, None], np.frombuffer(b".mp4", np.uint8),
                      np.frombuffer(b".jpg", np.uint8))
    c["media.path.offsets"], c["media.path.bytes"] = _fixed_strings(
        prefix, _digits(np.arange(start, start + n)[has_media], 10), suffix)
    # frames
    frames = np.ones(m, np.int64)
    vid = mk == VIDEO
    nv = int(vid.sum())
    counts = np.clip(rng.lognormal(np.log(24), 0.8, nv), 2, 1365).astype(np.int64)
    long = rng.random(nv) < 0.02
    counts[long] = rng.integers(600, 1366, int(long.sum()))
    frames[vid] = counts
    c["media.frame_offsets"] = np.concatenate([[0], np.cumsum(frames)]).astype("<u8")
    # slow size per media: videos <= 768 tokens, images 4..~20K tokens
    h = np.where(vid, rng.integers(6, 28, m), rng.integers(2, 144, m))
    wmax = np.where(vid, np.minimum(28, 768 // h), np.minimum(143, 20480 // h))
    w = rng.integers(1, wmax + 1)
    w = np.maximum(w, 2)
    w = np.minimum(w, wmax)
    f_total = int(frames.sum())
    index_in_media = np.arange(f_total) - np.repeat(np.cumsum(frames) - frames, frames)
    fast = (rng.random(f_total) < 0.3) & (index_in_media > 0) & np.repeat(vid, frames)
    hf = np.repeat(h, frames)
    wf = np.repeat(w, frames)
    small_h = np.maximum(1, (hf * 0.55).astype(np.int64))
    small_w = np.maximum(1, (wf * 0.55).astype(np.int64))
    c["frame.height"] = np.where(fast, small_h, hf).astype("<u2")
    c["frame.width"] = np.where(fast, small_w, wf).astype("<u2")
    c["frame.fast"] = fast.astype("u1")
    video_frame = np.repeat(vid, frames)
    times = np.where(video_frame, index_in_media * 0.5, 0.0)
    c["frame.time"] = times.astype("<f8")
    # planning layout (ByteTokenizer): see dataloader.sequence for the prompt format
    tokens = c["frame.height"].astype(np.int64) * c["frame.width"]
    header_user = 1 + len("user\n")
    header_asst = 1 + len("assistant\n")
    first_pad = header_user + 1  # <|im_start|>user\n <|vision_start|>
    stamp = np.where(index_in_media // 2 >= 100, 3, np.where(index_in_media // 2 >= 10, 2, 1)) \
        + 2  # len("%.1f" % (f * 0.5))
    stamp = np.where(index_in_media // 2 >= 1000, 6, stamp)
    fast_i = fast.astype(np.int64)
    pre = np.where(video_frame, 1 + stamp + fast_i, 0)
    step = pre + tokens + np.where(video_frame, fast_i, 0)
    ends = _segment_cumsum(step, frames)
    position = first_pad + ends - step + pre
    visual = np.add.reduceat(step, np.cumsum(frames) - frames) if m else np.zeros(0, np.int64)
    media_seq = (first_pad + visual + 1 + len(PROMPTS["image"]) + 1 + 1 + header_asst
                 + caption[has_media] + 1 + 1)
    seq = np.where(has_media, 0, text_len + 1)
    seq[has_media] = media_seq
    loss = np.where(has_media, caption + 1, text_len)
    c["plan.seq_len"] = seq.astype("<i4")
    c["plan.loss"] = loss.astype("<i4")
    c["frame.position"] = position.astype("<i4")
    return c


def generate(out: Path, n: int, seed: int = 0) -> tuple[float, str]:
    """Writes ``n`` generated records to ``out``; (seconds, hash)."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    with ColumnarWriter(out) as w:
        for s in range(0, n, CHUNK):
            w.add_columns(generate_chunk(rng, s, min(CHUNK, n - s)), ["video", "image", "text"])
        result = w.close()
    return time.perf_counter() - t0, result.hash


def check_against_reference(path: Path, rows: int = 2000) -> None:
    """Generated planning columns == `sample_sizes` of the stored records (random rows)."""
    from dataloader.manifest import open_manifest
    from dataloader.sequence import ByteTokenizer, sample_sizes

    m = open_manifest(path)
    tok = ByteTokenizer()
    pick = np.random.default_rng(1).integers(0, len(m), rows)
    got = m.planning_sizes(pick, pick.tolist(), tok)
    want = [sample_sizes(m.record(r), r, tok) for r in pick.tolist()]
    if got != want:
        bad = next(i for i in range(rows) if got[i] != want[i])
        raise SystemExit(f"generated layout of row {pick[bad]} differs from sample_sizes: "
                         f"{got[bad]} vs {want[bad]}")


# --- measurements in a fresh process -------------------------------------------------------------
def _rss() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "VmRSS:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) / 1024
    return out


def _drop_cache(folder: str) -> None:
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(kind: str, path: str, repeats: int = 5) -> dict[str, float]:
    """Runs in a fresh process: open (or load) ``path``, then gather 16K random rows."""
    import dataloader.columnar  # noqa: F401 - imports are not part of the figures
    from dataloader.manifest import load_manifest, open_manifest
    from dataloader.sequence import ByteTokenizer

    tok = ByteTokenizer()
    out: dict[str, float] = {}
    if kind == "columnar":
        _drop_cache(path)
    before = _rss()
    t0 = time.perf_counter()
    m = open_manifest(path) if kind == "columnar" else load_manifest(path)
    out["open_s"] = time.perf_counter() - t0
    after = _rss()
    out["rss_anon_mb"] = after["RssAnon"] - before["RssAnon"]
    out["rss_file_mb"] = after["RssFile"] - before["RssFile"]
    t0 = time.perf_counter()
    digest = m.hash
    out["hash_s"] = time.perf_counter() - t0
    out["hash"] = digest  # type: ignore[assignment]
    rng = np.random.default_rng(2)
    ids = list(range(BATCH))
    times_sizes, times_cols = [], []
    for r in range(repeats):
        rows = rng.integers(0, len(m), BATCH)
        if kind == "columnar":
            t0 = time.perf_counter()
            m.planning_columns(rows)
            times_cols.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        m.planning_sizes(rows, ids, tok)
        times_sizes.append(time.perf_counter() - t0)
        if r == 0 and kind == "columnar":
            out["gather_cols_cold_s"] = times_cols[0]
            out["gather_sizes_after_cold_s"] = times_sizes[0]
    out["gather_sizes_s"] = float(np.median(times_sizes[1:] or times_sizes))
    if times_cols:
        out["gather_cols_s"] = float(np.median(times_cols[1:]))
    end = _rss()
    out["rss_anon_after_gathers_mb"] = end["RssAnon"] - before["RssAnon"]
    out["rss_file_after_gathers_mb"] = end["RssFile"] - before["RssFile"]
    return out


def measure_in_subprocess(kind: str, path: Path) -> dict[str, float]:
    proc = subprocess.run([sys.executable, __file__, "--measure", kind, str(path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"measuring {path} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- conversion and indexing ---------------------------------------------------------------------
def _size_mb(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.iterdir()) / 2**20


def convert_figures(columnar: Path, work: Path, n: int) -> dict[str, float]:
    """The first ``n`` records exported to JSONL (the columnar -> JSONL direction), then
    ``python -m dataloader convert`` of that JSONL back to a columnar folder."""
    from dataloader.__main__ import main
    from dataloader.columnar import ColumnarManifest
    from dataloader.manifest import write_jsonl

    jsonl = work / f"m{n}.jsonl"
    m = ColumnarManifest.open(columnar)
    t0 = time.perf_counter()
    write_jsonl((m.stored_record(r) for r in range(n)), jsonl)
    export_s = time.perf_counter() - t0
    back = work / f"back{n}"
    t0 = time.perf_counter()
    assert main(["convert", str(jsonl), "--out", str(back), "--no-progress"]) == 0
    convert_s = time.perf_counter() - t0
    return {"export_s": export_s, "convert_s": convert_s, "jsonl_mb": _size_mb(jsonl),
            "columnar_mb": _size_mb(back), "jsonl": str(jsonl), "back": str(back)}


def index_figures(work: Path, images: int, videos: int, rounds: int) -> dict[str, float]:
    """Index the same real files with ours and the baseline, alternately, best of ``rounds``."""
    from dataloader.index import collect_items, index_items, index_manifest
    from dataloader.manifest import write_jsonl
    from io_server.synthetic import write_image, write_video

    folder = work / "media"
    folder.mkdir()
    for i in range(videos):
        write_video(folder / f"clip{i}.mp4", width=112, height=84, seconds=2.0, fps=8, seed=i)
    for i in range(images):
        write_image(folder / f"img{i}.png", 56 + 28 * (i % 5), 84, seed=i)
    ours, base = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        result = index_manifest(folder, work / "indexed", workers=2, progress=False)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        records, bad = index_items(collect_items(folder), workers=2, progress=False)
        write_jsonl(records, work / "indexed.jsonl")
        base.append(time.perf_counter() - t0)
        assert result.records == len(records) == images + videos and not bad
    return {"files": images + videos, "ours_s": min(ours), "baseline_s": min(base)}


# --- main ----------------------------------------------------------------------------------------
def _row(name: str, ours: str, base: str, ratio: str, target: str = "") -> None:
    print(f"{name:<44} {ours:>16} {base:>16} {ratio:>10}  {target}")


def _report(small: int, large: int, jsonl_n: int, gen: dict, col: dict, back: dict, js: dict,
            conv: dict, idx: dict) -> None:
    def total(m: dict, after: bool = False) -> float:
        if after:
            return m["rss_anon_after_gathers_mb"] + m["rss_file_after_gathers_mb"]
        return m["rss_anon_mb"] + m["rss_file_mb"]

    # ``back`` holds the same records as the JSONL (converted from it): the side-by-side rows.
    rows = [(jsonl_n, back, True)] + [(n, col[n], False) for n in (small, large) if n != jsonl_n]
    _row("", "columnar", f"JSONL {jsonl_n:.0e}", "ratio", "target")
    for n, c, side in rows:
        _row(f"open, N={n:.0e} (cold cache)", f"{c['open_s'] * 1e3:.1f} ms",
             f"{js['open_s']:.1f} s" if side else "",
             f"{js['open_s'] / c['open_s']:.0f}x" if side else "", "< 1 s")
    for n, c, side in rows:
        _row(f"RSS added by opening, N={n:.0e}", f"{total(c):.1f} MB",
             f"{total(js):.0f} MB" if side else "",
             f"{total(js) / max(total(c), 0.1):.0f}x" if side else "", "< 200 MB, flat in N")
    for n, c, side in rows:
        _row(f"  RSS after 5 gathers (anon+file), N={n:.0e}",
             f"{c['rss_anon_after_gathers_mb']:.0f}+{c['rss_file_after_gathers_mb']:.0f} MB",
             f"{total(js, True):.0f} MB" if side else "", "")
    for n, c, side in rows:
        _row(f"16K-row planning arrays, N={n:.0e}, cold", f"{c['gather_cols_cold_s'] * 1e3:.1f} ms",
             "", "", "< 50 ms")
        _row(f"16K-row planning arrays, N={n:.0e}, warm", f"{c['gather_cols_s'] * 1e3:.1f} ms",
             f"{js['gather_sizes_s'] * 1e3:.0f} ms" if side else "",
             f"{js['gather_sizes_s'] / c['gather_cols_s']:.0f}x" if side else "", "< 50 ms")
        _row(f"16K SampleSizes objects, N={n:.0e}, warm", f"{c['gather_sizes_s'] * 1e3:.1f} ms",
             f"{js['gather_sizes_s'] * 1e3:.0f} ms" if side else "",
             f"{js['gather_sizes_s'] / c['gather_sizes_s']:.1f}x" if side else "", "< 50 ms")
    _row(f"content hash, N={jsonl_n:.0e}", "stored (0 s)", f"{js['hash_s']:.2f} s", "")
    _row(f"generate + write (bulk columns), N={large:.0e}",
         f"{large / gen[large][0] / 1e3:.0f}K rec/s", "", "")
    _row(f"convert JSONL -> columnar, N={jsonl_n:.0e}",
         f"{jsonl_n / conv['convert_s'] / 1e3:.1f}K rec/s",
         f"{jsonl_n / js['open_s'] / 1e3:.1f}K rec/s",
         f"{js['open_s'] / conv['convert_s']:.2f}x", "baseline: load_manifest of the same JSONL")
    _row(f"export columnar -> JSONL, N={jsonl_n:.0e}",
         f"{jsonl_n / conv['export_s'] / 1e3:.1f}K rec/s", "", "")
    _row(f"disk, N={jsonl_n:.0e}", f"{conv['columnar_mb']:.0f} MB", f"{conv['jsonl_mb']:.0f} MB",
         f"{conv['jsonl_mb'] / conv['columnar_mb']:.1f}x")
    _row(f"index {idx['files']} real files, 2 workers",
         f"{idx['files'] / idx['ours_s']:.0f} files/s",
         f"{idx['files'] / idx['baseline_s']:.0f} files/s",
         f"{idx['baseline_s'] / idx['ours_s']:.2f}x", "baseline: index_items + write_jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="columnar at 10^5 and 10^6, JSONL at 2*10^4")
    parser.add_argument("--measure", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp folder)")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    small, large = (10**5, 10**6) if args.quick else (10**6, 10**7)
    jsonl_n = 2 * 10**4 if args.quick else small
    work = Path(tempfile.mkdtemp(prefix="bench_manifest_", dir=args.work))
    print(f"scratch: {work} ({shutil.disk_usage(work).free / 2**30:.0f} GiB free)")
    try:
        gen = {}
        for n in (small, large):
            seconds, digest = generate(work / f"col{n}", n)
            check_against_reference(work / f"col{n}", 500 if args.quick else 2000)
            gen[n] = (seconds, digest)
            print(f"generated {n:.0e} records in {seconds:.1f}s ({n / seconds / 1e3:.0f}K "
                  f"rec/s), {_size_mb(work / f'col{n}'):.0f} MB, layouts checked against "
                  f"sample_sizes; disk free {shutil.disk_usage(work).free / 2**30:.0f} GiB")
        col = {n: measure_in_subprocess("columnar", work / f"col{n}") for n in (small, large)}
        conv = convert_figures(work / f"col{small}", work, jsonl_n)
        back = measure_in_subprocess("columnar", Path(conv["back"]))
        js = measure_in_subprocess("jsonl", Path(conv["jsonl"]))
        assert back["hash"] == js["hash"], "the JSONL and its conversion hash differently"
        if jsonl_n == small:
            assert back["hash"] == gen[small][1], "the round trip changed the hash"
        idx = index_figures(work, *((100, 4, 1) if args.quick else (300, 8, 2)))
        print()
        _report(small, large, jsonl_n, gen, col, back, js, conv, idx)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        print(f"removed {work}")


if __name__ == "__main__":
    main()
