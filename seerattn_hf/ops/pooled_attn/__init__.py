"""Dense causal attention plus the block-pooled probability map (the gate's training target:
"block_max" or "block_mass").

The Triton function imports its module on first call, so importing this package needs no Triton.
"""

from .naive import POOLED_TARGETS, check_pooled_target, naive_pooled_attention


def triton_pooled_attention(q, k, v, block_size, scale=None, seq_offsets=None, target="block_max"):
    """Triton version of `naive_pooled_attention` (same arguments, shapes and results)."""
    from .triton import triton_pooled_attention as fn

    return fn(q, k, v, block_size, scale=scale, seq_offsets=seq_offsets, target=target)


__all__ = ["POOLED_TARGETS", "check_pooled_target", "naive_pooled_attention", "triton_pooled_attention"]
