"""What runs inside the I/O server's decoding processes (and, unencoded, in the embedded client).

One job: turn (path, preset, pixel path, frame range, optional cached plan) into sampled frames
with the decoding backend, then zstd-encode them, so the daemon's main process only forwards bytes.
Results and errors cross the process boundary as plain frozen dataclasses (`MediaError` itself
does not survive pickling: its constructor takes two arguments).

A worker's memory is bounded (`init_worker`: RLIMIT_DATA, the heap and anonymous mappings); a job
that runs out gets an `InvalidRequestError` naming the limit instead of taking the host down.
"""

from __future__ import annotations

import collections
import functools
import os
import resource
import signal
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zstandard

from io_server.media import (
    CorruptMediaError,
    DecodedMedia,
    FramePlan,
    InvalidRequestError,
    MediaError,
)
from io_server.proto import io_server_pb2 as pb2
from io_server.wire import EncodedFrame, check_frame_range, encode_frames

if TYPE_CHECKING:
    from io_server.backends import DecodeBackend

_PARENT_POLL_S = 1.0


@dataclass(frozen=True, kw_only=True)
class DecodeJob:
    """One `Decode` request as handed to a worker process. `path` is already resolved."""

    backend: str
    """Decoding backend name (`io_server.backends.get_backend`)."""
    decoder_threads: int
    """FFmpeg threads of the backend (0 = FFmpeg's choice)."""
    path: str
    """The real path, inside the server's roots."""
    preset: Any
    """A `io_server.keye.KeyePreset`."""
    frame_start: int
    """First sampled frame to decode."""
    frame_stop: int | None
    """One past the last sampled frame; None = to the end."""
    plan: FramePlan | None
    """The cached plan of (path, mtime, size, preset, resize), or `None` to plan in the worker."""
    compression: int
    """`pb2.Compression` of the frames on the wire."""
    zstd_level: int
    """zstd level when `compression` is zstd."""
    resize: str = "exact"
    """Pixel path (`io_server.resize.RESIZE_MODES`)."""
    keep_yuv: bool = False
    """Send `Yuv420Frame` planes where the backend makes them (the YUV wire format)."""
    max_pixels: int = 1 << 26
    """Largest source frame decoded (`backends.DEFAULT_MAX_PIXELS`)."""


@dataclass(frozen=True, kw_only=True)
class ProbeJob:
    """One `Probe` request as handed to a worker process. `path` is already resolved."""

    backend: str
    """Decoding backend name (`io_server.backends.get_backend`)."""
    decoder_threads: int
    """FFmpeg threads of the backend (0 = FFmpeg's choice)."""
    path: str
    """The real path, inside the server's roots."""
    preset: Any
    """A `io_server.keye.KeyePreset`."""
    resize: str = "exact"
    """Pixel path of the Slow-Fast thumbnails (`io_server.resize.RESIZE_MODES`)."""
    max_pixels: int = 1 << 26
    """Largest source frame decoded (`backends.DEFAULT_MAX_PIXELS`)."""


@dataclass(frozen=True)
class DecodeOutcome:
    plan: FramePlan
    frame_start: int
    frame_stop: int
    frames: tuple[EncodedFrame, ...]
    decode_s: float
    compress_s: float
    cpu_s: float
    """CPU seconds of this worker process on the job (decode, resize, zstd)."""


@dataclass(frozen=True)
class ProbeOutcome:
    plan: FramePlan
    decode_s: float
    cpu_s: float


@dataclass(frozen=True)
class JobError:
    """A failed job: `error_type` is a `MediaError` subclass name, or "internal"."""

    error_type: str
    path: str
    reason: str


@functools.lru_cache(maxsize=8)
def _backend(name: str, threads: int, resize: str, max_pixels: int) -> DecodeBackend:
    """The worker's backend; "pyav" gets `threads` FFmpeg decoding threads (0 = FFmpeg's choice)."""
    from io_server.backends import get_backend

    return get_backend(name, threads=threads, resize=resize, max_pixels=max_pixels)


@functools.lru_cache(maxsize=8)
def _compressor(level: int) -> zstandard.ZstdCompressor:
    return zstandard.ZstdCompressor(level=level)


class PlanCache:
    """Thread-safe LRU of frame plans keyed by (real path, mtime_ns, size, preset name, resize)."""

    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        self._plans: collections.OrderedDict[tuple[Any, ...], FramePlan] = (
            collections.OrderedDict())
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> FramePlan | None:
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
            return plan

    def put(self, key: tuple[Any, ...], plan: FramePlan) -> None:
        if self._maxsize == 0:
            return
        with self._lock:
            self._plans[key] = plan
            self._plans.move_to_end(key)
            while len(self._plans) > self._maxsize:
                self._plans.popitem(last=False)


def plan_cache_key(path: str, preset_name: str, resize: str) -> tuple[Any, ...] | None:
    """(real path, mtime_ns, size, preset, resize): a rewritten file gets a new key. None if the
    path is refused or unreadable (the decode then reports why)."""
    from io_server.paths import check_path

    try:
        check_path(path)
        real = os.path.realpath(path)
        st = os.stat(real)
    except (OSError, ValueError, MediaError):
        return None
    return (real, st.st_mtime_ns, st.st_size, preset_name, resize)


def decode_media(backend: DecodeBackend, path: str, preset: Any, frame_start: int,
                 frame_stop: int | None, plan: FramePlan | None,
                 keep_yuv: bool = False) -> DecodedMedia:
    """Plans (unless `plan` is given), checks the range against the plan, decodes it.

    The daemon's workers and the client's embedded path both call this, so both return the
    same frames.

    Raises:
        MediaError: a subclass naming the path and the reason.
    """
    check_frame_range(path, frame_start, frame_stop)
    if plan is None:
        plan = backend.probe(path, preset=preset)
    start, stop = check_frame_range(path, frame_start, frame_stop, plan.num_frames)
    return backend.decode(path, preset=preset, frame_start=start, frame_stop=stop, plan=plan,
                          keep_yuv=keep_yuv)


_MEMORY_LIMIT = [0]
"""This process's RLIMIT_DATA in bytes (0 = none), set by `init_worker`."""

_OUT_OF_MEMORY = ("can't allocate memory", "cannot allocate memory", "out of memory",
                  "defaultcpuallocator")


def _out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc).lower() for s in _OUT_OF_MEMORY)


def _as_job_error(path: str, exc: BaseException) -> JobError:
    if isinstance(exc, MediaError):
        return JobError(type(exc).__name__, exc.path, exc.reason)
    if _out_of_memory(exc):
        limit = _MEMORY_LIMIT[0]
        where = (f"the worker memory limit of {limit >> 20} MiB (--worker-memory-mb)" if limit
                 else "the memory of this host")
        return JobError(InvalidRequestError.__name__, path,
                        f"decoding needs more memory than {where}: {type(exc).__name__}: {exc}")
    import av

    if isinstance(exc, av.FFmpegError):
        return JobError(CorruptMediaError.__name__, path, f"FFmpeg: {exc}")
    return JobError("internal", path, f"{type(exc).__name__}: {exc}")


def run_probe(job: ProbeJob) -> ProbeOutcome | JobError:
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        backend = _backend(job.backend, job.decoder_threads, job.resize, job.max_pixels)
        plan = backend.probe(job.path, preset=job.preset)
    except Exception as exc:  # noqa: BLE001 - every failure must reach the client as a status
        return _as_job_error(job.path, exc)
    return ProbeOutcome(plan, time.perf_counter() - t0, time.process_time() - c0)


def run_decode(job: DecodeJob) -> DecodeOutcome | JobError:
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        backend = _backend(job.backend, job.decoder_threads, job.resize, job.max_pixels)
        media = decode_media(backend, job.path, job.preset, job.frame_start, job.frame_stop,
                             job.plan, keep_yuv=job.keep_yuv)
        t1 = time.perf_counter()
        zstd = job.compression == pb2.COMPRESSION_ZSTD
        compressor = _compressor(job.zstd_level) if zstd else None
        frames = encode_frames(media.frames, job.compression, compressor)
    except Exception as exc:  # noqa: BLE001
        return _as_job_error(job.path, exc)
    t2 = time.perf_counter()
    return DecodeOutcome(media.plan, media.frame_start, media.frame_stop, frames,
                         decode_s=t1 - t0, compress_s=t2 - t1, cpu_s=time.process_time() - c0)


def ping() -> int:
    """Starts a worker process before the server announces itself: imports the decoding code
    (so the first request does not pay for it) and returns the pid."""
    import io_server.backends  # noqa: F401
    import io_server.resize  # noqa: F401

    return os.getpid()


def init_worker(parent_pid: int, memory_bytes: int = 0, torch_threads: int = 1) -> None:
    """Worker initializer: signals belong to the daemon; exit when the daemon is gone; bounded
    memory; one intra-op thread for torch (the exact pixel path), as a worker is one core.

    SIGINT/SIGTERM are ignored (the daemon decides when workers stop). A daemon killed with
    SIGKILL cannot tell its workers, so a watchdog thread exits the worker once its parent
    changes. `memory_bytes` > 0 caps the process's data segment (RLIMIT_DATA: heap, anonymous
    mappings, thread stacks); allocations beyond it fail and the job reports the limit.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))
        _MEMORY_LIMIT[0] = memory_bytes
    import torch

    torch.set_num_threads(max(torch_threads, 1))

    def watch() -> None:
        while True:
            time.sleep(_PARENT_POLL_S)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="io-server-parent-watch", daemon=True).start()
