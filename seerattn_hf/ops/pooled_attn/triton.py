"""Triton dense causal attention plus its block-max-pooled probability map, in two passes.

Pass 1 is the block-sparse kernel in dense mode: o and the row log-sum-exp. Pass 2 recomputes the
scores one (query block, key block) tile at a time and writes max over the tile of exp(s - lse_row),
one float per (b, h, i, j); a torch division then normalizes each row. Extra memory: the lse
([B, HQ, T]) and the map itself ([B, HQ, NB, NB]); nothing of size T x NB.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..block_sparse_attn.triton import (
    LOG2E,
    _descriptor_scratch,
    _interpreting,
    block_sparse_attn_fwd,
    check_attention_inputs,
    descriptor_ready,
)


@triton.jit
def pooled_max_fwd_kernel(
    q, k, lse, pooled, seq_offsets,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    T, NB, qk_scale,
    HQ: tl.constexpr, G: tl.constexpr, GM: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    HAS_OFFSETS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """q: [B, HQ, T, D]; k: [B, HKV, T, D]; lse: [B, HQ, T] float32 (natural log);
    pooled: [B, HQ, NB, NB] float32, entries j <= i written with max exp(s - lse) over the tile.
    Grid: (NB * G // GM, HKV, B), the heaviest (last) query blocks first."""
    BLOCK_M: tl.constexpr = GM * BS
    pid = tl.program_id(0)
    i_kvh = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)  # batch offsets can pass 2**31 elements
    n_htiles: tl.constexpr = G // GM
    i_q = NB - 1 - pid // n_htiles
    h0 = i_kvh * G + (pid % n_htiles) * GM

    off = 0
    if HAS_OFFSETS:
        off = tl.load(seq_offsets + i_b).to(tl.int32)
    if i_q >= tl.cdiv(T - off, BS):
        return  # block wholly outside the sequence: its row stays 0

    r = tl.arange(0, BLOCK_M)
    r_head = h0 + r // BS
    d = tl.arange(0, D)
    t_q = off + i_q * BS + r % BS
    row_ok = t_q < T
    q_tile = tl.load(q + i_b * stride_qb + r_head[:, None] * stride_qh + t_q[:, None] * stride_qt
                     + d[None, :], mask=row_ok[:, None], other=0.0)
    # scores in log2 units minus the row's log2-sum-exp: exp2 of it is the probability
    row_lse = tl.load(lse + (i_b * HQ + r_head) * T + t_q, mask=row_ok, other=float("inf")) * 1.4426950408889634
    k_desc = tl.make_tensor_descriptor(k + i_b * stride_kb + i_kvh * stride_kh, shape=[T, D],
                                       strides=[stride_kt, 1], block_shape=[BS, D])
    out = pooled + ((i_b * HQ + h0 + tl.arange(0, GM)) * NB + i_q) * NB

    for j in range(0, i_q):
        k_tile = k_desc.load([off + j * BS, 0])
        s = tl.dot(q_tile, tl.trans(k_tile), input_precision=INPUT_PRECISION)
        row_max = tl.max(s, 1) * qk_scale - row_lse  # the scale is positive: max first
        tl.store(out + j, tl.exp2(tl.max(tl.reshape(row_max, [GM, BS]), 1)))

    t_k = off + i_q * BS + tl.arange(0, BS)
    k_tile = k_desc.load([off + i_q * BS, 0])  # rows past T read as zeros
    s = tl.dot(q_tile, tl.trans(k_tile), input_precision=INPUT_PRECISION) * qk_scale
    s = tl.where((t_k[None, :] <= t_q[:, None]) & row_ok[:, None], s, float("-inf"))
    row_max = tl.max(s, 1) - row_lse
    tl.store(out + i_q, tl.exp2(tl.max(tl.reshape(row_max, [GM, BS]), 1)))


def pooled_attn_fwd(q, k, v, block_size, scale=None, seq_offsets=None, attn_config=None,
                    heads_per_tile=None, num_warps=None, num_stages=None):
    """Launcher. Shapes as in `triton_pooled_attention`. attn_config: keyword overrides for the
    dense attention pass (block_q, heads_per_tile, block_n, num_warps, num_stages);
    the other arguments override the pooled-map pass's heuristic (benchmarks)."""
    B, HQ, HKV, T, D = check_attention_inputs(q, k, v, block_size)
    G = HQ // HKV
    if seq_offsets is not None and tuple(seq_offsets.shape) != (B,):
        raise ValueError(f"expected seq_offsets [B={B}]; found {tuple(seq_offsets.shape)}")
    scale = D**-0.5 if scale is None else scale
    o, lse = block_sparse_attn_fwd(q, k, v, None, None, block_size, scale=scale,
                                   seq_offsets=seq_offsets, return_lse=True, dense=True,
                                   **(attn_config or {}))
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = descriptor_ready(k)
    NB = triton.cdiv(T, block_size)
    gm = 1  # query heads per tile: up to 256 rows measured best on an H200
    while gm * 2 <= G and G % (gm * 2) == 0 and gm * 2 * block_size <= 256:
        gm *= 2
    gm = heads_per_tile or gm
    if G % gm:
        raise ValueError(f"heads_per_tile must divide G={G}; found {gm}")
    nw = num_warps or (1 if _interpreting() else (8 if gm * block_size >= 128 else 4))
    ns = num_stages or (1 if _interpreting() else 3)
    pooled = torch.zeros(B, HQ, NB, NB, dtype=torch.float32, device=q.device)
    triton.set_allocator(_descriptor_scratch)
    pooled_max_fwd_kernel[(NB * (G // gm), HKV, B)](
        q, k, lse, pooled, seq_offsets if seq_offsets is not None else lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        T, NB, scale * LOG2E,
        HQ=HQ, G=G, GM=gm, D=D, BS=block_size, HAS_OFFSETS=seq_offsets is not None,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=nw, num_stages=ns,
    )
    pooled /= pooled.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return o, pooled


def triton_pooled_attention(q, k, v, block_size, scale=None, seq_offsets=None):
    """Dense causal attention and its row-normalized block-max-pooled probability map.

    Args:
        q: [B, HQ, T, D]; k, v: [B, HKV, T, D] (GQA read in place); block_size: power of two in
            [16, 128]; NB = ceil(T / block_size). scale: default D ** -0.5.
        seq_offsets: [B] int or None: left padding, blocks counted from each sequence's start.

    Returns:
        o: [B, T, HQ, D] in q.dtype; pooled: [B, HQ, NB, NB] float32, pooled[b, h, i, j] = max of
        the attention probabilities over query block i x key block j (0 above the diagonal), rows
        normalized to sum 1 (rows outside the sequence 0).
    """
    return pooled_attn_fwd(q, k, v, block_size, scale=scale, seq_offsets=seq_offsets)
