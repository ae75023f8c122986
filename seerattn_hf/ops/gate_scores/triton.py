"""Fused gate scoring: block RoPE of the gate's queries and keys, their scores, the causal mask and the
softmax over key blocks in one kernel (the torch path takes about thirty launches for the same).

Each program owns BLOCK_M query-block rows of one query head. It rotates its rows once, then walks the
key blocks up to its last diagonal twice: a first pass for the row maxima and sums (online softmax),
a second that writes the normalized scores; key tiles wholly above every diagonal of the tile are
written as -inf (0) without being read. Products are exact float32 ("ieee"): the selection ranks
these scores, and TF32 would reorder near ties against the torch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .naive import NORMALIZATIONS


@triton.jit
def _rotated(x_ptr, rows, row_mask, stride_row, positions, inv_freq, rope_scaling, HALF: tl.constexpr):
    """The two halves of rows `rows` of an `[N, 2 * HALF]` matrix, rotated to `positions` (rotate-half)."""
    c = tl.arange(0, HALF)
    first = tl.load(x_ptr + rows[:, None] * stride_row + c[None, :], mask=row_mask[:, None], other=0.0)
    second = tl.load(x_ptr + rows[:, None] * stride_row + HALF + c[None, :], mask=row_mask[:, None], other=0.0)
    angles = positions.to(tl.float32)[:, None] * tl.load(inv_freq + c)[None, :]
    cos = tl.cos(angles) * rope_scaling
    sin = tl.sin(angles) * rope_scaling
    return first * cos - second * sin, second * cos + first * sin


@triton.jit
def gate_scores_fwd_kernel(
    q, k, diagonal, inv_freq, out,
    stride_qb, stride_qh, stride_qr,
    stride_kb, stride_kh, stride_kn,
    stride_db,
    stride_ob, stride_oh, stride_or,
    R, NB, block_size, rope_scaling, score_scale,
    G: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NORMALIZE: tl.constexpr,
):
    """q: [B, HQ, R, h]; k: [B, HK, NB, h]; diagonal: [B or 1, R] int (stride_db 0 when shared);
    out: [B, HQ, R, NB] float32. NORMALIZE: 0 none, 1 softmax, 2 log_softmax. Grid (cdiv(R, BLOCK_M), HQ, B)."""
    i_m = tl.program_id(0)
    i_h = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    rows = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < R
    diag = tl.load(diagonal + i_b * stride_db + rows, mask=row_mask, other=-1)
    q1, q2 = _rotated(q + i_b * stride_qb + i_h * stride_qh, rows, row_mask, stride_qr, diag * block_size,
                      inv_freq, rope_scaling, HALF)
    k_base = k + i_b * stride_kb + (i_h // G) * stride_kh
    out_rows = out + i_b * stride_ob + i_h * stride_oh + rows[:, None] * stride_or
    n_end = tl.max(diag, axis=0) + 1  # key blocks past every diagonal of the tile are all -inf

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if NORMALIZE != 0:
        for n0 in range(0, n_end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            k1, k2 = _rotated(k_base, cols, cols < NB, stride_kn, cols * block_size, inv_freq, rope_scaling, HALF)
            s = (tl.dot(q1, tl.trans(k1), input_precision="ieee")
                 + tl.dot(q2, tl.trans(k2), input_precision="ieee")) * score_scale
            s = tl.where(cols[None, :] <= diag[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_use) + tl.sum(tl.exp(s - m_use[:, None]), axis=1)
            m_i = m_new
    m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
    log_l = tl.log(tl.where(l_i == 0.0, 1.0, l_i))

    for n0 in range(0, NB, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        if n0 < n_end:
            k1, k2 = _rotated(k_base, cols, cols < NB, stride_kn, cols * block_size, inv_freq, rope_scaling, HALF)
            s = (tl.dot(q1, tl.trans(k1), input_precision="ieee")
                 + tl.dot(q2, tl.trans(k2), input_precision="ieee")) * score_scale
            s = tl.where(cols[None, :] <= diag[:, None], s, float("-inf"))
        else:
            s = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)
        if NORMALIZE == 1:
            s = tl.exp(s - m_use[:, None]) / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        elif NORMALIZE == 2:
            s = s - m_use[:, None] - log_l[:, None]
        tl.store(out_rows + cols[None, :], s, mask=row_mask[:, None] & (cols < NB)[None, :])


def triton_gate_scores(gate_q, gate_k, diagonal, inv_freq, block_size, rope_scaling=1.0, normalize="none"):
    """Fused `naive_gate_scores` (see there for the arguments); float32 inputs, `[B, HQ, R, NB]` float32."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize: expected one of {list(NORMALIZATIONS)}, found {normalize!r}")
    if gate_q.dim() != 4 or gate_k.dim() != 4 or gate_q.dtype != torch.float32 or gate_k.dtype != torch.float32:
        raise ValueError(f"expected float32 gate_q [B, HQ, R, h] and gate_k [B, HK, NB, h]; found "
                         f"{gate_q.dtype} {tuple(gate_q.shape)} and {gate_k.dtype} {tuple(gate_k.shape)}")
    batch, heads, rows, hidden = gate_q.shape
    key_heads, blocks = gate_k.shape[1], gate_k.shape[2]
    if (gate_k.shape[0] != batch or gate_k.shape[3] != hidden or heads % key_heads or hidden & (hidden - 1)
            or hidden < 32):
        raise ValueError(f"expected gate_k [B={batch}, HK dividing {heads}, NB, h={hidden}] with h a power of "
                         f"two >= 32; found {tuple(gate_k.shape)}")
    if diagonal.dim() != 2 or diagonal.shape[1] != rows or diagonal.shape[0] not in (1, batch):
        raise ValueError(f"expected diagonal [B or 1, R={rows}]; found {tuple(diagonal.shape)}")
    gate_q = gate_q if gate_q.stride(-1) == 1 else gate_q.contiguous()
    gate_k = gate_k if gate_k.stride(-1) == 1 else gate_k.contiguous()
    diagonal = diagonal.to(device=gate_q.device, dtype=torch.int32).contiguous()
    inv_freq = inv_freq.to(device=gate_q.device, dtype=torch.float32).contiguous()
    out = torch.empty(batch, heads, rows, blocks, dtype=torch.float32, device=gate_q.device)
    block_m = 16 if rows <= 16 else 32
    block_n = 32 if hidden > 64 else 64
    grid = (triton.cdiv(rows, block_m), heads, batch)
    gate_scores_fwd_kernel[grid](
        gate_q, gate_k, diagonal, inv_freq, out,
        gate_q.stride(0), gate_q.stride(1), gate_q.stride(2),
        gate_k.stride(0), gate_k.stride(1), gate_k.stride(2),
        diagonal.stride(0) if diagonal.shape[0] == batch and batch > 1 else 0,
        out.stride(0), out.stride(1), out.stride(2),
        rows, blocks, block_size, float(rope_scaling), hidden ** -0.5,
        G=heads // key_heads, HALF=hidden // 2, BLOCK_M=block_m, BLOCK_N=block_n,
        NORMALIZE=NORMALIZATIONS.index(normalize),
        num_warps=4,
    )
    return out
