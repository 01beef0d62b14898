"""Start an I/O server daemon as a child process and stop it again (tests, benchmarks, scripts).

`start_server(roots=[...])` runs `python -m io_server --port 0 ...` in its own process group,
waits until the daemon has written its port, and returns a `ServerProcess`; `stop()` sends SIGTERM
and waits, `kill()` sends SIGKILL to the daemon alone (its workers notice and exit), and leaving
the context manager kills whatever of the group is left. The daemon's stdout and stderr go to a
log file, `ServerProcess.log_path`. The daemon runs in its own session (a signal to the caller's
process group does not reach it) and shuts down when the process that started it dies, even by
SIGKILL (``--exit-with-parent``); its workers follow it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class ServerProcess:
    """A running daemon started by `start_server`."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful shutdown) and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the daemon process only (a crash); its workers exit on their own."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cleanup(self) -> None:
        """Kills every process left in the daemon's process group (daemon, workers)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def start_server(roots: Sequence[str], *, workers: int = 1, args: Sequence[str] = (),
                 timeout_s: float = 60.0, log_dir: str | None = None) -> ServerProcess:
    """Starts `python -m io_server` on 127.0.0.1 with a free port; returns once it serves.

    Raises:
        RuntimeError: the daemon exited or did not announce its port within `timeout_s`
            (the message includes the end of its log).
    """
    log_dir = log_dir or tempfile.mkdtemp(prefix="io-server-")
    fd, port_file = tempfile.mkstemp(prefix="port-", dir=log_dir)
    os.close(fd)
    os.unlink(port_file)
    log_path = os.path.join(log_dir, f"server-{os.path.basename(port_file)}.log")
    cmd = [sys.executable, "-m", "io_server", "--port", "0", "--port-file", port_file,
           "--workers", str(workers), "--exit-with-parent", str(os.getpid())]
    for root in roots:
        cmd += ["--root", root]
    cmd += list(args)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = ServerProcess(proc=proc, port=0, log_path=log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.path.exists(port_file):
            with open(port_file) as f:
                text = f.read().strip()
            if text:
                server.port = int(text)
                return server
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    server.cleanup()
    raise RuntimeError(f"io-server did not start (exit status {proc.poll()}): "
                       f"{server.log()[-2000:]}")
