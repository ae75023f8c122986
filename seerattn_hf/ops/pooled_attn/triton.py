"""Triton dense causal attention plus its block-max-pooled probability map, in one pass.

The kernel is flash attention over every causal key that also stores, per step, each row's largest
score in each key block (the online softmax computes the row maxima anyway) into a scratch buffer
of its program. Once a tile's rows are done their log-sum-exp is known, and the block maxima become
max over the rows of a query block of exp(best score - lse), one float per (b, h, i, j); a torch
division then normalizes each row. The grid is persistent (a few programs per SM walk the tiles,
heaviest first), so the scratch is [programs, NB, tile rows], not T x NB: extra memory is that plus
the map itself, [B, HQ, NB, NB]. Each step computes q k^T once, for the softmax and the map
alike: two matrix products per step, as in plain attention (design notes: docs/kernels.md).

Target "block_mass" runs the same pass with MASS set: the scratch holds each row's log-sum-exp of
its scores in each key block instead of their max (one more exponential per score), and the
epilogue sums exp(block lse - row lse), the row's mass on the block, over the query block's rows
instead of taking their max (the row normalization turns the sum into the mean of the target).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
from .naive import check_pooled_target


@triton.jit
def pooled_attn_fused_kernel(
    q, k, v, o, pooled, scratch, seq_offsets,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_ot, stride_oh,
    T, NB, n_qtiles, scratch_blocks, qk_scale,
    B: tl.constexpr, HQ: tl.constexpr, G: tl.constexpr, GM: tl.constexpr, D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    HAS_OFFSETS: tl.constexpr, INPUT_PRECISION: tl.constexpr, MASS: tl.constexpr,
):
    """One pass: dense causal flash attention that also records, for every row and key block, the
    row's largest score in that block (scratch), and turns them into the block-max map once the
    row's log-sum-exp is known.

    q: [B, HQ, T, D]; k, v: [B, HKV, T, D]; o: [B, T, HQ, D]; pooled: [B, HQ, NB, NB] float32
    (unnormalized maxima, entries j <= i); scratch: [num_programs, scratch_blocks, GM * BLOCK_Q]
    float32, scratch_blocks = NB rounded up to whole steps.
    Persistent: program p takes tiles p, p + P, ... of the list ordered heaviest (last) query
    tile first, so its scratch is reused and extra memory does not grow with the number of tiles.
    BLOCK_Q and BLOCK_N are multiples of BS: a tile covers whole query blocks, a step whole key blocks.
    """
    BLOCK_M: tl.constexpr = GM * BLOCK_Q
    QB_PER_TILE: tl.constexpr = BLOCK_Q // BS
    SPLIT: tl.constexpr = BLOCK_N // BS
    n_htiles: tl.constexpr = G // GM
    HKV: tl.constexpr = HQ // G
    tiles_per_q: tl.constexpr = B * HKV * n_htiles
    pid = tl.program_id(0)
    scr = scratch + pid.to(tl.int64) * scratch_blocks * BLOCK_M

    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    cols = tl.arange(0, BLOCK_N)
    for tile in range(pid, n_qtiles * tiles_per_q, tl.num_programs(0)):
        i_q = n_qtiles - 1 - tile // tiles_per_q
        rest = tile % tiles_per_q
        i_b = (rest // (HKV * n_htiles)).to(tl.int64)  # batch offsets can pass 2**31 elements
        i_kvh = (rest // n_htiles) % HKV
        h0 = i_kvh * G + (rest % n_htiles) * GM
        off = 0
        if HAS_OFFSETS:
            off = tl.load(seq_offsets + i_b).to(tl.int32)
        n_seq_tiles = tl.cdiv(T - off, BLOCK_Q)
        r_head = h0 + r // BLOCK_Q
        o_rows = o + i_b * stride_ob + r_head * stride_oh
        if i_q >= n_seq_tiles:
            # no sequence rows here: zero part of the left padding instead (as the sparse kernel does)
            t = (i_q - n_seq_tiles) * BLOCK_Q + r % BLOCK_Q
            tl.store(o_rows[:, None] + t[:, None] * stride_ot + d[None, :],
                     tl.zeros([BLOCK_M, D], dtype=o.dtype.element_ty), mask=(t < off)[:, None])
        else:
            t_q = off + i_q * BLOCK_Q + r % BLOCK_Q
            row_ok = t_q < T
            q_tile = tl.load(q + i_b * stride_qb + r_head[:, None] * stride_qh + t_q[:, None] * stride_qt
                             + d[None, :], mask=row_ok[:, None], other=0.0)
            k_desc = tl.make_tensor_descriptor(k + i_b * stride_kb + i_kvh * stride_kh, shape=[T, D],
                                               strides=[stride_kt, 1], block_shape=[BLOCK_N, D])
            v_desc = tl.make_tensor_descriptor(v + i_b * stride_vb + i_kvh * stride_vh, shape=[T, D],
                                               strides=[stride_vt, 1], block_shape=[BLOCK_N, D])
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, D], tl.float32)
            tile_end = tl.minimum((i_q + 1) * BLOCK_Q, T - off)  # sequence rows of this tile end here

            # steps wholly before the tile's first row: no causal mask
            n_full = (i_q * BLOCK_Q) // BLOCK_N
            for step in range(0, n_full):
                t0 = off + step * BLOCK_N
                k_tile = k_desc.load([t0, 0])
                v_tile = v_desc.load([t0, 0])
                s = tl.dot(q_tile, tl.trans(k_tile), input_precision=INPUT_PRECISION)
                m_step = _record_block_max(s, scr, step, r, cols, qk_scale, BLOCK_M, BS, SPLIT, MASS)
                m_i, l_i, acc = online_softmax_step(s, qk_scale, m_step, m_i, l_i, acc, v_tile, False,
                                                    INPUT_PRECISION)

            # steps touching the diagonal: causal mask and the end of the sequence
            for step in range(n_full, tl.cdiv(tile_end, BLOCK_N)):
                t0 = off + step * BLOCK_N
                t_k = t0 + cols
                k_tile = k_desc.load([t0, 0])
                v_tile = v_desc.load([t0, 0])
                s = tl.dot(q_tile, tl.trans(k_tile), input_precision=INPUT_PRECISION)
                s = tl.where((t_k[None, :] <= t_q[:, None]) & (t_k < T)[None, :], s, float("-inf"))
                m_step = _record_block_max(s, scr, step, r, cols, qk_scale, BLOCK_M, BS, SPLIT, MASS)
                m_i, l_i, acc = online_softmax_step(s, qk_scale, m_step, m_i, l_i, acc, v_tile, True,
                                                    INPUT_PRECISION)

            tl.store(o_rows[:, None] + t_q[:, None] * stride_ot + d[None, :],
                     (acc / l_i[:, None]).to(o.dtype.element_ty), mask=row_ok[:, None])

            # Block maxima: max over the rows of a query block of exp2(row max in block - row lse).
            # Every sequence row attends at least to itself, so l_i > 0 there.
            row_lse = tl.where(row_ok, m_i + tl.log2(l_i), float("inf"))
            tl.debug_barrier()  # the scratch rows stored by other threads of this program
            NG: tl.constexpr = BLOCK_M // BS
            g = tl.arange(0, NG)
            q_blk = i_q * QB_PER_TILE + g % QB_PER_TILE
            out = pooled + ((i_b * HQ + h0 + g // QB_PER_TILE) * NB + q_blk) * NB
            n_kb = tl.cdiv(tile_end, BS)
            for j0 in range(0, n_kb, CHUNK):
                j = j0 + tl.arange(0, CHUNK)
                best = tl.load(scr + j[:, None] * BLOCK_M + r[None, :], mask=(j < n_kb)[:, None],
                               other=float("-inf"))
                if MASS:
                    prob = tl.sum(tl.reshape(tl.exp2(best - row_lse[None, :]), [CHUNK, NG, BS]), 2)
                else:
                    prob = tl.max(tl.reshape(tl.exp2(best - row_lse[None, :]), [CHUNK, NG, BS]), 2)
                tl.store(out[None, :] + j[:, None], prob,
                         mask=(j[:, None] <= q_blk[None, :]) & (q_blk * BS < T - off)[None, :])
            tl.debug_barrier()  # the next tile overwrites the scratch


@triton.jit
def _record_block_max(s, scr, step, r, cols, qk_scale, BLOCK_M: tl.constexpr, BS: tl.constexpr,
                      SPLIT: tl.constexpr, MASS: tl.constexpr):
    """Store each row's largest scaled score in each key block of this step into the scratch (MASS:
    the log2-sum-exp2 of its scaled scores there, -inf for a wholly masked block); return the
    step's row maxima (the online softmax needs them anyway)."""
    if SPLIT == 1:
        m_step = tl.max(s, 1) * qk_scale  # the scale is positive: max first
        record = m_step
        if MASS:
            record = _block_lse(s, m_step, qk_scale)
        tl.store(scr + step * BLOCK_M + r, record)
    else:
        m_step = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for sub in tl.static_range(SPLIT):
            s_sub = tl.where((cols // BS == sub)[None, :], s, float("-inf"))
            m_sub = tl.max(s_sub, 1) * qk_scale
            record = m_sub
            if MASS:
                record = _block_lse(s_sub, m_sub, qk_scale)
            tl.store(scr + (step * SPLIT + sub) * BLOCK_M + r, record)
            m_step = tl.maximum(m_step, m_sub)
    return m_step


@triton.jit
def _block_lse(s, m, qk_scale):
    """Row-wise log2(sum(exp2(s * qk_scale))) given the rows' scaled maxima m (-inf rows stay -inf)."""
    m_use = tl.where(m == float("-inf"), 0.0, m)
    return m_use + tl.log2(tl.sum(tl.exp2(s * qk_scale - m_use[:, None]), 1))


def fused_config(block_size, D, dtype):
    """(block_q, heads_per_tile, block_n, num_warps, num_stages, programs_per_sm, chunk) of the
    one-pass kernel: measured on an H200 (docs/kernels.md); small in the interpreter."""
    if interpreting():
        return block_size, 1, block_size, 4, 1, 1, 4
    block_q = max(block_size, 128)
    if D > 128 or dtype == torch.float32 or block_size > 64:
        return block_q, 1, max(block_size, 64), 8, 2, 1, 64
    # 128 x 64 tiles in one warpgroup, two programs per SM: one's block-max epilogue overlaps
    # the other's main loop (1.22-1.24x cuDNN at 32k-64k, against 1.24-1.30x for 128 x 128 tiles
    # with 8 warps and one program per SM)
    return block_q, 1, 64, 4, 2, 2, 128


def pooled_attn_fused_fwd(q, k, v, block_size, scale=None, seq_offsets=None, target="block_max", block_q=None,
                          heads_per_tile=None, block_n=None, num_warps=None, num_stages=None,
                          programs_per_sm=None, chunk=None, num_programs=None):
    """Launcher of the one-pass kernel; the keyword arguments override its heuristic (benchmarks,
    tests). Returns o and the unnormalized pooled map of `target` ("block_max" or "block_mass")."""
    check_pooled_target(target)
    B, HQ, HKV, T, D = check_attention_inputs(q, k, v, block_size)
    G = HQ // HKV
    check_seq_offsets(seq_offsets, B)
    bq, gm, bn, nw, ns, per_sm, ch = fused_config(block_size, D, q.dtype)
    bq, gm, bn = block_q or bq, heads_per_tile or gm, block_n or bn
    nw, ns, per_sm, ch = num_warps or nw, num_stages or ns, programs_per_sm or per_sm, chunk or ch
    if G % gm:
        raise ValueError(f"heads_per_tile must divide G={G}; found {gm}")
    for name, value in (("block_q", bq), ("block_n", bn)):
        if value % block_size or value & (value - 1) or value > 256:
            raise ValueError(f"{name} must be a power-of-two multiple of block_size={block_size} up to 256; "
                             f"found {value}")
    scale = D**-0.5 if scale is None else scale
    q = q if q.stride(-1) == 1 else q.contiguous()
    k, v = descriptor_ready(k), descriptor_ready(v)
    NB = triton.cdiv(T, block_size)
    n_qtiles = query_tile_count(T, bq, seq_offsets)
    n_tiles = n_qtiles * B * HKV * (G // gm)
    if num_programs is None:
        sms = 3 if interpreting() else torch.cuda.get_device_properties(q.device).multi_processor_count
        num_programs = sms * per_sm
    num_programs = min(num_programs, n_tiles)
    o = torch.empty(B, T, HQ, D, dtype=q.dtype, device=q.device)
    pooled = torch.zeros(B, HQ, NB, NB, dtype=torch.float32, device=q.device)
    scratch_blocks = triton.cdiv(T, bn) * (bn // block_size)  # whole steps: the last may pass NB
    scratch = torch.empty(num_programs, scratch_blocks, gm * bq, dtype=torch.float32, device=q.device)
    triton.set_allocator(descriptor_scratch)
    pooled_attn_fused_kernel[(num_programs,)](
        q, k, v, o, pooled, scratch, seq_offsets if seq_offsets is not None else o,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        T, NB, n_qtiles, scratch_blocks, scale * LOG2E,
        B=B, HQ=HQ, G=G, GM=gm, D=D, BLOCK_Q=bq, BS=block_size, BLOCK_N=bn,
        CHUNK=ch, HAS_OFFSETS=seq_offsets is not None,
        INPUT_PRECISION=input_precision(q.dtype), MASS=target == "block_mass",
        num_warps=nw, num_stages=ns,
    )
    return o, pooled


def pooled_attn_fwd(q, k, v, block_size, scale=None, seq_offsets=None, target="block_max", **config):
    """Launcher: the one-pass kernel, then each map row divided by its sum. config: keyword
    overrides of `pooled_attn_fused_fwd` (benchmarks, tests)."""
    o, pooled = pooled_attn_fused_fwd(q, k, v, block_size, scale=scale, seq_offsets=seq_offsets, target=target,
                                      **config)
    pooled /= pooled.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return o, pooled


def triton_pooled_attention(q, k, v, block_size, scale=None, seq_offsets=None, target="block_max"):
    """Dense causal attention and its row-normalized block-pooled probability map.

    Args:
        q: [B, HQ, T, D]; k, v: [B, HKV, T, D] (GQA read in place); block_size: power of two in
            [16, 128]; NB = ceil(T / block_size). scale: default D ** -0.5.
        seq_offsets: [B] int or None: left padding, blocks counted from each sequence's start.
        target: "block_max" or "block_mass", as in `naive_pooled_attention`.

    Returns:
        o: [B, T, HQ, D] in q.dtype; pooled: [B, HQ, NB, NB] float32, pooled[b, h, i, j] = max of
        the attention probabilities over query block i x key block j (0 above the diagonal), rows
        normalized to sum 1 (rows outside the sequence 0); "block_mass": the mean over block i's
        rows of their probability mass on key block j.
    """
    return pooled_attn_fwd(q, k, v, block_size, scale=scale, seq_offsets=seq_offsets, target=target)
