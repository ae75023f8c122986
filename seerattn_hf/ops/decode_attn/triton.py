"""Triton split-KV ("flash-decoding") attention over the kept blocks of a KV cache.

Pass 1 (`sparse_decode_attn_split_kernel`): one program per (split, KV head, sequence). It covers the
G query heads of the KV group and the TQ new tokens at once (G * TQ rows of one [rows, D] x [D, block]
product per step), and walks its share of the kept-block list: one step per kept block, read in place
from the [B, HKV, S, D] cache with loads masked to the sequence (a partial last block, a StaticCache's
unfilled tail and left padding are never read). The split shares are even cuts of the actual count,
computed in the kernel, so no host sync is needed. Each split stores its normalized partial output and
log2-sum-exp; with one split it stores the final output directly.
Pass 2 (`sparse_decode_attn_combine_kernel`): one program per (query head, token, sequence) merges the
splits with their log-sum-exp.
With DENSE=True the lists are ignored and every block of the sequence is read (dense decoding).
Design notes and measurements: docs/kernels.md.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..triton_common import LOG2E, check_power_of_two, input_precision, interpreting, online_softmax_step


@triton.jit
def sparse_decode_attn_split_kernel(
    q, k, v, o, lse, block_idx, block_count, seq_lens, seq_offsets,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_os, stride_ot, stride_oh,
    stride_lb, stride_ls, stride_lt,
    stride_ib, stride_ih, stride_cb,
    S, K, num_splits, qk_scale,
    G: tl.constexpr, TQ: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
    STORE_LSE: tl.constexpr, DENSE: tl.constexpr, HAS_OFFSETS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """q: [B, HQ, TQ, D]; k, v: [B, HKV, S, D]; block_idx: [B, HKV, K] int32; block_count: [B, HKV]
    int32; seq_lens, seq_offsets: [B]. With STORE_LSE o: [B, num_splits, TQ, HQ, D] float32 partials
    (normalized) and lse: [B, num_splits, TQ, HQ] float32 (log2 units); without (one split) o:
    [B, TQ, HQ, D] in q's dtype, the final output. Grid: (num_splits, HKV, B). num_splits is a
    runtime argument: a dense cache that grows step by step changes it without recompiling."""
    i_split = tl.program_id(0)
    i_kvh = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)  # batch offsets can pass 2**31 elements

    start = 0
    if HAS_OFFSETS:
        start = tl.load(seq_offsets + i_b).to(tl.int32)
    end = tl.minimum(start + tl.load(seq_lens + i_b).to(tl.int32), S)  # never past the cache
    if DENSE:
        count = tl.cdiv(tl.maximum(end - start, 0), BLOCK)
    else:
        count = tl.minimum(tl.maximum(tl.load(block_count + i_b * stride_cb + i_kvh), 0), K)
    chunk = tl.cdiv(count, num_splits)
    e_start = i_split * chunk
    e_end = tl.minimum(e_start + chunk, count)

    # row r: query head i_kvh * G + r // TQ, new token r % TQ (at cache position end - TQ + r % TQ)
    r = tl.arange(0, ROWS)
    row_ok = r < G * TQ
    head = i_kvh * G + r // TQ
    tok = r % TQ
    q_pos = end - TQ + tok
    d = tl.arange(0, D)
    q_tile = tl.load(q + i_b * stride_qb + head[:, None] * stride_qh + tok[:, None] * stride_qt
                     + d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)

    k_head = k + i_b * stride_kb + i_kvh * stride_kh
    v_head = v + i_b * stride_vb + i_kvh * stride_vh
    idx_row = block_idx + i_b * stride_ib + i_kvh * stride_ih
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    for e in range(e_start, e_end):
        if DENSE:
            blk = e
        else:
            blk = tl.load(idx_row + e)
        t_k = start + blk * BLOCK + tl.arange(0, BLOCK)
        in_seq = (t_k >= start) & (t_k < end)  # also a block index past the end or below 0 reads nothing
        k_tile = tl.load(k_head + t_k[:, None] * stride_kt + d[None, :] * stride_kd, mask=in_seq[:, None],
                         other=0.0)
        v_tile = tl.load(v_head + t_k[:, None] * stride_vt + d[None, :] * stride_vd, mask=in_seq[:, None],
                         other=0.0)
        s = tl.dot(q_tile, tl.trans(k_tile), input_precision=INPUT_PRECISION)
        s = tl.where(in_seq[None, :] & (t_k[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, qk_scale, tl.max(s, 1) * qk_scale, m_i, l_i, acc, v_tile,
                                            True, INPUT_PRECISION)

    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_rows = o + i_b * stride_ob + i_split * stride_os + tok * stride_ot + head * stride_oh
    tl.store(o_rows[:, None] + d[None, :], acc.to(o.dtype.element_ty), mask=row_ok[:, None])
    if STORE_LSE:
        row_lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(lse + i_b * stride_lb + i_split * stride_ls + tok * stride_lt + head, row_lse, mask=row_ok)


@triton.jit
def sparse_decode_attn_combine_kernel(
    o_part, lse_part, o,
    stride_pb, stride_ps, stride_pt, stride_ph,
    stride_lb, stride_ls, stride_lt,
    stride_ob, stride_ot, stride_oh,
    num_splits, D: tl.constexpr, SPLIT_TILE: tl.constexpr,
):
    """Merges the splits of one (query head, token, sequence): o = sum_s w_s o_s / sum_s w_s with
    w_s = 2 ** lse_s, SPLIT_TILE splits per step with a running maximum (any split count, one
    compiled kernel). Splits that kept nothing have lse -inf and o 0. Grid: (HQ, TQ, B)."""
    i_h = tl.program_id(0)
    i_t = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    d = tl.arange(0, D)
    lse_row = lse_part + i_b * stride_lb + i_t * stride_lt + i_h
    part_row = o_part + i_b * stride_pb + i_t * stride_pt + i_h * stride_ph
    m = tl.full([], float("-inf"), tl.float32)
    total = tl.zeros([], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for s0 in range(0, num_splits, SPLIT_TILE):
        s = s0 + tl.arange(0, SPLIT_TILE)
        ok = s < num_splits
        lse = tl.load(lse_row + s * stride_ls, mask=ok, other=float("-inf"))
        parts = tl.load(part_row + s[:, None] * stride_ps + d[None, :], mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_use)
        w = tl.exp2(lse - m_use)
        total = total * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(w[:, None] * parts, 0)
        m = m_new
    out = acc / tl.where(total == 0.0, 1.0, total)
    tl.store(o + i_b * stride_ob + i_t * stride_ot + i_h * stride_oh + d, out.to(o.dtype.element_ty))


PROGRAMS_PER_SM = 2  # one wave of this many programs per SM measured best on an H200 (docs/kernels.md)
MIN_BLOCKS_PER_SPLIT = 4
SPLIT_TILE = 16  # splits merged per step of the combine kernel


@functools.lru_cache(maxsize=None)
@functools.cache
def multiprocessor_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_count(pairs, max_blocks, device):
    """Splits per (sequence, KV head): as many as fill one wave of PROGRAMS_PER_SM programs per SM (a
    second, partial wave costs more than it spreads), each with at least MIN_BLOCKS_PER_SPLIT blocks
    of the longest possible list. pairs = B * HKV; max_blocks: the list width K (sparse) or the cache's
    blocks (dense). Host-side shapes only, so the launch needs no device sync (CUDA graphs)."""
    sms = 16 if interpreting() else multiprocessor_count(device.index or 0)
    return max(1, min(PROGRAMS_PER_SM * sms // pairs, triton.cdiv(max_blocks, MIN_BLOCKS_PER_SPLIT)))


def check_decode_inputs(q, k_cache, v_cache, block_idx, block_count, block_size, seq_lens, seq_offsets):
    """Argument checks of the launcher (shapes, dtypes, devices; no data-dependent check, which would
    need a device sync). Returns (B, HQ, TQ, HKV, S, D)."""
    if q.dim() not in (3, 4) or k_cache.dim() != 4:
        raise ValueError(f"expected q [B, HQ, D] or [B, HQ, TQ, D] and k_cache [B, HKV, S, D]; found "
                         f"{tuple(q.shape)} and {tuple(k_cache.shape)}")
    B, HQ, D = q.shape[0], q.shape[1], q.shape[-1]
    TQ = q.shape[2] if q.dim() == 4 else 1
    HKV, S = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape != (B, HKV, S, D) or v_cache.shape != k_cache.shape or HKV == 0 or HQ % HKV:
        raise ValueError(f"expected k_cache and v_cache of one shape [B={B}, HKV, S, D={D}] with HQ={HQ} "
                         f"a multiple of HKV; found {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    dtypes = (q.dtype, k_cache.dtype, v_cache.dtype)
    if dtypes[0] not in (torch.float16, torch.bfloat16, torch.float32) or len(set(dtypes)) != 1:
        raise ValueError(f"expected q, k_cache, v_cache of one dtype among float16, bfloat16, float32; "
                         f"found {', '.join(map(str, dtypes))}")
    tensors = [x for x in (q, k_cache, v_cache, block_idx, block_count, seq_lens, seq_offsets) if x is not None]
    if not (q.is_cuda or interpreting()) or any(x.device != q.device for x in tensors):
        raise ValueError(f"expected every tensor on one CUDA device (or TRITON_INTERPRET=1); found "
                         f"{', '.join(str(x.device) for x in tensors)}")
    check_power_of_two("head_dim", D, 16, 256)
    check_power_of_two("block_size", block_size, 16, 128)
    if HQ // HKV * TQ > 128:
        raise ValueError(f"expected (HQ / HKV) * TQ <= 128 query rows per KV head; found "
                         f"{HQ // HKV} * {TQ}")
    if (block_idx is None) != (block_count is None):
        raise ValueError("expected block_idx and block_count both given (sparse) or both None (dense); "
                         f"found block_idx {'None' if block_idx is None else 'given'}, block_count "
                         f"{'None' if block_count is None else 'given'}")
    if block_idx is not None:
        if block_idx.dim() != 3 or block_idx.shape[:2] != (B, HKV):
            raise ValueError(f"expected block_idx [B={B}, HKV={HKV}, K]; found {tuple(block_idx.shape)}")
        if tuple(block_count.shape) != (B, HKV):
            raise ValueError(f"expected block_count [B={B}, HKV={HKV}]; found {tuple(block_count.shape)}")
        if block_idx.is_floating_point() or block_count.is_floating_point():
            raise ValueError(f"expected integer block_idx and block_count; found {block_idx.dtype} and "
                             f"{block_count.dtype}")
    for name, x in (("seq_lens", seq_lens), ("seq_offsets", seq_offsets)):
        if x is not None and (tuple(x.shape) != (B,) or x.is_floating_point()):
            raise ValueError(f"expected {name} [B={B}] of integers; found {tuple(x.shape)} {x.dtype}")
    return B, HQ, TQ, HKV, S, D


def sparse_decode_attn_fwd(q, k_cache, v_cache, block_idx, block_count, block_size, seq_lens, scale=None,
                           seq_offsets=None, num_splits=None, num_warps=None, num_stages=None):
    """Launcher. Shapes as in `triton_sparse_decode_attention`; block_idx = block_count = None is
    dense decoding. num_splits / num_warps / num_stages override the heuristic (tests, benchmarks)."""
    B, HQ, TQ, HKV, S, D = check_decode_inputs(q, k_cache, v_cache, block_idx, block_count, block_size,
                                               seq_lens, seq_offsets)
    G = HQ // HKV
    q4 = q[:, :, None] if q.dim() == 3 else q
    dense = block_idx is None
    if dense:
        block_idx = block_count = seq_lens  # unused by the kernel
        K = 0
    else:
        K = block_idx.shape[-1]
        if block_idx.dtype != torch.int32 or block_idx.stride(-1) != 1:
            block_idx = block_idx.to(torch.int32).contiguous()
        if block_count.dtype != torch.int32 or block_count.stride(-1) != 1:
            block_count = block_count.to(torch.int32).contiguous()
    ns = num_splits or split_count(B * HKV, triton.cdiv(S, block_size) if dense else K, q.device)
    scale = D**-0.5 if scale is None else scale
    o = torch.empty(B, TQ, HQ, D, dtype=q.dtype, device=q.device)
    if ns > 1:
        part = torch.empty(B, ns, TQ, HQ, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, ns, TQ, HQ, dtype=torch.float32, device=q.device)
    else:
        part = o.unsqueeze(1)
        lse = o  # unused
    sparse_decode_attn_split_kernel[(ns, HKV, B)](
        q4, k_cache, v_cache, part, lse, block_idx, block_count, seq_lens,
        seq_offsets if seq_offsets is not None else seq_lens,
        *q4.stride(), *k_cache.stride(), *v_cache.stride(),
        part.stride(0), part.stride(1), part.stride(2), part.stride(3),
        lse.stride(0), lse.stride(1) if ns > 1 else 0, lse.stride(2) if ns > 1 else 0,
        block_idx.stride(0), block_idx.stride(1) if not dense else 0, block_count.stride(0),
        S, K, ns, scale * LOG2E,
        G=G, TQ=TQ, ROWS=max(16, triton.next_power_of_2(G * TQ)), D=D, BLOCK=block_size,
        STORE_LSE=ns > 1, DENSE=dense, HAS_OFFSETS=seq_offsets is not None,
        INPUT_PRECISION=input_precision(q.dtype),
        num_warps=num_warps or 4, num_stages=num_stages or (1 if interpreting() else 3),
    )
    if ns > 1:
        sparse_decode_attn_combine_kernel[(HQ, TQ, B)](
            part, lse, o, part.stride(0), part.stride(1), part.stride(2), part.stride(3),
            lse.stride(0), lse.stride(1), lse.stride(2), o.stride(0), o.stride(1), o.stride(2),
            ns, D=D, SPLIT_TILE=SPLIT_TILE, num_warps=4,
        )
    return o[:, 0] if q.dim() == 3 else o


def triton_sparse_decode_attention(q, k_cache, v_cache, block_idx, block_count, block_size, seq_lens,
                                   scale=None, seq_offsets=None):
    """Attention of each sequence's newest token(s) over the kept key blocks of its KV cache, read in
    place (no gather copy).

    Args:
        q: [B, HQ, D] or [B, HQ, TQ, D] (the last TQ tokens, causal among themselves); any strides.
        k_cache, v_cache: [B, HKV, S, D] (any strides; HQ % HKV == 0, GQA never repeated).
        block_idx: [B, HKV, K] int, distinct kept blocks per KV head in any order, first block_count
            valid (an index past the sequence or below 0 selects nothing); None (with block_count
            None): dense decoding, every block of the sequence.
        block_count: [B, HKV] int in [0, K].
        block_size: power of two in [16, 128]; block j of sequence b is the cache positions
            seq_offsets[b] + j * block_size + [0, block_size).
        seq_lens: [B] int, tokens per sequence (new tokens included, padding excluded); the sequence
            is the cache positions [seq_offsets[b], seq_offsets[b] + seq_lens[b]), at most S.
        scale: default D ** -0.5. seq_offsets: [B] int or None (left padding).

    Returns:
        o: [B, HQ, D] for a 3-D q, [B, TQ, HQ, D] for a 4-D q, in q.dtype (0 where nothing is kept).
    """
    return sparse_decode_attn_fwd(q, k_cache, v_cache, block_idx, block_count, block_size, seq_lens,
                                  scale=scale, seq_offsets=seq_offsets)
