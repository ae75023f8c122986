"""Dense causal attention plus, for every query token, its attention pooled over each complete
earlier key block (the decode gate's training target: "block_max" or "block_mass").

The Triton function imports its module on first call, so importing this package needs no Triton.
"""

from .naive import DECODE_TARGETS, check_decode_target, naive_decode_pooled_attention


def triton_decode_pooled_attention(q, k, v, block_size, scale=None, seq_offsets=None, first_query=0,
                                   target="block_max"):
    """Triton version of `naive_decode_pooled_attention` (same arguments, shapes and results)."""
    from .triton import triton_decode_pooled_attention as fn

    return fn(q, k, v, block_size, scale=scale, seq_offsets=seq_offsets, first_query=first_query, target=target)


__all__ = ["DECODE_TARGETS", "check_decode_target", "naive_decode_pooled_attention",
           "triton_decode_pooled_attention"]
