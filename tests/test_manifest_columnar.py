"""The columnar manifest against the JSONL one: same records, same interface answers.

The reference is the in-memory JSONL manifest and `dataloader.sequence.sample_sizes` (the
definition of a sample's layout); hypothesis generates the records, including the corners
(no media, several media, a conversation without a user turn, repeated timestamps, non-ASCII
text and names, absolute and relative paths).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataloader.__main__ import main
from dataloader.columnar import ColumnarManifest, content_hash
from dataloader.columnar_writer import ColumnarWriter, write_columnar
from dataloader.manifest import (
    Manifest,
    MediaRef,
    Record,
    Turn,
    load_manifest,
    open_manifest,
    write_jsonl,
)
from dataloader.mixture import Mixture
from dataloader.planning import LayoutComputer
from dataloader.sequence import ByteTokenizer, sample_sizes
from dataloader.validate import Limits, ManifestError

TOK = ByteTokenizer()


class ChunkTokenizer:
    """Another vocabulary: one id per 3 UTF-8 bytes (so layouts differ from `ByteTokenizer`)."""

    name = "chunk3-test"
    pad_id = 0

    def encode(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        return [16 + sum(data[i:i + 3]) % 200 for i in range(0, len(data), 3)]

    def special_id(self, token: str) -> int:
        return ByteTokenizer().special_id(token)


text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)


@st.composite
def media_refs(draw, index: int) -> MediaRef:
    path = draw(st.sampled_from([f"media/v{index}.mp4", f"/abs/clé {index}.mp4",
                                 f"sub/dir/x{index}.png"]))
    if draw(st.booleans()):
        h, w = draw(st.integers(1, 20)), draw(st.integers(1, 20))
        return MediaRef(path, "image", (h * w,), (h * 28,), (w * 28,), (False,), (0.0,))
    n = draw(st.integers(1, 12))
    sizes = draw(st.lists(st.tuples(st.integers(1, 27), st.integers(1, 28)), min_size=n,
                          max_size=n))
    steps = draw(st.lists(st.sampled_from([0.0, 0.5, 1.25, 3.0, 100.05]), min_size=n, max_size=n))
    times = tuple(float(t) for t in np.cumsum(steps))
    fast = tuple(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    return MediaRef(path, "video", tuple(a * b for a, b in sizes),
                    tuple(a * 28 for a, _ in sizes), tuple(b * 28 for _, b in sizes), fast, times)


@st.composite
def records(draw, index: int) -> Record:
    shape = draw(st.sampled_from(["text", "chat", "system", "assistant-only"]))
    if shape == "text":
        conv: tuple[Turn, ...] = (Turn("text", draw(text)),)
    elif shape == "chat":
        conv = (Turn("user", draw(text)), Turn("assistant", draw(text)))
    elif shape == "system":
        conv = (Turn("system", draw(text)), Turn("user", draw(text)),
                Turn("assistant", draw(text)), Turn("user", draw(text)))
    else:
        conv = (Turn("assistant", draw(text)),)
    media = tuple(draw(media_refs(index * 10 + k)) for k in range(draw(st.integers(0, 3))))
    dataset = draw(st.sampled_from(["video", "image", "text", "données"]))
    return Record(f"{draw(text)}#{index}", dataset, conv, media)


@st.composite
def manifests(draw) -> list[Record]:
    n = draw(st.integers(1, 25))
    return [draw(records(i)) for i in range(n)]


def _write_both(records: list[Record], folder: Path, **writer) -> tuple[Manifest,
                                                                         ColumnarManifest]:
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(records, folder / "m.jsonl")
    with ColumnarWriter(folder / "col", media_root=folder, **writer) as w:
        for r in records:
            w.add(r)
    return open_manifest(folder / "m.jsonl"), open_manifest(folder / "col")


def _assert_same_interface(a: Manifest, b: ColumnarManifest, records: list[Record],
                           tokenizer) -> None:
    assert len(a) == len(b) == len(records)
    assert a.hash == b.hash == content_hash(records)
    assert list(a.datasets.items()) == list(b.datasets.items())
    for name in a.datasets:
        assert np.array_equal(a.dataset_rows(name), b.dataset_rows(name))
        assert b.dataset_rows(name).dtype == np.int64
    for row, r in enumerate(records):
        assert b.stored_record(row) == r  # field by field, as stored
        assert a.record_id(row) == b.record_id(row) == r.id
        assert a.record(row) == b.record(row)  # paths resolved against the same folder
        assert a.media(row) == b.media(row) == b.record(row).media
    rows = np.random.default_rng(len(records)).integers(0, len(records), 3 * len(records))
    ids = [int(x) for x in np.random.default_rng(1).integers(0, 1 << 40, rows.size)]
    want = [sample_sizes(records[r], s, tokenizer) for r, s in zip(rows.tolist(), ids,
                                                                     strict=True)]
    assert a.planning_sizes(rows, ids, tokenizer) == want
    assert b.planning_sizes(rows, ids, tokenizer) == want


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(recs=manifests(), chunk=st.integers(1, 9))
def test_columnar_equals_jsonl_field_by_field(tmp_path_factory, recs, chunk):
    folder = tmp_path_factory.mktemp("eq")
    a, b = _write_both(recs, folder, chunk_records=chunk)
    _assert_same_interface(a, b, recs, TOK)
    b.verify()


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(recs=manifests())
def test_planning_layout_under_another_tokenizer(tmp_path_factory, recs):
    tok = ChunkTokenizer()
    for r in recs:  # the fast layout equals the definition, record by record
        ref = sample_sizes(r, 0, tok)
        got = LayoutComputer(tok).layout(r)
        assert (got.seq_len, got.loss_tokens) == (ref.layout.seq_len, ref.loss_tokens)
        assert got.frame_positions.tolist() == [p for ps in ref.layout.frame_positions
                                                for p in ps]
    folder = tmp_path_factory.mktemp("tok")
    a, b = _write_both(recs, folder, tokenizer=tok)
    assert b.tokenizer_name == "chunk3-test"
    _assert_same_interface(a, b, recs, tok)


def test_tokenizer_mismatch_falls_back_to_the_records_and_warns_once(tmp_path, caplog):
    recs = [Record(f"r{i}", "d", (Turn("user", "é" * i), Turn("assistant", "ok")),
                   (MediaRef("v.mp4", "video", (4, 2), (56, 28), (56, 56), (False, True),
                             (0.0, 0.5)),)) for i in range(5)]
    _, b = _write_both(recs, tmp_path)  # layouts under ByteTokenizer
    tok = ChunkTokenizer()
    rows = np.array([4, 0, 4])
    with caplog.at_level(logging.WARNING):
        got = b.planning_sizes(rows, [7, 8, 9], tok)
        b.planning_sizes(rows, [7, 8, 9], tok)
    assert got == [sample_sizes(recs[r], s, tok) for r, s in zip([4, 0, 4], [7, 8, 9],
                                                                  strict=True)]
    assert got != b.planning_sizes(rows, [7, 8, 9], TOK)
    warnings = [r for r in caplog.records if "computed with tokenizer 'bytes-v1'" in r.message]
    assert len(warnings) == 1 and "chunk3-test" in warnings[0].message


def test_same_global_batches_from_either_format(tmp_path):
    """The mixture + order pick rows through ``dataset_rows``; both formats give the same
    global batches (rows, records and planning sizes) for every position."""
    rng = np.random.default_rng(0)
    recs = []
    for i in range(300):
        kind = ["video", "image", "text"][int(rng.integers(0, 3))]
        media = () if kind == "text" else (MediaRef(
            f"{kind}/{i}", kind, (4,) * (1 + i % 3 if kind == "video" else 1),
            (56,) * (1 + i % 3 if kind == "video" else 1),
            (56,) * (1 + i % 3 if kind == "video" else 1),
            (False,) * (1 + i % 3 if kind == "video" else 1),
            tuple(0.5 * k for k in range(1 + i % 3 if kind == "video" else 1))),)
        recs.append(Record(f"id{i}", kind, (Turn("user", "q" * (i % 17)),
                                            Turn("assistant", "a" * (i % 5))), media))
    a, b = _write_both(recs, tmp_path, chunk_records=64)
    batches = []
    for m in (a, b):
        mix = Mixture.create({"video": 24, "image": 50, "text": 26}, m.datasets, seed=3)
        ds, _, index = mix.locate_many(np.arange(5000, 5000 + 256))
        names = mix.names
        rows = np.array([m.dataset_rows(names[d])[i] for d, i in zip(ds.tolist(),
                                                                      index.tolist(),
                                                                      strict=True)])
        sizes = m.planning_sizes(rows, list(range(5000, 5256)), TOK)
        batches.append((rows.tolist(), [m.record(r).id for r in rows.tolist()], sizes))
    assert batches[0] == batches[1]


def test_convert_command_round_trip_keeps_the_hash(tmp_path):
    recs = [Record(f"r{i}", ["a", "b"][i % 2], (Turn("text", f"t{i}"),),
                   (MediaRef(f"img{i}.png", "image", (4,), (56,), (56,), (False,), (0.0,)),))
            for i in range(20)]
    src = tmp_path / "data" / "m.jsonl"
    src.parent.mkdir()
    write_jsonl(recs, src)
    assert main(["convert", str(src), "--out", str(tmp_path / "col"), "--no-progress"]) == 0
    col = open_manifest(tmp_path / "col")
    jsonl = load_manifest(src)
    assert col.hash == jsonl.hash
    # Relative paths still resolve against the JSONL's folder after the move to another folder.
    assert col.media(3)[0].path == os.path.join(str(src.parent), "img3.png") \
        == jsonl.media(3)[0].path
    assert open_manifest(tmp_path / "col", media_root="/elsewhere").media(3)[0].path \
        == "/elsewhere/img3.png"
    back = tmp_path / "back.jsonl"
    assert main(["convert", str(tmp_path / "col"), "--out", str(back), "--no-progress"]) == 0
    assert back.read_bytes() == src.read_bytes()
    assert main(["verify", str(tmp_path / "col"), "--no-progress"]) == 0


# --- damaged files -------------------------------------------------------------------------------
@pytest.fixture()
def col(tmp_path) -> Path:
    recs = [Record(f"r{i}", "d", (Turn("user", "hé"), Turn("assistant", "x" * i)),
                   (MediaRef(f"v{i}.mp4", "video", (4, 2, 1), (56, 28, 28), (56, 56, 28),
                             (False, True, True), (0.0, 0.5, 1.0)),)) for i in range(40)]
    write_columnar(recs, tmp_path / "col")
    return tmp_path / "col"


def test_truncated_column_names_the_file(col):
    f = col / "frame.height.bin"
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(ManifestError, match=r"frame\.height\.bin: 238 bytes, the header says 240 "
                                            r"\(120 x <u2\): the file is truncated"):
        ColumnarManifest.open(col)


def test_header_that_points_elsewhere_or_disagrees_is_refused(col):
    header = json.loads((col / "manifest.json").read_text())
    header["columns"]["id.bytes"]["file"] = "../../etc/passwd"
    (col / "manifest.json").write_text(json.dumps(header))
    with pytest.raises(ManifestError, match=r"column id\.bytes is .* expected file "
                                            r"'id\.bytes\.bin'"):
        open_manifest(col)
    header["columns"]["id.bytes"]["file"] = "id.bytes.bin"
    header["columns"]["plan.loss"]["length"] = 39
    (col / "manifest.json").write_text(json.dumps(header))
    with pytest.raises(ManifestError, match=r"column plan\.loss has 39 entries, its records "
                                            r"table 40"):
        open_manifest(col)


def test_missing_or_damaged_header_names_the_file(col):
    (col / "media.kind.bin").unlink()
    with pytest.raises(ManifestError, match=r"media\.kind\.bin: missing"):
        open_manifest(col)
    (col / "manifest.json").write_bytes(b'{"format": "dataloader.columnar", "vers')
    with pytest.raises(ManifestError, match=r"manifest\.json: the header is damaged"):
        open_manifest(col)
    (col / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"manifest\.json: no such file"):
        open_manifest(col)


def _poke(path: Path, index: int, value, dtype: str) -> None:
    a = np.fromfile(path, dtype=dtype)
    a[index] = value
    a.tofile(path)


def test_damaged_offsets_and_values_are_caught(col):
    _poke(col / "media.offsets.bin", -1, 39, "<u8")
    with pytest.raises(ManifestError, match=r"media\.offsets\.bin: the offsets run 0\.\.39, "
                                            r"expected 0\.\.40"):
        open_manifest(col)
    _poke(col / "media.offsets.bin", -1, 40, "<u8")
    m = open_manifest(col)
    m.planning_sizes(np.arange(40), list(range(40)), TOK)
    # A bit flip in a frame size: verify() names the file; a gather refuses the absurd size.
    _poke(col / "frame.width.bin", 7, 0xFFFF, "<u2")
    m = open_manifest(col)
    with pytest.raises(ManifestError, match=r"frame\.width\.bin: SHA-256 .* differs"):
        m.verify()
    with pytest.raises(ManifestError, match=r"frame\.height\.bin, frame\.width\.bin.*media 2 "
                                            r"frame 1: 65535 tokens \(28x1834980 px\) outside "
                                            r"1\.\.768"):
        m.planning_sizes(np.array([1, 2]), [0, 1], TOK)
    m.planning_sizes(np.array([1, 3]), [0, 1], TOK)  # rows that do not touch it still work
    # Text that is not UTF-8 any more: the tokenising ranks get the file and the entry.
    blob = bytearray((col / "turn.text.bytes.bin").read_bytes())
    blob[0] = 0xFF
    (col / "turn.text.bytes.bin").write_bytes(bytes(blob))
    with pytest.raises(ManifestError, match=r"turn\.text\.bytes\.bin.*entry 0 is not UTF-8"):
        open_manifest(col).record(0)


# --- writer --------------------------------------------------------------------------------------
def _rec(i, rid=None, **kw) -> Record:
    return Record(rid or f"r{i}", "d", (Turn("text", "x"),), **kw)


@pytest.mark.parametrize("bucket", [1 << 23, 8])
def test_duplicate_ids_are_refused_with_bounded_memory(tmp_path, bucket):
    recs = [_rec(i) for i in range(100)] + [_rec(0, "r37"), _rec(0, "r5")]
    with pytest.raises(ManifestError, match=r"repeated record ids: 'r37' at rows 37 and 100; "
                                            r"'r5' at rows 5 and 101"):
        write_columnar(recs, tmp_path / "col", id_bucket=bucket, chunk_records=16)
    assert os.listdir(tmp_path) == []  # nothing left behind


def test_writer_refuses_absurd_records_and_keeps_going(tmp_path):
    w = ColumnarWriter(tmp_path / "col", limits=Limits(max_seq_len=100), source="in.jsonl")
    w.add(_rec(0), line=1)
    huge = MediaRef("v.mp4", "video", (10**8,), (28 * 10**4,) * 1, (28 * 10**4,), (False,),
                    (0.0,))
    with pytest.raises(ManifestError, match=r"in\.jsonl:2: record 'r1' media 0 \('v\.mp4'\): "
                                            r"tokens\[0\] = 100000000 exceeds "
                                            r"max_video_frame_tokens\(768\)"):
        w.add(_rec(1, media=(huge,)), line=2)
    with pytest.raises(ManifestError, match=r"in\.jsonl:3: record 'r2': 101 tokens exceed "
                                            r"max_seq_len\(100\)"):
        w.add(Record("r2", "d", (Turn("text", "y" * 100),)), line=3)
    w.add(_rec(3), line=4)
    result = w.close()
    assert result.records == 2 and open_manifest(tmp_path / "col").stored_record(1).id == "r3"


def test_writer_never_replaces_a_folder_that_is_not_a_manifest(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a columnar manifest folder"):
        ColumnarWriter(tmp_path / "data")
    write_columnar([_rec(0)], tmp_path / "col")
    first = open_manifest(tmp_path / "col").hash
    write_columnar([_rec(1)], tmp_path / "col")  # a manifest folder is replaced atomically
    assert open_manifest(tmp_path / "col").hash != first
    assert sorted(os.listdir(tmp_path)) == ["col", "data"]


def test_add_columns_checks_the_chunk(tmp_path):
    from dataloader.columnar import _ChunkBuilder

    b = _ChunkBuilder()
    lay = LayoutComputer(TOK)
    r = _rec(0, media=(MediaRef("a.png", "image", (4,), (56,), (56,), (False,), (0.0,)),))
    b.add(r, 0, lay.layout(r))
    chunk = b.build()
    bad = dict(chunk, **{"media.frame_offsets": np.array([0, 2], dtype="<u8"),
                         "frame.height": np.array([2, 2], dtype="<u2"),
                         "frame.width": np.array([2, 2], dtype="<u2"),
                         "frame.fast": np.zeros(2, "u1"), "frame.time": np.zeros(2),
                         "frame.position": np.array([1, 5], dtype="<i4")})
    w = ColumnarWriter(tmp_path / "col")
    with pytest.raises(ManifestError, match=r"media 0 \(image\) has 2 frames; allowed: images 1"):
        w.add_columns(bad, ["d"])
    w.add_columns(chunk, ["d"])
    assert w.close().hash == content_hash([r])


def test_header_json_is_readable(col):
    header = json.loads((col / "manifest.json").read_text())
    assert header["records"] == 40 and header["tokenizer"] == "bytes-v1"
    assert header["columns"]["frame.time"]["length"] == 120


def test_loader_gives_the_same_batches_and_resumes_across_formats(tmp_path):
    """A JSONL run's loader state resumes with the converted columnar manifest: the same global
    batches, states and tokens (the loader reads both through the shared interface)."""
    from tests.dataloader_helpers import build_manifest, rank_steps, write_media

    folder = write_media(tmp_path / "media", videos=2, images=3)
    jsonl = build_manifest(folder, tmp_path / "m.jsonl", break_files=False)
    assert main(["convert", str(jsonl), "--out", str(tmp_path / "col"), "--no-progress"]) == 0
    plan = {"world_size": 1}
    a = rank_steps(str(jsonl), plan, 3, prefetch=0)
    b = rank_steps(str(tmp_path / "col"), plan, 3, prefetch=0)
    assert a["steps"] == b["steps"] and a["state"] == b["state"]
    first = rank_steps(str(jsonl), plan, 1, prefetch=0)
    resumed = rank_steps(str(tmp_path / "col"), plan, 2, prefetch=0, state=first["state"])
    assert resumed["steps"] == a["steps"][1:] and resumed["state"] == a["state"]
