"""Torch reference of dense causal attention plus its block-pooled probability map."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# How the attention probabilities of a query block x key block tile become one map entry.
POOLED_TARGETS = ("block_max", "block_mass")


def check_pooled_target(target: str) -> None:
    if target not in POOLED_TARGETS:
        raise ValueError(f"pooled attention target: expected one of {list(POOLED_TARGETS)}, found {target!r}")


def naive_pooled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    seq_offsets: torch.Tensor | None = None,
    target: str = "block_max",
):
    """Dense causal attention and the row-normalized block pooling of its probabilities (float32 compute).

    Args:
        q: [B, HQ, T, D]; k, v: [B, HKV, T, D] with HQ % HKV == 0 (GQA, not repeated).
        block_size: tokens per block; NB = ceil(T / block_size).
        scale: softmax scale, default D ** -0.5.
        seq_offsets: [B] int or None: sequence b occupies [off_b, T); blocks are counted from off_b.
        target: "block_max": max of P over query block i x key block j; "block_mass": the mean over
            the (real) queries of block i of the probability mass each puts on key block j, the
            share of attention that keeping block j for row i preserves (rows sum to 1 before the
            normalization already).

    Returns:
        o: [B, T, HQ, D] in q.dtype (padding rows 0);
        pooled: [B, HQ, NB, NB] float32: the pooled tile values (0 above the block diagonal), each
        row divided by its sum (rows outside the sequence are 0). Built one query block at a time,
        never the full T x T matrix.
    """
    check_pooled_target(target)
    B, HQ, T, D = q.shape
    HKV = k.shape[1]
    G = HQ // HKV
    NB = (T + block_size - 1) // block_size
    scale = D**-0.5 if scale is None else scale
    dev = q.device
    o = torch.zeros(B, HKV, G, T, D, dtype=torch.float32, device=dev)
    pooled = torch.zeros(B, HKV, G, NB, NB, dtype=torch.float32, device=dev)
    for b in range(B):
        off = 0 if seq_offsets is None else int(seq_offsets[b])
        qb = q[b].float().reshape(HKV, G, T, D)
        kb, vb = k[b].float()[:, None], v[b].float()[:, None]
        for i in range((T - off + block_size - 1) // block_size):
            q0 = off + i * block_size
            q1 = min(q0 + block_size, T)
            t = torch.arange(q0, q1, device=dev)
            s = torch.matmul(qb[:, :, q0:q1], kb[:, :, off:q1].transpose(-1, -2)) * scale
            s = s.masked_fill(torch.arange(off, q1, device=dev) > t[:, None], float("-inf"))
            p = torch.softmax(s, dim=-1)  # [HKV, G, m, q1 - off]
            o[b, :, :, q0:q1] = torch.matmul(p, vb[:, :, off:q1])
            tiles = F.pad(p, (0, (i + 1) * block_size - p.shape[-1])).unflatten(-1, (i + 1, block_size))
            if target == "block_max":
                pooled[b, :, :, i, : i + 1] = tiles.amax(dim=(-3, -1))
            else:
                pooled[b, :, :, i, : i + 1] = tiles.sum(dim=-1).mean(dim=-2)
    pooled = pooled / pooled.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return o.reshape(B, HQ, T, D).transpose(1, 2).to(q.dtype), pooled.reshape(B, HQ, NB, NB)
