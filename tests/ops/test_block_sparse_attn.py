"""Block-sparse attention: the torch reference against a float64 dense masked computation, and the
Triton kernel (interpreter on CPU) and FlexAttention backend against the reference."""

from __future__ import annotations

import pytest
import torch
from attn_testing import (
    dense_reference,
    device,
    growing_keys,
    lists_to_dense,
    make_block_lists,
    make_offsets,
    make_qkv,
    rel_rms,
)

from seerattn_hf.ops.block_sparse_attn import (
    flex_block_sparse_attention,
    naive_block_sparse_attention,
    triton_block_sparse_attention,
)

# (B, T, HQ, HKV, D, block_size, masks shared per KV head, mask kind, density, left padding)
CASES = [
    (1, 1, 4, 1, 16, 16, False, "random", 0.5, False),
    (1, 63, 4, 4, 32, 16, False, "random", 0.3, False),
    (2, 128, 4, 1, 64, 64, True, "random", 0.5, True),
    (2, 200, 4, 1, 32, 32, False, "holes", 0.4, True),
    (2, 200, 8, 2, 16, 32, True, "full", 1.0, False),
    (1, 200, 4, 1, 32, 16, True, "diag", 0.0, True),
    (2, 200, 2, 2, 32, 16, False, "holes", 0.3, False),
    (1, 200, 4, 2, 16, 128, True, "holes", 0.5, True),
    (2, 77, 4, 2, 128, 16, True, "holes", 0.5, True),  # head_dim 128 (the output store's widest rows)
]


def case_id(case):
    B, T, HQ, HKV, D, bs, shared, kind, density, pad = case
    return (f"B{B}-T{T}-HQ{HQ}-HKV{HKV}-D{D}-bs{bs}-{'HMkv' if shared else 'HMq'}-{kind}{density}"
            + ("-pad" if pad else ""))


def make_case(case, dtype=torch.float32, dev="cpu"):
    B, T, HQ, HKV, D, bs, shared, kind, density, pad = case
    q, k, v = make_qkv(B, HQ, HKV, T, D, dtype, dev)
    offsets = make_offsets(B, T, dev) if pad else None
    idx, count = make_block_lists(B, HKV if shared else HQ, T, bs, density, kind, device=dev)
    return q, k, v, idx, count, bs, offsets


def assert_matches_reference(o, lse, ref_o, ref_lse, dtype):
    """A Triton result against the torch reference's, within the relative RMS error its dtype allows."""
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert o.dtype == dtype and o.shape == ref_o.shape
    assert rel_rms(o, ref_o) < tol
    assert rel_rms(lse, ref_lse) < tol


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_naive_matches_dense_float64(case):
    q, k, v, idx, count, bs, offsets = make_case(case)
    o, lse = naive_block_sparse_attention(q, k, v, idx, count, bs, seq_offsets=offsets, return_lse=True)
    ref_o, ref_lse, _ = dense_reference(q, k, v, lists_to_dense(idx, count), bs, seq_offsets=offsets)
    assert o.shape == (q.shape[0], q.shape[2], q.shape[1], q.shape[3]) and o.dtype == q.dtype
    assert rel_rms(o, ref_o) < 1e-5
    assert rel_rms(lse, ref_lse) < 1e-5


def test_naive_scale_and_padding_rows():
    q, k, v = make_qkv(2, 2, 1, 70, 16)
    idx, count = make_block_lists(2, 2, 70, 16, 0.5)
    offsets = torch.tensor([3, 41])
    o, lse = naive_block_sparse_attention(q, k, v, idx, count, 16, scale=0.3, seq_offsets=offsets,
                                          return_lse=True)
    ref_o, ref_lse, _ = dense_reference(q, k, v, lists_to_dense(idx, count), 16, 0.3, offsets)
    assert rel_rms(o, ref_o) < 1e-5 and rel_rms(lse, ref_lse) < 1e-5
    assert (o[1, :41] == 0).all() and (lse[1, :, :41] == float("-inf")).all()


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_matches_naive(case, dtype, nan_empty):
    q, k, v, idx, count, bs, offsets = make_case(case, dtype, device())
    o, lse = triton_block_sparse_attention(q, k, v, idx, count, bs, seq_offsets=offsets, return_lse=True)
    ref_o, ref_lse = naive_block_sparse_attention(q, k, v, idx, count, bs, seq_offsets=offsets,
                                                  return_lse=True)
    assert_matches_reference(o, lse, ref_o, ref_lse, dtype)


@pytest.mark.parametrize("case", [CASES[3], CASES[5], CASES[7]], ids=case_id)
def test_triton_steps_smaller_than_a_block(case, nan_empty):
    from seerattn_hf.ops.block_sparse_attn.triton import block_sparse_attn_fwd

    q, k, v, idx, count, bs, offsets = make_case(case, torch.float16, device())
    o, lse = block_sparse_attn_fwd(q, k, v, idx, count, bs, seq_offsets=offsets, return_lse=True,
                                   block_n=16)
    ref_o, ref_lse = naive_block_sparse_attention(q, k, v, idx, count, bs, seq_offsets=offsets,
                                                  return_lse=True)
    assert rel_rms(o, ref_o) < 3e-3 and rel_rms(lse, ref_lse) < 3e-3


# (B, T, HQ, HKV, D, block_q, heads_per_tile, block_n, left padding) of the dense mode; None leaves
# the choice to the launcher (128-row query tiles, one step per tile in the interpreter)
DENSE_CASES = [
    (1, 200, 4, 1, 64, None, None, None, False),
    (2, 77, 4, 2, 32, None, None, None, True),
    (2, 200, 4, 1, 16, 64, 2, 32, True),  # two query heads per tile, two steps per tile
    (2, 150, 2, 2, 32, 32, None, 16, True),
]


def dense_case_id(case):
    B, T, HQ, HKV, D, block_q, heads_per_tile, block_n, pad = case
    overrides = (("q", block_q), ("GM", heads_per_tile), ("n", block_n))
    return (f"B{B}-T{T}-HQ{HQ}-HKV{HKV}-D{D}" + "".join(f"-{name}{value}" for name, value in overrides if value)
            + ("-pad" if pad else ""))


@pytest.mark.parametrize("case", DENSE_CASES, ids=dense_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_dense_mode_matches_every_block_kept(case, dtype, nan_empty):
    """dense=True (the benchmark's dense pass) ignores the block lists and must give the reference's
    result with every causal block kept."""
    from seerattn_hf.ops.block_sparse_attn.triton import block_sparse_attn_fwd

    B, T, HQ, HKV, D, block_q, heads_per_tile, block_n, pad = case
    block_size = 32  # only checked in the dense mode; the reference's lists use it
    q, k, v = make_qkv(B, HQ, HKV, T, D, dtype, device())
    offsets = make_offsets(B, T, device()) if pad else None
    o, lse = block_sparse_attn_fwd(q, k, v, None, None, block_size, seq_offsets=offsets, return_lse=True,
                                   dense=True, block_q=block_q, heads_per_tile=heads_per_tile, block_n=block_n)
    idx, count = make_block_lists(B, HKV, T, block_size, 1.0, "full", device=device())
    ref_o, ref_lse = naive_block_sparse_attention(q, k, v, idx, count, block_size, seq_offsets=offsets,
                                                  return_lse=True)
    assert_matches_reference(o, lse, ref_o, ref_lse, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_scores_growing_along_the_row(dtype, nan_empty):
    q, k, v = make_qkv(2, 4, 2, 190, 32, dtype, device())
    k = growing_keys(k)
    idx, count = make_block_lists(2, 2, 190, 16, 0.6, device=device())
    offsets = torch.tensor([0, 37], device=device())
    o, lse = triton_block_sparse_attention(q, k, v, idx, count, 16, seq_offsets=offsets, return_lse=True)
    ref_o, ref_lse = naive_block_sparse_attention(q, k, v, idx, count, 16, seq_offsets=offsets, return_lse=True)
    assert_matches_reference(o, lse, ref_o, ref_lse, dtype)


def test_triton_without_lse_and_custom_scale(nan_empty):
    q, k, v = make_qkv(1, 4, 2, 100, 32, device=device())
    idx, count = make_block_lists(1, 2, 100, 32, 0.5, device=device())
    o = triton_block_sparse_attention(q, k, v, idx, count, 32, scale=0.05)
    assert rel_rms(o, naive_block_sparse_attention(q, k, v, idx, count, 32, scale=0.05)) < 1e-5


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("case", [CASES[3], CASES[4], CASES[7]], ids=case_id)
def test_flex_matches_naive(case):
    q, k, v, idx, count, bs, offsets = make_case(case, dev=device())
    o, lse = flex_block_sparse_attention(q, k, v, idx, count, bs, seq_offsets=offsets, return_lse=True)
    ref_o, ref_lse = naive_block_sparse_attention(q, k, v, idx, count, bs, seq_offsets=offsets,
                                                  return_lse=True)
    tol = 1e-5 if o.device.type == "cpu" else 2e-3
    assert rel_rms(o, ref_o) < tol and rel_rms(lse, ref_lse) < tol


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, **{n: a[n][..., :12] for n in "qkv"}}, "head_dim"),
        (lambda a: {**a, "block_size": 48}, "block_size"),
        (lambda a: {**a, "block_idx": a["block_idx"][:, :, :-1]}, "block_idx"),
        (lambda a: {**a, "block_count": a["block_count"][:, :1]}, "block_count"),
        (lambda a: {**a, "k": a["k"][:, :, :-1]}, "k and v"),
        (lambda a: {**a, "v": a["v"].double()}, "dtype"),
    ],
    ids=["head_dim", "block_size", "block_idx", "block_count", "kv_shape", "dtype"],
)
def test_triton_rejects_bad_arguments(change, message):
    q, k, v = make_qkv(1, 4, 2, 64, 16, device=device())
    idx, count = make_block_lists(1, 4, 64, 16, 0.5, device=device())
    args = dict(q=q, k=k, v=v, block_idx=idx, block_count=count, block_size=16)
    with pytest.raises(ValueError, match=message):
        triton_block_sparse_attention(**change(args))


GPU_CASES = [(1, 4096, 32, 8, 128, 64, False, "random", 0.3, False),
             (1, 16384, 32, 8, 128, 64, True, "random", 0.1, False),
             (2, 4096, 32, 8, 128, 64, False, "holes", 0.5, True),
             (1, 8192, 32, 8, 128, 128, True, "full", 1.0, False)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_triton_bf16_gpu(case, nan_empty):
    q, k, v, idx, count, bs, offsets = make_case(case, torch.bfloat16, "cuda")
    o, lse = triton_block_sparse_attention(q, k, v, idx, count, bs, seq_offsets=offsets, return_lse=True)
    ref_o, ref_lse = naive_block_sparse_attention(q, k, v, idx, count, bs, seq_offsets=offsets,
                                                  return_lse=True)
    assert rel_rms(o, ref_o) < 1e-2 and rel_rms(lse, ref_lse) < 1e-3


@pytest.mark.gpu
def test_flex_bf16_gpu():
    q, k, v, idx, count, bs, offsets = make_case(GPU_CASES[2], torch.bfloat16, "cuda")
    o = flex_block_sparse_attention(q, k, v, idx, count, bs, seq_offsets=offsets)
    assert rel_rms(o, naive_block_sparse_attention(q, k, v, idx, count, bs, seq_offsets=offsets)) < 1e-2


# Query chunks continued from a cache: (case index, chunk length). Chunks start inside blocks,
# on a block boundary, hold a single row, or start inside a sequence's left padding.
CHUNK_CASES = [(1, 29), (2, 64), (3, 77), (3, 1), (4, 131), (7, 90), (8, 40)]


def chunk_rows(idx, count, query_length, key_length, block_size, offsets):
    """The rows of whole-prompt lists that a chunk of the last `query_length` positions reads."""
    from seerattn_hf.blocks import query_block_diagonals

    diagonal, _ = query_block_diagonals(query_length, key_length, block_size, offsets, idx.shape[0], idx.device)
    rows = diagonal.clamp(max=idx.shape[2] - 1)
    chunk_idx = idx.gather(2, rows[:, None, :, None].expand(-1, idx.shape[1], -1, idx.shape[3]))
    chunk_count = count.gather(2, rows[:, None, :].expand(-1, count.shape[1], -1))
    return chunk_idx.contiguous(), chunk_count.contiguous()


def chunk_case(case_index, chunk, dtype=torch.float32, dev="cpu"):
    q, k, v, idx, count, bs, offsets = make_case(CASES[case_index], dtype, dev)
    T = q.shape[2]
    chunk_idx, chunk_count = chunk_rows(idx, count, chunk, T, bs, offsets)
    return q, k, v, idx, count, bs, offsets, q[:, :, T - chunk:], chunk_idx, chunk_count


@pytest.mark.parametrize("case_index, chunk", CHUNK_CASES, ids=[f"case{c}-chunk{n}" for c, n in CHUNK_CASES])
def test_naive_chunk_equals_the_rows_of_the_whole_prompt(case_index, chunk):
    q, k, v, idx, count, bs, offsets, q_chunk, chunk_idx, chunk_count = chunk_case(case_index, chunk)
    whole_o, whole_lse = naive_block_sparse_attention(q, k, v, idx, count, bs, seq_offsets=offsets,
                                                      return_lse=True)
    o, lse = naive_block_sparse_attention(q_chunk, k, v, chunk_idx, chunk_count, bs, seq_offsets=offsets,
                                          return_lse=True)
    T = q.shape[2]
    assert o.shape == (q.shape[0], chunk, q.shape[1], q.shape[3])
    assert rel_rms(o, whole_o[:, T - chunk:]) < 1e-6 and rel_rms(lse, whole_lse[..., T - chunk:]) < 1e-6


@pytest.mark.parametrize("case_index, chunk", CHUNK_CASES, ids=[f"case{c}-chunk{n}" for c, n in CHUNK_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_chunk_matches_naive(case_index, chunk, dtype, nan_empty):
    _, k, v, _, _, bs, offsets, q_chunk, chunk_idx, chunk_count = chunk_case(case_index, chunk, dtype, device())
    o, lse = triton_block_sparse_attention(q_chunk, k, v, chunk_idx, chunk_count, bs, seq_offsets=offsets,
                                           return_lse=True)
    ref_o, ref_lse = naive_block_sparse_attention(q_chunk, k, v, chunk_idx, chunk_count, bs,
                                                  seq_offsets=offsets, return_lse=True)
    assert_matches_reference(o, lse, ref_o, ref_lse, dtype)


def test_chunk_lists_of_the_wrong_row_count_are_refused():
    q, k, v = make_qkv(1, 4, 2, 100, 16, device=device())
    idx, count = make_block_lists(1, 4, 100, 16, 0.5, device=device())  # 7 rows; the chunk needs 2
    for attention in (naive_block_sparse_attention, triton_block_sparse_attention):
        with pytest.raises(ValueError, match="block_idx"):
            attention(q[:, :, -20:], k, v, idx, count, 16)


@pytest.mark.gpu
def test_triton_chunk_bf16_gpu(nan_empty):
    q, k, v, idx, count, bs, offsets = make_case(GPU_CASES[0], torch.bfloat16, "cuda")
    chunk = 4096 - 1000  # starts inside a block
    chunk_idx, chunk_count = chunk_rows(idx, count, chunk, q.shape[2], bs, offsets)
    args = (q[:, :, -chunk:], k, v, chunk_idx, chunk_count, bs)
    o = triton_block_sparse_attention(*args)
    assert rel_rms(o, naive_block_sparse_attention(*args)) < 1e-2
