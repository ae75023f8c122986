"""The fused gate, two kernels per side of the scores:

`gate_projection_fwd_kernel` pools BLOCK_R block rows of one head (each token read once, every
pooling kind computed from it) and maps them with the head's weights (one tl.dot per kind, the weights read once per
tile of rows).

`gate_scores_fwd_kernel`: block RoPE of the gate's queries and keys, their scores, the causal mask and
the softmax over key blocks in one kernel (the torch path takes about thirty launches for the same).

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


@triton.jit
def _pooled(tile, inside, count, KIND: tl.constexpr):
    """`[D]` float32: the rows of `tile: [BS, D]` marked `inside` pooled by KIND (0 avg, 1 max, 2 min)."""
    if KIND == 0:
        value = tl.sum(tile, axis=0) / tl.maximum(count, 1).to(tl.float32)
    elif KIND == 1:
        value = tl.max(tl.where(inside[:, None], tile, float("-inf")), axis=0)
    else:
        value = tl.min(tl.where(inside[:, None], tile, float("inf")), axis=0)
    return tl.where(count > 0, value, 0.0)


@triton.jit
def _pool_rows(x_row0, stride_xt, t0_of_row, t1_of_row, KIND0: tl.constexpr, KIND1: tl.constexpr,
               KIND2: tl.constexpr, BLOCK_R: tl.constexpr, BS: tl.constexpr, D: tl.constexpr):
    """Three `[BLOCK_R, D]` float32 tiles: each row's tokens [t0, t1) pooled by each kind (a kind of
    -1: zeros), every token read once; empty rows 0."""
    pooled0 = tl.zeros([BLOCK_R, D], tl.float32)
    pooled1 = tl.zeros([BLOCK_R, D], tl.float32)
    pooled2 = tl.zeros([BLOCK_R, D], tl.float32)
    t = tl.arange(0, BS)
    d = tl.arange(0, D)
    r_ids = tl.arange(0, BLOCK_R)
    for r in tl.static_range(BLOCK_R):
        t0 = tl.sum(tl.where(r_ids == r, t0_of_row, 0), axis=0)
        t1 = tl.sum(tl.where(r_ids == r, t1_of_row, 0), axis=0)
        inside = (t0 + t) < t1
        tile = tl.load(x_row0 + (t0 + t)[:, None] * stride_xt + d[None, :], mask=inside[:, None], other=0.0)
        tile = tile.to(tl.float32)
        this_row = (r_ids == r)[:, None]
        pooled0 = tl.where(this_row, _pooled(tile, inside, t1 - t0, KIND0)[None, :], pooled0)
        if KIND1 >= 0:
            pooled1 = tl.where(this_row, _pooled(tile, inside, t1 - t0, KIND1)[None, :], pooled1)
        if KIND2 >= 0:
            pooled2 = tl.where(this_row, _pooled(tile, inside, t1 - t0, KIND2)[None, :], pooled2)
    return pooled0, pooled1, pooled2


@triton.jit
def gate_projection_fwd_kernel(
    x, weight, seq_offsets, out,
    stride_xb, stride_xt, stride_xh,
    stride_wh, stride_wi,
    stride_ob, stride_oh, stride_or,
    TX, T, R, block_size,
    HEAD_DIV: tl.constexpr, D: tl.constexpr, HIDDEN: tl.constexpr, BS: tl.constexpr,
    KIND0: tl.constexpr, KIND1: tl.constexpr, KIND2: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
):
    """x: [B, TX, H, D], the last TX of T positions; weight: [HW, D * kinds, HIDDEN] float32; out:
    [B, HW, R, HIDDEN] float32. KIND1/KIND2 = -1 when absent. Grid (cdiv(R, BLOCK_R), HW, B)."""
    i_r = tl.program_id(0)
    i_h = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    off = 0
    if HAS_OFFSETS:
        off = tl.load(seq_offsets + i_b).to(tl.int32)
    base = T - TX
    first = tl.maximum(base - off, 0) // block_size
    rows = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    block_start = off + (first + rows) * block_size
    t0 = tl.maximum(block_start, tl.maximum(base, off)) - base  # x rows of each block row
    t1 = tl.minimum(block_start + block_size, T) - base
    t1 = tl.where(rows < R, t1, t0)
    x_row0 = x + i_b * stride_xb + (i_h // HEAD_DIV) * stride_xh
    d = tl.arange(0, D)
    o = tl.arange(0, HIDDEN)
    w_head = weight + i_h * stride_wh
    acc = tl.zeros([BLOCK_R, HIDDEN], tl.float32)
    pooled0, pooled1, pooled2 = _pool_rows(x_row0, stride_xt, t0, t1, KIND0, KIND1, KIND2, BLOCK_R, BS, D)
    w = tl.load(w_head + d[:, None] * stride_wi + o[None, :])
    acc += tl.dot(pooled0, w, input_precision="ieee")
    if KIND1 >= 0:
        w = tl.load(w_head + (D + d)[:, None] * stride_wi + o[None, :])
        acc += tl.dot(pooled1, w, input_precision="ieee")
    if KIND2 >= 0:
        w = tl.load(w_head + (2 * D + d)[:, None] * stride_wi + o[None, :])
        acc += tl.dot(pooled2, w, input_precision="ieee")
    tl.store(out + i_b * stride_ob + i_h * stride_oh + rows[:, None] * stride_or + o[None, :], acc,
             mask=(rows < R)[:, None])


POOLING_CODES = {"avg": 0, "max": 1, "min": 2}


def triton_gate_projection(x, weight, kinds, block_size, key_length, seq_offsets, dtype=torch.float32):
    """Fused `naive_gate_projection` (see there): pooling and the per-head map in one kernel, float32."""
    from ...blocks import query_block_rows

    if dtype != torch.float32 or weight.dtype != torch.float32:
        raise ValueError(f"the fused gate projection computes in float32; found dtype {dtype}, weight {weight.dtype}")
    batch, length, heads, dim = x.shape
    out_heads, inputs, hidden = weight.shape
    if (not 1 <= len(kinds) <= 3 or inputs != dim * len(kinds) or out_heads % heads or x.stride(-1) != 1
            or dim & (dim - 1) or hidden & (hidden - 1) or dim < 16 or hidden < 16 or length > key_length):
        raise ValueError(f"expected x [B, TX <= {key_length}, H, D] (last dim contiguous), weight "
                         f"[HW (a multiple of H), D * {len(kinds)}, h], D and h powers of two >= 16; found x "
                         f"{tuple(x.shape)}, weight {tuple(weight.shape)}")
    if seq_offsets is not None and tuple(seq_offsets.shape) != (batch,):
        raise ValueError(f"expected seq_offsets [B={batch}]; found {tuple(seq_offsets.shape)}")
    rows = query_block_rows(length, key_length, block_size, seq_offsets)
    out = torch.empty(batch, out_heads, rows, hidden, dtype=torch.float32, device=x.device)
    codes = [POOLING_CODES[kind] for kind in kinds] + [-1] * (3 - len(kinds))
    block_r = 16
    grid = (triton.cdiv(rows, block_r), out_heads, batch)
    gate_projection_fwd_kernel[grid](
        x, weight.contiguous(), seq_offsets if seq_offsets is not None else out, out,
        x.stride(0), x.stride(1), x.stride(2),
        weight.stride(0), weight.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        length, key_length, rows, block_size,
        HEAD_DIV=out_heads // heads, D=dim, HIDDEN=hidden, BS=block_size,
        KIND0=codes[0], KIND1=codes[1], KIND2=codes[2], BLOCK_R=block_r,
        HAS_OFFSETS=seq_offsets is not None,
        num_warps=8 if dim * hidden >= 128 * 128 else 4,  # the weight tile is the largest operand
    )
    return out


@triton.jit
def _sortable(x):
    """float32 -> int32 keys in the same order (-inf lowest, +inf highest)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def topk_block_lists_kernel(
    scores, diagonal, row_valid, budget, block_idx, block_count,
    stride_sb, stride_sh, stride_sr,
    stride_db, stride_vb, stride_bb,
    stride_ib, stride_ih, stride_ir,
    stride_cb, stride_ch,
    NB, K, keep_first, keep_recent,
    KEEP_DIAGONAL: tl.constexpr, NBP: tl.constexpr,
):
    """One row of `[B, HM, R, NB]` scores -> its `budget` best causal blocks (forced blocks first, kept
    beyond the budget), ascending in `block_idx[b, h, r, :K]` (padded with the last), `block_count`.
    Rows of padding keep their diagonal. Grid (R, HM, B)."""
    i_r = tl.program_id(0)
    i_h = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    diag = tl.load(diagonal + i_b * stride_db + i_r)
    valid = tl.load(row_valid + i_b * stride_vb + i_r) != 0
    cols = tl.arange(0, NBP)
    causal = (cols <= diag) & (cols < NB)
    row = tl.load(scores + i_b * stride_sb + i_h * stride_sh + i_r * stride_sr + cols, mask=causal,
                  other=float("-inf")).to(tl.float32)
    forced = (cols < keep_first) | ((cols < diag) & (cols >= diag - keep_recent))
    if KEEP_DIAGONAL:
        forced = forced | (cols == diag)
    forced = forced & causal
    row = tl.where(forced, float("inf"), row)
    k = tl.maximum(tl.load(budget + i_b * stride_bb + i_r), tl.sum(forced.to(tl.int32), axis=0))
    # The k-th largest key by bisection over the int32 keys; ties at it are taken by position.
    keys = _sortable(row)
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    for _ in range(32):
        mid = lo + (hi - lo + 1) // 2
        enough = tl.sum((keys.to(tl.int64) >= mid).to(tl.int32), axis=0) >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    above = keys.to(tl.int64) > lo
    ties = (keys.to(tl.int64) == lo) & causal
    needed = k - tl.sum(above.to(tl.int32), axis=0)
    keep = (above & causal) | (ties & (tl.cumsum(ties.to(tl.int32), axis=0) <= needed))
    keep = tl.where(valid, keep, cols == diag)
    count = tl.sum(keep.to(tl.int32), axis=0)
    slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    idx_row = block_idx + i_b * stride_ib + i_h * stride_ih + i_r * stride_ir
    tl.store(idx_row + slot, cols, mask=keep)
    last = tl.max(tl.where(keep, cols, -1), axis=0)
    tl.store(idx_row + cols, tl.zeros([NBP], tl.int32) + last, mask=(cols >= count) & (cols < K))
    tl.store(block_count + i_b * stride_cb + i_h * stride_ch + i_r, count)


def triton_topk_block_lists(scores, diagonal, row_valid, budget, keep_first, keep_recent, keep_diagonal):
    """The ranking methods' lists of `selectors.select_block_lists` (its spec) in one kernel.

    scores: `[B, HM, R, NB]` (any float dtype); diagonal, row_valid, budget: `[B or 1, R]` (budget:
    blocks each row keeps before forced ones). Returns block_idx `[B, HM, R, K]` int32 and block_count
    `[B, HM, R]` int32, K the largest count.
    """
    batch, heads, rows, blocks = scores.shape
    scores = scores if scores.stride(-1) == 1 else scores.contiguous()
    device = scores.device
    diagonal = diagonal.to(device=device, dtype=torch.int32).expand(batch, rows).contiguous()
    row_valid = (torch.ones(batch, rows, dtype=torch.int8, device=device) if row_valid is None
                 else row_valid.to(device=device, dtype=torch.int8).expand(batch, rows).contiguous())
    budget = budget.to(device=device, dtype=torch.int32).expand(batch, rows).contiguous()
    # Forced blocks come on top of the budget: at most keep_first + keep_recent + 1 of them.
    width = max(min(int(budget.max()) + keep_first + keep_recent + 1, blocks), 1)
    block_idx = torch.empty(batch, heads, rows, width, dtype=torch.int32, device=device)
    block_count = torch.empty(batch, heads, rows, dtype=torch.int32, device=device)
    topk_block_lists_kernel[(rows, heads, batch)](
        scores, diagonal, row_valid, budget, block_idx, block_count,
        scores.stride(0), scores.stride(1), scores.stride(2),
        diagonal.stride(0), row_valid.stride(0), budget.stride(0),
        block_idx.stride(0), block_idx.stride(1), block_idx.stride(2),
        block_count.stride(0), block_count.stride(1),
        blocks, width, keep_first, keep_recent,
        KEEP_DIAGONAL=keep_diagonal, NBP=max(triton.next_power_of_2(blocks), 16),
        num_warps=4 if blocks <= 1024 else 8,
    )
    return block_idx, block_count
