"""Command line of the dataloader package.

Build a manifest from a folder of media (or a list file), probing files in parallel::

    python -m dataloader index /data/clips --out manifest.jsonl --workers 8
    python -m dataloader index list.txt --out manifest.parquet --servers host1:50051,host2:50051

Files that cannot be probed are left out and written, with the reason, to ``--report``
(default ``<out>.bad.jsonl``); the exit status is 0 unless the command itself fails.
Tiny CPU example: ``python -m dataloader index tests/data --out /tmp/m.jsonl --workers 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from dataloader.index import collect_items, index_items
from dataloader.manifest import Manifest, write_records


def _index(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    items = collect_items(args.source, dataset=args.dataset)
    servers = tuple(s for s in (args.servers or "").split(",") if s)
    records, bad = index_items(items, workers=args.workers, servers=servers, preset=args.preset,
                               progress=not args.no_progress)
    report = args.report or f"{args.out}.bad.jsonl"
    if records:
        write_records(records, args.out)
    tmp = f"{report}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for b in bad:
            f.write(json.dumps(b.to_dict(), sort_keys=True) + "\n")
    os.replace(tmp, report)
    digest = Manifest(tuple(records)).hash if records else "-"
    print(f"indexed {len(records)} records from {len(items)} items in "
          f"{time.perf_counter() - t0:.1f}s -> {args.out} (hash {digest}); "
          f"{len(bad)} unreadable files -> {report}")
    return 0 if records or not items else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataloader")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("index", help="probe media and write a manifest")
    p.add_argument("source", help="a folder of media files, or a list file")
    p.add_argument("--out", required=True, help="manifest path (.jsonl, or .parquet)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--servers", default="", help="comma-separated I/O server addresses; "
                   "default: probe in local worker processes")
    p.add_argument("--preset", default=None, help="Keye preset name (release or paper)")
    p.add_argument("--dataset", default=None, help="dataset name (default: the media kind)")
    p.add_argument("--report", default=None, help="unreadable files (default <out>.bad.jsonl)")
    p.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    return _index(args)


if __name__ == "__main__":
    sys.exit(main())
