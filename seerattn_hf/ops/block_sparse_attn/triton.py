"""Triton block-sparse causal attention forward (GQA native, left padding, optional lse).

Each program owns one query block of GM query heads of one KV group: a tile of GM * BLOCK_Q rows
(GM > 1 only when the heads share one block list, i.e. one mask per KV head), so each K/V tile is read
once for the GM heads. It walks only its compact list of kept key blocks, BLOCK_N <= block_size key
rows per step, loaded through tensor descriptors (a step never crosses a kept block, so its rows are
contiguous). Kept blocks before the diagonal need no causal mask: a binary search over the ascending
list finds where they end, so only the diagonal block is masked. The kept-block index of the next
step is loaded one step ahead, and the output tile is stored through a tensor descriptor.
Design notes and measurements: docs/kernels.md.

The same kernel with DENSE=True ignores the lists and attends every causal key: the benchmark's
measure of what the kernel reaches with dense 128 x 128 tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...blocks import query_block_rows
from ..triton_common import (
    LOG2E,
    check_attention_inputs,
    check_seq_offsets,
    descriptor_ready,
    descriptor_scratch,
    input_precision,
    interpreting,
    online_softmax_step,
    query_tile_count,
)


@triton.jit
def _step_start(idx_row, step, off, BLOCK_N: tl.constexpr, KBS: tl.constexpr, DENSE: tl.constexpr):
    """First key row of a step: steps of BLOCK_N <= KBS rows lie inside one kept block."""
    col0 = step * BLOCK_N
    if DENSE:
        t0 = off + col0
    else:
        t0 = off + tl.load(idx_row + col0 // KBS) * KBS + col0 % KBS
    return t0


@triton.jit
def block_sparse_attn_fwd_kernel(
    q, k, v, o, lse, block_idx, block_count, seq_offsets,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_ot, stride_oh,
    stride_ib, stride_ih, stride_in,
    stride_cb, stride_ch,
    T, TQ, n_qblocks, qk_scale,
    HQ: tl.constexpr, G: tl.constexpr, GM: tl.constexpr, MASK_PER_QHEAD: tl.constexpr,
    D: tl.constexpr, BLOCK_Q: tl.constexpr, KBS: tl.constexpr, BLOCK_N: tl.constexpr,
    DENSE: tl.constexpr, HAS_OFFSETS: tl.constexpr, RETURN_LSE: tl.constexpr, CHUNK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """q: [B, HQ, TQ, D], the queries of the last TQ of T positions; k, v: [B, HKV, T, D];
    o: [B, TQ, HQ, D]; lse: [B, HQ, TQ] float32 (log2 units are converted to natural log on store);
    block_idx: [B, HM, NB, K] int32; block_count: [B, HM, NB]. List row i is the sequence's block
    first + i, first the block holding the chunk's first real query (0 for a whole prompt).
    CHUNK (TQ < T): the first block may be partly cached, so rows are stored through masked pointers.
    Grid: (n_qblocks * G // GM, HKV, B), the heaviest (last) query blocks first."""
    BLOCK_M: tl.constexpr = GM * BLOCK_Q
    pid = tl.program_id(0)
    i_kvh = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)  # batch offsets can pass 2**31 elements
    n_htiles: tl.constexpr = G // GM
    i_q = n_qblocks - 1 - pid // n_htiles
    h0 = i_kvh * G + (pid % n_htiles) * GM

    off = 0
    if HAS_OFFSETS:
        off = tl.load(seq_offsets + i_b).to(tl.int32)
    q_start = T - TQ
    first = tl.maximum(q_start - off, 0) // BLOCK_Q
    n_seq_blocks = tl.cdiv(T - off, BLOCK_Q) - first

    r = tl.arange(0, BLOCK_M)
    r_head = h0 + r // BLOCK_Q
    lse_rows = lse + (i_b * HQ + r_head) * TQ

    if i_q >= n_seq_blocks:
        # No sequence block here: this program zeroes part of the left padding [q_start, off)
        # instead. The grid's one spare query block always leaves enough such programs.
        t = (i_q - n_seq_blocks) * BLOCK_Q + r % BLOCK_Q
        pad = t < off - q_start
        o_rows = o + i_b * stride_ob + r_head * stride_oh
        d = tl.arange(0, D)
        tl.store(o_rows[:, None] + t[:, None] * stride_ot + d[None, :],
                 tl.zeros([BLOCK_M, D], dtype=o.dtype.element_ty), mask=pad[:, None])
        if RETURN_LSE:
            tl.store(lse_rows + t, tl.full([BLOCK_M], float("-inf"), tl.float32), mask=pad)
        return

    i_block = first + i_q  # the diagonal key block
    t_start = off + i_block * BLOCK_Q
    t_q = t_start + r % BLOCK_Q  # key positions of the rows
    row_real = (t_q >= q_start) & (t_q < T)
    d = tl.arange(0, D)
    q_tile = tl.load(q + i_b * stride_qb + r_head[:, None] * stride_qh + (t_q - q_start)[:, None] * stride_qt
                     + d[None, :], mask=row_real[:, None], other=0.0)

    if DENSE:
        n_full = (i_block * BLOCK_Q) // KBS
        n_end = tl.cdiv(tl.minimum((i_block + 1) * BLOCK_Q, T - off), KBS)
        idx_row = block_idx  # unused
    else:
        i_m = h0 if MASK_PER_QHEAD else i_kvh
        idx_row = block_idx + i_b * stride_ib + i_m * stride_ih + i_q * stride_in
        count = tl.load(block_count + i_b * stride_cb + i_m * stride_ch + i_q)
        # kept blocks are ascending: binary search for the first one at or after the diagonal
        lo = tl.full([], 0, tl.int32)
        hi = count.to(tl.int32)
        while lo < hi:
            mid = (lo + hi) // 2
            before = tl.load(idx_row + mid) < i_block
            lo = tl.where(before, mid + 1, lo)
            hi = tl.where(before, hi, mid)
        n_full = lo
        n_end = tl.minimum(count, n_full + 1)  # the diagonal block, if kept; later ones add nothing

    # K/V tiles arrive through tensor descriptors (the bulk copy engine on Hopper): each step's
    # BLOCK_N <= KBS rows are contiguous inside one kept block, and rows past T read as zeros.
    k_desc = tl.make_tensor_descriptor(k + i_b * stride_kb + i_kvh * stride_kh, shape=[T, D],
                                       strides=[stride_kt, 1], block_shape=[BLOCK_N, D])
    v_desc = tl.make_tensor_descriptor(v + i_b * stride_vb + i_kvh * stride_vh, shape=[T, D],
                                       strides=[stride_vt, 1], block_shape=[BLOCK_N, D])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    # steps wholly before the diagonal: no mask at all
    n_steps = (n_full * KBS) // BLOCK_N
    t_next = _step_start(idx_row, 0, off, BLOCK_N, KBS, DENSE)
    for step in range(0, n_steps):
        # the next kept block is read one step ahead, so no bulk copy waits on an index load
        t0 = t_next
        t_next = _step_start(idx_row, tl.minimum(step + 1, n_steps - 1), off, BLOCK_N, KBS, DENSE)
        k_tile = k_desc.load([t0, 0])
        v_tile = v_desc.load([t0, 0])
        s = tl.dot(q_tile, tl.trans(k_tile), input_precision=INPUT_PRECISION)
        m_i, l_i, acc = online_softmax_step(s, qk_scale, tl.max(s, 1) * qk_scale, m_i, l_i, acc, v_tile,
                                            False, INPUT_PRECISION)

    # the steps of the diagonal block: causal mask, partial last block, rows with nothing kept
    for step in range((n_full * KBS) // BLOCK_N, tl.cdiv(n_end * KBS, BLOCK_N)):
        t0 = _step_start(idx_row, step, off, BLOCK_N, KBS, DENSE)
        t_k = t0 + tl.arange(0, BLOCK_N)
        k_tile = k_desc.load([t0, 0])
        v_tile = v_desc.load([t0, 0])
        s = tl.dot(q_tile, tl.trans(k_tile), input_precision=INPUT_PRECISION)
        s = tl.where((t_k[None, :] <= t_q[:, None]) & (t_k < T)[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, qk_scale, tl.max(s, 1) * qk_scale, m_i, l_i, acc, v_tile,
                                            True, INPUT_PRECISION)

    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    # The output tile leaves through a tensor descriptor over this sequence's [HQ, T, D] view (rows past
    # T are not written): only scalars stay live through the loops, where per-row output pointers
    # would take the registers the main loop needs and make it spill.
    if CHUNK:
        tl.store(o + i_b * stride_ob + r_head[:, None] * stride_oh + (t_q - q_start)[:, None] * stride_ot
                 + d[None, :], acc.to(o.dtype.element_ty), mask=row_real[:, None])
    else:
        o_desc = tl.make_tensor_descriptor(o + i_b * stride_ob, shape=[HQ, T, D],
                                           strides=[stride_oh, stride_ot, 1], block_shape=[GM, BLOCK_Q, D])
        o_desc.store([h0, t_start, 0], tl.reshape(acc.to(o.dtype.element_ty), [GM, BLOCK_Q, D]))
    if RETURN_LSE:
        row_lse = (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634  # log2 -> ln
        row_lse = tl.where(empty, float("-inf"), row_lse)
        tl.store(lse_rows + t_q - q_start, row_lse, mask=row_real)


def default_config(block_q, kv_block, D, G, heads_per_tile_max, dtype):
    """(heads_per_tile, block_n, num_warps, num_stages): measured on an H200 (docs/kernels.md);
    small in the interpreter. kv_block: the largest block_n allowed (the key block size)."""
    gm = 1
    while gm * 2 <= heads_per_tile_max and G % (gm * 2) == 0 and gm * 2 * block_q <= 128:
        gm *= 2
    if interpreting():
        return gm, kv_block, 4, 1
    block_n = min(kv_block, 64 if (D > 128 or dtype == torch.float32) else 128)
    if gm * block_q * block_n >= 128 * 128:
        return gm, block_n, 8, 2 if (D > 128 or dtype == torch.float32) else 3
    if gm * block_q >= 128:  # 128 x 64 tiles: one warpgroup, two stages measured best
        return gm, block_n, 4, 2
    return gm, block_n, 4, 3


def block_sparse_attn_fwd(q, k, v, block_idx, block_count, block_size, scale=None, seq_offsets=None,
                          return_lse=False, dense=False, block_q=None, heads_per_tile=None,
                          block_n=None, num_warps=None, num_stages=None):
    """Launcher. Shapes as in `triton_block_sparse_attention`. dense=True ignores block_idx/count
    (pass None) and attends every causal key, with query blocks of block_q rows (default 128).
    heads_per_tile / block_n (a power of two <= block_size) / num_warps / num_stages override the
    heuristic (benchmarks)."""
    B, HQ, HKV, T, D = check_attention_inputs(q, k, v, block_size, query_chunk=not dense)
    TQ = q.shape[2]
    G = HQ // HKV
    q = q if q.stride(-1) == 1 else q.contiguous()
    k, v = descriptor_ready(k), descriptor_ready(v)
    if dense:
        HM = HKV
        block_q = block_q or 128
        block_idx = block_count = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=q.device)
    else:
        block_q = block_size
        NB = query_block_rows(TQ, T, block_size, seq_offsets)
        HM = block_idx.shape[1] if block_idx.dim() == 4 else -1
        if block_idx.dim() != 4 or block_idx.shape[:3] != (B, HM, NB) or HM not in (HQ, HKV):
            raise ValueError(f"expected block_idx [B={B}, HM in ({HQ}, {HKV}), NB={NB}, K]; found "
                             f"{tuple(block_idx.shape)}")
        if tuple(block_count.shape) != (B, HM, NB):
            raise ValueError(f"expected block_count [B={B}, HM={HM}, NB={NB}]; found "
                             f"{tuple(block_count.shape)}")
        if block_idx.shape[-1] == 0:  # nothing kept anywhere; the kernel reads one entry ahead
            block_idx = torch.zeros(B, HM, NB, 1, dtype=torch.int32, device=q.device)
        if block_idx.dtype != torch.int32 or block_idx.stride(-1) != 1:
            block_idx = block_idx.to(torch.int32).contiguous()
        if block_count.dtype != torch.int32 or block_count.stride(-1) != 1:
            block_count = block_count.to(torch.int32).contiguous()
    mask_per_qhead = (not dense) and HM == HQ and G > 1
    kv_block = block_q if dense else block_size
    gm, bn, nw, ns = default_config(block_q, kv_block, D, G, 1 if mask_per_qhead else G, q.dtype)
    gm = heads_per_tile or gm
    bn, nw, ns = block_n or bn, num_warps or nw, num_stages or ns
    if G % gm or (mask_per_qhead and gm != 1):
        raise ValueError(f"heads_per_tile must divide G={G} (and be 1 with per-query-head masks); found {gm}")
    if bn & (bn - 1) or not 16 <= bn <= (256 if dense else block_size):
        raise ValueError(f"block_n must be a power of two in [16, {256 if dense else block_size}]; found {bn}")
    check_seq_offsets(seq_offsets, B)
    scale = D**-0.5 if scale is None else scale
    triton.set_allocator(descriptor_scratch)

    o = torch.empty(B, TQ, HQ, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, HQ, TQ, dtype=torch.float32, device=q.device) if return_lse else o
    # With left padding, one spare query tile whose programs zero padding rows (every row is written).
    n_qblocks = query_tile_count(T, block_q, seq_offsets) if dense else NB + (seq_offsets is not None)
    grid = (n_qblocks * (G // gm), HKV, B)
    block_sparse_attn_fwd_kernel[grid](
        q, k, v, o, lse, block_idx, block_count, seq_offsets if seq_offsets is not None else o,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        block_idx.stride(0), block_idx.stride(1), block_idx.stride(2),
        block_count.stride(0), block_count.stride(1),
        T, TQ, n_qblocks, scale * LOG2E,
        HQ=HQ, G=G, GM=gm, MASK_PER_QHEAD=mask_per_qhead, D=D, BLOCK_Q=block_q,
        KBS=bn if dense else block_size, BLOCK_N=bn, DENSE=dense,
        HAS_OFFSETS=seq_offsets is not None, RETURN_LSE=return_lse, CHUNK=TQ < T,
        INPUT_PRECISION=input_precision(q.dtype),
        num_warps=nw, num_stages=ns,
    )
    return (o, lse) if return_lse else o


def triton_block_sparse_attention(q, k, v, block_idx, block_count, block_size, scale=None,
                                  seq_offsets=None, return_lse=False):
    """Block-sparse causal attention over the kept key blocks of each query block.

    Args:
        q: [B, HQ, TQ, D] (any strides with a contiguous last dim), TQ <= T: the queries of the last TQ
            positions (a chunk continued from a cache), causal w.r.t. those positions; k, v:
            [B, HKV, T, D], GQA read in place (query head h uses kv head h // (HQ // HKV)).
        block_idx: [B, HM, NB, K] int32, ascending kept key blocks per query block, first block_count
            valid; HM == HQ or HM == HKV (shared by a KV group: its heads run as one tile).
        block_count: [B, HM, NB] int32. block_size: power of two in [16, 128];
            NB = `blocks.query_block_rows(TQ, T, block_size, seq_offsets)` (ceil(T / block_size) for
            TQ == T; row i of a chunk is the block holding its first real query, plus i).
        scale: default D ** -0.5. seq_offsets: [B] int or None, left padding (blocks counted from it).
        return_lse: also return lse.

    Returns:
        o: [B, TQ, HQ, D] in q.dtype (rows keeping nothing and padding rows are 0); with return_lse
        also lse: [B, HQ, TQ] float32, natural log, -inf where nothing is kept.
    """
    return block_sparse_attn_fwd(q, k, v, block_idx, block_count, block_size, scale=scale,
                                 seq_offsets=seq_offsets, return_lse=return_lse)
