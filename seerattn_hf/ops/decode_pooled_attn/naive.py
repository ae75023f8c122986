"""Torch reference of dense causal attention plus the decode target: each token's attention
pooled over each complete key block before its own block ("block_max": its largest probability
there, maxed over the GQA group; "block_mass": the probability mass it puts there, averaged over
the GQA group)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# How one token's attention probabilities over a key block (and over its GQA group) become one entry.
DECODE_TARGETS = ("block_max", "block_mass")


def check_decode_target(target: str) -> None:
    if target not in DECODE_TARGETS:
        raise ValueError(f"decode target: expected one of {list(DECODE_TARGETS)}, found {target!r}")


def naive_decode_pooled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    seq_offsets: torch.Tensor | None = None,
    first_query: int = 0,
    target: str = "block_max",
):
    """Dense causal attention and, per query token, its probabilities pooled over each of the decode
    selector's candidate blocks (float32 compute).

    Token t of a sequence starting at `off` sits in block (t - off) // block_size. Its candidates are
    the complete blocks before that one, j < (t - off) // block_size (`decode_selection.candidate_mask`
    for a decode step at t): its own block is always read, so it is no part of the target, though its
    keys count in the softmax as at decoding time.

    Args:
        q: [B, HQ, T, D]; k, v: [B, HKV, T, D] with HQ % HKV == 0 (GQA, not repeated).
        block_size: tokens per block; NB = ceil(T / block_size).
        scale: softmax scale, default D ** -0.5.
        seq_offsets: [B] int or None: sequence b occupies [off_b, T); blocks are counted from off_b.
        first_query: the target covers query positions t >= first_query only (TQ = T - first_query).
        target: "block_max": the max over the GQA group's query heads and the keys of block j of the
            probabilities of row t (the paper's); "block_mass": the sum of row t's probabilities over
            the keys of block j, averaged over the GQA group's query heads: the share of the group's
            attention that reading block j preserves. The group shares one selection, and the mass
            it keeps, summed over the group, is the sum over the kept blocks of this mean: top-k of
            it keeps the most (the max over the group would rank a block one head needs as high as
            one every head needs).

    Returns:
        o: [B, T, HQ, D] in q.dtype (padding rows 0);
        target: [B, HKV, TQ, NB] float32: target[b, h, t - first_query, j] = the pooled value of
        row t on block j, for candidate blocks j, divided by the row's sum over its candidates; 0
        elsewhere (rows without a candidate are 0).
    """
    check_decode_target(target)
    B, HQ, T, D = q.shape
    HKV = k.shape[1]
    G = HQ // HKV
    NB = (T + block_size - 1) // block_size
    scale = D**-0.5 if scale is None else scale
    dev = q.device
    o = torch.zeros(B, HKV, G, T, D, dtype=torch.float32, device=dev)
    out = torch.zeros(B, HKV, T, NB, dtype=torch.float32, device=dev)
    for b in range(B):
        off = 0 if seq_offsets is None else int(seq_offsets[b])
        qb = q[b].float().reshape(HKV, G, T, D)
        kb, vb = k[b].float()[:, None], v[b].float()[:, None]
        for q0 in range(off, T, block_size):  # one query block at a time, never the full T x T matrix
            q1 = min(q0 + block_size, T)
            t = torch.arange(q0, q1, device=dev)
            s = torch.matmul(qb[:, :, q0:q1], kb[:, :, off:q1].transpose(-1, -2)) * scale
            s = s.masked_fill(torch.arange(off, q1, device=dev) > t[:, None], float("-inf"))
            p = torch.softmax(s, dim=-1)  # [HKV, G, m, q1 - off]
            o[b, :, :, q0:q1] = torch.matmul(p, vb[:, :, off:q1])
            blocks = (q0 - off) // block_size + 1
            p = F.pad(p, (0, blocks * block_size - p.shape[-1]))
            tiles = p.unflatten(-1, (blocks, block_size))  # [HKV, G, m, blocks, block_size]
            if target == "block_max":
                pooled = tiles.amax(dim=(1, -1))  # [HKV, m, blocks]
            else:
                pooled = tiles.sum(dim=-1).mean(dim=1)
            candidate = torch.arange(blocks, device=dev) < ((t - off) // block_size)[:, None]
            out[b, :, q0:q1, :blocks] = pooled * candidate
    out = out[:, :, first_query:]
    out = out / out.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return o.reshape(B, HQ, T, D).transpose(1, 2).to(q.dtype), out
