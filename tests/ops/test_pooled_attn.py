"""Pooled attention (the distillation target): the torch reference against a float64 dense
computation, and the Triton kernels (interpreter on CPU) against the reference."""

from __future__ import annotations

import pytest
import torch
from attn_testing import dense_reference, device, growing_keys, make_offsets, make_qkv, rel_rms

from seerattn_hf.ops.pooled_attn import naive_pooled_attention, triton_pooled_attention

# (B, T, HQ, HKV, D, block_size, left padding)
CASES = [
    (1, 1, 4, 1, 16, 16, False),
    (1, 63, 4, 4, 32, 16, False),
    (2, 128, 4, 1, 64, 64, True),
    (2, 200, 4, 1, 32, 32, True),
    (1, 200, 8, 2, 16, 16, False),
    (2, 200, 2, 2, 16, 128, True),
]


def case_id(case):
    B, T, HQ, HKV, D, bs, pad = case
    return f"B{B}-T{T}-HQ{HQ}-HKV{HKV}-D{D}-bs{bs}" + ("-pad" if pad else "")


def dense_pooled_reference(q, k, v, block_size, seq_offsets=None):
    """o [B, T, HQ, D] and the row-normalized block-max map [B, HQ, NB, NB], float64, from the full P."""
    B, HQ, T, _ = q.shape
    NB = (T + block_size - 1) // block_size
    keep = torch.ones(B, 1, NB, NB, dtype=torch.bool, device=q.device)
    o, _, p = dense_reference(q, k, v, keep, block_size, seq_offsets=seq_offsets)
    pooled = torch.zeros(B, HQ, NB, NB, dtype=torch.float64, device=q.device)
    for b in range(B):
        off = 0 if seq_offsets is None else int(seq_offsets[b])
        n = T - off
        tiles = torch.nn.functional.pad(p[b, :, off:, off:], (0, NB * block_size - n, 0, NB * block_size - n))
        pooled[b] = tiles.unflatten(1, (NB, block_size)).unflatten(-1, (NB, block_size)).amax(dim=(2, 4))
    return o, pooled / pooled.sum(-1, keepdim=True).clamp_min(1e-300)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_naive_matches_dense_float64(case):
    B, T, HQ, HKV, D, bs, pad = case
    q, k, v = make_qkv(B, HQ, HKV, T, D)
    offsets = make_offsets(B, T) if pad else None
    o, pooled = naive_pooled_attention(q, k, v, bs, seq_offsets=offsets)
    ref_o, ref_pooled = dense_pooled_reference(q, k, v, bs, offsets)
    assert o.shape == (B, T, HQ, D) and pooled.shape == ref_pooled.shape
    assert rel_rms(o, ref_o) < 1e-5
    assert rel_rms(pooled, ref_pooled) < 1e-5
    sums = pooled.sum(-1)
    assert torch.allclose(sums[sums > 0], torch.ones(()), atol=1e-5)
    assert (pooled.triu(1) == 0).all()


def dense_mass_reference(q, k, v, block_size, seq_offsets=None):
    """The block-mass map [B, HQ, NB, NB], float64, from the full P by explicit loops over queries:
    entry (i, j) is the mean over the real queries t of block i of sum over keys of block j of P[t, key]."""
    B, HQ, T, _ = q.shape
    NB = (T + block_size - 1) // block_size
    keep = torch.ones(B, 1, NB, NB, dtype=torch.bool, device=q.device)
    p = dense_reference(q, k, v, keep, block_size, seq_offsets=seq_offsets)[2]
    mass = torch.zeros(B, HQ, NB, NB, dtype=torch.float64)
    for b in range(B):
        off = 0 if seq_offsets is None else int(seq_offsets[b])
        for i in range((T - off + block_size - 1) // block_size):
            queries = range(off + i * block_size, min(off + (i + 1) * block_size, T))
            for j in range(i + 1):
                keys = slice(off + j * block_size, min(off + (j + 1) * block_size, T))
                mass[b, :, i, j] = sum(p[b, :, t, keys].sum(-1) for t in queries) / len(queries)
    return mass


@pytest.mark.parametrize("case", CASES + [(3, 77, 6, 2, 16, 16, True)], ids=case_id)
def test_naive_block_mass_matches_dense_float64(case):
    B, T, HQ, HKV, D, bs, pad = case
    q, k, v = make_qkv(B, HQ, HKV, T, D)
    q = q * 3.0  # peaked rows: the mass of a block differs from its share of the maxima
    offsets = make_offsets(B, T) if pad else None
    o, mass = naive_pooled_attention(q, k, v, bs, seq_offsets=offsets, target="block_mass")
    ref = dense_mass_reference(q, k, v, bs, offsets)
    assert mass.shape == ref.shape and mass.dtype == torch.float32
    assert rel_rms(mass, ref) < 1e-5
    assert rel_rms(o, dense_pooled_reference(q, k, v, bs, offsets)[0]) < 1e-5
    # Rows of the brute force sum to 1 by construction (no normalization there); rows outside a
    # sequence are 0, and nothing lies above the diagonal.
    ref_sums = ref.sum(-1)
    assert torch.allclose(ref_sums[ref_sums > 0], torch.ones((), dtype=torch.float64), atol=1e-9)
    assert torch.equal(mass.sum(-1) > 0, ref_sums > 0)
    assert torch.allclose(mass.sum(-1)[ref_sums > 0], torch.ones(()), atol=1e-5)
    assert (mass.triu(1) == 0).all()
    if T > bs:
        assert rel_rms(mass, naive_pooled_attention(q, k, v, bs, seq_offsets=offsets)[1]) > 1e-2


def test_unknown_target_is_refused():
    q, k, v = make_qkv(1, 2, 1, 32, 16)
    with pytest.raises(ValueError, match="block_max.*block_sum"):
        naive_pooled_attention(q, k, v, 16, target="block_sum")


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_matches_naive(case, dtype, nan_empty):
    B, T, HQ, HKV, D, bs, pad = case
    q, k, v = make_qkv(B, HQ, HKV, T, D, dtype, device())
    offsets = make_offsets(B, T, device()) if pad else None
    o, pooled = triton_pooled_attention(q, k, v, bs, seq_offsets=offsets)
    ref_o, ref_pooled = naive_pooled_attention(q, k, v, bs, seq_offsets=offsets)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert o.dtype == dtype and pooled.dtype == torch.float32
    assert rel_rms(o, ref_o) < tol
    assert rel_rms(pooled, ref_pooled) < tol


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]], ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_block_mass_matches_naive(case, dtype, nan_empty):
    B, T, HQ, HKV, D, bs, pad = case
    q, k, v = make_qkv(B, HQ, HKV, T, D, dtype, device())
    k = growing_keys(k)  # the running maximum moves: the block sums must be rescaled right
    offsets = make_offsets(B, T, device()) if pad else None
    o, mass = triton_pooled_attention(q, k, v, bs, seq_offsets=offsets, target="block_mass")
    ref_o, ref_mass = naive_pooled_attention(q, k, v, bs, seq_offsets=offsets, target="block_mass")
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert rel_rms(o, ref_o) < tol and rel_rms(mass, ref_mass) < tol


def test_triton_block_mass_with_several_key_blocks_per_step(nan_empty):
    from seerattn_hf.ops.pooled_attn.triton import pooled_attn_fwd

    q, k, v = make_qkv(2, 4, 1, 150, 32, torch.float16, device())
    offsets = torch.tensor([0, 29], device=device())
    o, mass = pooled_attn_fwd(q, k, v, 16, seq_offsets=offsets, target="block_mass", block_q=32, heads_per_tile=2,
                              block_n=32, chunk=4, num_programs=2)
    ref_o, ref_mass = naive_pooled_attention(q, k, v, 16, seq_offsets=offsets, target="block_mass")
    assert rel_rms(o, ref_o) < 3e-3 and rel_rms(mass, ref_mass) < 3e-3


def test_triton_packed_heads_and_small_steps(nan_empty):
    from seerattn_hf.ops.pooled_attn.triton import pooled_attn_fwd

    q, k, v = make_qkv(2, 4, 1, 150, 32, torch.float16, device())
    offsets = torch.tensor([0, 29], device=device())
    # two heads per tile, two query blocks per head, two key blocks per step, several scratch chunks,
    # and two programs taking turns over the tiles (the scratch reused)
    o, pooled = pooled_attn_fwd(q, k, v, 16, seq_offsets=offsets, block_q=32, heads_per_tile=2, block_n=32,
                                chunk=4, num_programs=2)
    ref_o, ref_pooled = naive_pooled_attention(q, k, v, 16, seq_offsets=offsets)
    assert rel_rms(o, ref_o) < 3e-3 and rel_rms(pooled, ref_pooled) < 3e-3


def test_triton_scores_growing_along_the_row(nan_empty):
    q, k, v = make_qkv(2, 4, 2, 170, 32, torch.float16, device())
    k = growing_keys(k)
    offsets = torch.tensor([0, 23], device=device())
    o, pooled = triton_pooled_attention(q, k, v, 16, seq_offsets=offsets)
    ref_o, ref_pooled = naive_pooled_attention(q, k, v, 16, seq_offsets=offsets)
    assert rel_rms(o, ref_o) < 3e-3 and rel_rms(pooled, ref_pooled) < 3e-3


def test_triton_custom_scale(nan_empty):
    q, k, v = make_qkv(1, 4, 2, 90, 32, device=device())
    o, pooled = triton_pooled_attention(q, k, v, 32, scale=0.5)
    ref_o, ref_pooled = naive_pooled_attention(q, k, v, 32, scale=0.5)
    assert rel_rms(o, ref_o) < 1e-5 and rel_rms(pooled, ref_pooled) < 1e-5


def test_triton_rejects_bad_arguments():
    q, k, v = make_qkv(1, 4, 2, 64, 16, device=device())
    with pytest.raises(ValueError, match="block_size"):
        triton_pooled_attention(q, k, v, 24)
    with pytest.raises(ValueError, match="HQ"):
        triton_pooled_attention(q[:, :3], k, v, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [(1, 4096, 32, 8, 128, 64, False), (2, 8192, 32, 8, 128, 64, True)],
                         ids=case_id)
def test_triton_bf16_gpu(case, nan_empty):
    B, T, HQ, HKV, D, bs, pad = case
    q, k, v = make_qkv(B, HQ, HKV, T, D, torch.bfloat16, "cuda")
    offsets = make_offsets(B, T, "cuda") if pad else None
    o, pooled = triton_pooled_attention(q, k, v, bs, seq_offsets=offsets)
    ref_o, ref_pooled = naive_pooled_attention(q, k, v, bs, seq_offsets=offsets)
    assert rel_rms(o, ref_o) < 1e-2 and rel_rms(pooled, ref_pooled) < 1e-2
