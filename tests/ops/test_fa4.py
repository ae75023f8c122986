"""FlashAttention-4 backend: the conversion of kept-block lists to FA4's block-sparse tensors (CPU,
pure torch), the dispatch table and its errors, and (GPU, FA4 installed) FA4's outputs against the
torch reference."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from attn_testing import lists_to_dense, make_block_lists, make_qkv, rel_rms

import seerattn_hf as sa
from seerattn_hf import attention
from seerattn_hf.ops.block_sparse_attn import fa4 as fa4_module
from seerattn_hf.ops.block_sparse_attn import fa4_block_sparse_attention, naive_block_sparse_attention
from seerattn_hf.ops.block_sparse_attn.fa4 import fa4_block_lists, fa4_dense_attention, fa4_unsupported_reason

# (B, T, HQ, HM, block_size, kind, density): GQA lists per KV group (HM < HQ), odd lengths, rows
# without their diagonal, empty rows and blocks past the diagonal ("holes")
LIST_CASES = [(1, 1, 4, 4, 16, "random", 0.5), (2, 200, 8, 2, 32, "holes", 0.4), (1, 333, 6, 3, 16, "holes", 0.3),
              (2, 130, 4, 4, 64, "full", 1.0), (1, 100, 4, 1, 16, "diag", 0.0)]


def fa4_tensors_to_dense(lists, NB):
    """[B, HQ, NB, NB] bool of the blocks FA4 computes, and the same split into (full, masked)."""
    full = lists_to_dense(lists["full_block_idx"], lists["full_block_cnt"])
    masked = lists_to_dense(lists["mask_block_idx"].expand(*lists["mask_block_idx"].shape[:3], NB),
                            lists["mask_block_cnt"])
    return full | masked, full, masked


@pytest.mark.parametrize("case", LIST_CASES, ids=str)
def test_fa4_block_lists_compute_the_kept_causal_blocks(case):
    B, T, HQ, HM, bs, kind, density = case
    idx, count = make_block_lists(B, HM, T, bs, density, kind)
    NB = idx.shape[2]
    lists = fa4_block_lists(idx, count, HQ)
    assert all(t.dtype == torch.int32 for t in lists.values())
    assert lists["full_block_idx"].shape[:3] == lists["mask_block_idx"].shape[:3] == (B, HQ, NB)
    assert lists["full_block_idx"].shape[-1] <= NB and lists["mask_block_idx"].shape[-1] == 1
    computed, full, masked = fa4_tensors_to_dense(lists, NB)
    rows = torch.arange(NB)
    # ours: the kept blocks up to the diagonal (blocks after it contribute nothing), per query head
    expected = (lists_to_dense(idx, count) & (rows[None, :] <= rows[:, None])).repeat_interleave(HQ // HM, dim=1)
    assert torch.equal(computed, expected)
    assert not (full & (rows[None, :] >= rows[:, None])).any(), "full blocks lie strictly below the diagonal"
    assert torch.equal(masked, expected & torch.eye(NB, dtype=torch.bool)), "the masked block is the kept diagonal"


def test_fa4_errors_name_what_is_missing(monkeypatch):
    cpu = torch.device("cpu")
    assert "needs CUDA" in fa4_unsupported_reason(cpu, torch.bfloat16, 128)
    with pytest.raises(RuntimeError, match="backend='fa4' cannot run here: FA4 needs CUDA"):
        fa4_module.require_fa4(cpu, torch.bfloat16, 128)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(fa4_module, "compute_capability", lambda device: (9, 0))
    assert "float16 or bfloat16" in fa4_unsupported_reason(cuda, torch.float32, 128)
    assert "head_dim=100" in fa4_unsupported_reason(cuda, torch.bfloat16, 100)
    assert "64 or 128-token blocks" in fa4_unsupported_reason(cuda, torch.bfloat16, 128, block_size=32)
    monkeypatch.setattr(fa4_module, "_import_error", lambda: "ModuleNotFoundError: No module named 'flash_attn'")
    assert 'pip install "seerattn_hf[fa4]"' in fa4_unsupported_reason(cuda, torch.bfloat16, 128, block_size=64)
    monkeypatch.setattr(fa4_module, "_import_error", lambda: None)
    assert fa4_unsupported_reason(cuda, torch.bfloat16, 128, block_size=64) is None
    monkeypatch.setattr(fa4_module, "compute_capability", lambda device: (8, 0))
    assert "found 8.x" in fa4_unsupported_reason(cuda, torch.bfloat16, 128)
    monkeypatch.setattr(fa4_module, "compute_capability", lambda device: (10, 0))
    assert "multiple of 256" in fa4_unsupported_reason(cuda, torch.bfloat16, 128, block_size=128)


@pytest.mark.parametrize("major, block_size, padded, continued, installed, backend, expected", [
    (9, 128, False, False, True, "auto", "fa4"),
    (9, 64, False, False, True, "auto", "triton"),  # measured: our kernel is faster at 64-token blocks
    (9, 128, True, False, True, "auto", "triton"),  # FA4 takes unpadded batches only
    (9, 128, False, True, True, "auto", "triton"),  # and one-shot prefills
    (9, 128, False, False, False, "auto", "triton"),
    (10, 256, False, False, True, "auto", "triton"),  # unmeasured: the portable default
    (9, 64, False, False, True, "fa4", "fa4"),
    (9, 64, True, False, True, "fa4", "triton"),
    (9, 128, False, False, True, "triton", "triton"),
])
def test_sparse_backend_table(monkeypatch, major, block_size, padded, continued, installed, backend, expected):
    monkeypatch.setattr(fa4_module, "compute_capability", lambda device: (major, 0))
    monkeypatch.setattr(attention, "compute_capability", lambda device: (major, 0))
    monkeypatch.setattr(fa4_module, "_import_error", lambda: None if installed else "ImportError: no flash_attn")
    query = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.bfloat16,
                            shape=(1, 32, 32768, 128))
    key = SimpleNamespace(shape=(1, 8, 40000 if continued else 32768, 128))
    offsets = torch.tensor([3]) if padded else None
    for list_heads in (32, 8):  # a mask per query head, one per KV group
        block_idx = torch.zeros(1, list_heads, 1, 1)
        chosen = attention.sparse_backend(backend, query, key, block_idx, block_size, offsets)
        assert chosen == expected
        assert attention.sparse_backend(chosen, query, key, block_idx, block_size, offsets) == chosen


def test_forced_fa4_fails_once_clearly_and_auto_reports_its_choice():
    from model_factory import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(0, 96, (1, 64))
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=16, sparsity_method="density", density=0.5))
    with torch.no_grad():
        model(ids)
    assert sa.get_sparsity_stats(model)["backends"] == {"sparse:torch": 2}
    sa.set_attention_mode(model, "dense")
    with torch.no_grad():
        model(ids)
    assert sa.get_sparsity_stats(model)["backends"] == {"dense:model": 2, "sparse:torch": 2}
    sa.reset_sparsity_stats(model)
    assert sa.get_sparsity_stats(model)["backends"] == {}
    sa.set_attention_mode(model, "sparse")
    sa.update_sparsity_config(model, backend="fa4")
    with pytest.raises(RuntimeError, match="backend='fa4' cannot run here: FA4 needs CUDA tensors"):
        with torch.no_grad():
            model(ids)


def test_prefill_bench_adds_fa4_baselines_and_compares_with_the_fastest_dense(monkeypatch):
    from seerattn_hf.evaluation.cli import with_fa4_baselines
    from seerattn_hf.evaluation.reports import prefill_markdown
    from seerattn_hf.evaluation.settings import build_settings

    config = SimpleNamespace(head_dim=128, hidden_size=4096, num_attention_heads=32)
    model = SimpleNamespace(config=config, device=torch.device("cuda", 0), dtype=torch.bfloat16,
                            seer_config=SimpleNamespace(gate=SimpleNamespace(block_size=64)))
    settings = build_settings(["dense", "gate"], [0.1])
    monkeypatch.setattr(fa4_module, "compute_capability", lambda device: (9, 0))
    monkeypatch.setattr(fa4_module, "_import_error", lambda: "ImportError: no flash_attn")
    assert with_fa4_baselines(settings, "auto", model) == settings
    monkeypatch.setattr(fa4_module, "_import_error", lambda: None)
    expanded = with_fa4_baselines(settings, "auto", model)
    assert [s.label for s in expanded] == ["dense [model]", "dense [fa4]", "gate d=0.1 [auto]", "gate d=0.1 [fa4]"]
    assert [s.policy_changes()["backend"] for s in expanded] == ["triton", "fa4", "auto", "fa4"]

    def row(label, method, ttft):
        return {"length": 8192, "label": label, "method": method, "density": 1.0, "ttft_s": ttft,
                "ttft_no_attention_s": 0.1, "breakdown": {"gate_s": 0.0, "attention_s": 0.1, "other_s": 0.1}}
    summary = {"config_preset": "x", "num_layers": 1, "dtype": "bf16", "device": "cuda", "repeats": 1, "warmup": 1,
               "results": [row("dense [model]", "dense", 0.4), row("dense [fa4]", "dense", 0.2),
                           row("gate d=0.1 [auto]", "gate", 0.1)]}
    markdown = prefill_markdown(summary)
    assert "fastest dense setting at each length: 8192: dense [fa4]" in markdown
    assert "| 8192 | gate d=0.1 [auto] | 1 | 0.1 | 2 |" in markdown, "speed-up 0.2 s / 0.1 s, not 0.4 / 0.1"


def test_auto_takes_fa4_only_from_the_measured_prompt_length(monkeypatch):
    monkeypatch.setattr(attention, "compute_capability", lambda device: (9, 0))
    monkeypatch.setattr(fa4_module, "compute_capability", lambda device: (9, 0))
    monkeypatch.setattr(fa4_module, "_import_error", lambda: None)
    floor = attention.AUTO_FA4_SPARSE[(9, 128, "head")]
    block_idx = torch.zeros(1, 32, 1, 1)
    for length, expected in ((floor - 1, "triton"), (floor, "fa4")):
        query = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.bfloat16,
                                shape=(1, 32, length, 128))
        key = SimpleNamespace(shape=(1, 8, length, 128))
        assert attention.sparse_backend("auto", query, key, block_idx, 128, None) == expected
        assert attention.sparse_backend("fa4", query, key, block_idx, 128, None) == "fa4"  # forced: any length


def fa4_importable() -> bool:
    return torch.cuda.is_available() and fa4_module._import_error() is None


needs_fa4 = pytest.mark.skipif(not fa4_importable(), reason="needs FA4 (flash_attn.cute) on a CUDA GPU")
# (B, T, HQ, HKV, block_size, masks per KV group, kind, density)
GPU_CASES = [(1, 4096, 32, 8, 64, False, "random", 0.3), (1, 8191, 32, 8, 128, True, "random", 0.1),
             (2, 3000, 32, 8, 64, True, "random", 0.5), (1, 8192, 32, 8, 128, False, "full", 1.0)]


@pytest.mark.gpu
@needs_fa4
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_fa4_block_sparse_bf16_gpu(case):
    B, T, HQ, HKV, bs, shared, kind, density = case
    q, k, v = make_qkv(B, HQ, HKV, T, 128, torch.bfloat16, "cuda")
    idx, count = make_block_lists(B, HKV if shared else HQ, T, bs, density, kind, device="cuda")
    o, lse = fa4_block_sparse_attention(q, k, v, idx, count, bs, return_lse=True)
    ref_o, ref_lse = naive_block_sparse_attention(q, k, v, idx, count, bs, return_lse=True)
    assert rel_rms(o, ref_o) < 1e-2 and rel_rms(lse, ref_lse) < 1e-3


@pytest.mark.gpu
@needs_fa4
@pytest.mark.parametrize("bs", [64, 128])
def test_fa4_block_sparse_rows_without_diagonal_or_blocks_gpu(bs):
    q, k, v = make_qkv(1, 32, 8, 2000, 128, torch.bfloat16, "cuda")
    idx, count = make_block_lists(1, 32, 2000, bs, 0.4, "holes", device="cuda")
    o = fa4_block_sparse_attention(q, k, v, idx, count, bs)
    assert rel_rms(o, naive_block_sparse_attention(q, k, v, idx, count, bs)) < 1e-2


@pytest.mark.gpu
@needs_fa4
@pytest.mark.parametrize("T, Tq", [(4096, 4096), (5000, 5000), (6000, 1000)])
def test_fa4_dense_bf16_gpu(T, Tq):
    q, k, v = make_qkv(1, 32, 8, T, 128, torch.bfloat16, "cuda")
    every_block, counts = make_block_lists(1, 32, T, 64, 1.0, "full", device="cuda")
    ref_o, ref_lse = naive_block_sparse_attention(q, k, v, every_block, counts, 64, return_lse=True)
    # a continued prompt: the last Tq queries over all T keys (causal, bottom-right aligned)
    o, lse = fa4_dense_attention(q[:, :, T - Tq:], k, v, return_lse=True)
    assert rel_rms(o, ref_o[:, T - Tq:]) < 1e-2 and rel_rms(lse, ref_lse[:, :, T - Tq:]) < 1e-3


@pytest.mark.gpu
@needs_fa4
@pytest.mark.parametrize("block_size", [64, 128])
def test_patched_model_takes_fa4_where_the_table_says_gpu(block_size, monkeypatch):

    from model_factory import tiny_model

    model = tiny_model("llama", num_heads=8, num_kv_heads=2, head_dim=128, dtype=torch.bfloat16).cuda()
    ids = torch.randint(1, 96, (1, 1000), device="cuda")
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=block_size, sparsity_method="density",
                                                         density=0.3))
    # The H200 rows of the table, from any length here (the prompt is shorter than their floor).
    monkeypatch.setattr(attention, "AUTO_FA4_SPARSE", dict.fromkeys(attention.AUTO_FA4_SPARSE, 0))
    auto_sparse = "fa4" if block_size == 128 else "triton"
    # Each backend replays the block lists of the first run: a tie broken the other way by a bf16
    # difference in an earlier layer would otherwise change a list, and with it the logits.
    recorded, replay = [], iter(())
    select = attention.select_block_lists

    def record_or_replay(*args, **kwargs):
        lists = next(replay, None)
        if lists is None:
            lists = select(*args, **kwargs)
            recorded.append(lists)
        return lists

    monkeypatch.setattr(attention, "select_block_lists", record_or_replay)
    logits = {}
    for backend, sparse, dense in (("triton", "triton", "model"), ("auto", auto_sparse, "fa4"), ("fa4", "fa4", "fa4")):
        sa.update_sparsity_config(model, backend=backend)
        sa.reset_sparsity_stats(model)
        sa.set_attention_mode(model, "sparse")
        replay = iter(list(recorded))
        with torch.no_grad():
            logits[backend] = model(ids).logits.float()
        sa.set_attention_mode(model, "dense")
        with torch.no_grad():
            model(ids)
        assert sa.get_sparsity_stats(model)["backends"] == {f"sparse:{sparse}": 2, f"dense:{dense}": 2}
    # the same gates and lists through each kernel
    assert rel_rms(logits["fa4"], logits["triton"]) < 2e-2 and rel_rms(logits["auto"], logits["triton"]) < 2e-2
