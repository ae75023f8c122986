"""Torch reference of sparse decoding attention: the spec of the Triton kernel."""

from __future__ import annotations

import torch


def naive_sparse_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_idx: torch.Tensor | None,
    block_count: torch.Tensor | None,
    block_size: int,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    seq_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the newest token(s) of each sequence over the kept key blocks of its KV cache
    (float32 compute). Only the kept blocks are gathered; the rest of the cache is never read.

    Sequence b holds the cache positions [off_b, off_b + seq_lens[b]) (off_b = seq_offsets[b], or 0);
    its new tokens are the last TQ of them. Block j of sequence b is the positions
    off_b + j * block_size + [0, block_size) (blocks are counted from the sequence's first token);
    positions of a kept block outside the sequence are ignored (a partial last block; an index past
    the end or below 0 selects nothing).

    Args:
        q: [B, HQ, D] (one new token per sequence) or [B, HQ, TQ, D] (the last TQ tokens of each
            sequence, causal among themselves: speculative / assisted decoding).
        k_cache, v_cache: [B, HKV, S, D], HQ % HKV == 0 (query head h reads KV head h // (HQ // HKV));
            S is the cache capacity (a StaticCache has S > off_b + seq_lens[b]).
        block_idx: [B, HKV, K] int: kept blocks of each KV head (shared by its query heads), distinct,
            in any order; only the first block_count entries are read. None: every block (dense).
        block_count: [B, HKV] int in [0, K], or None with block_idx None.
        block_size: tokens per block.
        seq_lens: [B] int: tokens of each sequence, its new tokens included (padding excluded).
        scale: softmax scale, default D ** -0.5.
        seq_offsets: [B] int or None: left padding, the cache positions before each sequence.

    Returns:
        o: [B, HQ, D] for a 3-D q, [B, TQ, HQ, D] for a 4-D q, in q.dtype; 0 for a query that keeps
        no key.
    """
    one_token = q.dim() == 3
    q4 = q[:, :, None] if one_token else q
    B, HQ, TQ, D = q4.shape
    HKV = k_cache.shape[1]
    G = HQ // HKV
    scale = D**-0.5 if scale is None else scale
    o = torch.zeros(B, TQ, HQ, D, dtype=torch.float32, device=q.device)
    within = torch.arange(block_size, device=q.device)
    for b in range(B):
        start = 0 if seq_offsets is None else int(seq_offsets[b])
        end = start + int(seq_lens[b])
        q_pos = end - TQ + torch.arange(TQ, device=q.device)
        for h in range(HKV):
            if block_idx is None:
                blocks = torch.arange(-(-(end - start) // block_size), device=q.device)
            else:
                blocks = block_idx[b, h, : int(block_count[b, h])].long()
            pos = (start + blocks[:, None] * block_size + within).flatten()
            pos = pos[(pos >= start) & (pos < end)]
            keys, values = k_cache[b, h, pos].float(), v_cache[b, h, pos].float()  # [L, D]
            s = q4[b, h * G:(h + 1) * G].float() @ keys.T * scale  # [G, TQ, L]
            s = s.masked_fill(pos > q_pos[:, None], float("-inf"))
            p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a query keeping nothing -> 0
            o[b, :, h * G:(h + 1) * G] = (p @ values).transpose(0, 1)
    o = o.to(q.dtype)
    return o[:, 0] if one_token else o
