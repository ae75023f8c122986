"""Torch reference of block-sparse causal attention: the spec of the Triton and Flex versions."""

from __future__ import annotations

import torch

from ...blocks import query_block_rows


def naive_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    block_count: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    seq_offsets: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Causal attention restricted to the kept key blocks of each query block (float32 compute).

    Args:
        q: [B, HQ, TQ, D] (any strides), TQ <= T: the queries of the last TQ positions (a chunk
            continued from a cache; TQ == T for a whole prompt), causal w.r.t. those positions.
        k, v: [B, HKV, T, D], HQ % HKV == 0; query head h reads kv head h // (HQ // HKV).
        block_idx: [B, HM, NB, K] int: kept key blocks of each query block, ascending; only the first
            block_count entries are read. HM == HQ (a mask per query head) or HM == HKV (shared by the
            query heads of a KV group). NB == `blocks.query_block_rows(TQ, T, block_size, seq_offsets)`
            (ceil(T / block_size) when TQ == T): row i is block `first_b + i` of sequence b, first_b
            the block holding the chunk's first real token (a chunk may start inside a block).
            Key block indices count from the sequence's first token.
        block_count: [B, HM, NB] int.
        block_size: tokens per block.
        scale: softmax scale, default D ** -0.5.
        seq_offsets: [B] int or None: sequence b occupies positions [off_b, T) (left padding); its
            blocks are counted from off_b. Padding rows output 0.
        return_lse: also return the log-sum-exp of the scaled scores.

    Returns:
        o: [B, TQ, HQ, D] in q.dtype; with return_lse also lse: [B, HQ, TQ] float32 (-inf where a row
        keeps no key).
    """
    B, HQ, TQ, D = q.shape
    HKV, HM, T = k.shape[1], block_idx.shape[1], k.shape[2]
    rows = query_block_rows(TQ, T, block_size, seq_offsets)
    if HM not in (HQ, HKV) or HQ % HKV:
        raise ValueError(f"expected block lists for each of the {HQ} query heads or each of the {HKV} KV heads "
                         f"(HQ a multiple of HKV); found {HM} heads of lists")
    if TQ > T or block_idx.shape[2] != rows:
        raise ValueError(f"expected q of at most T={T} positions and block_idx [B, HM, {rows}, K]; found "
                         f"q {tuple(q.shape)}, block_idx {tuple(block_idx.shape)}")
    q_start = T - TQ
    G = HQ // HKV
    scale = D**-0.5 if scale is None else scale
    dev = q.device
    o = torch.zeros(B, HKV, G, TQ, D, dtype=torch.float32, device=dev)
    lse = torch.full((B, HKV, G, TQ), float("-inf"), dtype=torch.float32, device=dev)
    heads = torch.arange(HKV, device=dev)[:, None, None]
    offs = torch.arange(block_size, device=dev)
    for b in range(B):
        off = 0 if seq_offsets is None else int(seq_offsets[b])
        qb = q[b].float().reshape(HKV, G, TQ, D)
        kb, vb = k[b].float(), v[b].float()
        # [HKV, G or 1, NB, K]: one list per query head, or one per KV group broadcast over G
        idx = block_idx[b].long().reshape(HKV, -1, *block_idx.shape[2:])
        cnt = block_count[b].long().reshape(HKV, -1, block_idx.shape[2])
        first = max(q_start - off, 0) // block_size
        for i in range((T - off + block_size - 1) // block_size - first):
            q0 = max(off + (first + i) * block_size, q_start)
            q1 = min(off + (first + i + 1) * block_size, T)
            t = torch.arange(q0, q1, device=dev)
            rows_out = slice(q0 - q_start, q1 - q_start)
            # Only as many list slots as this row's longest list: work follows the kept blocks.
            width = int(cnt[..., i].max())
            kept = torch.arange(width, device=dev) < cnt[..., i, None]  # [HKV, g, K]
            pos = off + idx[..., i, :width, None].clamp(0, T) * block_size + offs  # [HKV, g, K, bs]
            valid = (kept[..., None] & (pos < T)).flatten(-2)  # [HKV, g, L]
            pos = pos.flatten(-2).clamp(max=T - 1)
            kk, vv = kb[heads, pos], vb[heads, pos]  # [HKV, g, L, D]
            s = torch.matmul(qb[:, :, rows_out], kk.transpose(-1, -2)) * scale  # [HKV, G, m, L]
            allowed = valid[..., None, :] & (pos[..., None, :] <= t[:, None])
            s = s.masked_fill(~allowed, float("-inf"))
            if return_lse:
                lse[b, :, :, rows_out] = torch.logsumexp(s, dim=-1)
            p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows keeping nothing -> 0
            o[b, :, :, rows_out] = torch.matmul(p, vv)
    o = o.reshape(B, HQ, TQ, D).transpose(1, 2).to(q.dtype)
    return (o, lse.reshape(B, HQ, TQ)) if return_lse else o
