"""io-server: the I/O daemon that decodes images and videos for training ranks.

Run it on a CPU host (one worker process per decoding core):

    io-server --port 50051 --workers 16 --root /data
    python -m io_server --port 0 --workers 1 --root /tmp/media   # tiny local run, free port

It prints one line `io-server listening on HOST:PORT` on stdout once it serves (with `--port 0`
the OS picks the port; `--port-file F` also writes it to F), logs to stderr, and stops cleanly
on SIGTERM/SIGINT: health turns NOT_SERVING, new requests are refused, in-flight ones finish
within `--grace-s`, exit status 0. Clients: `io_server.client.IOClient(["HOST:PORT", ...])`.

Pixels: `--resize exact` (default) equals Keye's released processor; `--resize fast` is FFmpeg's
scaler (faster, a few levels off; see `io_server.resize`). Limits against hostile input:
`--max-path-bytes`, `--max-pixels`, `--worker-memory-mb`, `--max-in-flight`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from io_server import keye, paths, resize
from io_server.backends import DEFAULT_MAX_PIXELS


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="io-server", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--port", type=int, default=0, help="TCP port; 0 = a free one (announced)")
    p.add_argument("--port-file", default=None, help="write the chosen port to this file")
    p.add_argument("--workers", type=int, default=1, help="decoding worker processes")
    p.add_argument("--root", action="append", default=[], dest="roots",
                   help="directory files may be served from (repeatable; default: working dir)")
    p.add_argument("--max-in-flight", type=int, default=0,
                   help="requests admitted at once; beyond: RESOURCE_EXHAUSTED (0 = 4 x workers)")
    p.add_argument("--zstd-level", type=int, default=3, help="zstd level of frames on the wire")
    p.add_argument("--preset", default=keye.DEFAULT_PRESET.name, choices=sorted(keye.PRESETS),
                   help="Keye preset for requests that name none")
    p.add_argument("--backend", default="pyav", choices=["pyav", "dali"],
                   help="decoding backend (dali = NVDEC on a GPU host)")
    p.add_argument("--decoder-threads", type=int, default=1,
                   help="FFmpeg threads per worker (0 = FFmpeg's choice)")
    p.add_argument("--chunk-bytes", type=int, default=2 << 20,
                   help="largest frame piece per message")
    p.add_argument("--plan-cache-size", type=int, default=4096,
                   help="frame plans remembered (LRU); 0 = plan on every request")
    p.add_argument("--grace-s", type=float, default=30.0,
                   help="time in-flight requests get to finish after SIGTERM")
    p.add_argument("--resize", default=resize.DEFAULT_RESIZE, choices=list(resize.RESIZE_MODES),
                   help="pixel path for requests that name none: exact = Keye's processor "
                        "(torch bilinear-antialias), fast = FFmpeg's scaler")
    p.add_argument("--max-path-bytes", type=int, default=paths.MAX_PATH_BYTES,
                   help="longest request path; longer ones are refused before any filesystem "
                        "access")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="largest source frame (width x height) decoded; larger ones (image "
                        "bombs) are refused before decoding")
    p.add_argument("--worker-memory-mb", type=int, default=4096,
                   help="data-segment limit of each worker process (RLIMIT_DATA); 0 = none")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--exit-with-parent", type=int, default=None, metavar="PID",
                   help="shut down (as on SIGTERM) when process PID, the parent that started "
                        "this daemon, dies, even by SIGKILL (Linux)")
    return p.parse_args(argv)


def exit_with_parent(parent: int) -> None:
    """Ask the kernel for SIGTERM when our parent dies (PR_SET_PDEATHSIG), then make sure it has
    not died already (the request only covers deaths after it)."""
    import ctypes
    import os
    import signal

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        raise SystemExit(f"io-server: parent {parent} is gone (parent is now {os.getppid()})")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `io-server` console script and `python -m io_server`."""
    args = parse_args(argv)
    if args.exit_with_parent is not None:
        exit_with_parent(args.exit_with_parent)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s io-server[%(process)d] %(message)s")
    from io_server.server import ServerConfig, serve

    try:
        config = ServerConfig(
            host=args.host, port=args.port, workers=args.workers, roots=tuple(args.roots),
            max_in_flight=args.max_in_flight, zstd_level=args.zstd_level, preset=args.preset,
            backend=args.backend, decoder_threads=args.decoder_threads,
            chunk_bytes=args.chunk_bytes, grace_s=args.grace_s,
            plan_cache_size=args.plan_cache_size, port_file=args.port_file, resize=args.resize,
            max_path_bytes=args.max_path_bytes, max_pixels=args.max_pixels,
            worker_memory_mb=args.worker_memory_mb)
    except ValueError as exc:
        print(f"io-server: {exc}", file=sys.stderr)
        return 2
    try:
        return serve(config)
    except OSError as exc:
        print(f"io-server: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
