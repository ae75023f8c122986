"""Sparse decoding attention over a KV cache: torch reference and Triton split-KV kernel.

The Triton function imports its module on first call, so importing this package needs no Triton.
"""

from .naive import naive_sparse_decode_attention


def triton_sparse_decode_attention(q, k_cache, v_cache, block_idx, block_count, block_size, seq_lens,
                                   scale=None, seq_offsets=None):
    """Triton version of `naive_sparse_decode_attention` (same arguments, shapes and results)."""
    from .triton import triton_sparse_decode_attention as fn

    return fn(q, k_cache, v_cache, block_idx, block_count, block_size, seq_lens, scale=scale,
              seq_offsets=seq_offsets)


__all__ = ["naive_sparse_decode_attention", "triton_sparse_decode_attention"]
