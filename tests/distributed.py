"""Multi-process gloo test harness: a pool of forked ranks that run test functions together.

The pool starts ``world_size`` processes once (per test module), each with ``torch.distributed``
initialised over gloo on 127.0.0.1 and a free port, and then runs module-level functions on every
rank at once: ``pool.run(fn, *args)`` returns the list of per-rank results. A rank that raises
fails the call with its traceback; a rank that dies is reported with its signal; a call that does
not finish in time is reported as hung. After any failure the pool is torn down (its processes
killed) and the next call starts a fresh one, so one broken test does not break the others.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, conn) -> None:
    import torch
    import torch.distributed as dist

    # Four ranks share two cores; one intra-op thread each also avoids OpenMP state
    # inherited across fork.
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    while True:
        task = conn.recv()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            conn.send(("ok", fn(*args, **kwargs)))
        except BaseException:  # report everything, including assertion errors
            conn.send(("error", traceback.format_exc()))
    dist.destroy_process_group()
    conn.close()


class RankFailure(AssertionError):
    """A rank raised, died or hung."""


class DistributedPool:
    def __init__(self, world_size: int, *, timeout_s: float = 180.0) -> None:
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._procs: list[mp.Process] = []
        self._conns: list[Any] = []

    def _start(self) -> None:
        ctx = mp.get_context("fork")
        port = free_port()
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker, args=(rank, self.world_size, port, child), daemon=True
            )
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None,
            **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the per-rank results."""
        if not self._procs:
            self._start()
        for conn in self._conns:
            conn.send((fn, args, kwargs))
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        results: dict[int, Any] = {}
        errors: list[str] = []
        while len(results) + len(errors) < self.world_size:
            progressed = False
            for rank, (proc, conn) in enumerate(zip(self._procs, self._conns, strict=True)):
                if rank in results or any(e.startswith(f"rank {rank}:") for e in errors):
                    continue
                if conn.poll(0.01):
                    status, value = conn.recv()
                    if status == "ok":
                        results[rank] = value
                    else:
                        errors.append(f"rank {rank}: {value}")
                    progressed = True
                elif not proc.is_alive():
                    code = proc.exitcode
                    how = f"killed by signal {-code}" if code and code < 0 else f"exit {code}"
                    errors.append(f"rank {rank}: died ({how})")
                    progressed = True
            if errors and not progressed:
                # The other ranks are likely blocked in a collective with the failed one.
                break
            if time.monotonic() > deadline:
                missing = [r for r in range(self.world_size) if r not in results]
                waited = timeout_s or self.timeout_s
                errors.append(f"ranks {missing} hung (no result after {waited}s)")
                break
        if errors:
            self.close(force=True)
            raise RankFailure("\n".join(errors))
        return [results[r] for r in range(self.world_size)]

    def close(self, force: bool = False) -> None:
        if not force:
            for conn in self._conns:
                with contextlib.suppress(BrokenPipeError, OSError):
                    conn.send(None)
            for proc in self._procs:
                proc.join(timeout=10)
        for proc in self._procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(timeout=10)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []
