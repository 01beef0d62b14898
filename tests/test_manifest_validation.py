"""Hostile manifests: every malformed record is refused at load and at conversion, naming the
file, the line, the field and the value (issue 12's list and issue 14 item 10)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from dataloader.__main__ import main
from dataloader.manifest import Manifest, MediaRef, Record, Turn, load_manifest
from dataloader.validate import Limits, ManifestError

VIDEO = {"path": "v.mp4", "kind": "video", "tokens": [4, 4], "heights": [56, 56],
         "widths": [56, 56], "is_fast": [False, True], "timestamps": [0.0, 0.5]}
GOOD = {"id": "a", "dataset": "video", "media": [VIDEO],
        "conversation": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}


def _set(path: str, value):
    def apply(d):
        node = d
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        last = keys[-1]
        if value is _DELETE:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value
        return d
    return apply


_DELETE = object()
BIG = 10**4 * 28
CASES = {
    # absurd sizes (Keye caps)
    "1e8 tokens per frame": (_set("media.0", dict(VIDEO, tokens=[10**8, 4], heights=[BIG, 56],
                                                  widths=[BIG, 56])),
                             r"tokens\[0\] = 100000000 exceeds max_video_frame_tokens\(768\)"),
    "1e9 tokens per frame": (_set("media.0", dict(VIDEO, tokens=[10**9, 4],
                                                  heights=[28 * 10**5, 56],
                                                  widths=[28 * 10**4, 56])),
                             r"tokens\[0\] = 1000000000 exceeds max_video_frame_tokens"),
    "image over 20480 tokens": (_set("media.0", dict(VIDEO, kind="image", tokens=[20481 * 4],
                                                     heights=[56 * 20481], widths=[56],
                                                     is_fast=[False], timestamps=[0.0])),
                                r"tokens\[0\] = 81924 exceeds max_image_tokens\(20480\)"),
    "1366 frames": (_set("media.0", dict(VIDEO, tokens=[4] * 1366, heights=[56] * 1366,
                                         widths=[56] * 1366, is_fast=[False] * 1366,
                                         timestamps=[0.5 * i for i in range(1366)])),
                    r"1366 frames exceed max_frames\(1365\)"),
    "300 media": (_set("media", [VIDEO] * 300), r"300 media items exceed max_media\(256\)"),
    "an astronomically large int": (_set("media.0.tokens", [10**30, 4]),
                                    r"tokens\[0\] = 10{30} must be an integer >= 1 "
                                    r"\(and < 2\^40\)"),
    # sides and tokens
    "negative height and width": (_set("media.0.heights", [-56, 56]), None),
    "zero tokens": (_set("media.0", dict(VIDEO, tokens=[0, 4], heights=[0, 56])),
                    r"tokens\[0\] = 0 must be an integer >= 1"),
    "49x768 px": (_set("media.0", dict(VIDEO, tokens=[48, 4], heights=[49, 56],
                                       widths=[768, 56])),
                  r"heights\[0\] = 49 is not a positive multiple of 28 px"),
    "tokens != h*w/784": (_set("media.0.tokens", [5, 4]),
                          r"frame 0: 5 tokens but 56x56 px \(4 tokens of 28x28\)"),
    "lengths differ": (_set("media.0.widths", [56]),
                       r"one equal length >= 1, got tokens 2, heights 2, widths 1"),
    "image with two frames": (_set("media.0.kind", "image"), r"an image has one frame, got 2"),
    "unknown kind": (_set("media.0.kind", "audio"),
                     r"kind 'audio' is not one of \('image', 'video'\)"),
    # timestamps
    "NaN timestamp": (_set("media.0.timestamps", [0.0, float("nan")]),
                      r"timestamps\[1\] = nan must be a finite number >= 0"),
    "infinite timestamp": (_set("media.0.timestamps", [float("inf"), 1.0]),
                           r"timestamps\[0\] = inf must be a finite"),
    "negative timestamp": (_set("media.0.timestamps", [-1.0, 1.0]), r"timestamps\[0\] = -1\.0"),
    "decreasing timestamps": (_set("media.0.timestamps", [2.0, 1.5]),
                              r"timestamps\[1\] = 1\.5 is before timestamps\[0\] = 2\.0"),
    # JSON types
    'is_fast: ["false"]': (_set("media.0.is_fast", ["false", True]),
                           r"is_fast\[0\] = 'false' \(string\) is not a boolean"),
    "is_fast: 1": (_set("media.0.is_fast", [1, True]),
                   r"is_fast\[0\] = 1 \(integer\) is not a boolean"),
    "tokens as floats": (_set("media.0.tokens", [4.0, 4]),
                         r"tokens\[0\] = 4\.0 \(number\) is not an integer"),
    "heights as bools": (_set("media.0.heights", [True, 56]),
                         r"heights\[0\] = True \(boolean\) is not an integer"),
    "timestamps as strings": (_set("media.0.timestamps", ["0", 1.0]),
                              r"timestamps\[0\] = '0' \(string\) is not a number"),
    "tokens as a string": (_set("media.0.tokens", "44"), r"tokens must be an array, got string"),
    "id as a number": (_set("id", 7), r"non-empty string id, got integer 7"),
    "empty id": (_set("id", ""), r"non-empty string id"),
    "dataset null": (_set("dataset", None), r"dataset must be a non-empty string, got null"),
    "conversation as text": (_set("conversation", "hello"),
                             r"conversation must be an array, got string"),
    "empty conversation": (_set("conversation", []), r"the conversation is empty"),
    "unknown role": (_set("conversation.0.role", "robot"), r"turn role 'robot' is not one of"),
    "content as a number": (_set("conversation.1.content", 3),
                            r"assistant turn: content must be a string, got integer 3"),
    "media as an object": (_set("media", {"path": "x"}), r"media must be an array, got object"),
    "missing key": (_set("media.0.timestamps", _DELETE),
                    r"media item has missing keys \['timestamps'\]"),
    "unknown key": (_set("media.0.fps", 2), r"unknown keys \['fps'\]"),
    "record not an object": (lambda d: [d], r"a record must be a JSON object, got array"),
    "control character in a path": (_set("media.0.path", "a\nb.mp4"),
                                     r"the path contains a control character"),
    "lone surrogate": (_set("conversation.1.content", "\ud800"),
                       r"assistant turn content: not valid Unicode"),
}


def _line(case: str) -> bytes:
    mutate, _ = CASES[case]
    d = mutate(copy.deepcopy(GOOD))
    return json.dumps(d).encode("utf-8")


def _files(tmp_path: Path, bad_line: bytes) -> Path:
    path = tmp_path / "m.jsonl"
    path.write_bytes(json.dumps(dict(GOOD, id="first")).encode() + b"\n" + bad_line + b"\n")
    return path


def _refused(path: Path, pattern: str, capsys) -> None:
    with pytest.raises(ManifestError, match=f"m\\.jsonl:2: .*{pattern}"):
        load_manifest(path)
    assert main(["convert", str(path), "--out", str(path.parent / "col"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "m.jsonl:2:" in err, err
    assert not (path.parent / "col").exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_record_is_refused_with_file_line_and_field(case, tmp_path, capsys):
    pattern = CASES[case][1] or r"heights\[0\] = -56 must be a positive multiple of 28 px"
    _refused(_files(tmp_path, _line(case)), pattern, capsys)


@pytest.mark.parametrize("raw, pattern", [
    (b'{"id": "caf\xe9"}', r"not valid UTF-8: byte 0xe9 at column 12"),
    (b'{"id": "a", ', r"not JSON: Expecting property name enclosed in double quotes"),
    (b'{"id": "a", "id": "b"}', r"key 'id' appears twice in one JSON object"),
    (json.dumps(dict(GOOD, id="first")).encode(),
     r"record id 'first' already appears at line 1"),
], ids=["non-UTF-8 byte", "bad JSON", "key twice", "duplicate id"])
def test_bad_lines_name_the_line(raw, pattern, tmp_path, capsys):
    path = _files(tmp_path, raw)
    if "already appears" in pattern:  # the columnar writer finds it at the end, by line
        with pytest.raises(ManifestError, match=f"m\\.jsonl:2: {pattern}"):
            load_manifest(path)
        assert main(["convert", str(path), "--out", str(tmp_path / "col"),
                     "--no-progress"]) == 2
        assert "m.jsonl: repeated record ids at lines 1 and 2" in capsys.readouterr().err
        return
    _refused(path, pattern, capsys)


def test_negative_sizes_never_reach_a_fetch():
    """Issue 14 item 10: negative sides that multiply to the right token count were accepted
    and later reported as "the file changed since it was indexed"."""
    with pytest.raises(ManifestError, match=r"heights\[0\] = -56 must be a positive multiple"):
        MediaRef("a.png", "image", (4,), (-56,), (-56,), (False,), (0.0,))
    with pytest.raises(ManifestError, match=r"is_fast\[0\] = 'false' \(str"):
        MediaRef("a.mp4", "video", (4,), (56,), (56,), ("false",), (0.0,))


def test_in_memory_manifest_applies_the_limits():
    frames = 5
    v = MediaRef("v.mp4", "video", (4,) * frames, (56,) * frames, (56,) * frames,
                 (False,) * frames, tuple(float(i) for i in range(frames)))
    r = Record("x", "d", (Turn("text", "t"),), (v,))
    Manifest((r,))
    with pytest.raises(ManifestError, match=r"row 0: record 'x' media 0 \('v\.mp4'\): 5 frames "
                                            r"exceed max_frames\(4\)"):
        Manifest((r,), limits=Limits(max_frames=4))
    with pytest.raises(ValueError, match=r"Limits\.max_frames must be an int >= 1, got 0"):
        Limits(max_frames=0)
    with pytest.raises(ValueError, match=r"max_image_tokens\(70000\) exceeds 65535"):
        Limits(max_image_tokens=70000)
