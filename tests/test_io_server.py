"""The I/O daemon as a real process on 127.0.0.1 (`python -m io_server --port 0`), spoken to with
the raw gRPC stubs: status codes for bad input, frames against two references (the in-process
decode, bit-exact, and an independent PyAV decode + torch's antialiased bilinear resize as Keye's
processor does it, within one level), chunking, bounded admission, health, stats, worker crash
recovery and graceful SIGTERM shutdown. Hostile input and overload: tests/test_io_hardening.py.

Every server is started by a fixture or a `with` block and killed (its whole process group) in
teardown, also when a test fails.
"""

from __future__ import annotations

import os
import re
import signal
import time

import av
import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from io_server import keye, synthetic, wire
from io_server.backends import PyAVBackend
from io_server.launch import ServerProcess, start_server
from io_server.media import MediaKind
from io_server.proto import io_server_pb2 as pb2
from io_server.proto import io_server_pb2_grpc as pb2_grpc
from io_server.server import SERVICE_NAME
from io_server.worker import decode_media

pytestmark = pytest.mark.timeout(120)

CHUNK = 65536  # the smallest --chunk-bytes: frames of the test clips span several messages
HOLD_OPTIONS = [("grpc.http2.bdp_probe", 0)]  # keep the receive window small: unread = in flight


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("media")
    outside = tmp_path_factory.mktemp("outside")
    paths = {
        "root": str(root),
        "clip": synthetic.write_video(root / "clip.mp4", width=320, height=240, seconds=6,
                                      fps=12, seed=1).path,
        "hold": synthetic.write_video(root / "hold.mp4", width=640, height=480, seconds=8,
                                      fps=10, seed=3).path,
        "image": synthetic.write_image(root / "image.png", 500, 300, seed=2),
        "outside": synthetic.write_image(outside / "secret.png", 64, 64, seed=4),
    }
    paths["truncated"] = synthetic.write_truncated(paths["clip"], root / "truncated.mp4", 0.4)
    paths["garbage"] = synthetic.write_garbage(root / "garbage.mp4", 4096, seed=5)
    os.symlink(paths["outside"], root / "link_out.png")
    paths["link_out"] = str(root / "link_out.png")
    return paths


@pytest.fixture(scope="module")
def server(media: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    with start_server([media["root"]], workers=1,
                      args=["--chunk-bytes", str(CHUNK), "--max-in-flight", "2"],
                      log_dir=str(tmp_path_factory.mktemp("logs"))) as proc:
        yield proc


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> pb2_grpc.IOServerStub:
    channel = grpc.insecure_channel(server.address)
    yield pb2_grpc.IOServerStub(channel)
    channel.close()


def _error(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call()  # type: ignore[operator]
        if not isinstance(result, pb2.ProbeReply):
            list(result)
    return info.value


def _decode_raw(stub: pb2_grpc.IOServerStub, **kwargs: object) -> list[pb2.DecodeChunk]:
    return list(stub.Decode(pb2.DecodeRequest(**kwargs), timeout=60))


def _frames(chunks: list[pb2.DecodeChunk]) -> list[np.ndarray]:
    """Reassembles frames from a raw reply (the protocol as documented in the .proto)."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    frames, info, pieces = [], None, []
    for chunk in chunks[1:]:
        if chunk.HasField("info"):
            info, pieces = chunk.info, []
        pieces.append(chunk.data)
        if chunk.frame_end:
            frames.append(wire.decode_frame(info, b"".join(pieces), dctx))
    return frames


# ---------------------------------------------------------------------------------------------
# Bad input: one status code each, and the server keeps serving


def test_missing_file_is_not_found_naming_the_path(stub, media, server):
    path = os.path.join(media["root"], "no_such_clip.mp4")
    err = _error(lambda: stub.Decode(pb2.DecodeRequest(path=path), timeout=30))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert path in err.details()
    err = _error(lambda: stub.Probe(pb2.ProbeRequest(path=path), timeout=30))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert re.search(rf"Probe {re.escape(path)} -> NOT_FOUND: no such file", server.log())


@pytest.mark.parametrize("name", ["truncated", "garbage"])
def test_corrupt_video_is_invalid_argument_and_server_keeps_serving(stub, media, server, name):
    err = _error(lambda: stub.Decode(pb2.DecodeRequest(path=media[name]), timeout=60))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert media[name] in err.details()
    meta = dict(err.trailing_metadata())
    assert meta[wire.META_TYPE] == "CorruptMediaError"
    assert meta[wire.META_REASON]  # FFmpeg's reason, non-empty
    assert f"Decode {media[name]} -> INVALID_ARGUMENT" in server.log()
    chunks = _decode_raw(stub, path=media["clip"])
    assert len(_frames(chunks)) == len(chunks[0].plan.tokens) == 12


@pytest.mark.parametrize("which", ["outside", "dotdot", "symlink"])
def test_paths_outside_the_roots_are_permission_denied(stub, media, which):
    path = {
        "outside": media["outside"],
        "dotdot": os.path.join(media["root"], "..", os.path.basename(os.path.dirname(
            media["outside"])), "secret.png"),
        "symlink": media["link_out"],
    }[which]
    assert os.path.exists(path)  # the file is there: only the roots forbid it
    for call in (lambda: stub.Decode(pb2.DecodeRequest(path=path), timeout=30),
                 lambda: stub.Probe(pb2.ProbeRequest(path=path), timeout=30)):
        err = _error(call)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert path in err.details()


@pytest.mark.parametrize("start,stop", [(0, 10**9), (10**9, None), (-1, 4), (0, -3), (5, 2),
                                        (10, 13), (12, None)])
def test_absurd_frame_ranges_are_invalid_argument(stub, media, start, stop):
    # clip.mp4 has 12 sampled frames: [10, 13) and [12, end) fall outside the plan
    req = pb2.DecodeRequest(path=media["clip"], frame_start=start)
    if stop is not None:
        req.frame_stop = stop
    if (start, stop) == (12, None):  # [12, 12) is a valid empty range
        chunks = _decode_raw(stub, path=media["clip"], frame_start=12)
        assert len(chunks) == 1 and chunks[0].frame_start == chunks[0].frame_stop == 12
        return
    err = _error(lambda: stub.Decode(req, timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(start) in err.details()


def test_unknown_preset_is_invalid_argument(stub, media):
    err = _error(lambda: stub.Probe(pb2.ProbeRequest(path=media["clip"], preset="turbo"),
                                    timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "turbo" in err.details()


def test_over_max_in_flight_is_resource_exhausted_at_once(server, media):
    # --max-in-flight 2: hold two raw streams open without reading them, the third is refused.
    channel = grpc.insecure_channel(server.address, options=HOLD_OPTIONS)
    stub = pb2_grpc.IOServerStub(channel)
    _wait_idle(stub)  # an earlier test's request may release its slot a moment after its reply
    held = [stub.Decode(pb2.DecodeRequest(path=media["hold"],
                                          compression=pb2.COMPRESSION_NONE), timeout=60)
            for _ in range(2)]
    try:
        for call in held:
            assert next(call).HasField("plan")
        assert stub.Stats(pb2.StatsRequest()).in_flight == 2
        t0 = time.monotonic()
        err = _error(lambda: stub.Decode(pb2.DecodeRequest(path=media["clip"]), timeout=30))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - t0 < 5.0  # refused, not queued
        assert "2 requests already in flight" in err.details()
    finally:
        for call in held:
            call.cancel()
    _wait_idle(stub)
    assert _frames(_decode_raw(stub, path=media["clip"]))
    channel.close()


def _wait_idle(stub: pb2_grpc.IOServerStub) -> None:
    deadline = time.monotonic() + 10
    while stub.Stats(pb2.StatsRequest()).in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stub.Stats(pb2.StatsRequest()).in_flight == 0


# ---------------------------------------------------------------------------------------------
# Correct frames


def test_frames_equal_the_in_process_decode_bit_exact(stub, media):
    chunks = _decode_raw(stub, path=media["clip"])
    frames = _frames(chunks)
    local = decode_media(PyAVBackend(threads=1), media["clip"], keye.DEFAULT_PRESET, 0, None,
                         None)
    assert wire.plan_from_proto(chunks[0].plan) == local.plan
    assert len(frames) == len(local.frames) == local.plan.num_frames
    for got, want in zip(frames, local.frames, strict=True):
        assert got.dtype == np.uint8 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    # a sub-range is the same frames as the slice of the whole
    part = _frames(_decode_raw(stub, path=media["clip"], frame_start=3, frame_stop=7))
    for got, want in zip(part, local.frames[3:7], strict=True):
        np.testing.assert_array_equal(got, want)


def test_frames_equal_an_independent_pyav_decode(stub, media):
    """Reference: decode every source frame with PyAV at full size, pick the indices with the
    Keye formula (FACTS.md), resize the uint8 frames with torch bilinear + antialias (Keye's
    processor). The default (exact) path must be within one level: it is 0 here."""
    chunks = _decode_raw(stub, path=media["clip"])
    plan = chunks[0].plan
    with av.open(media["clip"]) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        source = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    n = min(int(len(source) / fps * min(2.0, fps)), 1365)
    indices = np.round(np.linspace(0, len(source) - 1, n)).astype(int)
    assert list(plan.frame_indices) == indices.tolist()
    assert list(plan.timestamps) == np.float32([(1 / fps) * i for i in indices]).tolist()
    for got, idx, info in zip(_frames(chunks), indices, [c.info for c in chunks[1:]
                                                          if c.HasField("info")], strict=True):
        assert (info.grid_h * 28, info.grid_w * 28) == got.shape[:2]
        assert info.tokens == info.grid_h * info.grid_w
        x = torch.from_numpy(source[idx]).permute(2, 0, 1)[None]
        ref = torch.nn.functional.interpolate(x, size=got.shape[:2], mode="bilinear",
                                              antialias=True)[0].permute(1, 2, 0).numpy()
        worst = np.abs(got.astype(np.int16) - ref.astype(np.int16)).max()
        assert worst <= 1, f"frame {idx}: max |diff| {worst} levels"


def test_reply_is_chunked_below_the_limit_with_headers_per_frame(stub, media):
    chunks = _decode_raw(stub, path=media["hold"], compression=pb2.COMPRESSION_NONE)
    plan = chunks[0].plan
    assert not chunks[0].data and chunks[0].frame_stop == len(plan.tokens)
    assert all(len(c.data) <= CHUNK for c in chunks)
    infos = [c for c in chunks[1:] if c.HasField("info")]
    assert [c.frame for c in infos] == list(range(len(plan.tokens)))
    for c in infos:
        i = c.frame
        assert (c.info.height, c.info.width) == (plan.heights[i], plan.widths[i])
        assert c.info.is_fast == plan.is_fast[i] and c.info.timestamp_s == plan.timestamps[i]
        assert c.info.tokens == plan.tokens[i]
        assert c.info.raw_size == c.info.encoded_size == plan.heights[i] * plan.widths[i] * 3
    assert len(chunks) > len(infos) + 1  # raw frames of 640x480 span several messages
    zstd = _frames(_decode_raw(stub, path=media["hold"]))
    for a, b in zip(_frames(chunks), zstd, strict=True):
        np.testing.assert_array_equal(a, b)


def test_image_decode_and_probe(stub, media):
    reply = stub.Probe(pb2.ProbeRequest(path=media["image"]), timeout=30)
    plan = wire.plan_from_proto(reply.plan)
    assert plan.kind is MediaKind.IMAGE and plan.num_frames == 1 and plan.is_fast == (False,)
    assert reply.preset == keye.DEFAULT_PRESET.name
    frames = _frames(_decode_raw(stub, path=media["image"]))
    local = decode_media(PyAVBackend(threads=1), media["image"], keye.DEFAULT_PRESET, 0, None,
                         None)
    np.testing.assert_array_equal(frames[0], local.frames[0])


def test_health_and_stats(server, stub, media):
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    before = stub.Stats(pb2.StatsRequest(), timeout=10)
    chunks = _decode_raw(stub, path=media["clip"])
    _error(lambda: stub.Probe(pb2.ProbeRequest(path=media["root"] + "/missing.mp4"), timeout=10))
    after = stub.Stats(pb2.StatsRequest(), timeout=10)
    wire_bytes = sum(len(c.data) for c in chunks)
    raw_bytes = sum(h * w * 3 for h, w in zip(chunks[0].plan.heights, chunks[0].plan.widths,
                                              strict=True))
    assert after.requests - before.requests == 2
    assert after.errors - before.errors == 1
    assert after.errors_by_code["NOT_FOUND"] - before.errors_by_code.get("NOT_FOUND", 0) == 1
    assert after.wire_bytes_out - before.wire_bytes_out == wire_bytes
    assert after.raw_bytes_out - before.raw_bytes_out == raw_bytes
    assert after.file_bytes_read - before.file_bytes_read == os.path.getsize(media["clip"])
    assert after.decode_seconds > before.decode_seconds
    assert after.serving and after.workers == 1 and after.max_in_flight == 2
    if not after.gpu_available:
        assert after.gpu_unavailable_reason and not after.gpus
    channel.close()


def _worker_pids(server: ServerProcess) -> list[int]:
    match = re.search(r"worker processes \[([\d, ]+)\]", server.log())
    assert match, server.log()
    return [int(p) for p in match.group(1).split(",")]


def test_a_crashed_worker_does_not_take_the_server_down(media, tmp_path):
    with start_server([media["root"]], workers=1, log_dir=str(tmp_path)) as proc:
        channel = grpc.insecure_channel(proc.address)
        stub = pb2_grpc.IOServerStub(channel)
        (worker,) = _worker_pids(proc)
        os.kill(worker, signal.SIGKILL)
        time.sleep(0.3)
        frames = []
        for _ in range(2):  # the first may meet the broken pool (UNAVAILABLE); then it works
            try:
                frames = _frames(_decode_raw(stub, path=media["clip"]))
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
        assert len(frames) == 12
        assert proc.proc.poll() is None
        channel.close()


def test_sigterm_finishes_in_flight_refuses_new_and_exits_0(media, tmp_path):
    with start_server([media["root"]], workers=1, log_dir=str(tmp_path),
                      args=["--chunk-bytes", str(CHUNK)]) as proc:
        channel = grpc.insecure_channel(proc.address, options=HOLD_OPTIONS)
        stub = pb2_grpc.IOServerStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        held = stub.Decode(pb2.DecodeRequest(path=media["hold"],
                                             compression=pb2.COMPRESSION_NONE), timeout=60)
        first = next(held)  # admitted and decoded; the rest waits for us to read
        proc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.05)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        err = _error(lambda: stub.Decode(pb2.DecodeRequest(path=media["clip"]), timeout=10))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in err.details()
        frames = _frames([first, *held])  # the in-flight request completes in full
        local = decode_media(PyAVBackend(threads=1), media["hold"], keye.DEFAULT_PRESET, 0, None,
                             None)
        assert len(frames) == local.plan.num_frames
        for a, b in zip(frames, local.frames, strict=True):
            np.testing.assert_array_equal(a, b)
        assert proc.proc.wait(timeout=30) == 0
        assert "draining: 1 requests in flight" in proc.log()
        channel.close()
