"""Preference records, the loader's preference mode, the per-prompt state column and the
reference log-prob store, in one process with real (tiny) media decoded in-process.

References: each answer tokenized on its own (`Record.answers` + `tokenize`), the balancer's
placement read back, brute-force walks over the steps, and an uninterrupted reference pass.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from dataloader.columnar_writer import write_columnar
from dataloader.loader import LoaderConfig, StepLoader
from dataloader.manifest import Record, Turn, open_manifest, write_jsonl
from dataloader.reference_logps import ReferenceLogps, compute_reference_logps
from dataloader.sequence import ByteTokenizer, sample_sizes, tokenize
from dataloader.state import IncompatibleStateError
from dataloader.validate import ManifestError
from hetero_parallel.plan import ParallelPlan
from hetero_parallel.step_plan import StepConfig
from tests.dataloader_helpers import build_manifest, cost_model, write_media


def _preference(r: Record, i: int) -> Record:
    return Record(f"pref-{r.id}", r.dataset,
                  (Turn("system", "Be precise."), Turn("user", f"What is shown? ({i})"),
                   Turn("chosen", f"A faithful answer number {i}." * (1 + i % 3)),
                   Turn("rejected", f"Wrong {i}.")), r.media)


@pytest.fixture(scope="module")
def pref(tmp_path_factory):
    """A JSONL and a columnar preference manifest over real clips and images (clip1 corrupt)."""
    root = tmp_path_factory.mktemp("pref")
    folder = write_media(root / "media", videos=4, images=4)
    plain = open_manifest(build_manifest(folder, root / "plain.jsonl", break_files=True))
    records = [_preference(r, i) for i, r in enumerate(plain.records) if r.media]
    records += [Record(f"pref-text{i}", "text",
                       (Turn("user", f"Say {i}."), Turn("chosen", f"{i}!"),
                        Turn("rejected", f"not {i}")))
                for i in range(5)]
    write_jsonl(records, root / "pref.jsonl")
    write_columnar(records, root / "pref_columnar")
    return {"root": root, "jsonl": str(root / "pref.jsonl"),
            "columnar": str(root / "pref_columnar"), "records": records}


def _loader(path: str, **config) -> StepLoader:
    cfg = dict(global_batch_size=4, seed=3, prefetch=0, preference=True,
               step=StepConfig(num_microbatches=2, frames_per_chunk=2,
                               max_tokens_per_microbatch=1500))
    cfg.update(config)
    return StepLoader(open_manifest(path), LoaderConfig(**cfg), plan=ParallelPlan(world_size=1),
                      rank=0, cost_model=cost_model())


def test_preference_records_are_validated_and_split_into_two_conversations():
    prompt = (Turn("user", "q"),)
    r = Record("r", "d", (*prompt, Turn("rejected", "b"), Turn("chosen", "a")))
    chosen, rejected = r.answers()
    assert chosen.conversation == (*prompt, Turn("assistant", "a"))
    assert rejected.conversation == (*prompt, Turn("assistant", "b"))
    # Outside preference mode the record is its chosen conversation.
    tok = ByteTokenizer()
    assert sample_sizes(r, 0, tok) == sample_sizes(chosen, 0, tok)
    for turns, match in [
        ((*prompt, Turn("chosen", "a")), "ends with one 'chosen' and one 'rejected'"),
        ((*prompt, Turn("chosen", "a"), Turn("chosen", "b")), "ends with one 'chosen'"),
        ((Turn("chosen", "a"), *prompt, Turn("rejected", "b")), "ends with one 'chosen'"),
        ((Turn("system", "s"), Turn("chosen", "a"), Turn("rejected", "b")), "needs a prompt"),
    ]:
        with pytest.raises(ManifestError, match=match):
            Record("bad", "d", turns)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


def test_preference_steps_keep_pairs_together_and_encode_media_once(pref):
    tok = ByteTokenizer()
    by_id = {r.id: r for r in pref["records"]}
    runs = {}
    for kind in ("jsonl", "columnar"):
        loader = _loader(pref[kind])
        steps = [loader.next_step() for _ in range(4)]
        loader.close()
        runs[kind] = [(d.sample_ids, d.batch.digest(),
                       [_digest(mb.input_ids) for mb in d.microbatches]) for d in steps]
        skipped = [s for d in steps for s in d.skipped]
        assert any("clip1" in s.reason for s in skipped)
        for d in steps:
            assert len(d.samples) == 4
            assert d.pairs == {2 * r.position: 2 * r.position + 1 for r in d.samples}
            assert d.sample_ids == tuple(sorted([*d.pairs, *d.pairs.values()]))
            batch = d.batch
            # Chosen and rejected answers share one replica and micro-batch...
            where = {s: j for j, mb in enumerate(batch.samples_for_replica(0)) for s in mb}
            assert all(where[c] == where[r] for c, r in d.pairs.items())
            # ...and the ViT encodes each prompt's media once, for the chosen answer.
            assert all(ch.sample_id % 2 == 0 for ch in batch.media_chunks)
            for ref in d.samples:
                record = by_id[ref.record_id]
                layout_c, layout_r = d.layouts[2 * ref.position], d.layouts[2 * ref.position + 1]
                assert (layout_c.group, layout_r.group) == (ref.position, ref.position)
                assert layout_r.media_from == 2 * ref.position
                assert layout_r.frame_positions == layout_c.frame_positions
                assert sum(len(m.tokens) for m in record.media) == sum(
                    len(t) for t in layout_c.frame_tokens)
            # Token by token, each answer is its own conversation.
            ids = [s for mb in batch.samples_for_replica(0) for s in mb]
            for mb, shape in zip(d.microbatches, d.plan.shapes, strict=True):
                for i, s in enumerate(shape.sample_ids):
                    ref = next(r for r in d.samples if r.position == s // 2)
                    want = tokenize(by_id[ref.record_id].answers()[s % 2], s, tok)
                    start = shape.offsets[i]
                    got = mb.input_ids[0, start:start + want.token_ids.size].numpy()
                    assert (got == want.token_ids).all(), s
            assert set(ids) == set(d.sample_ids)
            assert d.total_loss_tokens == sum(
                sample_sizes(by_id[r.record_id].answers()[j], 0, tok).loss_tokens
                for r in d.samples for j in (0, 1))
    assert runs["jsonl"] == runs["columnar"]


def test_pairs_stay_whole_under_a_tight_token_cap(pref):
    loader = _loader(pref["jsonl"], step=StepConfig(num_microbatches=4, frames_per_chunk=2,
                                                    max_tokens_per_microbatch=700))
    for _ in range(3):
        d = loader.next_step()
        shapes = d.plan.shapes
        for shape in shapes:
            assert sum(d.layouts[s].seq_len for s in shape.sample_ids) <= 700
            assert all((s ^ 1) in shape.sample_ids for s in shape.sample_ids)
    loader.close()


def test_a_non_preference_record_in_preference_mode_is_an_error_naming_it(tmp_path):
    records = [Record("ok", "t", (Turn("user", "q"), Turn("chosen", "a"), Turn("rejected", "b"))),
               Record("plain", "t", (Turn("user", "q"), Turn("assistant", "a")))]
    write_jsonl(records, tmp_path / "m.jsonl")
    loader = _loader(str(tmp_path / "m.jsonl"), global_batch_size=2, step=StepConfig())
    with pytest.raises(RuntimeError, match="record 'plain'.*is not a preference record"):
        loader.next_step()
    loader.close()


def test_prompt_state_is_reported_saved_and_checked(pref):
    a = _loader(pref["jsonl"], prompt_state=True)
    first = a.next_step()
    assert first.prompt_state == (0,) * 4
    rows = [r.row for r in first.samples]
    a.set_prompt_state(rows[:2], [3, 5])
    state = a.state_dict()
    saved = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()}
    after = [a.next_step() for _ in range(3)]
    a.close()
    b = _loader(pref["jsonl"], prompt_state=True)
    b.load_state_dict(saved)
    again = [b.next_step() for _ in range(3)]
    assert [d.prompt_state for d in again] == [d.prompt_state for d in after]
    assert [d.sample_ids for d in again] == [d.sample_ids for d in after]
    assert b.prompt_state[rows[0]] == 3 and b.prompt_state[rows[1]] == 5
    with pytest.raises(ValueError, match="fit int8"):
        b.set_prompt_state([0], [200])
    with pytest.raises(ValueError, match="outside the manifest"):
        b.set_prompt_state([len(b.manifest)], [1])
    b.close()
    broken = dict(saved, prompt_state=saved["prompt_state"].clone())
    broken["prompt_state"][0] += 1
    c = _loader(pref["jsonl"], prompt_state=True)
    with pytest.raises(IncompatibleStateError, match="fails its CRC-32"):
        c.load_state_dict(broken)
    with pytest.raises(IncompatibleStateError, match="no prompt-state column"):
        c.load_state_dict({k: v for k, v in saved.items() if not k.startswith("prompt_state")})
    c.close()


def _fake_reference(data) -> dict[int, float]:
    """A deterministic stand-in for a model's forward: a function of each answer's tokens."""
    out = {}
    for mb, shape in zip(data.microbatches, data.plan.shapes, strict=True):
        for i, s in enumerate(shape.sample_ids):
            start, n = shape.offsets[i], shape.sample_lengths[i]
            out[s] = -float((mb.input_ids[0, start:start + n] % 13).sum()) / 7
    return out


def test_the_reference_pass_resumes_and_its_values_reach_the_steps(pref, tmp_path):
    whole = compute_reference_logps(_loader(pref["jsonl"]), _fake_reference, tmp_path / "a",
                                    rank=0, source="sft-step-100", flush_every=1)
    assert whole.meta["complete"] and whole.meta["skipped_rows"]
    manifest = open_manifest(pref["jsonl"])
    skipped = set(whole.meta["skipped_rows"])
    assert {m.path.rsplit("/", 1)[1] for r in skipped for m in manifest.media(r)} == \
        {"clip1.mp4", "img2.png"}  # the files build_manifest broke
    filled = ~np.isnan(whole.values).any(axis=1)
    assert filled.sum() + len(skipped) == len(manifest)
    # Interrupted after 2 steps, then continued: the same numbers.
    part = compute_reference_logps(_loader(pref["jsonl"]), _fake_reference, tmp_path / "b",
                                   rank=0, source="sft-step-100", max_steps=2, flush_every=1)
    assert not part.meta["complete"]
    rest = compute_reference_logps(_loader(pref["jsonl"]), _fake_reference, tmp_path / "b",
                                   rank=0, source="sft-step-100", flush_every=1)
    np.testing.assert_array_equal(rest.values, whole.values)
    with pytest.raises(ValueError, match="not of 'other-model'"):
        compute_reference_logps(_loader(pref["jsonl"]), _fake_reference, tmp_path / "b", rank=0,
                                source="other-model")
    # Training steps carry each answer's reference value.
    store = ReferenceLogps.open(tmp_path / "a")
    loader = _loader(pref["jsonl"], global_batch_size=3)
    loader.reference = store
    d = loader.next_step()
    for ref in d.samples:
        for j in (0, 1):
            assert d.reference_logps[2 * ref.position + j] == whole.values[ref.row, j]
    loader.close()
    # A store of another manifest, and a record the pass did not reach, are refused.
    other = ReferenceLogps(store.folder, store.values, dict(store.meta, manifest_hash="0" * 64))
    with pytest.raises(ValueError, match="not of this one"):
        StepLoader(manifest, LoaderConfig(global_batch_size=2, preference=True, prefetch=0),
                   plan=ParallelPlan(world_size=1), rank=0, cost_model=cost_model(),
                   reference=other)
    with pytest.raises(ValueError, match="no reference log-probs for 1 records"):
        ReferenceLogps(store.folder, np.full((len(manifest), 2), np.nan), store.meta).lookup(
            np.asarray([0]), ["r0"])
