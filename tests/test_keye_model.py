"""The exact Keye-VL-1.5 model: multimodal rotary positions, the ViT against transformers' SigLIP,
the projector's merge order, and the LLM's logits against transformers' Qwen3 on TP/PP layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dataloader.manifest import MediaRef, Record, Turn
from dataloader.sequence import IMAGE_PAD, VIDEO_PAD, ByteTokenizer, sample_sizes, tokenize
from examples.keye_vl.rope import keye_position_ids
from examples.keye_vl.vision import PATCH, VisionEncoder, VisionShape
from hetero_parallel.layout import SampleLayout

# --- multimodal rotary positions -------------------------------------------------------------


def test_position_ids_of_a_hand_worked_sample():
    # 2 text tokens, a 2x3 image, 4 text tokens.
    layout = SampleLayout(0, 12, ((6,),), ((2,),), (((2, 3),),))
    want = np.array([
        [0, 1, 2, 2, 2, 2, 2, 2, 5, 6, 7, 8],  # t
        [0, 1, 2, 2, 2, 3, 3, 3, 5, 6, 7, 8],  # h
        [0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7, 8],  # w
    ])
    np.testing.assert_array_equal(keye_position_ids(layout), want)
    text = SampleLayout(1, 5, (), ())
    np.testing.assert_array_equal(keye_position_ids(text), np.tile(np.arange(5), (3, 1)))
    with pytest.raises(ValueError, match="frame_grids"):
        keye_position_ids(SampleLayout(2, 12, ((6,),), ((2,),)))


def _image(h: int, w: int) -> MediaRef:
    return MediaRef("a.jpg", "image", (h * w // 784,), (h,), (w,), (False,), (0.0,))


def _video(sizes: list[tuple[int, int]], fast: list[bool]) -> MediaRef:
    return MediaRef("v.mp4", "video", tuple(h * w // 784 for h, w in sizes),
                    tuple(h for h, _ in sizes), tuple(w for _, w in sizes), tuple(fast),
                    tuple(0.5 * i for i in range(len(sizes))))


RECORDS = [
    Record("image", "d", (Turn("user", "what is this?"), Turn("assistant", "a cat")),
           (_image(56, 84),)),
    # Slow frames 3x4 tokens, fast frames 1x2 tokens (30% budget), markers around fast ones.
    Record("video", "d", (Turn("user", "describe"), Turn("assistant", "it moves")),
           (_video([(84, 112), (28, 56), (28, 56), (84, 112), (28, 56)],
                   [False, True, True, False, True]),)),
    Record("mixed", "d", (Turn("system", "be brief"), Turn("user", "compare"),
                          Turn("assistant", "same"), Turn("user", "sure?"),
                          Turn("assistant", "yes")),
           (_image(112, 56), _video([(56, 56), (28, 28)], [False, True]), _image(28, 140))),
    Record("text", "d", (Turn("text", "plain pre-training text"),)),
]


def _reference_positions(ids: list[int], record: Record, visual: set[int]) -> np.ndarray:
    """Walk the token ids: text continues one after the largest id so far; each run of visual
    placeholders is the next frame of the record (in media order) and gets (s, s + r, s + c)."""
    grids = [(h // 28, w // 28) for m in record.media
             for h, w in zip(m.heights, m.widths, strict=True)]
    out = np.zeros((3, len(ids)), dtype=np.int64)
    nxt, i, frame = 0, 0, 0
    while i < len(ids):
        if ids[i] not in visual:
            out[:, i] = nxt
            nxt += 1
            i += 1
            continue
        rows, cols = grids[frame]
        frame += 1
        for k in range(rows * cols):
            assert ids[i + k] in visual
            out[:, i + k] = (nxt, nxt + k // cols, nxt + k % cols)
        i += rows * cols
        nxt += max(rows, cols)
    assert frame == len(grids)
    return out


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.id)
def test_position_ids_equal_a_token_walk_reference(record):
    tok = ByteTokenizer()
    sample = tokenize(record, 7, tok)
    visual = {tok.special_id(IMAGE_PAD), tok.special_id(VIDEO_PAD)}
    want = _reference_positions(sample.token_ids.tolist(), record, visual)
    layout = sample_sizes(record, 7, tok).layout  # what the ranks have without token ids
    np.testing.assert_array_equal(keye_position_ids(layout), want)


# --- the ViT -------------------------------------------------------------------------------

SHAPE = VisionShape(hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=64,
                    llm_hidden_size=48, image_size=56)


def _siglip_and_ours(seed: int = 0):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from examples.keye_vl.hf_config import siglip_vision_config_kwargs
    from examples.keye_vl.hf_layout import vit_rules

    torch.manual_seed(seed)
    ref = SiglipVisionModel(SiglipVisionConfig(**siglip_vision_config_kwargs(SHAPE),
                                               attn_implementation="eager")).eval()
    hf = {k.removeprefix("vision_model."): v for k, v in ref.state_dict().items()}
    ours = VisionEncoder(SHAPE).eval()
    state = ours.state_dict()
    for rule in vit_rules(SHAPE, hf_prefix=""):
        state[rule.ckpt.removeprefix("vision.")] = rule.combine([hf[n] for n in rule.hf])
    ours.load_state_dict(state)
    return ref, ours


def test_vit_matches_siglip_on_the_learned_position_grid():
    ref, ours = _siglip_and_ours()
    side = SHAPE.position_grid * PATCH
    frame = torch.randint(0, 256, (side, side, 3), generator=torch.Generator().manual_seed(1),
                          dtype=torch.uint8)
    pixels = frame.float().div(255).sub(0.5).div(0.5).permute(2, 0, 1)[None]
    with torch.no_grad():
        want = ref(pixel_values=pixels).last_hidden_state[0]
        got = ours.vit([frame], rope=False)
        with_rope = ours.vit([frame])
    diff = (got - want).abs().max().item()
    print(f"max_abs_diff vit {diff:.3e}")
    assert diff <= 1e-5
    assert (with_rope - want).abs().max() > 1e-2  # the 2D rotary attention is really there


def _bilinear(table: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize of ``[g, g, d]`` (what align_corners=False means)."""
    g = table.shape[0]

    def taps(n_out: int) -> list[tuple[int, int, float]]:
        out = []
        for i in range(n_out):
            x = max((i + 0.5) * g / n_out - 0.5, 0.0)
            lo = min(int(np.floor(x)), g - 1)
            out.append((lo, min(lo + 1, g - 1), x - lo))
        return out

    res = np.zeros((rows, cols, table.shape[2]))
    for i, (r0, r1, fr) in enumerate(taps(rows)):
        for j, (c0, c1, fc) in enumerate(taps(cols)):
            res[i, j] = ((1 - fr) * ((1 - fc) * table[r0, c0] + fc * table[r0, c1])
                         + fr * ((1 - fc) * table[r1, c0] + fc * table[r1, c1]))
    return res.reshape(rows * cols, -1)


def test_position_embedding_is_resized_bilinearly_to_each_frame():
    _, ours = _siglip_and_ours()
    g, d = SHAPE.position_grid, SHAPE.hidden_size
    table = ours.vit.pos_embed.weight.detach().reshape(g, g, d).double().numpy()
    for rows, cols in ((4, 4), (2, 6), (8, 2), (3, 5)):
        got = ours.vit.position_embedding(rows, cols).detach().double().numpy()
        np.testing.assert_allclose(got, _bilinear(table, rows, cols), atol=1e-6)


def test_packed_frames_equal_frames_one_at_a_time():
    _, ours = _siglip_and_ours()
    g = torch.Generator().manual_seed(2)
    frames = [torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
              for h, w in ((56, 84), (28, 28), (56, 84), (112, 56))]
    with torch.no_grad():
        packed = ours(frames)
        alone = torch.cat([ours([f]) for f in frames])
    assert packed.shape == (6 + 1 + 6 + 8, SHAPE.llm_hidden_size)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_projector_merges_2x2_patches_in_keye_order():
    ours = VisionEncoder(SHAPE)
    rows, cols, d = 4, 6, 3
    feats = torch.arange(rows * cols * d, dtype=torch.float32).reshape(rows * cols, d)
    merged = ours.projector.merge(feats, [(rows, cols)])
    # Keye: "(h p1 w p2) d -> (h w) (p1 p2 d)" over the row-major patch sequence.
    for i in range(rows // 2):
        for j in range(cols // 2):
            want = torch.cat([feats[(2 * i + a) * cols + 2 * j + b]
                              for a in range(2) for b in range(2)])
            torch.testing.assert_close(merged[i * (cols // 2) + j], want)


# --- the LLM against transformers' Qwen3, on gloo ---------------------------------------------

def _logits_on_layout(ckpt: str, ids: torch.Tensor, layout: dict,
                      positions: torch.Tensor | None = None) -> torch.Tensor | None:
    """Our LLM from CKPT on ``layout`` (1D positions, or ``positions`` ``[3, b, s]``); the full
    logits on last-stage ranks (gathered over TP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from examples.keye_vl.convert import ckpt_model_config
    from examples.keye_vl.model import build_model
    from hetero_parallel import ParallelPlan, initialize, teardown
    from hetero_parallel.cpu_compat import cpu_compat

    model, _ = ckpt_model_config(ckpt)
    with cpu_compat():
        plan = ParallelPlan(world_size=dist.get_world_size(), **layout)
        groups = initialize(plan, backend="gloo", seed=1)
        try:
            _, chunks = build_model(groups, model, init_from=ckpt)

            def forward_step(data_iterator, gpt):
                batch = next(data_iterator)
                pos = positions if positions is not None else \
                    torch.arange(batch.shape[1]).expand_as(batch)
                return gpt(batch, pos, None), None

            for chunk in chunks:
                chunk.eval()
            with torch.no_grad():
                out = get_forward_backward_func()(
                    forward_step_func=forward_step, data_iterator=iter([ids]), model=chunks[0],
                    num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=ids.shape[0],
                    forward_only=True)
            if not ps.is_pipeline_last_stage(ignore_virtual=True):
                return None
            logits = out[0]
            if plan.tp > 1:
                parts = [torch.empty_like(logits) for _ in range(plan.tp)]
                dist.all_gather(parts, logits.contiguous(),
                                group=ps.get_tensor_model_parallel_group())
                logits = torch.cat(parts, dim=-1)
            return logits
        finally:
            teardown(groups)


@pytest.fixture(scope="module")
def keye_checkpoint(tmp_path_factory):
    """A tiny Keye-layout Hugging Face folder (bf16, as released), its CKPT and Qwen3's logits."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from examples.keye_vl.convert import from_hf_keye
    from examples.keye_vl.hf_config import qwen3_config_kwargs
    from tests.test_keye_convert import TINY_KEYE, write_keye_folder

    root = tmp_path_factory.mktemp("keye_hf")
    tensors = write_keye_folder(root / "hf", TINY_KEYE, dtype=torch.bfloat16)
    from_hf_keye(str(root / "hf"), str(root / "ckpt"))
    ref = Qwen3ForCausalLM(Qwen3Config(**qwen3_config_kwargs(TINY_KEYE.llm),
                                       attn_implementation="eager")).eval()
    ref.load_state_dict({k: v.float() for k, v in tensors.items()
                         if k.startswith(("model.", "lm_head."))})
    ids = torch.randint(0, TINY_KEYE.llm.vocab_size, (2, 24),
                        generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids).logits
    return root, ids, want


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{}, {"tp": 2}, {"pp": 2}], ids=["tp1", "tp2", "pp2"])
def test_llm_logits_match_qwen3(pool4, keye_checkpoint, layout):
    root, ids, want = keye_checkpoint
    results = pool4.run(_logits_on_layout, str(root / "ckpt"), ids, layout)
    got = [r for r in results if r is not None]
    assert got
    worst = max((g - want).abs().max().item() for g in got)
    print(f"max_abs_diff llm {layout or 'tp1'} {worst:.3e}")
    assert worst <= 1e-4


class _KeyeMrope(torch.nn.Module):
    """cos/sin of Keye's multimodal RoPE written from the rule, in place of Qwen3's 1D rotary
    embedding: frequency k of each half turns with axis t, h or w by its mrope section."""

    def __init__(self, positions_3bs: torch.Tensor, head_dim: int, base: float,
                 section: tuple[int, int, int]) -> None:
        super().__init__()
        inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        axis = torch.cat([torch.full((n,), a) for a, n in enumerate(section)])  # per frequency
        pos = positions_3bs.double()  # [3, b, s]
        angles = torch.stack([pos[axis[k]] * inv[k] for k in range(head_dim // 2)], dim=-1)
        angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout, [b, s, head_dim]
        self.cos, self.sin = angles.cos().float(), angles.sin().float()

    def forward(self, x, position_ids):
        return self.cos.to(x.dtype), self.sin.to(x.dtype)


@pytest.mark.slow
def test_llm_multimodal_positions_match_the_rule(pool4, keye_checkpoint):
    """Visual tokens' (t, h, w) positions through megatron's mrope on TP=2 equal Qwen3 with the
    rule's rotary angles."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from examples.keye_vl.hf_config import qwen3_config_kwargs
    from hetero_parallel.export import SafetensorsSource
    from tests.test_keye_convert import TINY_KEYE

    root, ids, text_only = keye_checkpoint
    layout = SampleLayout(0, 24, ((6,), (4,)), ((4,), (14,)), (((2, 3),), ((2, 2),)))
    positions = torch.from_numpy(keye_position_ids(layout))[:, None, :].expand(3, 2, 24)
    llm = TINY_KEYE.llm
    ref = Qwen3ForCausalLM(Qwen3Config(**qwen3_config_kwargs(llm),
                                       attn_implementation="eager")).eval()
    source = SafetensorsSource(root / "hf")
    ref.load_state_dict({k: source.read(k).float() for k in ref.state_dict()})
    ref.model.rotary_emb = _KeyeMrope(positions, llm.head_dim, llm.rotary_base,
                                      llm.mrope_section)
    with torch.no_grad():
        want = ref(ids).logits
    results = pool4.run(_logits_on_layout, str(root / "ckpt"), ids, {"tp": 2},
                        positions.contiguous())
    worst = max((g - want).abs().max().item() for g in results if g is not None)
    print(f"max_abs_diff llm mrope {worst:.3e}")
    assert worst <= 1e-4
    assert (want - text_only).abs().max() > 1e-3  # the visual positions really matter here


# --- a giant frame split over ViT ranks (sequence-parallel ViT attention) ------------------------
def _split_vit(seed: int) -> dict:
    """Every rank encodes its piece of one 4x6-token frame (keys/values exchanged per layer);
    returns its rows and its gradients of a fixed linear loss, and the single-rank reference."""
    from examples.keye_vl.vision import TINY_VISION
    from hetero_parallel.balancer import MediaSpec, SampleSpec, plan_global_batch
    from hetero_parallel.cost_model import CostModel
    from hetero_parallel.vit_split import SplitAttention

    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(seed)
    model = VisionEncoder(TINY_VISION)
    frame = torch.randint(0, 256, (4 * 28, 6 * 28, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(seed))
    probe = torch.randn(24, TINY_VISION.llm_hidden_size, generator=torch.Generator().manual_seed(1))
    # Whole frame on this rank: the reference.
    whole = model([frame])
    (whole * probe).sum().backward()
    reference = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    # The frame split over the ranks (a cost model whose attention term dominates).
    batch = plan_global_batch([SampleSpec(0, 4, (MediaSpec((24,)),))],
                              CostModel(vit_linear=1e-3, vit_quadratic=1.0, llm_linear=1.0,
                                        llm_quadratic=0.0),
                              num_replicas=1, num_microbatches=1, num_vit_ranks=world,
                              split_vit_items=True)
    (group,) = batch.split_groups()
    split = SplitAttention(batch, rank, dist.group.WORLD, rows_per_token=model.rows_per_token)
    mine = batch.chunks_for_vit_rank(rank)
    rows = model([frame for _ in mine], split=split)
    lo = group.token_bounds[group.vit_ranks.index(rank)] if mine else 0
    (rows * probe[lo:lo + rows.shape[0]]).sum().backward()
    grads = {k: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
             for k, p in model.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)
    return {"rows": rows.detach(), "lo": lo, "whole": whole.detach(), "grads": grads,
            "reference": reference, "pieces": len(group.vit_ranks)}


@pytest.mark.slow
def test_a_frame_split_over_vit_ranks_equals_the_whole_frame(pool4):
    results = pool4.run(_split_vit, 0)
    assert results[0]["pieces"] > 1
    whole = results[0]["whole"]
    covered = 0
    for r in results:
        n = r["rows"].shape[0]
        torch.testing.assert_close(r["rows"], whole[r["lo"]:r["lo"] + n], rtol=1e-5, atol=1e-6)
        covered += n
        for k, g in r["grads"].items():
            ref = r["reference"][k]
            err = ((g - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
            assert err < 1e-5, (k, err)
    assert covered == whole.shape[0]
