"""Counters of the I/O server and GPU utilisation read through NVML (`pynvml`).

`ServerCounters` is the daemon's thread-safe tally (requests, errors, bytes, decode seconds,
in-flight); `GpuMonitor` reads NVDEC and memory utilisation of every GPU on the host and reports
why it cannot where there is no driver or no device (CPU hosts), instead of failing.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import ModuleType


@dataclass(frozen=True)
class GpuStat:
    """Utilisation of one GPU at the moment it was read."""

    index: int
    name: str
    decoder_utilization_pct: int
    """NVDEC busy percentage (`nvmlDeviceGetDecoderUtilization`)."""
    gpu_utilization_pct: int
    memory_utilization_pct: int
    """Memory-controller busy percentage."""
    memory_used_bytes: int
    memory_total_bytes: int


@dataclass(frozen=True)
class StatsSnapshot:
    """A consistent copy of `ServerCounters` (the fields of the `Stats` reply)."""

    uptime_s: float
    requests: int
    decode_requests: int
    probe_requests: int
    errors: int
    errors_by_code: dict[str, int]
    rejected: int
    bytes_in: int
    file_bytes_read: int
    raw_bytes_out: int
    wire_bytes_out: int
    frames_out: int
    decode_seconds: float
    compress_seconds: float
    worker_cpu_seconds: float
    in_flight: int
    plan_cache_hits: int
    plan_cache_misses: int
    gpus: tuple[GpuStat, ...] = ()
    gpu_unavailable_reason: str = ""


@dataclass
class ServerCounters:
    """Thread-safe counters of one server process; `snapshot()` copies them under the lock."""

    started_at: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _counts: Counter[str] = field(default_factory=Counter, repr=False)
    _errors_by_code: Counter[str] = field(default_factory=Counter, repr=False)
    _seconds: Counter[str] = field(default_factory=Counter, repr=False)

    def add(self, **counts: int) -> None:
        """Adds integer counts, e.g. `add(requests=1, decode_requests=1)`."""
        with self._lock:
            self._counts.update(counts)

    def add_seconds(self, *, decode: float = 0.0, compress: float = 0.0,
                    cpu: float = 0.0) -> None:
        with self._lock:
            self._seconds["decode"] += decode
            self._seconds["compress"] += compress
            self._seconds["cpu"] += cpu

    def add_error(self, code_name: str) -> None:
        with self._lock:
            self._counts["errors"] += 1
            self._errors_by_code[code_name] += 1

    def snapshot(self, *, in_flight: int) -> StatsSnapshot:
        with self._lock:
            c = self._counts
            return StatsSnapshot(
                uptime_s=time.monotonic() - self.started_at,
                requests=c["requests"],
                decode_requests=c["decode_requests"],
                probe_requests=c["probe_requests"],
                errors=c["errors"],
                errors_by_code=dict(self._errors_by_code),
                rejected=c["rejected"],
                bytes_in=c["bytes_in"],
                file_bytes_read=c["file_bytes_read"],
                raw_bytes_out=c["raw_bytes_out"],
                wire_bytes_out=c["wire_bytes_out"],
                frames_out=c["frames_out"],
                decode_seconds=self._seconds["decode"],
                compress_seconds=self._seconds["compress"],
                worker_cpu_seconds=self._seconds["cpu"],
                in_flight=in_flight,
                plan_cache_hits=c["plan_cache_hits"],
                plan_cache_misses=c["plan_cache_misses"],
            )


class GpuMonitor:
    """Reads GPU utilisation through NVML; absent GPUs are reported, never raised.

    NVML is initialised once in the constructor and shut down by `close()`. On a host without the
    NVIDIA driver or without devices, `read()` returns `((), reason)`.
    """

    def __init__(self) -> None:
        self._nvml: ModuleType | None = None
        self._reason = ""
        try:
            import pynvml
        except ImportError:
            self._reason = "pynvml is not installed (pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self._reason = f"NVML unavailable: {exc}"
            return
        self._nvml = pynvml

    def read(self) -> tuple[tuple[GpuStat, ...], str]:
        """Returns the per-GPU stats, and the reason they are absent (empty when present)."""
        nvml = self._nvml
        if nvml is None:
            return (), self._reason
        try:
            gpus = []
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = nvml.nvmlDeviceGetName(handle)
                decoder_pct, _period_us = nvml.nvmlDeviceGetDecoderUtilization(handle)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                gpus.append(
                    GpuStat(
                        index=index,
                        name=name.decode() if isinstance(name, bytes) else str(name),
                        decoder_utilization_pct=int(decoder_pct),
                        gpu_utilization_pct=int(rates.gpu),
                        memory_utilization_pct=int(rates.memory),
                        memory_used_bytes=int(memory.used),
                        memory_total_bytes=int(memory.total),
                    )
                )
        except nvml.NVMLError as exc:
            return (), f"NVML query failed: {exc}"
        if not gpus:
            return (), "NVML reports no GPU"
        return tuple(gpus), ""

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None
            self._reason = "GPU monitor closed"
