"""Indexing never aborts: a caption that is not UTF-8, a bad line of a list file and a killed
probing process are each reported, and everything else is indexed (issue 14 item 8)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dataloader.index import collect_items, index_items, index_manifest, probe_local
from dataloader.manifest import open_manifest
from tests.dataloader_helpers import write_media

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    folder = write_media(tmp_path_factory.mktemp("index") / "media", videos=2, images=3)
    (folder / "clip0.txt").write_bytes(b"caption \xff\xfe of clip 0")
    return folder


def test_a_caption_that_is_not_utf8_is_reported_and_the_rest_indexed(media):
    records, bad = index_items(collect_items(media), workers=1, progress=False)
    assert [r.id for r in records] == ["clip1.mp4", "img0.png", "img1.png", "img2.png"]
    assert [(Path(b.path).name, b.error, b.records) for b in bad] == \
        [("clip0.txt", "UnicodeDecodeError", ("clip0.mp4",))]
    assert "not valid UTF-8: byte 0xff at offset 8" in bad[0].reason


def test_bad_lines_of_a_list_file_are_reported(media, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"\n".join([
        str(media / "img0.png").encode(),
        b'{"id": "x\xff", "text": "t"}',
        b'{"id": "broken", ',
        b"notes.md",
        json.dumps({"id": "t", "text": "fine"}).encode(),
        json.dumps({"id": "m", "text": "x", "media": "img1.png"}).encode(),
    ]))
    records, bad = index_items(collect_items(lst), workers=1, progress=False)
    assert [r.id for r in records] == [str(media / "img0.png"), "t"]
    assert [(b.path.rsplit("/", 1)[1], b.error) for b in bad] == [
        ("list.txt:2", "UnicodeDecodeError"), ("list.txt:3", "JSONDecodeError"),
        ("list.txt:4", "ValueError"), ("list.txt:6", "ManifestError")]
    assert "media must be an array of paths" in bad[3].reason


def _probe_or_die(path: str, preset: str | None):
    """Probes like the real worker, but a file named kill* kills its process (as the OOM killer
    or a decoder crash would)."""
    if os.path.basename(path).startswith("kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    return probe_local(path, preset)


@pytest.mark.slow
def test_a_killed_index_worker_leaves_a_complete_manifest_and_a_report(media, tmp_path):
    folder = tmp_path / "media"
    shutil.copytree(media, folder)
    for name in ("kill_a.png", "kill_b.png"):
        shutil.copy(folder / "img0.png", folder / name)
    result = index_manifest(folder, tmp_path / "manifest", workers=2, probe=_probe_or_die,
                            progress=False, window=3)
    report = [json.loads(x) for x in Path(result.report).read_text().splitlines()]
    died = sorted((Path(b["path"]).name, b["records"]) for b in report
                  if b["error"] == "WorkerDied")
    assert died == [("kill_a.png", ["kill_a.png"]), ("kill_b.png", ["kill_b.png"])]
    assert all("killed by signal 9 (SIGKILL)" in b["reason"] for b in report
               if b["error"] == "WorkerDied")
    assert result.probe.worker_deaths >= 1
    assert {"kill_a.png", "kill_b.png"} <= {Path(p).name for p in result.probe.retried}
    # Complete: every other record, with the sizes the in-process prober gives (the reference).
    m = open_manifest(tmp_path / "manifest")
    reference, _ = index_items(collect_items(folder), workers=1, progress=False)
    reference = [r for r in reference if not r.id.startswith("kill")]
    assert [m.record(row) for row in range(len(m))] == reference
    assert m.hash == open_manifest(tmp_path / "manifest").hash
    assert result.summary().startswith(f"indexed {len(reference)} records from 6 items")


@pytest.mark.slow
def test_index_command_writes_a_columnar_manifest(media, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dataloader", "index", str(media), "--out",
         str(tmp_path / "m"), "--workers", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "probing media" in proc.stderr
    m = open_manifest(tmp_path / "m")
    assert m.datasets == {"image": 3, "video": 1}
    assert m.stored_record(0).media[0].path == os.path.relpath(media / "clip1.mp4",
                                                               tmp_path / "m")
    report = Path(f"{tmp_path / 'm'}.bad.jsonl").read_text()
    assert "clip0.txt" in report and f"(hash {m.hash})" in proc.stdout


def test_repeated_ids_of_a_list_file_are_refused_before_probing(tmp_path):
    from dataloader.index import refuse_repeated_ids
    from dataloader.validate import ManifestError

    lst = tmp_path / "list.txt"
    lines = [json.dumps({"id": f"t{i % 7 if i in (3, 10) else i}", "text": "x"})
             for i in range(12)]
    lst.write_text("\n".join(lines))
    with pytest.raises(ManifestError, match=r"list\.txt: repeated record ids at .*list\.txt:4 "
                                            r"and .*list\.txt:11"):
        refuse_repeated_ids(lst, None, str(tmp_path / "ids.tmp"))
    assert not (tmp_path / "ids.tmp").exists()


def _probe_blocks(path: str, preset: str | None):
    """A probe that never returns (a decoder stuck on a file)."""
    import time

    time.sleep(3600)


@pytest.mark.slow
def test_an_interrupted_index_kills_its_probing_processes_instead_of_waiting(media):
    """Ctrl-C (here SIGALRM) while probes are stuck: the error surfaces at once and no probing
    process is left behind (waiting for them would hang forever)."""
    script = (
        "import signal\n"
        "from dataloader.index import collect_items, index_items\n"
        "from tests.test_manifest_index import _probe_blocks\n"
        "def stop(*_):\n"
        "    raise KeyboardInterrupt\n"
        "signal.signal(signal.SIGALRM, stop)\n"
        "signal.alarm(8)\n"
        "try:\n"
        f"    index_items(collect_items({str(media)!r}), workers=2, probe=_probe_blocks,\n"
        "                progress=False)\n"
        "except KeyboardInterrupt:\n"
        "    import multiprocessing as mp, time\n"
        "    deadline = time.monotonic() + 10\n"
        "    while mp.active_children() and time.monotonic() < deadline:\n"
        "        time.sleep(0.1)\n"
        "    print('interrupted', len(mp.active_children()), flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the probing processes too, if it hung
        proc.wait()
    assert proc.returncode == 0, err
    assert out.split() == ["interrupted", "0"], (out, err)
