"""Hostile input and overload against a real daemon (issue 14, items 1-6, and its load test).

One server process for the module (`--workers 1 --max-in-flight 4 --worker-memory-mb 600
--max-pixels 80000000`), spoken to with the raw stubs (to see statuses and trailers) and with
`IOClient`. Every case checks three things:
- the clear status and message;
- afterwards the server still answers health SERVING and decodes a good clip bit-exact;
- nothing is lost: a stream of good decodes runs beside the hostile requests, and every one of
  them completes, correct.

The load test: 64 clients, each with its own channel, against `--max-in-flight 4`; every request
completes exactly once within its deadline, and `Stats.rejected` equals the refusals the clients
saw.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from io_server import synthetic, wire
from io_server.backends import PyAVBackend
from io_server.client import IOClient, IOServerError
from io_server.launch import ServerProcess, start_server
from io_server.media import DecodedMedia
from io_server.proto import io_server_pb2 as pb2
from io_server.proto import io_server_pb2_grpc as pb2_grpc
from io_server.server import SERVICE_NAME

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MAX_PIXELS = 80_000_000
WORKER_MB = 600


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hostile")
    paths = {
        "root": str(root),
        "clip": synthetic.write_video(root / "clip.mp4", width=160, height=112, seconds=2.0,
                                      fps=10, seed=51, scene_cuts=(1.0,)).path,
        "clip2": synthetic.write_video(root / "clip2.mp4", width=128, height=96, seconds=2.0,
                                       fps=8, seed=52).path,
        # Large uncompressed replies, read slowly: they hold in-flight slots.
        "hold": synthetic.write_video(root / "hold.mp4", width=480, height=360, seconds=6.0,
                                      fps=10, seed=53).path,
        # Image bombs: headers declaring huge frames, a few hundred bytes each.
        "bomb_rgb": synthetic.write_png_zeros(root / "bomb_rgb.png", 16000, 16000, rows=16),
        "bomb_rgba16": synthetic.write_png_zeros(root / "bomb_rgba16.png", 16000, 16000,
                                                 bit_depth=16, color_type=6, rows=16),
        "bomb_30k": synthetic.write_png_zeros(root / "bomb_30k.png", 30000, 30000, rows=4),
        # Under the pixel limit, but its decode needs more than the worker's 600 MiB.
        "heavy": synthetic.write_png_zeros(root / "heavy.png", 8000, 8000),
    }
    os.symlink(root / "loop_b", root / "loop_a")
    os.symlink(root / "loop_a", root / "loop_b")
    os.symlink(root / "self_loop", root / "self_loop")
    paths["loop_a"], paths["self_loop"] = str(root / "loop_a"), str(root / "self_loop")
    return paths


@pytest.fixture(scope="module")
def reference(media: dict[str, str]) -> dict[str, DecodedMedia]:
    backend = PyAVBackend(threads=1)
    return {p: backend.decode(p) for p in (media["clip"], media["clip2"])}


@pytest.fixture(scope="module")
def server(media: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    args = ["--max-in-flight", "4", "--worker-memory-mb", str(WORKER_MB), "--max-pixels",
            str(MAX_PIXELS)]
    with start_server([media["root"]], workers=1, args=args,
                      log_dir=str(tmp_path_factory.mktemp("logs"))) as proc:
        yield proc


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pb2_grpc.IOServerStub]:
    channel = grpc.insecure_channel(server.address)
    yield pb2_grpc.IOServerStub(channel)
    channel.close()


def _same(got: DecodedMedia, want: DecodedMedia) -> None:
    assert got.plan == want.plan and len(got.frames) == len(want.frames)
    for a, b in zip(got.frames, want.frames, strict=True):
        np.testing.assert_array_equal(a, b)


def _status(call) -> grpc.RpcError:  # noqa: ANN001 - a stub call
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if not isinstance(result, pb2.ProbeReply):
            list(result)
    return info.value


def _check_bounded(err: grpc.RpcError) -> None:
    """Status details and trailers are printable ASCII and short, whatever the client sent."""
    assert len(err.details()) < 2 * wire.META_REASON_CHARS
    for key, value in err.trailing_metadata() or ():
        assert isinstance(value, str) and value.isascii() and value.isprintable(), (key, value)
        assert len(value) <= wire.META_REASON_CHARS + 64


def _still_serving(server: ServerProcess, media: dict[str, str],
                   reference: dict[str, DecodedMedia]) -> None:
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()
    with IOClient([server.address], deadline_s=30) as client:
        _same(client.decode(media["clip"]), reference[media["clip"]])
    assert server.proc.poll() is None


@contextlib.contextmanager
def _good_traffic(server: ServerProcess, media: dict[str, str],
                  reference: dict[str, DecodedMedia], count: int = 6) -> Iterator[None]:
    """Good decodes running beside the block; on exit every one must have completed, correct."""
    results: list[DecodedMedia] = []
    errors: list[BaseException] = []
    paths = [media["clip"], media["clip2"]] * (count // 2)

    def run() -> None:
        try:
            with IOClient([server.address], deadline_s=30) as client:
                for p in paths:
                    results.append(client.decode(p))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield
    finally:
        thread.join(timeout=120)
    assert not thread.is_alive() and not errors, errors
    assert len(results) == len(paths)
    for p, got in zip(paths, results, strict=True):
        _same(got, reference[p])


# ---------------------------------------------------------------------------------------------
# 1. Control characters


CONTROL_PATHS = ["clip\x00.mp4", "clip.mp4\nFORGED-LOG-LINE io-server ERROR hacked",
                 "\r\nFORGED-LOG-LINE-2", "\x1b[31mred.mp4", "clip\x7f.mp4", "a\u2028b.mp4",
                 "clip\t.mp4"]


def test_control_characters_are_invalid_argument_and_logs_stay_clean(stub, server, media,
                                                                      reference):
    with _good_traffic(server, media, reference):
        for name in CONTROL_PATHS:
            path = os.path.join(media["root"], name)
            for call in (lambda p=path: stub.Decode(pb2.DecodeRequest(path=p), timeout=10),
                         lambda p=path: stub.Probe(pb2.ProbeRequest(path=p), timeout=10)):
                err = _status(call)
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.details())
                assert "control character U+" in err.details()
                _check_bounded(err)
    log = server.log()
    assert not any(line.startswith("FORGED-LOG-LINE") for line in log.splitlines())
    assert "FORGED-LOG-LINE io-server ERROR hacked" in log  # logged, but escaped on one line
    assert re.search(r"clip\.mp4\\nFORGED-LOG-LINE", log)
    _still_serving(server, media, reference)


# ---------------------------------------------------------------------------------------------
# 2 and 3. Long paths, long names, and the long-path DoS


def test_long_paths_and_names_get_a_clear_status_never_a_metadata_error(stub, server, media,
                                                                        reference):
    def missing(total: int) -> str:  # a path of `total` bytes inside the root, components < 255
        base = media["root"] + "/"
        parts, left = [], total - len(base)
        while left > 0:
            take = min(200, left)
            parts.append("d" * (take - 1) + ("/" if left > take else "x"))
            left -= take
        return base + "".join(parts)

    with _good_traffic(server, media, reference):
        for total in (2000, 4000, 4095, 4096, 4500, 5000, 5500, 6000, 6500, 7000, 10_240):
            path = missing(total)
            assert len(path) == total
            err = _status(lambda p=path: stub.Decode(pb2.DecodeRequest(path=p), timeout=10))
            _check_bounded(err)
            if total <= 4095:
                assert err.code() == grpc.StatusCode.NOT_FOUND, (total, err.details())
            else:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (total, err.details())
                assert f"{total} bytes long, over the limit of 4095" in err.details()
        err = _status(lambda: stub.Probe(pb2.ProbeRequest(
            path=media["root"] + "/" + "n" * 300 + ".mp4"), timeout=10))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "NAME_MAX" in err.details()
        for field in ("preset", "resize"):
            request = pb2.DecodeRequest(path=media["clip"], **{field: "p" * 100_000})
            err = _status(lambda r=request: stub.Decode(r, timeout=10))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "100000 characters" in err.details()
            _check_bounded(err)
    _still_serving(server, media, reference)


def test_long_path_dos_is_refused_before_touching_the_filesystem(server, media, reference):
    """Forty 400 KB `a/a/a...` paths with 1 s deadlines: each is refused at once (realpath
    would cost ~7 s of server CPU each), and health and decoding answer meanwhile."""
    bomb = media["root"] + "/" + "a/" * 200_000
    channel = grpc.insecure_channel(server.address)
    stub = pb2_grpc.IOServerStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    codes: list[grpc.StatusCode] = []
    cpu0 = _cpu_seconds(server.pid)
    with _good_traffic(server, media, reference):
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(_status, lambda: stub.Decode(pb2.DecodeRequest(path=bomb),
                                                                timeout=1.0))
                       for _ in range(40)]
            t_health = time.monotonic()
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                health_pb2.HealthCheckResponse.SERVING
            health_s = time.monotonic() - t_health
            for f in futures:
                err = f.result()
                codes.append(err.code())
                assert f"{len(bomb)} bytes long" in err.details()
                _check_bounded(err)
        elapsed = time.monotonic() - t0
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
    assert elapsed < 10 and health_s < 1.0, (elapsed, health_s)
    assert _cpu_seconds(server.pid) - cpu0 < 5.0  # 40 x realpath would be ~280 s
    # A path at the limit is cheap to resolve.
    at_limit = media["root"] + "/" + "a/" * ((4095 - len(media["root"]) - 2) // 2)
    t0 = time.monotonic()
    err = _status(lambda: stub.Probe(pb2.ProbeRequest(path=at_limit), timeout=5))
    assert err.code() == grpc.StatusCode.NOT_FOUND and time.monotonic() - t0 < 0.5
    channel.close()
    _still_serving(server, media, reference)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# 4. Overload: backpressure, never a lost sample (the load test)


def test_64_clients_against_max_in_flight_4_every_request_exactly_once(server, media,
                                                                       reference):
    clients = [IOClient([server.address], deadline_s=20, total_deadline_s=60) for _ in range(64)]
    paths = [media["clip"] if i % 2 else media["clip2"] for i in range(64)]
    barrier = threading.Barrier(64)

    def one(k: int) -> tuple[DecodedMedia, float]:
        barrier.wait()
        t0 = time.monotonic()
        media_ = clients[k].decode(paths[k])
        return media_, time.monotonic() - t0

    with IOClient([server.address]) as probe:
        before = probe.stats()[server.address]
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            results = list(pool.map(one, range(64)))
        after = probe.stats()[server.address]
    for k, (got, seconds) in enumerate(results):
        _same(got, reference[paths[k]])
        assert seconds < clients[k].total_deadline_s
    refused = sum(c.counters.busy_refusals for c in clients)
    assert refused > 0, "64 clients never met the limit of 4"
    assert after.rejected - before.rejected == refused  # every refusal counted
    assert (after.errors_by_code.get("RESOURCE_EXHAUSTED", 0)
            - before.errors_by_code.get("RESOURCE_EXHAUSTED", 0)) == refused
    assert after.decode_requests - before.decode_requests == 64 + refused
    frames = sum(len(m.frames) for m, _ in results)
    assert after.frames_out - before.frames_out == frames  # each request served exactly once
    assert all(c.counters.failed_attempts == 0 for c in clients)
    for c in clients:
        c.close()
    _still_serving(server, media, reference)


def test_busy_waits_end_at_the_total_deadline_then_the_request_goes_through(server, media,
                                                                            reference):
    """With every slot held, a request waits (jittered backoff) for at most its total deadline
    and then fails naming the refusals; once slots free up, the same call succeeds."""
    channel = grpc.insecure_channel(server.address, options=[("grpc.http2.bdp_probe", 0)])
    stub = pb2_grpc.IOServerStub(channel)
    held = [stub.Decode(pb2.DecodeRequest(path=media["hold"], compression=pb2.COMPRESSION_NONE),
                        timeout=60) for _ in range(4)]
    try:
        for call in held:  # admitted and decoded; the replies wait for us to read them
            assert next(call).HasField("plan")
        client = IOClient([server.address], deadline_s=5, total_deadline_s=1.5)
        t0 = time.monotonic()
        with pytest.raises(IOServerError, match=r"total deadline of 1\.5 s: \d+ busy refusals"):
            client.decode(media["clip"])
        waited = time.monotonic() - t0
        assert 1.4 < waited < 3.0, waited
        assert client.counters.busy_refusals >= 2 and client.counters.failed_attempts == 0
    finally:
        for call in held:
            call.cancel()
        channel.close()
    deadline = time.monotonic() + 10
    with IOClient([server.address]) as probe:
        while probe.stats()[server.address].in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
    _same(client.decode(media["clip"]), reference[media["clip"]])
    client.close()
    _still_serving(server, media, reference)


# ---------------------------------------------------------------------------------------------
# 5. Image bombs and the worker memory bound


def _worker_peak_rss_mb(server: ServerProcess) -> float:
    match = re.search(r"worker processes \[([\d, ]+)\]", server.log())
    assert match, server.log()
    peak = 0.0
    for pid in match.group(1).split(","):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{int(pid)}/status") as f:
            hwm = re.search(r"VmHWM:\s+(\d+) kB", f.read())
            peak = max(peak, int(hwm.group(1)) / 1024) if hwm else peak
    return peak


def test_image_bombs_are_refused_before_decoding_naming_size_and_limit(stub, server, media,
                                                                       reference):
    with _good_traffic(server, media, reference):
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two at once
            errs = list(pool.map(lambda k: _status(lambda: stub.Decode(
                pb2.DecodeRequest(path=media[k]), timeout=30)), ["bomb_rgb", "bomb_rgba16"]))
        errs.append(_status(lambda: stub.Probe(pb2.ProbeRequest(path=media["bomb_30k"]),
                                               timeout=30)))
        for err, size in zip(errs, ["16000x16000 frame = 256,000,000", "16000x16000",
                                    "30000x30000 frame = 900,000,000"], strict=True):
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            assert size in err.details() and "limit of 80,000,000 pixels" in err.details()
            _check_bounded(err)
    assert _worker_peak_rss_mb(server) < 700  # a decoded 16000^2 bomb alone is 768 MB
    _still_serving(server, media, reference)


def test_a_decode_over_the_worker_memory_limit_fails_alone(stub, server, media, reference):
    with _good_traffic(server, media, reference):
        err = _status(lambda: stub.Decode(pb2.DecodeRequest(path=media["heavy"]), timeout=60))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert f"worker memory limit of {WORKER_MB} MiB" in err.details()
    assert _worker_peak_rss_mb(server) < WORKER_MB + 200  # RLIMIT_DATA plus mapped code
    _still_serving(server, media, reference)


# ---------------------------------------------------------------------------------------------
# 6. Symlink loops


def test_a_symlink_loop_is_named_a_loop(stub, server, media, reference):
    with _good_traffic(server, media, reference):
        for key in ("loop_a", "self_loop"):
            for call in (lambda k=key: stub.Decode(pb2.DecodeRequest(path=media[k]), timeout=10),
                         lambda k=key: stub.Probe(pb2.ProbeRequest(path=media[k]), timeout=10)):
                err = _status(call)
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
                assert "symlink loop" in err.details() and "no such file" not in err.details()
                assert media[key] in err.details()
    with IOClient([server.address]) as client, pytest.raises(Exception, match="symlink loop"):
        client.decode(media["loop_a"])
    _still_serving(server, media, reference)
