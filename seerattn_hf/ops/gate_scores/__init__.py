"""The gate in two fused steps, each with its torch reference: pooling with the per-head maps
(`gate_projection`), then block RoPE, scores and softmax (`gate_scores`); and the ranking methods'
selection of kept blocks in one kernel (`topk_block_lists`, whose reference is
`selectors.select_block_lists`).

The Triton functions import their module on first call, so importing this package needs no Triton.
"""

import torch

from .naive import NORMALIZATIONS, block_rope, naive_gate_projection, naive_gate_scores


def triton_gate_projection(x, weight, kinds, block_size, key_length, seq_offsets, dtype=torch.float32):
    """Triton version of `naive_gate_projection` (float32 compute; same arguments, shapes and results)."""
    from .triton import triton_gate_projection as fn

    return fn(x, weight, kinds, block_size, key_length, seq_offsets, dtype=dtype)


def triton_gate_scores(gate_q, gate_k, diagonal, inv_freq, block_size, rope_scaling=1.0, normalize="none"):
    """Triton version of `naive_gate_scores` (float32 inputs; same arguments, shapes and results)."""
    from .triton import triton_gate_scores as fn

    return fn(gate_q, gate_k, diagonal, inv_freq, block_size, rope_scaling=rope_scaling, normalize=normalize)


def triton_topk_block_lists(scores, diagonal, row_valid, budget, keep_first, keep_recent, keep_diagonal):
    """The kept-block lists of the ranking selections (`selectors.select_block_lists`, their spec) in one kernel."""
    from .triton import triton_topk_block_lists as fn

    return fn(scores, diagonal, row_valid, budget, keep_first, keep_recent, keep_diagonal)


__all__ = ["NORMALIZATIONS", "block_rope", "naive_gate_projection", "naive_gate_scores", "triton_gate_projection",
           "triton_gate_scores", "triton_topk_block_lists"]
