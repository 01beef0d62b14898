"""GPU-only paths: run where CUDA (and TransformerEngine) are present, skip cleanly elsewhere.

One GPU hosts one NCCL rank, so these are single-rank checks; multi-rank behaviour is covered on
gloo by the CPU tests. They print their timings (``pytest -s`` shows them) for closing notes.
"""

from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_te = pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                              reason="needs transformer-engine (pip install -e '.[gpu]')")
pytestmark = pytest.mark.gpu


@pytest.fixture
def nccl_world():
    import torch.distributed as dist

    from hetero_parallel import ParallelPlan, initialize, teardown
    from tests.distributed import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    groups = initialize(ParallelPlan(world_size=1), backend="nccl")
    yield groups
    teardown(groups, destroy_world=True)


def _tiny(impl: str, dtype: torch.dtype = torch.float32):
    from megatron.core.models.gpt import GPTModel

    from hetero_parallel.llm_chunks import gpt_layer_spec
    from tests.tiny_models import VOCAB, gpt_config

    config = gpt_config(bf16=dtype == torch.bfloat16, params_dtype=dtype, pipeline_dtype=dtype,
                        use_cpu_initialization=True)
    torch.manual_seed(0)
    return GPTModel(config=config, transformer_layer_spec=gpt_layer_spec(config, impl=impl),
                    vocab_size=VOCAB, max_sequence_length=1024, position_embedding_type="rope",
                    rotary_base=10_000).cuda()


_TE_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
             "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def _copy_into_te(torch_model, te_model) -> None:
    """The same weights in TransformerEngine's fused names (layer norms live in the linears)."""
    te_params = dict(te_model.named_parameters())
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            target = name
            for old, new in _TE_NAMES.items():
                if name.endswith(old):
                    target = name[: -len(old)] + new
            te_params[target].copy_(p)


def _packed_batch(lengths=(37, 64, 19, 88)):
    from hetero_parallel.layout import make_microbatch, packed_shape

    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(4, 500, (n,), generator=g) for n in lengths]
    shape = packed_shape(list(range(len(ids))), lengths, divisor=8, sample_divisor=8)
    mb = make_microbatch(ids, [torch.ones(n, dtype=torch.bool) for n in lengths], shape)
    padded = make_microbatch(ids, [torch.ones(n, dtype=torch.bool) for n in lengths],
                             type(shape)(shape.sample_ids, -(-max(lengths) // 8) * 8))
    return mb, shape, padded


def _loss(model, mb, shape=None) -> torch.Tensor:
    from megatron.core.packed_seq_params import PackedSeqParams

    packed = None
    if shape is not None:
        cu, cu_padded = (t.cuda() for t in shape.cu_seqlens())
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 cu_seqlens_q_padded=cu_padded, cu_seqlens_kv_padded=cu_padded,
                                 max_seqlen_q=max(shape.packed_lengths),
                                 max_seqlen_kv=max(shape.packed_lengths))
    per_token = model(mb.input_ids.cuda(), mb.position_ids.cuda(), None,
                      labels=mb.labels.cuda(), packed_seq_params=packed)
    mask = mb.loss_mask.cuda()
    return (per_token.float() * mask).sum() / mask.sum()


@needs_cuda
@needs_te
def test_packed_te_attention_equals_the_exact_torch_layers(nccl_world):
    """fp32, one GPU: TransformerEngine's packed (THD) path and `cpu_layers` give the same loss,
    packed or padded (so the CPU tests' attention is what TE computes)."""
    reference = _tiny("torch")
    te = _tiny("transformer_engine")
    _copy_into_te(reference, te)
    mb, shape, padded = _packed_batch()
    ref_packed = _loss(reference, mb, shape)
    ref_padded = _loss(reference, padded)
    te_packed = _loss(te, mb, shape)
    print(f"\nloss: torch packed {ref_packed.item():.6f} padded {ref_padded.item():.6f}; "
          f"TE packed {te_packed.item():.6f}")
    torch.testing.assert_close(ref_packed, ref_padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(te_packed, ref_packed, rtol=1e-4, atol=1e-4)


@needs_cuda
@needs_te
def test_bf16_trains_packed_and_packing_saves_time(nccl_world):
    model = _tiny("transformer_engine", torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mb, shape, padded = _packed_batch((300, 700, 120, 1900))
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = _loss(model, mb, shape)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]

    def timed(batch, shape_or_none) -> float:
        for _ in range(3):
            _loss(model, batch, shape_or_none).backward()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            _loss(model, batch, shape_or_none).backward()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / 10

    t_packed, t_padded = timed(mb, shape), timed(padded, None)
    print(f"\nbf16 step (fwd+bwd): packed {t_packed * 1e3:.2f} ms, padded {t_padded * 1e3:.2f} ms, "
          f"padded/packed {t_padded / t_packed:.2f}x; losses {losses}")


@needs_cuda
def test_checkpoint_save_and_load_of_a_1b_model_on_one_gpu(nccl_world, tmp_path):
    """Issue 10's GPU check: save and load a ~1B-parameter LLM + Adam state, timed."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from hetero_parallel.checkpoint import CheckpointConfig, CheckpointManager
    from hetero_parallel.llm_chunks import gpt_layer_spec, parallel_config_kwargs
    from hetero_parallel.plan import ParallelPlan
    from hetero_parallel.trainer import HeteroTrainer, OptimizerConfig

    plan = ParallelPlan(world_size=1)
    config = TransformerConfig(num_layers=16, hidden_size=2048, num_attention_heads=16,
                               num_query_groups=8, ffn_hidden_size=5504, gated_linear_unit=True,
                               normalization="RMSNorm", add_bias_linear=False,
                               activation_func=torch.nn.functional.silu, bf16=True,
                               params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
                               **{**parallel_config_kwargs(plan),
                                  "use_cpu_initialization": False})
    model = GPTModel(config=config, transformer_layer_spec=gpt_layer_spec(config),
                     vocab_size=32_000, max_sequence_length=4096).cuda()
    params = sum(p.numel() for p in model.parameters())
    trainer = HeteroTrainer(nccl_world, vision=torch.nn.Linear(4, 4).cuda(),
                            llm_chunks=[model], optim=OptimizerConfig(lr=1e-4))
    manager = CheckpointManager(CheckpointConfig(folder=tmp_path), {"trainer": trainer}, rank=0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    manager.save(1)
    t_save = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = manager.load()
    torch.cuda.synchronize()
    t_load = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in (tmp_path / "step_00000001").iterdir())
    print(f"\n{params / 1e9:.2f}B params: checkpoint {size / 1e9:.1f} GB, save {t_save:.1f} s "
          f"({size / t_save / 1e9:.2f} GB/s), load+verify {t_load:.1f} s")
    assert report.step == 1
    assert params > 0.9e9
