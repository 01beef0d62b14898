"""Command line of the dataloader package: build, convert, check and describe manifests.

Index a folder of media (or a list file) straight into a columnar manifest folder, probing files
in parallel (a JSONL ``--out`` writes JSONL, for small sets)::

    python -m dataloader index /data/clips --out /data/manifest --workers 8
    python -m dataloader index list.txt --out manifest.jsonl --servers host1:50051,host2:50051

Convert JSONL to the columnar format, or back (both stream)::

    python -m dataloader convert manifest.jsonl --out /data/manifest
    python -m dataloader convert /data/manifest --out manifest.jsonl

Check every checksum of a columnar manifest, or print what a manifest holds::

    python -m dataloader verify /data/manifest
    python -m dataloader info /data/manifest

``index`` leaves out what it cannot use (unreadable or invalid files, a caption that is not UTF-8, a
probing process that died twice) and writes each, with the reason, to ``--report`` (default
``<out>.bad.jsonl``); the exit status is 1 when the source had items but none could be indexed
(an empty source writes an empty manifest), else 0 unless the command itself fails.
Media paths are stored relative to ``--media-root`` (default: the manifest's folder). Limits
(``--max-frames`` ...) default to Keye-VL-1.5's (`dataloader.validate.Limits`).
Tiny CPU example: ``python -m examples.keye_vl.make_data --out /tmp/d`` writes media and a list
file, then ``python -m dataloader index /tmp/d/list.jsonl --out /tmp/m --workers 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from dataloader.validate import DEFAULT_LIMITS, Limits, ManifestError


def _tokenizer(spec: str) -> Any:
    from dataloader.sequence import ByteTokenizer, HFTokenizer

    if spec == "bytes":
        return ByteTokenizer()
    if spec.startswith("hf:"):
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise ImportError("--tokenizer hf:NAME needs transformers (pip install "
                              "transformers)") from exc
        name = spec[3:]
        return HFTokenizer(AutoTokenizer.from_pretrained(name), name=name)
    raise ValueError(f"--tokenizer must be 'bytes' or 'hf:<name or path>', got {spec!r}")


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(max_frames=args.max_frames, max_video_frame_tokens=args.max_video_frame_tokens,
                  max_image_tokens=args.max_image_tokens, max_media=args.max_media,
                  max_seq_len=args.max_seq_len)


def _is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".json")) and os.path.basename(path) != "manifest.json"


def _index(args: argparse.Namespace) -> int:
    from dataloader.index import index_manifest

    result = index_manifest(
        args.source, args.out, workers=args.workers,
        servers=tuple(s for s in args.servers.split(",") if s), preset=args.preset,
        dataset=args.dataset, report=args.report, media_root=args.media_root,
        tokenizer=_tokenizer(args.tokenizer), limits=_limits(args), progress=not args.no_progress)
    print(result.summary())
    return 0 if result.records or not result.items else 1


def _convert(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dataloader.columnar import ColumnarManifest
    from dataloader.columnar_writer import ColumnarWriter
    from dataloader.manifest import is_columnar, iter_jsonl, read_parquet, write_jsonl

    t0 = time.perf_counter()
    src, out = args.source, os.path.abspath(args.out)
    if is_columnar(src):
        if not _is_jsonl(out):
            raise ValueError(f"--out {args.out!r}: a columnar manifest converts to JSONL (.jsonl)")
        m = ColumnarManifest.open(src if os.path.isdir(src) else os.path.dirname(src))
        n = write_jsonl(tqdm(m.iter_records(), total=len(m), unit="rec", desc="converting",
                             disable=args.no_progress), out)
        if os.path.dirname(out) != m.media_root:
            print(f"note: relative media paths resolve against {m.media_root}; open the JSONL "
                  f"with media_root={m.media_root!r}", file=sys.stderr)
        print(f"converted {n} records in {time.perf_counter() - t0:.1f}s -> {out} "
              f"(hash {m.hash})")
        return 0
    media_root = os.path.abspath(args.media_root) if args.media_root else \
        os.path.dirname(os.path.abspath(src))
    limits = _limits(args)
    if src.endswith((".parquet", ".pq")):
        rows: Any = ((None, r) for r in read_parquet(src, limits))
    else:
        rows = iter_jsonl(src, limits)
    with ColumnarWriter(out, tokenizer=_tokenizer(args.tokenizer), limits=limits,
                        media_root=media_root, source=src) as w:
        for line, record in tqdm(rows, unit="rec", desc="converting", disable=args.no_progress):
            w.add(record, line)
        result = w.close()
    print(f"converted {result.records} records in {time.perf_counter() - t0:.1f}s -> "
          f"{result.path} (hash {result.hash}; datasets {result.datasets})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from dataloader.columnar import ColumnarManifest

    m = ColumnarManifest.open(args.manifest)
    m.verify(progress=not args.no_progress)
    print(f"{m.folder}: {len(m)} records, every checksum matches (hash {m.hash})")
    return 0


def _info(args: argparse.Namespace) -> int:
    from dataloader.manifest import open_manifest

    m = open_manifest(args.manifest)
    info = {"records": len(m), "hash": m.hash, "datasets": m.datasets,
            "tokenizer": getattr(m, "tokenizer_name", None),
            "media_root": getattr(m, "media_root", None) or getattr(m, "base", None)}
    print(json.dumps(info, indent=1))
    return 0


def _add_limits(p: argparse.ArgumentParser) -> None:
    d = DEFAULT_LIMITS
    p.add_argument("--max-frames", type=int, default=d.max_frames)
    p.add_argument("--max-video-frame-tokens", type=int, default=d.max_video_frame_tokens)
    p.add_argument("--max-image-tokens", type=int, default=d.max_image_tokens)
    p.add_argument("--max-media", type=int, default=d.max_media)
    p.add_argument("--max-seq-len", type=int, default=d.max_seq_len)
    p.add_argument("--tokenizer", default="bytes",
                   help="tokenizer of the precomputed layouts: bytes (default) or hf:<name>")
    p.add_argument("--no-progress", action="store_true")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataloader")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("index", help="probe media and write a manifest")
    p.add_argument("source", help="a folder of media files, or a list file")
    p.add_argument("--out", required=True,
                   help="manifest folder (columnar), or a .jsonl file for small sets")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--servers", default="", help="comma-separated I/O server addresses; "
                   "default: probe in local worker processes")
    p.add_argument("--preset", default=None, help="Keye preset name (release or paper)")
    p.add_argument("--dataset", default=None, help="dataset name (default: the media kind)")
    p.add_argument("--report", default=None, help="unreadable files (default <out>.bad.jsonl)")
    p.add_argument("--media-root", default=None,
                   help="store media paths relative to this folder (default: the manifest's)")
    _add_limits(p)
    p = sub.add_parser("convert", help="JSONL -> columnar folder, or columnar -> JSONL")
    p.add_argument("source", help="a .jsonl (or .parquet) file, or a columnar folder")
    p.add_argument("--out", required=True)
    p.add_argument("--media-root", default=None, help="the folder the source's relative media "
                   "paths are relative to (default: the source's folder)")
    _add_limits(p)
    p = sub.add_parser("verify", help="recompute every checksum of a columnar manifest")
    p.add_argument("manifest")
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("info", help="records, hash and datasets of a manifest")
    p.add_argument("manifest")
    args = parser.parse_args(argv)
    try:
        return {"index": _index, "convert": _convert, "verify": _verify,
                "info": _info}[args.command](args)
    except (ManifestError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
