"""Triton dense causal attention plus the decode target, in one pass.

The kernel is flash attention over every causal key that also stores, per step, each row's largest
score in each key block (the online softmax computes the row maxima anyway) into a scratch buffer of
its program. A program's tile is one query tile of one KV head, and it walks the GQA group's query
heads in turn: once a head's rows are done their log-sum-exp is known, the block maxima become
exp2(best score - lse), and the target entries of the tile's rows take their maximum over the heads
seen so far (the program owns those entries, so no atomics). A torch division then normalizes each
row over its candidates. The grid is persistent (a few programs per SM walk the tiles, heaviest
first), so the scratch is [programs, NB, BLOCK_Q]; extra memory is that plus the target itself,
[B, HKV, TQ, NB].

Target "block_mass" runs the same pass with MASS set (as the prefill kernel does): the scratch holds
each row's log-sum-exp of its scores in each key block instead of their max, exp2(block lse - row
lse) is the row's mass on the block, and the target entries add it up over the group's heads
instead of taking the maximum (the row normalization turns that sum into the group mean).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..pooled_attn.triton import _record_block_max
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
from .naive import check_decode_target


@triton.jit
def decode_pooled_attn_fwd_kernel(
    q, k, v, o, target, scratch, seq_offsets,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_ot, stride_oh,
    T, NB, first_query, n_qtiles, scratch_blocks, qk_scale,
    B: tl.constexpr, HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    HAS_OFFSETS: tl.constexpr, INPUT_PRECISION: tl.constexpr, MASS: tl.constexpr,
):
    """q: [B, HQ, T, D]; k, v: [B, HKV, T, D]; o: [B, T, HQ, D]; target: [B, HKV, T - first_query, NB]
    float32, zero-filled (unnormalized maxima over the group, MASS: masses summed over the group,
    written at candidate entries); scratch:
    [num_programs, scratch_blocks, BLOCK_Q] float32. BLOCK_Q and BLOCK_N are multiples of BS."""
    SPLIT: tl.constexpr = BLOCK_N // BS
    HKV: tl.constexpr = HQ // G
    tiles_per_q: tl.constexpr = B * HKV
    pid = tl.program_id(0)
    scr = scratch + pid.to(tl.int64) * scratch_blocks * BLOCK_Q
    TQ = T - first_query

    r = tl.arange(0, BLOCK_Q)
    d = tl.arange(0, D)
    cols = tl.arange(0, BLOCK_N)
    for tile in range(pid, n_qtiles * tiles_per_q, tl.num_programs(0)):
        i_q = n_qtiles - 1 - tile // tiles_per_q
        rest = tile % tiles_per_q
        i_b = (rest // HKV).to(tl.int64)  # batch offsets can pass 2**31 elements
        i_kvh = rest % HKV
        off = 0
        if HAS_OFFSETS:
            off = tl.load(seq_offsets + i_b).to(tl.int32)
        n_seq_tiles = tl.cdiv(T - off, BLOCK_Q)
        if i_q >= n_seq_tiles:
            # no sequence rows here: zero part of the left padding instead (as the prefill kernels do)
            t = (i_q - n_seq_tiles) * BLOCK_Q + r
            for h in range(G):
                o_rows = o + i_b * stride_ob + (i_kvh * G + h) * stride_oh
                tl.store(o_rows + t[:, None] * stride_ot + d[None, :],
                         tl.zeros([BLOCK_Q, D], dtype=o.dtype.element_ty), mask=(t < off)[:, None])
        else:
            t_q = off + i_q * BLOCK_Q + r
            row_ok = t_q < T
            tile_end = tl.minimum((i_q + 1) * BLOCK_Q, T - off)  # sequence rows of this tile end here
            k_desc = tl.make_tensor_descriptor(k + i_b * stride_kb + i_kvh * stride_kh, shape=[T, D],
                                               strides=[stride_kt, 1], block_shape=[BLOCK_N, D])
            v_desc = tl.make_tensor_descriptor(v + i_b * stride_vb + i_kvh * stride_vh, shape=[T, D],
                                               strides=[stride_vt, 1], block_shape=[BLOCK_N, D])
            # the rows' candidates: complete blocks before their own (counted from the sequence start)
            n_cand = (t_q - off) // BS
            row_target = row_ok & (t_q >= first_query)
            out_rows = target + ((i_b * HKV + i_kvh) * TQ + (t_q - first_query).to(tl.int64)) * NB
            n_kb = tl.cdiv(tile_end, BS)
            for h in range(G):
                i_h = i_kvh * G + h
                q_tile = tl.load(q + i_b * stride_qb + i_h * stride_qh + t_q[:, None] * stride_qt + d[None, :],
                                 mask=row_ok[:, None], other=0.0)
                m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
                l_i = tl.zeros([BLOCK_Q], tl.float32)
                acc = tl.zeros([BLOCK_Q, D], tl.float32)

                # steps wholly before the tile's first row: no causal mask
                n_full = (i_q * BLOCK_Q) // BLOCK_N
                for step in range(0, n_full):
                    t0 = off + step * BLOCK_N
                    k_tile = k_desc.load([t0, 0])
                    v_tile = v_desc.load([t0, 0])
                    s = tl.dot(q_tile, tl.trans(k_tile), input_precision=INPUT_PRECISION)
                    m_step = _record_block_max(s, scr, step, r, cols, qk_scale, BLOCK_Q, BS, SPLIT, MASS)
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
                    m_step = _record_block_max(s, scr, step, r, cols, qk_scale, BLOCK_Q, BS, SPLIT, MASS)
                    m_i, l_i, acc = online_softmax_step(s, qk_scale, m_step, m_i, l_i, acc, v_tile, True,
                                                        INPUT_PRECISION)

                tl.store(o + i_b * stride_ob + i_h * stride_oh + t_q[:, None] * stride_ot + d[None, :],
                         (acc / l_i[:, None]).to(o.dtype.element_ty), mask=row_ok[:, None])

                # Every sequence row attends at least to itself, so l_i > 0 there.
                row_lse = tl.where(row_ok, m_i + tl.log2(l_i), float("inf"))
                tl.debug_barrier()  # the scratch rows (and earlier heads' targets) stored by other threads
                for j0 in range(0, n_kb, CHUNK):
                    j = j0 + tl.arange(0, CHUNK)
                    keep = row_target[:, None] & (j[None, :] < n_cand[:, None])
                    best = tl.load(scr + j[None, :] * BLOCK_Q + r[:, None], mask=keep, other=float("-inf"))
                    prob = tl.exp2(best - row_lse[:, None])
                    seen = tl.load(out_rows[:, None] + j[None, :], mask=keep, other=0.0)
                    if MASS:
                        seen += prob
                    else:
                        seen = tl.maximum(seen, prob)
                    tl.store(out_rows[:, None] + j[None, :], seen, mask=keep)
                tl.debug_barrier()  # the next head overwrites the scratch and reads these targets


def decode_pooled_config(block_size, D, dtype):
    """(block_q, block_n, num_warps, num_stages, programs_per_sm, chunk): small tiles in the
    interpreter. On the GPU 128 x 64 tiles in 8 warps, one program per SM: with the prefill kernel's
    4 warps this kernel's main loop spills (44 local loads per step for sm_90 at D = 128 in
    scripts/kernel_resources.py; none with 8). Not yet timed on a GPU."""
    if interpreting():
        return block_size, block_size, 4, 1, 1, 4
    block_q = max(block_size, 128)
    if D > 128 or dtype == torch.float32 or block_size > 64:
        return block_q, max(block_size, 64), 8, 2, 1, 64
    return block_q, 64, 8, 2, 1, 32


def decode_pooled_attn_fused_fwd(q, k, v, block_size, scale=None, seq_offsets=None, first_query=0,
                                 target="block_max", block_q=None, block_n=None, num_warps=None, num_stages=None,
                                 programs_per_sm=None, chunk=None, num_programs=None):
    """Launcher of the one-pass kernel; the keyword arguments override its heuristic (benchmarks,
    tests). Returns o and the unnormalized target of `target` ("block_max" or "block_mass")."""
    check_decode_target(target)
    B, HQ, HKV, T, D = check_attention_inputs(q, k, v, block_size)
    G = HQ // HKV
    check_seq_offsets(seq_offsets, B)
    if not 0 <= first_query < max(T, 1):
        raise ValueError(f"expected first_query in [0, T={T}); found {first_query}")
    bq, bn, nw, ns, per_sm, ch = decode_pooled_config(block_size, D, q.dtype)
    bq, bn, nw, ns = block_q or bq, block_n or bn, num_warps or nw, num_stages or ns
    per_sm, ch = programs_per_sm or per_sm, chunk or ch
    for name, value in (("block_q", bq), ("block_n", bn)):
        if value % block_size or value & (value - 1) or value > 256:
            raise ValueError(f"{name} must be a power-of-two multiple of block_size={block_size} up to 256; "
                             f"found {value}")
    scale = D**-0.5 if scale is None else scale
    q = q if q.stride(-1) == 1 else q.contiguous()
    k, v = descriptor_ready(k), descriptor_ready(v)
    NB = triton.cdiv(T, block_size)
    n_qtiles = query_tile_count(T, bq, seq_offsets)
    n_tiles = n_qtiles * B * HKV
    if num_programs is None:
        sms = 3 if interpreting() else torch.cuda.get_device_properties(q.device).multi_processor_count
        num_programs = sms * per_sm
    num_programs = min(num_programs, n_tiles)
    o = torch.empty(B, T, HQ, D, dtype=q.dtype, device=q.device)
    pooled = torch.zeros(B, HKV, T - first_query, NB, dtype=torch.float32, device=q.device)
    scratch_blocks = triton.cdiv(T, bn) * (bn // block_size)  # whole steps: the last may pass NB
    scratch = torch.empty(num_programs, scratch_blocks, bq, dtype=torch.float32, device=q.device)
    triton.set_allocator(descriptor_scratch)
    decode_pooled_attn_fwd_kernel[(num_programs,)](
        q, k, v, o, pooled, scratch, seq_offsets if seq_offsets is not None else o,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        T, NB, first_query, n_qtiles, scratch_blocks, scale * LOG2E,
        B=B, HQ=HQ, G=G, D=D, BLOCK_Q=bq, BS=block_size, BLOCK_N=bn, CHUNK=ch,
        HAS_OFFSETS=seq_offsets is not None, INPUT_PRECISION=input_precision(q.dtype),
        MASS=target == "block_mass", num_warps=nw, num_stages=ns,
    )
    return o, pooled


def triton_decode_pooled_attention(q, k, v, block_size, scale=None, seq_offsets=None, first_query=0,
                                   target="block_max", **config):
    """Dense causal attention and the decode target (see `naive_decode_pooled_attention`).

    Args:
        q: [B, HQ, T, D]; k, v: [B, HKV, T, D] (GQA read in place); block_size: power of two in
            [16, 128]; NB = ceil(T / block_size). scale: default D ** -0.5.
        seq_offsets: [B] int or None: left padding, blocks counted from each sequence's start.
        first_query: the target covers query positions t >= first_query (TQ = T - first_query).
        target: "block_max" or "block_mass", as in `naive_decode_pooled_attention`.
        config: keyword overrides of `decode_pooled_attn_fused_fwd` (benchmarks, tests).

    Returns:
        o: [B, T, HQ, D] in q.dtype; target: [B, HKV, TQ, NB] float32, each row's block maxima over
        the complete blocks before its own, maxed over the GQA group ("block_mass": each row's mass on
        those blocks, averaged over the group), normalized to sum 1 (rows without a candidate 0).
    """
    o, pooled = decode_pooled_attn_fused_fwd(q, k, v, block_size, scale=scale, seq_offsets=seq_offsets,
                                             first_query=first_query, target=target, **config)
    pooled /= pooled.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return o, pooled
