"""Dense causal attention plus the block-max-pooled probability map (the gate's training target).

The Triton function imports its module on first call, so importing this package needs no Triton.
"""

from .naive import naive_pooled_attention


def triton_pooled_attention(q, k, v, block_size, scale=None, seq_offsets=None):
    """Triton version of `naive_pooled_attention` (same arguments, shapes and results)."""
    from .triton import triton_pooled_attention as fn

    return fn(q, k, v, block_size, scale=scale, seq_offsets=seq_offsets)


__all__ = ["naive_pooled_attention", "triton_pooled_attention"]
