"""Decode pooled attention (the decode gate's distillation target, "block_max" and "block_mass"): the
torch reference against a float64 dense computation and against the decode oracles, and the Triton
kernel (interpreter on CPU) against the reference."""

from __future__ import annotations

import pytest
import torch
from attn_testing import dense_reference, device, growing_keys, make_offsets, make_qkv, rel_rms

from seerattn_hf.decode_selection import candidate_mask, oracle_mass_scores, oracle_scores
from seerattn_hf.ops.decode_pooled_attn import (DECODE_TARGETS, naive_decode_pooled_attention,
                                                triton_decode_pooled_attention)

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


def dense_decode_target(q, k, v, block_size, seq_offsets=None, first_query=0, kind="block_max"):
    """o and the target [B, HKV, TQ, NB], float64, from the full probability matrix ("block_max":
    max over the block's keys and the GQA group; "block_mass": sum over the keys, mean over the group)."""
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
        tiles = rows.unflatten(-1, (NB, block_size))
        if kind == "block_max":
            pooled = tiles.amax(-1).unflatten(0, (HKV, -1)).amax(1)  # [HKV, n, NB]
        else:
            pooled = tiles.sum(-1).unflatten(0, (HKV, -1)).mean(1)
        own_block = torch.arange(n, device=q.device) // block_size
        target[b, :, off:] = pooled * (torch.arange(NB, device=q.device) < own_block[:, None])
    target = target[:, :, first_query:]
    return o, target / target.sum(-1, keepdim=True).clamp_min(1e-300)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("kind", DECODE_TARGETS)
def test_naive_matches_dense_float64(case, kind):
    B, T, HQ, HKV, D, bs, pad, first = case
    q, k, v = make_qkv(B, HQ, HKV, T, D)
    q = q * 3.0  # peaked rows: a block's mass differs from its share of the maxima
    offsets = make_offsets(B, T) if pad else None
    o, target = naive_decode_pooled_attention(q, k, v, bs, seq_offsets=offsets, first_query=first, target=kind)
    ref_o, ref_target = dense_decode_target(q, k, v, bs, offsets, first, kind)
    assert o.shape == (B, T, HQ, D) and target.shape == (B, HKV, T - first, (T + bs - 1) // bs)
    assert rel_rms(o, ref_o) < 1e-5
    assert rel_rms(target, ref_target) < 1e-5
    sums = target.sum(-1)
    assert torch.equal(sums > 0, ref_target.sum(-1) > 0)
    assert torch.allclose(sums[sums > 0], torch.ones(()), atol=1e-5)
    if kind == "block_mass" and (sums > 0).any() and target.shape[-1] > 2:
        other = naive_decode_pooled_attention(q, k, v, bs, seq_offsets=offsets, first_query=first)[1]
        assert rel_rms(target, other) > 1e-2  # the option changes the target


@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("kind", DECODE_TARGETS)
def test_naive_last_token_is_the_decode_oracle(pad, kind):
    """The target of the last token is what the decode oracle of its kind ("oracle" for block_max,
    "oracle_mass" for block_mass) scores at that step, normalized over the decode selector's
    candidates: one target for training and selection."""
    B, T, HQ, HKV, D, bs = 3, 150, 6, 2, 16, 16
    q, k, v = make_qkv(B, HQ, HKV, T, D)
    offsets = make_offsets(B, T) if pad else torch.zeros(B, dtype=torch.long)
    _, target = naive_decode_pooled_attention(q, k, v, bs, seq_offsets=offsets if pad else None, first_query=T - 1,
                                              target=kind)
    lens = T - offsets
    NB = (T + bs - 1) // bs
    scores = oracle_scores if kind == "block_max" else oracle_mass_scores
    oracle = scores(q[:, :, -1], k, offsets, lens, bs, NB, D**-0.5)
    candidates = candidate_mask((lens - 1) // bs, NB)
    oracle = oracle * candidates
    oracle = oracle / oracle.sum(-1, keepdim=True).clamp_min(1e-30)
    assert (target[:, :, 0] > 0).any()
    assert rel_rms(target[:, :, 0], oracle) < 1e-5


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kind", DECODE_TARGETS)
def test_triton_matches_naive(case, dtype, kind, nan_empty):
    B, T, HQ, HKV, D, bs, pad, first = case
    q, k, v = make_qkv(B, HQ, HKV, T, D, dtype, device())
    offsets = make_offsets(B, T, device()) if pad else None
    o, target = triton_decode_pooled_attention(q, k, v, bs, seq_offsets=offsets, first_query=first, target=kind)
    ref_o, ref_target = naive_decode_pooled_attention(q, k, v, bs, seq_offsets=offsets, first_query=first,
                                                      target=kind)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert o.dtype == dtype and target.dtype == torch.float32 and target.shape == ref_target.shape
    assert rel_rms(o, ref_o) < tol
    assert rel_rms(target, ref_target) < tol


@pytest.mark.parametrize("draw", range(4))
def test_triton_block_mass_on_random_shapes(draw, nan_empty):
    """The MASS variant on shapes drawn from the test's own seed: odd lengths, GQA groups of 1-4,
    left padding of each sequence, a first target query anywhere, peaked or flat rows."""
    generator = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())

    def pick(values):
        return values[int(torch.randint(len(values), (), generator=generator))]

    B, HKV, G, D, bs = pick([1, 2, 3]), pick([1, 2]), pick([1, 2, 3, 4]), pick([16, 32]), pick([16, 32])
    T = 2 * int(torch.randint(20, 90, (), generator=generator)) + 1
    first = int(torch.randint(0, T, (), generator=generator))
    dtype = pick([torch.float32, torch.float16])
    q, k, v = make_qkv(B, HKV * G, HKV, T, D, dtype, device())
    q = (q.float() * pick([1.0, 4.0])).to(dtype)
    offsets = make_offsets(B, T, device()) if pick([False, True]) else None
    o, target = triton_decode_pooled_attention(q, k, v, bs, seq_offsets=offsets, first_query=first,
                                               target="block_mass")
    ref_o, ref_target = naive_decode_pooled_attention(q, k, v, bs, seq_offsets=offsets, first_query=first,
                                                      target="block_mass")
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    shape = (B, T, HKV * G, D, bs, first, dtype, offsets)
    assert rel_rms(o, ref_o) < tol and rel_rms(target, ref_target) < tol, shape


@pytest.mark.parametrize("kind", DECODE_TARGETS)
def test_triton_small_steps_and_shared_programs(kind, nan_empty):
    from seerattn_hf.ops.decode_pooled_attn.triton import triton_decode_pooled_attention as launch

    q, k, v = make_qkv(2, 6, 2, 150, 32, torch.float16, device())
    k = growing_keys(k)
    offsets = torch.tensor([0, 29], device=device())
    # two query blocks per tile, two key blocks per step, several scratch chunks, and two programs
    # taking turns over the tiles (the scratch reused)
    o, target = launch(q, k, v, 16, seq_offsets=offsets, first_query=40, target=kind, block_q=32, block_n=32,
                       chunk=2, num_programs=2)
    ref_o, ref_target = naive_decode_pooled_attention(q, k, v, 16, seq_offsets=offsets, first_query=40, target=kind)
    assert rel_rms(o, ref_o) < 3e-3 and rel_rms(target, ref_target) < 3e-3


def test_triton_rejects_bad_arguments():
    q, k, v = make_qkv(1, 4, 2, 64, 16, device=device())
    with pytest.raises(ValueError, match="block_size"):
        triton_decode_pooled_attention(q, k, v, 24)
    with pytest.raises(ValueError, match="first_query"):
        triton_decode_pooled_attention(q, k, v, 16, first_query=64)
    message = r"decode target: expected one of \['block_max', 'block_mass'\], found 'block_sum'"
    with pytest.raises(ValueError, match=message):
        triton_decode_pooled_attention(q, k, v, 16, target="block_sum")
    with pytest.raises(ValueError, match=message):
        naive_decode_pooled_attention(q, k, v, 16, target="block_sum")


@pytest.mark.gpu
@pytest.mark.parametrize("case", [(1, 4096, 32, 8, 128, 64, False, 2048), (2, 8192, 32, 8, 128, 64, True, 0),
                                  (1, 4100, 9, 3, 64, 64, False, 2050)], ids=case_id)
@pytest.mark.parametrize("kind", DECODE_TARGETS)
def test_triton_bf16_gpu(case, kind, nan_empty):
    B, T, HQ, HKV, D, bs, pad, first = case
    q, k, v = make_qkv(B, HQ, HKV, T, D, torch.bfloat16, "cuda")
    offsets = make_offsets(B, T, "cuda") if pad else None
    o, target = triton_decode_pooled_attention(q, k, v, bs, seq_offsets=offsets, first_query=first, target=kind)
    ref_o, ref_target = naive_decode_pooled_attention(q, k, v, bs, seq_offsets=offsets, first_query=first,
                                                      target=kind)
    assert rel_rms(o, ref_o) < 1e-2 and rel_rms(target, ref_target) < 1e-2
