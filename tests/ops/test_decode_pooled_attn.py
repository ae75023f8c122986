"""Decode pooled attention (the decode gate's distillation target): the torch reference against a
float64 dense computation and against the decode oracle, and the Triton kernel (interpreter on CPU)
against the reference."""

from __future__ import annotations

import pytest
import torch
from attn_testing import dense_reference, device, growing_keys, make_offsets, make_qkv, rel_rms

from seerattn_hf.decode_selection import candidate_mask, oracle_scores
from seerattn_hf.ops.decode_pooled_attn import naive_decode_pooled_attention, triton_decode_pooled_attention

# (B, T, HQ, HKV, D, block_size, left padding, first_query)
CASES = [
    (1, 1, 4, 1, 16, 16, False, 0),
    (1, 63, 4, 4, 32, 16, False, 0),
    (2, 128, 4, 1, 64, 64, True, 0),
    (2, 200, 6, 2, 32, 32, True, 100),
    (1, 203, 8, 2, 16, 16, False, 101),
    (2, 200, 2, 2, 16, 128, True, 0),
]


def case_id(case):
    B, T, HQ, HKV, D, bs, pad, first = case
    return f"B{B}-T{T}-HQ{HQ}-HKV{HKV}-D{D}-bs{bs}" + ("-pad" if pad else "") + (f"-from{first}" if first else "")


def dense_decode_target(q, k, v, block_size, seq_offsets=None, first_query=0):
    """o and the target [B, HKV, TQ, NB], float64, from the full probability matrix."""
    B, HQ, T, _ = q.shape
    HKV = k.shape[1]
    NB = (T + block_size - 1) // block_size
    keep = torch.ones(B, 1, NB, NB, dtype=torch.bool, device=q.device)
    o, _, p = dense_reference(q, k, v, keep, block_size, seq_offsets=seq_offsets)
    target = torch.zeros(B, HKV, T, NB, dtype=torch.float64, device=q.device)
    for b in range(B):
        off = 0 if seq_offsets is None else int(seq_offsets[b])
        n = T - off
        rows = torch.nn.functional.pad(p[b, :, off:, off:], (0, NB * block_size - n))
        pooled = rows.unflatten(-1, (NB, block_size)).amax(-1).unflatten(0, (HKV, -1)).amax(1)  # [HKV, n, NB]
        own_block = torch.arange(n, device=q.device) // block_size
        target[b, :, off:] = pooled * (torch.arange(NB, device=q.device) < own_block[:, None])
    target = target[:, :, first_query:]
    return o, target / target.sum(-1, keepdim=True).clamp_min(1e-300)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_naive_matches_dense_float64(case):
    B, T, HQ, HKV, D, bs, pad, first = case
    q, k, v = make_qkv(B, HQ, HKV, T, D)
    offsets = make_offsets(B, T) if pad else None
    o, target = naive_decode_pooled_attention(q, k, v, bs, seq_offsets=offsets, first_query=first)
    ref_o, ref_target = dense_decode_target(q, k, v, bs, offsets, first)
    assert o.shape == (B, T, HQ, D) and target.shape == (B, HKV, T - first, (T + bs - 1) // bs)
    assert rel_rms(o, ref_o) < 1e-5
    assert rel_rms(target, ref_target) < 1e-5
    sums = target.sum(-1)
    assert torch.allclose(sums[sums > 0], torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "pad"])
def test_naive_last_token_is_the_decode_oracle(pad):
    """The target of the last token is what the decode oracle scores at that step, normalized over
    the decode selector's candidates: one target for training and selection."""
    B, T, HQ, HKV, D, bs = 3, 150, 6, 2, 16, 16
    q, k, v = make_qkv(B, HQ, HKV, T, D)
    offsets = make_offsets(B, T) if pad else torch.zeros(B, dtype=torch.long)
    _, target = naive_decode_pooled_attention(q, k, v, bs, seq_offsets=offsets if pad else None, first_query=T - 1)
    lens = T - offsets
    NB = (T + bs - 1) // bs
    oracle = oracle_scores(q[:, :, -1], k, offsets, lens, bs, NB, D**-0.5)
    candidates = candidate_mask((lens - 1) // bs, NB)
    oracle = oracle * candidates
    oracle = oracle / oracle.sum(-1, keepdim=True).clamp_min(1e-30)
    assert (target[:, :, 0] > 0).any()
    assert rel_rms(target[:, :, 0], oracle) < 1e-5


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_matches_naive(case, dtype, nan_empty):
    B, T, HQ, HKV, D, bs, pad, first = case
    q, k, v = make_qkv(B, HQ, HKV, T, D, dtype, device())
    offsets = make_offsets(B, T, device()) if pad else None
    o, target = triton_decode_pooled_attention(q, k, v, bs, seq_offsets=offsets, first_query=first)
    ref_o, ref_target = naive_decode_pooled_attention(q, k, v, bs, seq_offsets=offsets, first_query=first)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert o.dtype == dtype and target.dtype == torch.float32 and target.shape == ref_target.shape
    assert rel_rms(o, ref_o) < tol
    assert rel_rms(target, ref_target) < tol


def test_triton_small_steps_and_shared_programs(nan_empty):
    from seerattn_hf.ops.decode_pooled_attn.triton import triton_decode_pooled_attention as launch

    q, k, v = make_qkv(2, 6, 2, 150, 32, torch.float16, device())
    k = growing_keys(k)
    offsets = torch.tensor([0, 29], device=device())
    # two query blocks per tile, two key blocks per step, several scratch chunks, and two programs
    # taking turns over the tiles (the scratch reused)
    o, target = launch(q, k, v, 16, seq_offsets=offsets, first_query=40, block_q=32, block_n=32, chunk=2,
                       num_programs=2)
    ref_o, ref_target = naive_decode_pooled_attention(q, k, v, 16, seq_offsets=offsets, first_query=40)
    assert rel_rms(o, ref_o) < 3e-3 and rel_rms(target, ref_target) < 3e-3


def test_triton_rejects_bad_arguments():
    q, k, v = make_qkv(1, 4, 2, 64, 16, device=device())
    with pytest.raises(ValueError, match="block_size"):
        triton_decode_pooled_attention(q, k, v, 24)
    with pytest.raises(ValueError, match="first_query"):
        triton_decode_pooled_attention(q, k, v, 16, first_query=64)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [(1, 4096, 32, 8, 128, 64, False, 2048), (2, 8192, 32, 8, 128, 64, True, 0),
                                  (1, 4100, 9, 3, 64, 64, False, 2050)], ids=case_id)
def test_triton_bf16_gpu(case, nan_empty):
    B, T, HQ, HKV, D, bs, pad, first = case
    q, k, v = make_qkv(B, HQ, HKV, T, D, torch.bfloat16, "cuda")
    offsets = make_offsets(B, T, "cuda") if pad else None
    o, target = triton_decode_pooled_attention(q, k, v, bs, seq_offsets=offsets, first_query=first)
    ref_o, ref_target = naive_decode_pooled_attention(q, k, v, bs, seq_offsets=offsets, first_query=first)
    assert rel_rms(o, ref_o) < 1e-2 and rel_rms(target, ref_target) < 1e-2
