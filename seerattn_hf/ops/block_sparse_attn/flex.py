"""FlexAttention version of block-sparse attention: a comparison backend for benchmarks and tests.

The kept-block lists become a BlockMask directly: blocks before the diagonal are "full" blocks (no
mask_mod call), the kept diagonal block is a partial block whose mask_mod applies causality and the
sequence end. Left-padded sequences are shifted to start at position 0 first (a copy), because Flex
counts blocks from position 0 while the lists count them from each sequence's start.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def build_block_mask(block_idx, block_count, block_size, T, n_heads, lengths=None, dense_mask_mod=False):
    """BlockMask from kept-block lists. block_idx: [B, HM, NB, K]; block_count: [B, HM, NB];
    n_heads: HQ (lists of HM < HQ heads are repeated to it); lengths: [B] valid tokens per sequence
    (counted from position 0) or None for T. dense_mask_mod: make mask_mod look the kept blocks up
    in a [B, HQ, NB, NB] table too, for eager FlexAttention, which skips no block and obeys only
    mask_mod; compiled kernels read the lists and call mask_mod on diagonal blocks alone."""
    B, HM, NB, K = block_idx.shape
    dev = block_idx.device
    idx = block_idx.long().clamp(0, NB - 1)
    cnt = block_count.long()
    if HM != n_heads:
        idx = idx.repeat_interleave(n_heads // HM, dim=1)
        cnt = cnt.repeat_interleave(n_heads // HM, dim=1)
    if lengths is not None:  # rows past a sequence's own blocks are ignored
        n_seq_blocks = (lengths + block_size - 1) // block_size
        cnt = cnt * (torch.arange(NB, device=dev) < n_seq_blocks[:, None, None])
    rows = torch.arange(NB, device=dev)[:, None]
    kept = torch.arange(K, device=dev) < cnt[..., None]
    n_full = (kept & (idx < rows)).sum(-1)  # ascending lists: a prefix
    has_diag = (kept & (idx == rows)).any(-1)
    pad = max(NB - K, 0)
    full_idx = torch.nn.functional.pad(idx, (0, pad))[..., :NB].int()
    diag_idx = torch.zeros_like(full_idx)
    diag_idx[..., 0] = torch.arange(NB, device=dev, dtype=torch.int32)
    kept_table = None
    if dense_mask_mod:
        kept_table = torch.zeros(B, n_heads, NB, NB + 1, dtype=torch.bool, device=dev)
        kept_table.scatter_(-1, torch.where(kept, idx, NB), True)

    def mask_mod(b, h, q_idx, kv_idx):
        ok = kv_idx <= q_idx
        if lengths is not None:
            ok = ok & (q_idx < lengths[b])
        if kept_table is not None:
            ok = ok & kept_table[b, h, q_idx // block_size, kv_idx // block_size]
        return ok

    return BlockMask.from_kv_blocks(
        has_diag.int(), diag_idx, n_full.int(), full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod,
        seq_lengths=(T, T), compute_q_blocks=False,
    )


def flex_block_sparse_attention(q, k, v, block_idx, block_count, block_size, scale=None,
                                seq_offsets=None, return_lse=False):
    """Same arguments, shapes and results as `naive_block_sparse_attention`, through FlexAttention
    (compiled on CUDA; eager elsewhere, for tests only). lse is optional as there. Whole prompts
    only: a query chunk continued from a cache (fewer queries than keys) is refused."""
    B, HQ, T, D = q.shape
    if k.shape[2] != T:
        raise ValueError(f"the flex backend takes whole prompts (as many queries as keys); found {T} queries "
                         f"and {k.shape[2]} keys: use backend 'triton' or 'torch' for continued prefill")
    if k.shape[1] == 0 or HQ % k.shape[1]:
        raise ValueError(f"expected HQ a multiple of HKV; found HQ={HQ}, HKV={k.shape[1]}")
    lengths = None
    if seq_offsets is not None:
        off = seq_offsets.to(device=q.device, dtype=torch.long)
        lengths = T - off
        src = (torch.arange(T, device=q.device) + off[:, None]).clamp(max=T - 1)  # [B, T]
        q, k, v = (x.gather(2, src[:, None, :, None].expand(-1, x.shape[1], -1, D)) for x in (q, k, v))
    mask = build_block_mask(block_idx, block_count, block_size, T, HQ, lengths,
                            dense_mask_mod=not q.is_cuda)
    options = None
    if q.is_cuda and block_size < 128:
        options = {"BLOCK_M": block_size, "BLOCK_N": block_size}
    fn = _compiled_flex() if q.is_cuda else flex_attention
    o, aux = fn(q, k, v, block_mask=mask, scale=scale, enable_gqa=HQ != k.shape[1],
                kernel_options=options, return_aux=AuxRequest(lse=True))
    lse = aux.lse
    if seq_offsets is not None:  # shift back: position p reads sequence token p - off
        pos = torch.arange(T, device=q.device)
        src = (pos - off[:, None]).clamp(min=0)
        real = (pos >= off[:, None])[:, None, :]
        o = o.gather(2, src[:, None, :, None].expand_as(o)) * real[..., None]
        lse = torch.where(real, lse.gather(2, src[:, None, :].expand_as(lse)), float("-inf"))
    o = o.transpose(1, 2).to(q.dtype)
    return (o, lse.float()) if return_lse else o
