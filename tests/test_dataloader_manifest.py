"""Manifest files, the ``index`` command and the Keye prompt layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dataloader.index import collect_items, index_items
from dataloader.manifest import (
    Manifest,
    MediaRef,
    Record,
    Turn,
    load_manifest,
    read_jsonl,
    read_parquet,
    write_jsonl,
    write_parquet,
)
from dataloader.sequence import ByteTokenizer, sample_sizes, tokenize
from tests.dataloader_helpers import text_records, write_media

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from io_server.synthetic import write_garbage, write_truncated

    folder = write_media(tmp_path_factory.mktemp("dl_manifest") / "media", videos=3, images=3)
    write_garbage(folder / "garbage.mp4", seed=1)
    write_truncated(folder / "clip0.mp4", folder / "truncated.mp4", keep_fraction=0.05)
    (folder / "notes.md").write_text("not media")
    return folder


def test_index_command_probes_in_parallel_and_reports_unreadable_files(media, tmp_path):
    from io_server.client import IOClient

    out = tmp_path / "m.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "dataloader", "index", str(media), "--out", str(out),
         "--workers", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "probing media" in proc.stderr  # the tqdm bar
    manifest = load_manifest(out)  # media paths are stored relative to the manifest's folder
    assert not Path(manifest.records[0].media[0].path).is_absolute()
    records = [manifest.record(row) for row in range(len(manifest))]
    report = [json.loads(x) for x in Path(f"{out}.bad.jsonl").read_text().splitlines()]
    assert sorted(r.id for r in records) == sorted(
        [f"clip{i}.mp4" for i in range(3)] + [f"img{i}.png" for i in range(3)])
    assert sorted(Path(b["path"]).name for b in report) == ["garbage.mp4", "truncated.mp4"]
    for b in report:
        assert b["error"] == "CorruptMediaError" and b["reason"]
        assert b["records"] == [Path(b["path"]).name]
    # Sizes equal what the I/O client's probe says, file by file (the reference).
    client = IOClient()
    for r in records:
        (m,) = r.media
        plan = client.probe(m.path)
        assert (m.kind, m.tokens, m.is_fast, m.timestamps, m.heights, m.widths) == \
            (plan.kind.value, plan.tokens, plan.is_fast, plan.timestamps, plan.heights,
             plan.widths)
    clip0 = next(r for r in records if r.id == "clip0.mp4")
    assert clip0.conversation[-1] == Turn("assistant", "caption of clip 0")
    assert clip0.dataset == "video"
    assert "indexed 6 records from 8 items" in proc.stdout


def test_index_list_file_with_json_lines(media, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join([
        str(media / "img0.png"),
        json.dumps({"id": "two", "dataset": "mix", "media": [str(media / "clip2.mp4"),
                                                               str(media / "img1.png")],
                    "conversation": [{"role": "user", "content": "compare"},
                                     {"role": "assistant", "content": "they differ"}]}),
        json.dumps({"id": "t", "text": "just text"}),
        json.dumps({"id": "broken", "media": [str(media / "garbage.mp4")], "text": "x"}),
    ]))
    records, bad = index_items(collect_items(lst, dataset="d"), workers=1, progress=False)
    assert [r.id for r in records] == [str(media / "img0.png"), "two", "t"]
    assert [m.kind for m in records[1].media] == ["video", "image"]
    assert records[2].media == () and records[2].conversation == (Turn("text", "just text"),)
    assert [(Path(b.path).name, b.records) for b in bad] == [("garbage.mp4", ("broken",))]


def test_index_through_a_real_io_server_equals_local_probing(media):
    from io_server.launch import start_server

    items = collect_items(media)
    local, local_bad = index_items(items, workers=1, progress=False)
    with start_server([str(media)], workers=1) as server:
        remote, remote_bad = index_items(items, workers=2, servers=(server.address,),
                                         progress=False)
    assert remote == local and len(local) == 6
    assert [(b.path, b.error) for b in remote_bad] == [(b.path, b.error) for b in local_bad]


def _sample_records(media: Path) -> list[Record]:
    records, _ = index_items(collect_items(media), workers=1, progress=False)
    return records + text_records(3)


def test_jsonl_and_parquet_round_trip(media, tmp_path):
    pytest.importorskip("pyarrow")
    records = _sample_records(media)
    write_jsonl(records, tmp_path / "m.jsonl")
    write_parquet(records, tmp_path / "m.parquet")
    from_jsonl = read_jsonl(tmp_path / "m.jsonl")
    from_parquet = read_parquet(tmp_path / "m.parquet")
    assert from_jsonl == records and from_parquet == records
    assert load_manifest(tmp_path / "m.parquet").hash == Manifest(tuple(records)).hash
    assert load_manifest(tmp_path / "m.jsonl").datasets == {"image": 3, "text": 3, "video": 3}


def test_manifest_hash_and_validation(media):
    records = _sample_records(media)
    a = Manifest(tuple(records))
    b = Manifest(tuple(records[1:] + records[:1]))
    assert a.hash != b.hash
    with pytest.raises(ValueError, match="record id 'text0' appears at rows 6 and 9"):
        Manifest(tuple(records) + (records[-3],))
    with pytest.raises(ValueError, match=r"frame 0: 5 tokens but 56x56 px \(4 tokens"):
        MediaRef("x.png", "image", (5,), (56,), (56,), (False,), (0.0,))


def _expected_text(record: Record) -> str:
    """The Keye prompt written out independently, with the special tokens spelled."""
    def media_text(m: MediaRef) -> str:
        if m.kind == "image":
            return "<|vision_start|>" + "<|image_pad|>" * m.tokens[0] + "<|vision_end|>"
        frames = ""
        for n, fast, ts in zip(m.tokens, m.is_fast, m.timestamps, strict=True):
            body = "<|video_pad|>" * n
            frames += "<|frame|>" + ("%.1f" % ts) + (  # noqa: UP031 - the format Keye uses
                f"<|fast_start|>{body}<|fast_end|>" if fast else body)
        return "<|vision_start|>" + frames + "<|vision_end|>"

    out = ""
    for i, t in enumerate(record.conversation):
        media = "".join(media_text(m) for m in record.media) if i == 0 else ""
        if t.role == "text":
            out += media + t.content + "<|endoftext|>"
        else:
            out += f"<|im_start|>{t.role}\n{media}{t.content}<|im_end|>\n"
    return out


def test_tokenized_prompt_layout_and_targets(media):
    tok = ByteTokenizer()
    records = _sample_records(media)
    video = next(r for r in records if r.id == "clip1.mp4")
    assert any(video.media[0].is_fast) and not video.media[0].is_fast[0]
    for sid, r in enumerate(records):
        t = tokenize(r, sid, tok)
        assert tok.decode(t.token_ids.tolist()) == _expected_text(r)
        sizes = sample_sizes(r, sid, tok)
        assert sizes.layout == t.layout and t.layout.seq_len == t.token_ids.size
        # Every visual slot holds a pad id, and the slots are exactly the pads.
        pads = {tok.special_id("<|image_pad|>"), tok.special_id("<|video_pad|>")}
        slots = np.zeros(t.token_ids.size, bool)
        for toks, poss in zip(t.layout.frame_tokens, t.layout.frame_positions, strict=True):
            for n, p in zip(toks, poss, strict=True):
                slots[p:p + n] = True
        assert np.array_equal(slots, np.isin(t.token_ids, list(pads)))
        assert t.layout.frame_tokens == tuple(m.tokens for m in r.media)
        # Loss on assistant content + <|im_end|>, or on all of a text sample.
        if r.conversation[0].role == "text":
            assert t.is_target.all()
        else:
            answer = r.conversation[-1].content
            assert int(t.is_target.sum()) == len(answer.encode()) + 1
        assert sizes.loss_tokens == int(t.is_target[1:].sum())


def test_an_empty_first_text_turn_has_no_loss_tokens():
    """Position 0 predicts nothing, and an empty first piece must not count -1 loss tokens."""
    from dataloader.planning import LayoutComputer
    from dataloader.sequence import ByteTokenizer, sample_sizes, tokenize

    record = Record("r", "text", (Turn("text", ""),))
    tok = ByteTokenizer()
    t = tokenize(record, 0, tok)
    assert sample_sizes(record, 0, tok).loss_tokens == int(t.is_target[1:].sum()) == 0
    assert LayoutComputer(tok).layout(record).loss_tokens == 0
