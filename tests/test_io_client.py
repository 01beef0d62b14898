"""`IOClient` against real daemons on 127.0.0.1: media errors as `io_server.media` exceptions,
results equal to the embedded (in-process) path, load spread over servers, failover when a server
is SIGKILLed mid-stream or hangs (SIGSTOP -> DEADLINE_EXCEEDED), and exactly-once results.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import threading
import time

import numpy as np
import pytest
import torch

from io_server import synthetic
from io_server.backends import PyAVBackend
from io_server.client import DecodeItem, IOClient, IOServerError, to_torch
from io_server.launch import ServerProcess, start_server
from io_server.media import (
    AccessDeniedError,
    CorruptMediaError,
    DecodedMedia,
    InvalidRequestError,
    MediaNotFoundError,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("media")
    outside = tmp_path_factory.mktemp("outside")
    clips = [synthetic.write_video(root / f"clip{i}.mp4", width=160 + 32 * i, height=120 + 16 * i,
                                   seconds=3 + i % 3, fps=10, seed=10 + i).path
             for i in range(6)]
    return {
        "root": str(root),
        "clips": clips,
        "image": synthetic.write_image(root / "image.jpg", 200, 120, seed=3),
        "truncated": synthetic.write_truncated(clips[0], root / "truncated.mp4", 0.3),
        "outside": synthetic.write_image(outside / "secret.png", 64, 64, seed=4),
    }


@pytest.fixture(scope="module")
def reference(media) -> dict[str, DecodedMedia]:
    """Each clip decoded by the embedded client (no server)."""
    with IOClient(backend=PyAVBackend(threads=1)) as client:
        return {p: client.decode(p) for p in [*media["clips"], media["image"]]}


@pytest.fixture(scope="module")
def servers(media, tmp_path_factory) -> list[ServerProcess]:
    logs = str(tmp_path_factory.mktemp("logs"))
    procs = [start_server([media["root"]], workers=1, log_dir=logs) for _ in range(2)]
    yield procs
    for p in procs:
        p.cleanup()


def _same(got: DecodedMedia, want: DecodedMedia) -> None:
    assert got.plan == want.plan
    assert (got.frame_start, got.frame_stop) == (want.frame_start, want.frame_stop)
    assert len(got.frames) == len(want.frames)
    for a, b in zip(got.frames, want.frames, strict=True):
        np.testing.assert_array_equal(a, b)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Errors become io_server.media exceptions (never retried)


@pytest.mark.parametrize("embedded", [False, True], ids=["server", "in-process"])
def test_media_errors_raise_the_matching_exception(servers, media, embedded):
    addresses = () if embedded else [s.address for s in servers]
    missing = os.path.join(media["root"], "missing.mp4")
    with IOClient(addresses, deadline_s=30) as client:
        with pytest.raises(MediaNotFoundError) as info:
            client.decode(missing)
        assert info.value.path == missing and "no such file" in info.value.reason
        with pytest.raises(CorruptMediaError) as info:
            client.decode(media["truncated"])
        assert info.value.path == media["truncated"] and info.value.reason
        with pytest.raises(InvalidRequestError, match=r"\[0, 1000000000\)"):
            client.decode(media["clips"][0], 0, 10**9)
        with pytest.raises(InvalidRequestError):
            client.decode(media["clips"][0], -1, 2)
        if not embedded:  # roots are a server feature
            with pytest.raises(AccessDeniedError) as info:
                client.probe(media["outside"])
            assert "outside the allowed roots" in info.value.reason


def test_media_errors_are_not_retried(servers, media):
    with IOClient([s.address for s in servers]) as client:
        before = {a: r.requests for a, r in client.stats().items()}
        with pytest.raises(MediaNotFoundError):
            client.decode(os.path.join(media["root"], "gone.mp4"))
        after = {a: r.requests for a, r in client.stats().items()}
    assert sum(after.values()) - sum(before.values()) == 1


# ---------------------------------------------------------------------------------------------
# Results


def test_server_results_equal_the_embedded_decode(servers, media, reference):
    with IOClient([s.address for s in servers]) as client:
        for path, want in reference.items():
            _same(client.decode(path), want)
            assert client.probe(path) == want.plan
        part = client.decode(media["clips"][1], 2, 5)
    whole = reference[media["clips"][1]]
    assert (part.frame_start, part.frame_stop) == (2, 5)
    for a, b in zip(part.frames, whole.frames[2:5], strict=True):
        np.testing.assert_array_equal(a, b)


def test_uncompressed_transport_gives_the_same_frames(servers, media, reference):
    with IOClient([servers[0].address], compression="none") as client:
        _same(client.decode(media["clips"][2]), reference[media["clips"][2]])


def test_to_torch_shares_memory(reference, media):
    media_ = reference[media["clips"][0]]
    tensors = to_torch(media_)
    assert all(t.dtype == torch.uint8 for t in tensors)
    assert tensors[0].shape == media_.frames[0].shape
    chw = to_torch(media_, channels_first=True)
    assert chw[0].shape == (3, *media_.frames[0].shape[:2])
    assert tensors[0].data_ptr() == media_.frames[0].ctypes.data


def test_decode_many_spreads_over_servers_and_keeps_order(servers, media, reference):
    items = [DecodeItem(p) for p in media["clips"]] * 2 + [DecodeItem(media["image"])]
    with IOClient([s.address for s in servers], max_concurrency=4) as client:
        before = {a: r.decode_requests for a, r in client.stats().items()}
        results = client.decode_many(items)
        after = {a: r.decode_requests for a, r in client.stats().items()}
        bad = client.decode_many([DecodeItem(media["truncated"]), DecodeItem(media["image"])],
                                 return_exceptions=True)
    for item, got in zip(items, results, strict=True):
        _same(got, reference[item.path])
    served = [after[a] - before[a] for a in after]
    assert sum(served) == len(items) and min(served) > 0, served
    assert isinstance(bad[0], CorruptMediaError)
    _same(bad[1], reference[media["image"]])


# ---------------------------------------------------------------------------------------------
# Failover


def test_dead_address_is_skipped(servers, media, reference):
    dead = f"127.0.0.1:{_free_port()}"
    with IOClient([dead, servers[0].address], deadline_s=10) as client:
        for path in media["clips"][:3]:
            _same(client.decode(path), reference[path])
    with (IOClient([dead], deadline_s=5, max_attempts=2) as client,
          pytest.raises(IOServerError, match="UNAVAILABLE")):
        client.decode(media["clips"][0])


def test_sigkill_mid_stream_every_request_completes_exactly_once(media, reference, tmp_path,
                                                                 caplog):
    """Two servers; one is SIGKILLed while it is serving: every request of the batch still
    returns exactly one complete, correct result (through the survivor)."""
    victim = start_server([media["root"]], workers=1, log_dir=str(tmp_path))
    survivor = start_server([media["root"]], workers=1, log_dir=str(tmp_path))
    try:
        items = [DecodeItem(p) for p in media["clips"]] * 4
        results: list[object] = []
        client = IOClient([victim.address, survivor.address], deadline_s=30, max_attempts=3,
                          max_concurrency=4)
        caplog.set_level(logging.INFO, logger="io_server.client")
        runner = threading.Thread(target=lambda: results.append(client.decode_many(items)))
        runner.start()
        probe = IOClient([victim.address])
        deadline = time.monotonic() + 30
        killed_with_in_flight = 0
        while time.monotonic() < deadline and runner.is_alive():
            stats = probe.stats()[victim.address]
            if stats is not None and stats.in_flight > 0 and stats.frames_out > 0:
                killed_with_in_flight = stats.in_flight
                victim.kill()
                break
            time.sleep(0.01)
        runner.join(timeout=90)
        probe.close()
        assert not runner.is_alive()
        assert killed_with_in_flight > 0, "the victim never had a request in flight"
        (got,) = results
        retried = [r for r in caplog.records if f"failed on {victim.address}" in r.getMessage()]
        assert retried, "no request was redone after the kill"
        assert len(got) == len(items)
        for item, media_ in zip(items, got, strict=True):
            _same(media_, reference[item.path])
        survivor_stats = client.stats()[survivor.address]
        assert survivor_stats.decode_requests >= killed_with_in_flight
        client.close()
        # the victim's worker processes notice their parent is gone and exit
        pids = [int(p) for p in re.search(r"worker processes \[([\d, ]+)\]",
                                          victim.log()).group(1).split(",")]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)
    finally:
        victim.cleanup()
        survivor.cleanup()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_hung_server_deadline_exceeded_then_retried_elsewhere(servers, media, reference,
                                                              tmp_path, caplog):
    hung = start_server([media["root"]], workers=1, log_dir=str(tmp_path))
    try:
        os.kill(hung.pid, signal.SIGSTOP)
        caplog.set_level(logging.INFO, logger="io_server.client")
        with IOClient([hung.address, servers[0].address], deadline_s=1.0) as client:
            t0 = time.monotonic()
            for path in media["clips"][:2]:
                _same(client.decode(path), reference[path])
            # the hung server cost one deadline, then it was avoided
            assert time.monotonic() - t0 < 10
        assert any(f"failed on {hung.address} with DEADLINE_EXCEEDED" in r.getMessage()
                   for r in caplog.records)
    finally:
        os.kill(hung.pid, signal.SIGCONT)
        hung.cleanup()


def test_in_process_client_plans_each_file_version_once(tmp_path):
    from io_server.keye import DEFAULT_PRESET

    class CountingBackend(PyAVBackend):
        def __init__(self) -> None:
            super().__init__()
            self.probes = 0

        def probe(self, path, preset=DEFAULT_PRESET):
            self.probes += 1
            return super().probe(path, preset)

    path = str(tmp_path / "clip.mp4")
    synthetic.write_video(path, width=112, height=84, seconds=3.0, fps=8.0, seed=3,
                          scene_cuts=(1.5,))
    backend = CountingBackend()
    client = IOClient(backend=backend)
    whole = client.decode(path)
    parts = [client.decode(path, a, b) for a, b in ((0, 2), (2, 4), (4, whole.plan.num_frames))]
    assert backend.probes == 1
    assert [f.tobytes() for p in parts for f in p.frames] == [f.tobytes() for f in whole.frames]
    # A rewritten file is planned again.
    synthetic.write_video(path, width=140, height=112, seconds=2.0, fps=8.0, seed=4)
    os.utime(path, ns=(1, 1))
    assert client.decode(path).plan.source_width == 140
    assert backend.probes == 2


# ---------------------------------------------------------------------------------------------
# YUV 4:2:0 wire format


def test_yuv_transport_gives_the_servers_rgb_with_half_the_bytes(servers, media):
    """The server sends planes, the client converts: the frames equal the server's own RGB
    answer (fast path) bit for bit, with exactly half the frame bytes before zstd."""
    from io_server.media import Yuv420Frame

    address = servers[0].address
    path = media["clips"][3]
    with (IOClient([address], resize="fast") as rgb_client,
          IOClient([address], resize="fast", pixel_format="yuv420p") as yuv_client):
        s0 = rgb_client.stats()[address]
        rgb = rgb_client.decode(path)
        s1 = rgb_client.stats()[address]
        got = yuv_client.decode(path)
        s2 = rgb_client.stats()[address]
        kept = yuv_client.decode(path, keep_yuv=True)
        _same(got, rgb)
        assert all(isinstance(f, Yuv420Frame) for f in kept.frames)
        for t, want in zip(to_torch(kept), rgb.frames, strict=True):  # the GPU converter, on CPU
            np.testing.assert_array_equal(t.numpy(), want)
        rgb_raw = s1.raw_bytes_out - s0.raw_bytes_out
        yuv_raw = s2.raw_bytes_out - s1.raw_bytes_out
        assert yuv_raw * 2 == rgb_raw == sum(f.nbytes for f in rgb.frames)
        assert s2.wire_bytes_out - s1.wire_bytes_out < s1.wire_bytes_out - s0.wire_bytes_out
        assert s2.resize == "exact"  # the server's default; these clients asked for "fast"
    # The default (exact) path makes RGB frames that 4:2:0 cannot carry: refused, with why.
    with IOClient([address], pixel_format="yuv420p") as client, \
            pytest.raises(InvalidRequestError, match="resize 'fast'"):
        client.decode(path)
    with pytest.raises(ValueError, match="resize='fast'"):
        IOClient([address], resize="exact", pixel_format="yuv420p")


@pytest.mark.slow
def test_an_attempt_cut_by_the_total_deadline_is_not_a_server_failure():
    """A server that does not answer within the call's whole budget: the call ends with the
    total-deadline error, and the attempt the budget cut short is not counted as a failure of the
    server (its per-attempt deadline, 5 s, never ran out)."""
    from concurrent import futures

    import grpc

    from io_server.proto import io_server_pb2_grpc as pb2_grpc

    release = threading.Event()

    class Silent(pb2_grpc.IOServerServicer):
        def Decode(self, request, context):
            release.wait(10)
            return iter(())

    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb2_grpc.add_IOServerServicer_to_server(Silent(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client = IOClient([f"127.0.0.1:{port}"], deadline_s=5, total_deadline_s=0.5)
        t0 = time.monotonic()
        with pytest.raises(IOServerError, match=r"total deadline of 0\.5 s: 0 busy refusals "
                                                r"\(RESOURCE_EXHAUSTED\), 0 failed attempts"):
            client.decode("/any/clip.mp4")
        assert time.monotonic() - t0 < 3.0
        assert client.counters.failed_attempts == 0
        client.close()
    finally:
        release.set()
        server.stop(grace=None)
