"""The I/O server daemon: gRPC `IOServer` + standard health service over a pool of decoding
processes.

Request path: a handler thread admits the request (at most `max_in_flight` at once, beyond that
RESOURCE_EXHAUSTED at once: no queue grows without bound; the client waits and retries), checks
the path (no control characters, at most `max_path_bytes`: before anything touches the
filesystem), resolves it inside the allowed roots, looks the frame plan up in a cache keyed by
(real path, mtime, size, preset, resize), and hands the job to a worker *process* (decoding never
contends for the GIL). The worker decodes, resizes and zstd-compresses; the main process only
splits the bytes into messages below gRPC's limit and forwards them.

Admission is the only concurrency limit: gRPC's own cap (`maximum_concurrent_rpcs`) is off,
because its refusals never reach the servicer and so could not be counted in `Stats.rejected`. A
refusal takes microseconds on one of the `_EXTRA_RPC_THREADS` handler threads kept free of
decoding, which also keep health checks and Stats answering under any load.

Status codes (see io_server.proto): NOT_FOUND, INVALID_ARGUMENT (corrupt media, impossible range,
unknown preset, bad or overlong path, symlink loop, frame over `max_pixels`, out of worker
memory), PERMISSION_DENIED (outside the roots, also via `..` or symlinks), RESOURCE_EXHAUSTED
(over `max_in_flight`), UNAVAILABLE (shutting down; worker pool crashed), INTERNAL (a bug). One
log line per error, naming the file and the reason; client text in logs, status details and
trailers is escaped to printable ASCII and shortened (`paths.display`), so it can neither forge
log lines nor make gRPC reject the reply.

Shutdown (SIGTERM or SIGINT): health turns NOT_SERVING and new Decode/Probe calls are refused with
UNAVAILABLE, in-flight requests finish (up to `grace_s`), then the process exits 0.

Start it with `io-server` / `python -m io_server` (see `io_server.__main__`).
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from io_server import keye, paths, resize, wire
from io_server.backends import DEFAULT_MAX_PIXELS
from io_server.media import (
    AccessDeniedError,
    FramePlan,
    InvalidRequestError,
    MediaError,
)
from io_server.proto import io_server_pb2 as pb2
from io_server.proto import io_server_pb2_grpc as pb2_grpc
from io_server.stats import GpuMonitor, ServerCounters
from io_server.worker import (
    DecodeJob,
    DecodeOutcome,
    JobError,
    PlanCache,
    ProbeJob,
    ProbeOutcome,
    init_worker,
    ping,
    run_decode,
    run_probe,
)

log = logging.getLogger("io_server")

SERVICE_NAME = "io_server.v1.IOServer"
"""The name under which the health service reports this service (besides "")."""

_EXTRA_RPC_THREADS = 8
"""Handler threads beyond `max_in_flight`, so Stats/health and refusals never wait."""

MIN_WORKER_MEMORY_MB = 512
"""A worker needs about 250 MiB of data segment for its imports (torch, FFmpeg, gRPC)."""
MAX_NAME_CHARS = 64
"""Longest preset or resize name a request may carry (the known ones are a few characters)."""

_WAIT_POLL_S = 0.25


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Everything the daemon is configured with (the `io-server` flags)."""

    host: str = "127.0.0.1"
    """Interface to listen on; 127.0.0.1 keeps the daemon local unless asked otherwise."""
    port: int = 0
    """TCP port; 0 asks the OS for a free one (announced on stdout and in `port_file`)."""
    workers: int = 1
    """Decoding processes."""
    roots: tuple[str, ...] = ()
    """Directories files are served from (resolved with realpath); empty = the working dir."""
    max_in_flight: int = 0
    """Decode/Probe requests admitted at once; 0 = 4 x workers. Beyond: RESOURCE_EXHAUSTED."""
    zstd_level: int = 3
    """zstd level of frames on the wire (1..22; negative = faster, weaker)."""
    preset: str = keye.DEFAULT_PRESET.name
    """Keye preset used when a request names none (`keye.PRESETS`)."""
    backend: str = "pyav"
    """Decoding backend (`io_server.backends.get_backend`)."""
    decoder_threads: int = 1
    """FFmpeg threads per worker ("pyav"); 1 = one core per worker, 0 = FFmpeg's choice."""
    chunk_bytes: int = 2 << 20
    """Largest `data` piece in one DecodeChunk message (below gRPC's 4 MiB default limit)."""
    grace_s: float = 30.0
    """How long in-flight requests may take to finish after SIGTERM."""
    plan_cache_size: int = 4096
    """Frame plans remembered (LRU), keyed by (real path, mtime, size, preset, resize)."""
    port_file: str | None = None
    """If set, the chosen port is written there (atomically) once the server is serving."""
    resize: str = resize.DEFAULT_RESIZE
    """Pixel path for requests that name none: "exact" (Keye's processor) or "fast" (FFmpeg)."""
    max_path_bytes: int = paths.MAX_PATH_BYTES
    """Longest request path in bytes; longer ones are refused before touching the filesystem."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Largest source frame (width x height) decoded; larger ones are refused before decoding."""
    worker_memory_mb: int = 4096
    """Data-segment limit of each worker process in MiB (RLIMIT_DATA); 0 = unlimited."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port({self.port}) must be in [0, 65535]")
        if self.decoder_threads < 0:
            raise ValueError(f"decoder_threads({self.decoder_threads}) must be >= 0")
        if self.backend not in ("pyav", "dali"):
            raise ValueError(f"backend {self.backend!r} is not one of ['dali', 'pyav']")
        if self.workers < 1:
            raise ValueError(f"workers({self.workers}) must be >= 1")
        if self.max_in_flight < 0:
            raise ValueError(f"max_in_flight({self.max_in_flight}) must be >= 0 (0 = 4 x workers)")
        if not -7 <= self.zstd_level <= 22 or self.zstd_level == 0:
            raise ValueError(f"zstd_level({self.zstd_level}) must be in [-7, -1] or [1, 22]")
        if self.preset not in keye.PRESETS:
            raise ValueError(f"preset {self.preset!r} is not one of {sorted(keye.PRESETS)}")
        if not 64 << 10 <= self.chunk_bytes <= 3 << 20:
            raise ValueError(f"chunk_bytes({self.chunk_bytes}) must be in [65536, 3145728]")
        if self.grace_s < 0:
            raise ValueError(f"grace_s({self.grace_s}) must be >= 0")
        if self.plan_cache_size < 0:
            raise ValueError(f"plan_cache_size({self.plan_cache_size}) must be >= 0")
        if self.resize not in resize.RESIZE_MODES:
            raise ValueError(f"resize {self.resize!r} is not one of {list(resize.RESIZE_MODES)}")
        if not 1 <= self.max_path_bytes <= paths.MAX_PATH_BYTES:
            raise ValueError(f"max_path_bytes({self.max_path_bytes}) must be in "
                             f"[1, {paths.MAX_PATH_BYTES}] (Linux's PATH_MAX minus its NUL)")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels({self.max_pixels}) must be >= 1")
        if self.worker_memory_mb and self.worker_memory_mb < MIN_WORKER_MEMORY_MB:
            raise ValueError(f"worker_memory_mb({self.worker_memory_mb}) must be 0 (unlimited) or "
                             f">= {MIN_WORKER_MEMORY_MB}: a worker's imports alone take ~250 MiB")
        for root in self.roots:
            if not os.path.isdir(root):
                raise ValueError(f"root {root!r} is not a directory")

    @property
    def in_flight_limit(self) -> int:
        return self.max_in_flight or 4 * self.workers


# ---------------------------------------------------------------------------------------------
# Parts of the daemon, each with one job


class PathGuard:
    """Maps a requested path to a real file inside the allowed roots.

    The path is first checked without touching the filesystem (`paths.check_path`: no control
    characters, at most `max_path_bytes`), so resolving it costs little. Relative paths are taken
    relative to the first root. The path is resolved with `realpath` (so `..` and symlinks are
    followed) *before* the containment check, and workers open the resolved path. Someone who can
    write inside a root could still swap a directory for a symlink between the check and the
    open; roots should not be writable by untrusted users.
    """

    def __init__(self, roots: tuple[str, ...], max_path_bytes: int = paths.MAX_PATH_BYTES) -> None:
        if not roots:
            raise ValueError("PathGuard needs at least one root")
        self.roots = tuple(os.path.realpath(r) for r in roots)
        self._prefixes = tuple(r if r.endswith(os.sep) else r + os.sep for r in self.roots)
        self.max_path_bytes = max_path_bytes

    def resolve(self, path: str) -> tuple[str, os.stat_result]:
        """The real path of `path` and its `stat`.

        Raises:
            InvalidRequestError: empty path, control characters, over `max_path_bytes`, a
                component over NAME_MAX, a symlink loop, not a regular file.
            AccessDeniedError: resolves outside every root.
            MediaNotFoundError: inside a root but missing.
        """
        paths.check_path(path, self.max_path_bytes)
        joined = path if os.path.isabs(path) else os.path.join(self.roots[0], path)
        real = os.path.realpath(joined)
        if not any(real == r or real.startswith(p) for r, p in zip(self.roots, self._prefixes,
                                                                   strict=True)):
            raise AccessDeniedError(
                path, f"resolves to {paths.display(real)}, outside the allowed roots "
                      f"{list(self.roots)}")
        try:
            # A loop is left unresolved by realpath: stat names it (ELOOP).
            st = paths.check_file(real)
        except MediaError as err:
            raise type(err)(path, err.reason) from None
        return real, st


class Admission:
    """Bounded admission of requests: at most `limit` in flight, refusals instead of queues.

    A request stays in flight until both its handler has finished and the worker job it started
    (if any) is done, so cancelled requests cannot pile work up behind the limit.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_flight = 0
        self._draining = False
        self._cond = threading.Condition()

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._in_flight

    @property
    def draining(self) -> bool:
        with self._cond:
            return self._draining

    def try_enter(self) -> Ticket | grpc.StatusCode:
        """A ticket, or the code to refuse with (UNAVAILABLE draining, RESOURCE_EXHAUSTED full)."""
        with self._cond:
            if self._draining:
                return grpc.StatusCode.UNAVAILABLE
            if self._in_flight >= self.limit:
                return grpc.StatusCode.RESOURCE_EXHAUSTED
            self._in_flight += 1
            return Ticket(self)

    def leave(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    def drain(self) -> None:
        """From now on every request is refused with UNAVAILABLE."""
        with self._cond:
            self._draining = True

    def wait_idle(self, timeout: float) -> bool:
        """Waits until nothing is in flight; False if `timeout` seconds passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._in_flight == 0, timeout=timeout)


class Ticket:
    """One admitted request; leaves the admission when every part holding it has released."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._holders = 1  # the RPC itself
        self._lock = threading.Lock()

    def hold_until_done(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._holders += 1
        future.add_done_callback(lambda _f: self.release())

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last:
            self._admission.leave()


class WorkerPool:
    """A process pool (spawn context) that replaces itself when a worker dies.

    A crashed worker (e.g. a decoder segfault) breaks a `ProcessPoolExecutor` for good; the pool
    is rebuilt so the server keeps serving, and the jobs that were running fail with UNAVAILABLE.
    """

    def __init__(self, workers: int, memory_bytes: int = 0, torch_threads: int = 1) -> None:
        self._workers = workers
        self._initargs = (os.getpid(), memory_bytes, torch_threads)
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._generation = 0
        self._executor = self._new_executor()

    def _new_executor(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=self._workers, mp_context=self._ctx, initializer=init_worker,
            initargs=self._initargs)

    def start(self) -> list[int]:
        """Starts every worker process now (imports included); returns their pids."""
        futures = [self._executor.submit(ping) for _ in range(self._workers)]
        return sorted({f.result() for f in futures})

    def submit(self, fn: Callable[..., Any], *args: Any) -> tuple[concurrent.futures.Future[Any],
                                                                   int]:
        with self._lock:
            try:
                return self._executor.submit(fn, *args), self._generation
            except BrokenProcessPool:
                self._replace_locked()
                return self._executor.submit(fn, *args), self._generation

    def replace_if_broken(self, generation: int) -> None:
        with self._lock:
            if generation == self._generation:
                self._replace_locked()

    def _replace_locked(self) -> None:
        log.error("a decoding worker died; restarting the worker pool (%d processes)",
                  self._workers)
        old = self._executor
        self._executor = self._new_executor()
        self._generation += 1
        old.shutdown(wait=False, cancel_futures=True)

    def shutdown(self) -> None:
        with self._lock:
            self._executor.shutdown(wait=True, cancel_futures=True)


class _Failure(Exception):
    """A request that ends with a non-OK status (raised inside the servicer only)."""

    def __init__(self, code: grpc.StatusCode, path: str, reason: str,
                 metadata: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(f"{path}: {reason}")
        self.code = code
        self.path = path
        self.reason = reason
        self.metadata = metadata

    @classmethod
    def from_media_error(cls, err: MediaError) -> _Failure:
        code, meta = wire.error_status(err)
        return cls(code, err.path, err.reason, meta)


# ---------------------------------------------------------------------------------------------
# The service


class IOServicer(pb2_grpc.IOServerServicer):
    """Implements `IOServer` (Decode, Probe, Stats) on top of the parts above."""

    def __init__(self, config: ServerConfig, guard: PathGuard, pool: WorkerPool,
                 counters: ServerCounters, gpu: GpuMonitor) -> None:
        self._config = config
        self._guard = guard
        self._pool = pool
        self._counters = counters
        self._gpu = gpu
        self._plans = PlanCache(config.plan_cache_size)
        self.admission = Admission(config.in_flight_limit)

    # -- helpers ------------------------------------------------------------------------------

    def _admit(self, path: str) -> Ticket:
        result = self.admission.try_enter()
        if isinstance(result, Ticket):
            return result
        self._counters.add(rejected=1)
        if result == grpc.StatusCode.UNAVAILABLE:
            raise _Failure(result, path, "server is shutting down; retry on another server")
        reason = (f"{self.admission.limit} requests already in flight (--max-in-flight): busy, "
                  "wait and retry (or use another server)")
        raise _Failure(result, path, reason, wire.busy_status(path, reason))

    def _check_request(self, path: str, preset: str, mode: str) -> None:
        """The checks that touch nothing (path text, names): before admission, so a hostile
        request is refused for what it is and never holds an in-flight slot."""
        try:
            paths.check_path(path, self._config.max_path_bytes)
            self._preset(path, preset)
            self._resize(path, mode)
        except MediaError as err:
            raise _Failure.from_media_error(err) from None

    def _abort(self, method: str, context: grpc.ServicerContext, failure: _Failure) -> None:
        """Logs one line, counts the error and ends the RPC with `failure` (raises). Client text
        is shown escaped and shortened (`paths.display`)."""
        self._counters.add_error(failure.code.name)
        path = paths.display(failure.path)
        reason = paths.display(failure.reason, wire.META_REASON_CHARS)
        if failure.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            log.debug("%s %s -> %s: %s", method, path, failure.code.name, reason)
        else:
            log.warning("%s %s -> %s: %s", method, path, failure.code.name, reason)
        if failure.metadata:
            context.set_trailing_metadata(failure.metadata)
        context.abort(failure.code, f"{path}: {reason}")

    def _preset(self, path: str, name: str) -> keye.KeyePreset:
        try:
            return keye.get_preset(name or self._config.preset)
        except ValueError:
            raise InvalidRequestError(
                path, f"unknown Keye preset {paths.display(name, MAX_NAME_CHARS)!r} "
                      f"({len(name)} characters); known: {sorted(keye.PRESETS)}") from None

    def _resize(self, path: str, name: str) -> str:
        mode = name or self._config.resize
        if mode not in resize.RESIZE_MODES:
            raise InvalidRequestError(
                path, f"unknown resize mode {paths.display(mode, MAX_NAME_CHARS)!r} "
                      f"({len(mode)} characters); known: {list(resize.RESIZE_MODES)}")
        return mode

    def _locate(self, path: str, preset: keye.KeyePreset,
                mode: str) -> tuple[str, tuple[Any, ...], int]:
        """(real path, plan-cache key, file size)."""
        real, st = self._guard.resolve(path)
        return real, (real, st.st_mtime_ns, st.st_size, preset.name, mode), st.st_size

    def _cached_plan(self, key: tuple[Any, ...]) -> FramePlan | None:
        plan = self._plans.get(key)
        self._counters.add(**({"plan_cache_hits": 1} if plan else {"plan_cache_misses": 1}))
        return plan

    def _wait(self, future: concurrent.futures.Future[Any], generation: int, path: str,
              context: grpc.ServicerContext) -> Any:
        """The job's result; None if the client went away; UNAVAILABLE if the pool broke."""
        while True:
            if not context.is_active():
                future.cancel()
                return None
            try:
                return future.result(timeout=_WAIT_POLL_S)
            except concurrent.futures.TimeoutError:
                continue
            except (BrokenProcessPool, concurrent.futures.CancelledError):
                self._pool.replace_if_broken(generation)
                raise _Failure(grpc.StatusCode.UNAVAILABLE, path,
                               "a decoding worker process died during this request") from None

    @staticmethod
    def _job_failure(err: JobError) -> _Failure:
        if err.error_type == "internal":
            return _Failure(grpc.StatusCode.INTERNAL, err.path, err.reason)
        cls = next((c for c in wire.ERROR_CODES if c.__name__ == err.error_type), None)
        if cls is None:
            return _Failure(grpc.StatusCode.INTERNAL, err.path,
                            f"unknown error type {err.error_type}: {err.reason}")
        return _Failure.from_media_error(cls(err.path, err.reason))

    # -- RPCs ---------------------------------------------------------------------------------

    def Decode(self, request: pb2.DecodeRequest,  # noqa: N802 - gRPC method name
               context: grpc.ServicerContext) -> Iterator[pb2.DecodeChunk]:
        path = request.path
        self._counters.add(requests=1, decode_requests=1, bytes_in=request.ByteSize())
        try:
            self._check_request(path, request.preset, request.resize)
            ticket = self._admit(path)
        except _Failure as failure:
            self._abort("Decode", context, failure)
            return
        if not context.add_callback(ticket.release):
            ticket.release()
        try:
            outcome = self._run_decode(request, context, ticket)
        except _Failure as failure:
            self._abort("Decode", context, failure)
            return
        if outcome is None:
            return
        yield from self._stream(request, outcome)

    def _run_decode(self, request: pb2.DecodeRequest, context: grpc.ServicerContext,
                    ticket: Ticket) -> DecodeOutcome | None:
        path = request.path
        frame_stop = request.frame_stop if request.HasField("frame_stop") else None
        if request.compression not in wire.COMPRESSIONS.values():
            raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, path,
                           f"unknown compression {request.compression}")
        if request.pixel_format not in wire.PIXEL_FORMATS.values():
            raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, path,
                           f"unknown pixel format {request.pixel_format}")
        keep_yuv = request.pixel_format == pb2.PIXEL_FORMAT_YUV420P
        try:
            wire.check_frame_range(path, request.frame_start, frame_stop)
            preset = self._preset(path, request.preset)
            mode = self._resize(path, request.resize)
            if keep_yuv and mode == "exact":
                raise InvalidRequestError(
                    path, "pixel format YUV420P carries the fast path's planes; resize 'exact' "
                          "makes RGB frames that 4:2:0 cannot carry without losing colour "
                          "resolution: ask for resize 'fast' or for RGB24")
            real, key, size = self._locate(path, preset, mode)
            plan = self._cached_plan(key)
            if plan is not None:
                wire.check_frame_range(path, request.frame_start, frame_stop, plan.num_frames)
        except MediaError as err:
            raise _Failure.from_media_error(err) from None
        job = DecodeJob(backend=self._config.backend,
                        decoder_threads=self._config.decoder_threads, path=real, preset=preset,
                        frame_start=request.frame_start, frame_stop=frame_stop, plan=plan,
                        compression=request.compression, zstd_level=self._config.zstd_level,
                        resize=mode, keep_yuv=keep_yuv, max_pixels=self._config.max_pixels)
        future, generation = self._pool.submit(run_decode, job)
        ticket.hold_until_done(future)
        result = self._wait(future, generation, path, context)
        if result is None:
            return None
        if isinstance(result, JobError):
            raise self._job_failure(JobError(result.error_type, path, result.reason))
        if plan is None:
            self._plans.put(key, result.plan)
        self._counters.add(file_bytes_read=size)
        self._counters.add_seconds(decode=result.decode_s, compress=result.compress_s,
                                   cpu=result.cpu_s)
        return result

    def _stream(self, request: pb2.DecodeRequest,
                outcome: DecodeOutcome) -> Iterator[pb2.DecodeChunk]:
        plan = outcome.plan
        yield pb2.DecodeChunk(
            plan=wire.plan_to_proto(plan, path=request.path),
            preset=request.preset or self._config.preset,
            resize=request.resize or self._config.resize,
            frame_start=outcome.frame_start, frame_stop=outcome.frame_stop)
        step = self._config.chunk_bytes
        for offset, frame in enumerate(outcome.frames):
            index = outcome.frame_start + offset
            data = frame.data
            info = wire.frame_info(plan, index, frame, request.compression)
            pieces = range(0, max(len(data), 1), step)
            for i, start in enumerate(pieces):
                yield pb2.DecodeChunk(
                    frame=index, info=info if i == 0 else None,
                    data=data if len(pieces) == 1 else data[start:start + step],
                    frame_end=i == len(pieces) - 1)
            self._counters.add(raw_bytes_out=frame.raw_size, wire_bytes_out=len(data),
                               frames_out=1)

    def Probe(self, request: pb2.ProbeRequest,  # noqa: N802
              context: grpc.ServicerContext) -> pb2.ProbeReply:
        path = request.path
        self._counters.add(requests=1, probe_requests=1, bytes_in=request.ByteSize())
        try:
            self._check_request(path, request.preset, request.resize)
            ticket = self._admit(path)
            if not context.add_callback(ticket.release):
                ticket.release()
            try:
                preset = self._preset(path, request.preset)
                mode = self._resize(path, request.resize)
                real, key, _size = self._locate(path, preset, mode)
            except MediaError as err:
                raise _Failure.from_media_error(err) from None
            plan = self._cached_plan(key)
            if plan is None:
                job = ProbeJob(backend=self._config.backend,
                               decoder_threads=self._config.decoder_threads, path=real,
                               preset=preset, resize=mode, max_pixels=self._config.max_pixels)
                future, generation = self._pool.submit(run_probe, job)
                ticket.hold_until_done(future)
                result = self._wait(future, generation, path, context)
                if result is None:
                    return pb2.ProbeReply()
                if isinstance(result, JobError):
                    raise self._job_failure(JobError(result.error_type, path, result.reason))
                assert isinstance(result, ProbeOutcome)
                plan = result.plan
                self._plans.put(key, plan)
                self._counters.add_seconds(decode=result.decode_s, cpu=result.cpu_s)
        except _Failure as failure:
            self._abort("Probe", context, failure)
            raise AssertionError("unreachable: context.abort raises") from None
        return pb2.ProbeReply(plan=wire.plan_to_proto(plan, path=path), preset=preset.name,
                              resize=mode)

    def Stats(self, request: pb2.StatsRequest,  # noqa: N802
              context: grpc.ServicerContext) -> pb2.StatsReply:
        snap = self._counters.snapshot(in_flight=self.admission.in_flight)
        gpus, reason = self._gpu.read()
        return pb2.StatsReply(
            uptime_s=snap.uptime_s, requests=snap.requests, decode_requests=snap.decode_requests,
            probe_requests=snap.probe_requests, errors=snap.errors,
            errors_by_code=snap.errors_by_code, rejected=snap.rejected, bytes_in=snap.bytes_in,
            file_bytes_read=snap.file_bytes_read, raw_bytes_out=snap.raw_bytes_out,
            wire_bytes_out=snap.wire_bytes_out, frames_out=snap.frames_out,
            decode_seconds=snap.decode_seconds, compress_seconds=snap.compress_seconds,
            worker_cpu_seconds=snap.worker_cpu_seconds,
            in_flight=snap.in_flight, max_in_flight=self.admission.limit,
            workers=self._config.workers, plan_cache_hits=snap.plan_cache_hits,
            plan_cache_misses=snap.plan_cache_misses, serving=not self.admission.draining,
            gpu_available=bool(gpus), gpu_unavailable_reason=reason,
            gpus=[pb2.GpuStats(**g.__dict__) for g in gpus], resize=self._config.resize,
            max_pixels=self._config.max_pixels, max_path_bytes=self._config.max_path_bytes,
            worker_memory_bytes=self._config.worker_memory_mb << 20)



# ---------------------------------------------------------------------------------------------
# Running the daemon


def format_address(host: str, port: int) -> str:
    """`host:port`, with IPv6 literals bracketed."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def _write_port_file(path: str, port: int) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


def serve(config: ServerConfig, stop: threading.Event | None = None) -> int:
    """Runs the daemon until SIGTERM/SIGINT (or `stop` is set); returns the exit status (0).

    Must be called from the main thread (it installs signal handlers). Announces itself with
    one line on stdout, `io-server listening on HOST:PORT`, once it is serving.
    """
    stop = stop or threading.Event()
    roots = config.roots
    if not roots:
        roots = (os.getcwd(),)
        log.info("no --root given: serving files under the working directory %s", roots[0])
    guard = PathGuard(roots, config.max_path_bytes)
    limit = config.in_flight_limit
    if not config.max_in_flight:
        log.info("max in-flight requests = 4 x workers(%d) = %d", config.workers, limit)

    # Processes start in pool.start(), once the port is bound.
    pool = WorkerPool(config.workers, memory_bytes=config.worker_memory_mb << 20,
                      torch_threads=max(config.decoder_threads, 1))
    counters = ServerCounters()
    gpu = GpuMonitor()
    servicer = IOServicer(config, guard, pool, counters, gpu)
    health_servicer = health.HealthServicer(
        experimental_non_blocking=True,
        experimental_thread_pool=concurrent.futures.ThreadPoolExecutor(max_workers=1))
    rpc_threads = limit + _EXTRA_RPC_THREADS
    # No maximum_concurrent_rpcs: Admission is the one limit, so every refusal is counted.
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=rpc_threads,
                                              thread_name_prefix="io-server-rpc"),
        options=[("grpc.so_reuseport", 0)],
    )
    pb2_grpc.add_IOServerServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    wanted = format_address(config.host, config.port)
    try:
        port = server.add_insecure_port(wanted)
    except RuntimeError as exc:  # grpc raises when the bind fails
        port, reason = 0, str(exc)
    else:
        reason = "bind failed"
    if port == 0:
        pool.shutdown()
        raise OSError(f"cannot listen on {wanted}: {reason} (port in use or not permitted?)")
    pids = pool.start()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        for service in ("", SERVICE_NAME):
            health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        address = format_address(config.host, port)
        log.info("serving on %s: %d worker processes %s, max %d in flight, roots %s, preset %s, "
                 "resize %s, zstd level %d, max path %d bytes, max %d pixels, worker memory %s",
                 address, config.workers, pids, limit, list(guard.roots), config.preset,
                 config.resize, config.zstd_level, config.max_path_bytes, config.max_pixels,
                 f"{config.worker_memory_mb} MiB" if config.worker_memory_mb else "unlimited")
        if config.port_file:
            _write_port_file(config.port_file, port)
        print(f"io-server listening on {address}", flush=True)
        while not stop.wait(timeout=1.0):
            pass
        health_servicer.enter_graceful_shutdown()
        servicer.admission.drain()
        in_flight = servicer.admission.in_flight
        log.info("draining: %d requests in flight, grace %.1f s", in_flight, config.grace_s)
        if not servicer.admission.wait_idle(config.grace_s):
            log.warning("grace period over with %d requests still in flight",
                        servicer.admission.in_flight)
        server.stop(grace=1.0).wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        pool.shutdown()
        gpu.close()
    log.info("stopped")
    return 0
