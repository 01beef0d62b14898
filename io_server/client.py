"""Client of the I/O server: decoded media as numpy (or torch), from one or many daemons.

`IOClient(["host1:50051", "host2:50051"])` spreads requests over the servers (least outstanding
requests first, round robin among equals), applies a deadline to every attempt, and retries a
request on *another* server when an attempt fails with UNAVAILABLE or DEADLINE_EXCEEDED (a server
that died or hung), at most `max_attempts` times. RESOURCE_EXHAUSTED means "busy", not "failed":
the client waits (exponential backoff with full jitter, 25 ms doubling up to 1 s) and asks again,
any server, for as long as the call's total deadline allows; waits never use up attempts, so
overload slows a training step down but never loses a sample. A reply stream that breaks midway
is discarded entirely and the request is redone elsewhere, so every call returns exactly one
complete result or raises. Media errors are not retried: NOT_FOUND, INVALID_ARGUMENT and
PERMISSION_DENIED raise the matching `io_server.media` error (`MediaNotFoundError`,
`CorruptMediaError` / `InvalidRequestError`, `AccessDeniedError`) with the server's reason.

`pixel_format="yuv420p"` (with `resize="fast"`) halves the frame bytes on the wire: the server
sends YUV 4:2:0 planes and the client converts them to RGB, getting the server's RGB pixels bit for
bit (`io_server.yuv`). `decode(..., keep_yuv=True)` returns the planes instead, and
`to_torch(media, device="cuda")` converts them on the GPU.

`IOClient()` with no address decodes in-process with the same code the daemon's workers run
(`get_backend("pyav")`): the embedded default for single-host runs and tests.

Example:
    >>> with IOClient(["127.0.0.1:50051"]) as client:          # doctest: +SKIP
    ...     media = client.decode("/data/clip.mp4", frame_start=0, frame_stop=8)
    ...     frames = to_torch(media)                                # list of HxWx3 uint8 tensors
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import zstandard

from io_server import keye, wire, yuv
from io_server.media import DecodedMedia, FramePlan, MediaError, Yuv420Frame
from io_server.proto import io_server_pb2 as pb2
from io_server.proto import io_server_pb2_grpc as pb2_grpc
from io_server.resize import DEFAULT_RESIZE, RESIZE_MODES
from io_server.worker import PlanCache, decode_media, plan_cache_key

if TYPE_CHECKING:
    import torch

    from io_server.backends import DecodeBackend

log = logging.getLogger(__name__)

RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
})
"""Codes after which the request is redone on another server (one attempt used)."""
BUSY = grpc.StatusCode.RESOURCE_EXHAUSTED
"""The code of a server at its --max-in-flight: wait and ask again (no attempt used)."""

_MAX_MESSAGE_BYTES = 16 << 20
_BACKOFF_S = 0.05
"""First pause before a server is retried (doubling per attempt, at most 1 s)."""
BUSY_BACKOFF_S = (0.025, 1.0)
"""Busy waits: the k-th wait is uniform in [0, min(1.0, 0.025 * 2^k)] seconds (full jitter)."""
_COOLDOWN_S = (0.5, 8.0)
"""A server that failed with a retryable code is avoided for this long (doubling per failure)."""


class IOServerError(RuntimeError):
    """A request that failed on every attempt, or a reply that broke the protocol."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class DecodeItem:
    """One request of `IOClient.decode_many`."""

    path: str
    frame_start: int = 0
    frame_stop: int | None = None
    preset: str | None = None


@dataclass(kw_only=True)
class ClientCounters:
    """What a client has seen since it was made (read them from `IOClient.counters`)."""

    requests: int = 0
    """Calls to probe/decode that went to a server."""
    busy_refusals: int = 0
    """RESOURCE_EXHAUSTED replies (each followed by a jittered wait and a new try)."""
    busy_wait_s: float = 0.0
    """Seconds spent in those waits."""
    failed_attempts: int = 0
    """Attempts that failed with UNAVAILABLE or DEADLINE_EXCEEDED (redone elsewhere)."""


@dataclass
class _Server:
    address: str
    channel: grpc.Channel
    stub: pb2_grpc.IOServerStub
    outstanding: int = 0
    failures: int = 0
    avoid_until: float = 0.0


def to_torch(media: DecodedMedia, *, channels_first: bool = False,
             device: str | torch.device | None = None) -> list[torch.Tensor]:
    """The frames of `media` as uint8 RGB tensors.

    Shape `(H, W, 3)`, or `(3, H, W)` with `channels_first` (a view, not a copy). Frames of a
    video may differ in size (slow vs fast frames), hence a list. RGB arrays are shared with
    numpy (no copy) unless `device` moves them; `Yuv420Frame` planes (`keep_yuv=True`) are
    converted on `device` (default: CPU), e.g. on the GPU with `device="cuda"`, giving the same
    pixels as the server's RGB path (`yuv.yuv420_to_rgb_torch`).
    """
    import torch

    tensors = []
    for f in media.frames:
        if isinstance(f, Yuv420Frame):
            tensors.append(yuv.yuv420_to_rgb_torch(f, device))
        else:
            t = torch.from_numpy(f)
            tensors.append(t if device is None else t.to(device))
    if channels_first:
        tensors = [t.permute(2, 0, 1) for t in tensors]
    return tensors


class IOClient:
    """Decodes media through I/O servers, or in-process when `addresses` is empty.

    Thread-safe: one client may serve many threads (e.g. `decode_many`). `counters`
    (`ClientCounters`) tells how often servers were busy and how long the client waited.

    Args:
        addresses: "host:port" of each server; empty = decode in this process.
        deadline_s: deadline of each attempt (a whole Decode stream or one Probe).
        max_attempts: failed attempts (UNAVAILABLE, DEADLINE_EXCEEDED) per request over all
            servers (>= 1). Busy refusals (RESOURCE_EXHAUSTED) do not count.
        total_deadline_s: limit of one call from start to result, busy waits and failover
            included; default `deadline_s * max_attempts`. Each attempt gets at most what is
            left of it.
        preset: Keye preset name for requests that name none; None = the server's default
            (in-process: `keye.DEFAULT_PRESET`).
        resize: pixel path, "exact" (Keye's processor) or "fast" (FFmpeg's scaler); None = the
            server's `--resize` (in-process: "exact").
        pixel_format: "rgb24" (default) or "yuv420p" (half the bytes; needs `resize="fast"`):
            the frames on the wire; `decode` returns RGB either way unless asked to keep YUV.
        compression: "zstd" (default) or "none" for the frames on the wire.
        max_concurrency: bound of `decode_many`'s parallel requests; default 2 per server
            (1 in-process).
        backend: the in-process decoder (default `get_backend("pyav")`); servers ignore it.
        plan_cache_size: frame plans the in-process path remembers (keyed like the daemon's:
            real path, mtime, size, preset), so chunked decodes of one video plan it once.
    """

    def __init__(
        self,
        addresses: Sequence[str] = (),
        *,
        deadline_s: float = 120.0,
        max_attempts: int = 3,
        total_deadline_s: float | None = None,
        preset: str | None = None,
        resize: str | None = None,
        pixel_format: str = "rgb24",
        compression: str = "zstd",
        max_concurrency: int | None = None,
        backend: DecodeBackend | None = None,
        plan_cache_size: int = 1024,
    ) -> None:
        if isinstance(addresses, str):
            raise TypeError(f"addresses must be a sequence of 'host:port', got the string "
                            f"{addresses!r}")
        if deadline_s <= 0:
            raise ValueError(f"deadline_s({deadline_s}) must be > 0")
        if max_attempts < 1:
            raise ValueError(f"max_attempts({max_attempts}) must be >= 1")
        if total_deadline_s is not None and total_deadline_s <= 0:
            raise ValueError(f"total_deadline_s({total_deadline_s}) must be > 0")
        if resize is not None and resize not in RESIZE_MODES:
            raise ValueError(f"resize {resize!r} is not one of {list(RESIZE_MODES)}")
        if pixel_format not in wire.PIXEL_FORMATS:
            raise ValueError(
                f"pixel_format {pixel_format!r} is not one of {sorted(wire.PIXEL_FORMATS)}")
        if pixel_format == "yuv420p" and (resize == "exact"
                                          or (resize is None and not addresses)):
            raise ValueError("pixel_format 'yuv420p' carries the planes of the fast path: pass "
                             "resize='fast' (the exact path resizes RGB, which 4:2:0 cannot "
                             "carry without losing colour resolution)")
        if compression not in wire.COMPRESSIONS:
            raise ValueError(
                f"compression {compression!r} is not one of {sorted(wire.COMPRESSIONS)}")
        if plan_cache_size < 0:
            raise ValueError(f"plan_cache_size({plan_cache_size}) must be >= 0")
        if preset is not None and preset not in keye.PRESETS:
            raise ValueError(f"preset {preset!r} is not one of {sorted(keye.PRESETS)}")
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency({max_concurrency}) must be >= 1")
        self.deadline_s = deadline_s
        self.max_attempts = max_attempts
        self.total_deadline_s = total_deadline_s or deadline_s * max_attempts
        self.preset = preset
        self.resize = resize
        self.pixel_format = pixel_format
        self.counters = ClientCounters()
        self._compression = wire.COMPRESSIONS[compression]
        self._lock = threading.Lock()
        self._rr = itertools.count()
        options = [("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES)]
        self._servers = [
            _Server(a, ch := grpc.insecure_channel(a, options=options), pb2_grpc.IOServerStub(ch))
            for a in addresses
        ]
        self.max_concurrency = max_concurrency or max(1, 2 * len(self._servers))
        self._backend = backend
        if not self._servers and backend is None:
            from io_server.backends import get_backend

            self._backend = get_backend("pyav", resize=resize or DEFAULT_RESIZE)
        self._plans = PlanCache(plan_cache_size)
        self._decompressor = threading.local()
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(s.address for s in self._servers)

    def close(self) -> None:
        """Closes the channels; in-flight calls fail. Idempotent."""
        self._closed = True
        for server in self._servers:
            server.channel.close()

    def __enter__(self) -> IOClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public calls -------------------------------------------------------------------------

    def probe(self, path: str, preset: str | None = None) -> FramePlan:
        """The frame plan of `path` (no pixels).

        Raises:
            MediaError: a subclass naming the path and the reason (not retried).
            IOServerError: every attempt failed with a retryable code.
        """
        preset = self._preset_name(preset)
        if not self._servers:
            assert self._backend is not None
            return self._backend.probe(path, preset=self._local_preset(path, preset))
        request = pb2.ProbeRequest(path=path, preset=preset, resize=self.resize or "")

        def attempt(server: _Server, timeout: float) -> FramePlan:
            reply = server.stub.Probe(request, timeout=timeout)
            return wire.plan_from_proto(reply.plan)

        return self._with_retries(path, attempt)

    def decode(self, path: str, frame_start: int = 0, frame_stop: int | None = None,
               preset: str | None = None, *, keep_yuv: bool = False) -> DecodedMedia:
        """Sampled frames `[frame_start, frame_stop)` of `path` (to the end when None), as uint8
        RGB (H, W, 3) arrays; with `pixel_format="yuv420p"` and `keep_yuv`, frames that came as
        YUV 4:2:0 stay `Yuv420Frame` planes (convert them with `to_torch(..., device=...)`).

        Raises:
            MediaError: a subclass naming the path and the reason (not retried).
            IOServerError: every attempt failed with a retryable code, the total deadline passed
                while servers were busy, or a reply broke the protocol.
        """
        preset = self._preset_name(preset)
        wants_yuv = self.pixel_format == "yuv420p"
        if not self._servers:
            assert self._backend is not None
            key = plan_cache_key(path, preset, getattr(self._backend, "resize", DEFAULT_RESIZE))
            plan = self._plans.get(key) if key is not None else None
            media = decode_media(self._backend, path, self._local_preset(path, preset),
                                 frame_start, frame_stop, plan, keep_yuv=wants_yuv and keep_yuv)
            if key is not None and plan is None:
                self._plans.put(key, media.plan)
            return media
        request = pb2.DecodeRequest(path=path, preset=preset, frame_start=frame_start,
                                    compression=self._compression, resize=self.resize or "",
                                    pixel_format=wire.PIXEL_FORMATS[self.pixel_format])
        if frame_stop is not None:
            request.frame_stop = frame_stop
        media = self._with_retries(
            path, lambda server, timeout: self._decode_once(server, request, timeout))
        if keep_yuv or not any(isinstance(f, Yuv420Frame) for f in media.frames):
            return media
        frames = tuple(yuv.yuv420_to_rgb(f) if isinstance(f, Yuv420Frame) else f
                       for f in media.frames)
        return DecodedMedia(plan=media.plan, frame_start=media.frame_start,
                            frame_stop=media.frame_stop, frames=frames)

    def decode_many(self, items: Iterable[DecodeItem], *, return_exceptions: bool = False,
                    max_concurrency: int | None = None) -> list[DecodedMedia | MediaError]:
        """Decodes every item with at most `max_concurrency` requests at once; results in order.

        With `return_exceptions`, a media error (or `IOServerError`) takes the place of its
        result instead of raising, so one bad file does not lose the others.
        """
        items = list(items)
        width = max(1, min(max_concurrency or self.max_concurrency, len(items) or 1))

        def one(item: DecodeItem) -> DecodedMedia | MediaError:
            try:
                return self.decode(item.path, item.frame_start, item.frame_stop, item.preset)
            except (MediaError, IOServerError) as exc:
                if return_exceptions:
                    return exc  # type: ignore[return-value]
                raise

        with concurrent.futures.ThreadPoolExecutor(max_workers=width,
                                                   thread_name_prefix="io-client") as pool:
            return list(pool.map(one, items))

    def stats(self) -> dict[str, pb2.StatsReply | None]:
        """Each server's `Stats` reply by address (None where unreachable); {} in-process."""
        out: dict[str, pb2.StatsReply | None] = {}
        for server in self._servers:
            try:
                out[server.address] = server.stub.Stats(pb2.StatsRequest(), timeout=self.deadline_s)
            except grpc.RpcError as exc:
                log.warning("Stats from %s failed: %s", server.address, exc.code().name)
                out[server.address] = None
        return out

    # -- internals ----------------------------------------------------------------------------

    def _preset_name(self, preset: str | None) -> str:
        name = preset if preset is not None else (self.preset or "")
        if name and name not in keye.PRESETS:
            raise ValueError(f"preset {name!r} is not one of {sorted(keye.PRESETS)}")
        return name

    @staticmethod
    def _local_preset(path: str, name: str) -> keye.KeyePreset:
        return keye.get_preset(name) if name else keye.DEFAULT_PRESET

    def _pick(self, avoid: set[str]) -> _Server:
        """Least outstanding requests among servers not in `avoid` and not cooling down."""
        now = time.monotonic()
        with self._lock:
            fresh = [s for s in self._servers if s.address not in avoid] or self._servers
            healthy = [s for s in fresh if s.avoid_until <= now] or fresh
            start = next(self._rr)
            n = len(healthy)
            best = min(range(n), key=lambda i: (healthy[(start + i) % n].outstanding, i))
            server = healthy[(start + best) % n]
            server.outstanding += 1
            return server

    def _done(self, server: _Server, failed: bool) -> None:
        with self._lock:
            server.outstanding -= 1
            if failed:
                server.failures += 1
                cool = min(_COOLDOWN_S[0] * 2 ** (server.failures - 1), _COOLDOWN_S[1])
                server.avoid_until = time.monotonic() + cool
            else:
                server.failures = 0
                server.avoid_until = 0.0

    def _count(self, **deltas: float) -> None:
        with self._lock:
            for name, value in deltas.items():
                setattr(self.counters, name, getattr(self.counters, name) + value)

    def _with_retries(self, path: str, attempt: Callable[[_Server, float], Any]) -> Any:
        """Runs `attempt(server, timeout)` until it returns, a media error ends it, `max_attempts`
        attempts have failed, or the total deadline passes.

        Busy refusals (RESOURCE_EXHAUSTED) do not use attempts: the call waits a jittered,
        exponentially growing pause (`BUSY_BACKOFF_S`, never past the deadline) and asks again,
        preferring a server that did not just refuse it.
        """
        if self._closed:
            raise IOServerError(path, "client is closed")
        self._count(requests=1)
        end = time.monotonic() + self.total_deadline_s
        tried: set[str] = set()
        busy_now: set[str] = set()
        errors: list[str] = []
        failures = busy = 0
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise IOServerError(
                    path, f"no result within the total deadline of {self.total_deadline_s:g} s: "
                          f"{busy} busy refusals (RESOURCE_EXHAUSTED), {failures} failed "
                          f"attempts{': ' + '; '.join(errors[-3:]) if errors else ''}")
            if busy_now >= set(self.addresses):
                busy_now.clear()  # every server refused once: any may have room now
            server = self._pick(tried | busy_now)
            if failures and server.address in tried:  # every server failed once: back off
                time.sleep(min(_BACKOFF_S * 2**failures, 1.0, remaining))
            timeout = min(self.deadline_s, max(end - time.monotonic(), 1e-3))
            try:
                result = attempt(server, timeout)
            except grpc.RpcError as exc:
                code = exc.code()
                if (code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout < self.deadline_s
                        and time.monotonic() >= end):
                    # The call's total budget cut this attempt short, not a server fault: the
                    # server is not marked failed and the loop reports the total deadline.
                    self._done(server, failed=False)
                    continue
                if code == BUSY:
                    self._done(server, failed=False)
                    busy += 1
                    busy_now.add(server.address)
                    cap = min(BUSY_BACKOFF_S[1], BUSY_BACKOFF_S[0] * 2 ** min(busy, 30))
                    pause = min(random.uniform(0.0, cap), max(end - time.monotonic(), 0.0))
                    self._count(busy_refusals=1, busy_wait_s=pause)
                    time.sleep(pause)
                    continue
                if code in RETRYABLE:
                    self._done(server, failed=True)
                    failures += 1
                    tried.add(server.address)
                    self._count(failed_attempts=1)
                    errors.append(f"{server.address}: {code.name} {exc.details()}")
                    log.info("%s failed on %s with %s; retrying elsewhere", path,
                             server.address, code.name)
                    if failures >= self.max_attempts:
                        raise IOServerError(
                            path, f"all {self.max_attempts} attempts failed: "
                                  f"{'; '.join(errors)}") from None
                    continue
                self._done(server, failed=False)
                media_error = wire.error_from_status(code, exc.details() or "",
                                                     exc.trailing_metadata(), path)
                if media_error is not None:
                    raise media_error from None
                raise IOServerError(path, f"{server.address}: {code.name} {exc.details()}") \
                    from None
            except BaseException:
                self._done(server, failed=False)
                raise
            self._done(server, failed=False)
            return result

    def _zstd(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._decompressor, "d", None)
        if d is None:
            d = self._decompressor.d = zstandard.ZstdDecompressor()
        return d

    def _decode_once(self, server: _Server, request: pb2.DecodeRequest,
                     timeout: float) -> DecodedMedia:
        """One attempt: reads the whole stream; any break raises and nothing is returned."""
        path = request.path
        stream = server.stub.Decode(request, timeout=timeout)
        try:
            head = next(stream, None)
            if head is None or not head.HasField("plan"):
                raise IOServerError(path, f"{server.address}: stream did not start with a plan")
            plan = wire.plan_from_proto(head.plan)
            start, stop = head.frame_start, head.frame_stop
            asked_stop = request.frame_stop if request.HasField("frame_stop") else stop
            if (start, stop) != (request.frame_start, asked_stop):
                raise IOServerError(path, f"{server.address}: served frames [{start}, {stop}) "
                                          f"for a request of [{request.frame_start}, "
                                          f"{asked_stop})")
            frames = []
            expected = start
            info: pb2.FrameInfo | None = None
            pieces: list[bytes] = []
            for chunk in stream:
                if chunk.frame != expected:
                    raise IOServerError(path, f"{server.address}: got frame {chunk.frame}, "
                                              f"expected {expected}")
                if chunk.HasField("info"):
                    info, pieces = chunk.info, []
                if info is None:
                    raise IOServerError(path, f"{server.address}: frame {expected} has no header")
                pieces.append(chunk.data)
                if chunk.frame_end:
                    data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                    try:
                        frames.append(wire.decode_frame(info, data, self._zstd()))
                    except (ValueError, zstandard.ZstdError) as exc:
                        raise IOServerError(path, f"{server.address}: frame {expected}: {exc}") \
                            from None
                    expected += 1
                    info, pieces = None, []
        finally:
            stream.cancel()
        if expected != stop or info is not None:
            raise IOServerError(path, f"{server.address}: stream ended at frame {expected}, "
                                      f"expected [{start}, {stop})")
        return DecodedMedia(plan=plan, frame_start=start, frame_stop=stop, frames=tuple(frames))
