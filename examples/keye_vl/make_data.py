"""Generate a small synthetic Keye-like dataset of real files, and its manifest.

Writes H.264 MP4 videos with scene cuts and motion (so the Slow-Fast classifier finds both slow and
fast frames), PNG/JPEG images of varied sizes, text-only samples, a list file describing every
sample (video / image / text datasets with captions that depend on the media, so that there is
something to learn), and the manifest built by the dataloader's indexer (``python -m dataloader
index``), which probes every file through the I/O code path.

    python -m examples.keye_vl.make_data --out data/keye_tiny        # ~40 samples, seconds
    python -m examples.keye_vl.make_data --out data/keye_tiny --videos 40 --images 80 --texts 40
    python -m examples.keye_vl.make_data --out data/keye_sft --kind chat        # SFT chats
    python -m examples.keye_vl.make_data --out data/keye_mpo --kind preference  # MPO pairs

``--kind chat`` writes multi-turn conversations about the same media (a description, then a
follow-up question with a short answer); ``--kind preference`` writes a prompt with a chosen
answer (the right caption) and a rejected one (a caption with wrong numbers and words).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dataloader.index import collect_items, index_items
from dataloader.manifest import write_records
from io_server.synthetic import write_image, write_video

WORDS = ("red", "green", "blue", "bright", "dark", "moving", "still", "square", "wide", "tall")


KINDS = ("pretrain", "chat", "preference")


def _conversation(kind: str, question: str, answer: str, follow_up: str, short: str,
                  wrong: str) -> list[dict[str, str]]:
    if kind == "pretrain":
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if kind == "chat":
        return [{"role": "system", "content": "You describe media precisely."},
                {"role": "user", "content": question}, {"role": "assistant", "content": answer},
                {"role": "user", "content": follow_up}, {"role": "assistant", "content": short}]
    return [{"role": "user", "content": question}, {"role": "chosen", "content": answer},
            {"role": "rejected", "content": wrong}]


def make_dataset(out: Path, *, videos: int, images: int, texts: int, seed: int = 0,
                 workers: int = 2, kind: str = "pretrain") -> Path:
    """Write the files, the list file and the manifest under ``out``; return the manifest path.
    ``kind``: captions (pre-training), multi-turn chats (SFT) or preference pairs (MPO)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    rng = np.random.default_rng(seed)
    (out / "video").mkdir(parents=True, exist_ok=True)
    (out / "image").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(videos):
        seconds = float(rng.uniform(2.0, 6.0))
        cuts = sorted(float(x) for x in rng.uniform(0.5, seconds - 0.5, int(rng.integers(0, 3))))
        w, h = (int(x) for x in rng.choice([(112, 84), (140, 112), (84, 140)]))
        path = out / "video" / f"clip{i:03d}.mp4"
        write_video(path, width=w, height=h, seconds=seconds, fps=8.0, seed=seed * 1000 + i,
                    scene_cuts=cuts)
        caption = (f"a {seconds:.0f} second clip with {len(cuts) + 1} scenes, "
                   f"{w} by {h}, {WORDS[i % len(WORDS)]}.")
        wrong = (f"a {seconds + 3:.0f} second clip with {len(cuts) + 4} scenes, "
                 f"{h} by {w}, {WORDS[(i + 5) % len(WORDS)]}.")
        lines.append({"id": f"video/{i}", "dataset": "video",
                      "media": [str(path.relative_to(out))],
                      "conversation": _conversation(kind, "Describe the video.", caption,
                                                    "How many scenes?", f"{len(cuts) + 1}.",
                                                    wrong)})
    for i in range(images):
        n = 1 + int(rng.integers(0, 2))
        paths = []
        for k in range(n):
            w, h = (int(28 * x) for x in rng.integers(1, 6, 2))
            suffix = ".png" if (i + k) % 2 else ".jpg"
            path = out / "image" / f"img{i:03d}_{k}{suffix}"
            write_image(path, max(w, 28), max(h, 28), seed=seed * 1000 + 10 * i + k)
            paths.append(str(path.relative_to(out)))  # relative to the list file
        caption = f"{n} image{'s' if n > 1 else ''}, {WORDS[(3 * i) % len(WORDS)]} blocks."
        wrong = f"{n + 2} images, {WORDS[(3 * i + 4) % len(WORDS)]} circles."
        lines.append({"id": f"image/{i}", "dataset": "image", "media": paths,
                      "conversation": _conversation(kind, "What is shown?", caption,
                                                    "How many images?", f"{n}.", wrong)})
    for i in range(texts):
        words = [WORDS[int(x)] for x in rng.integers(0, len(WORDS), int(rng.integers(4, 12)))]
        if kind == "pretrain":
            lines.append({"id": f"text/{i}", "dataset": "text",
                          "text": "count: " + " ".join(words) + f" {len(words)}."})
            continue
        lines.append({"id": f"text/{i}", "dataset": "text", "conversation": _conversation(
            kind, "Count the words: " + " ".join(words), f"{len(words)} words.",
            "And the first one?", f"{words[0]}.", f"{len(words) + 3} words.")})
    listing = out / "list.jsonl"
    listing.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    records, bad = index_items(collect_items(listing), workers=workers, servers=(),
                               progress=False)
    if bad:
        raise RuntimeError(f"generated files failed to probe: {[b.to_dict() for b in bad]}")
    manifest = out / "manifest.jsonl"
    write_records(records, manifest)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/keye_tiny")
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--texts", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kind", default="pretrain", choices=KINDS,
                        help="captions (pre-training), multi-turn chats (SFT) or preference "
                             "pairs (MPO)")
    args = parser.parse_args()
    manifest = make_dataset(Path(args.out), videos=args.videos, images=args.images,
                            texts=args.texts, seed=args.seed, workers=args.workers,
                            kind=args.kind)
    print(f"wrote {manifest}")


if __name__ == "__main__":
    main()
