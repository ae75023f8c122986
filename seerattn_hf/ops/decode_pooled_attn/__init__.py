"""Dense causal attention plus, for every query token, its attention max-pooled over each complete
earlier key block (the decode gate's training target).

The Triton function imports its module on first call, so importing this package needs no Triton.
"""

from .naive import naive_decode_pooled_attention


def triton_decode_pooled_attention(q, k, v, block_size, scale=None, seq_offsets=None, first_query=0):
    """Triton version of `naive_decode_pooled_attention` (same arguments, shapes and results)."""
    from .triton import triton_decode_pooled_attention as fn

    return fn(q, k, v, block_size, scale=scale, seq_offsets=seq_offsets, first_query=first_query)


__all__ = ["naive_decode_pooled_attention", "triton_decode_pooled_attention"]
