"""Block-sparse causal attention: torch reference, Triton kernel, FlexAttention comparison backend,
FlashAttention-4 optional backend.

The Triton, Flex and FA4 functions import their modules on first call, so importing this package
needs neither Triton, torch's flex attention nor FA4.
"""

from .naive import naive_block_sparse_attention


def triton_block_sparse_attention(q, k, v, block_idx, block_count, block_size, scale=None,
                                  seq_offsets=None, return_lse=False):
    """Triton version of `naive_block_sparse_attention` (same arguments, shapes and results)."""
    from .triton import triton_block_sparse_attention as fn

    return fn(q, k, v, block_idx, block_count, block_size, scale=scale, seq_offsets=seq_offsets,
              return_lse=return_lse)


def flex_block_sparse_attention(q, k, v, block_idx, block_count, block_size, scale=None,
                                seq_offsets=None, return_lse=False):
    """FlexAttention version of `naive_block_sparse_attention` (GPU only; a comparison backend)."""
    from .flex import flex_block_sparse_attention as fn

    return fn(q, k, v, block_idx, block_count, block_size, scale=scale, seq_offsets=seq_offsets,
              return_lse=return_lse)


def fa4_block_sparse_attention(q, k, v, block_idx, block_count, block_size, scale=None,
                               seq_offsets=None, return_lse=False):
    """FlashAttention-4 version of `naive_block_sparse_attention` (GPU only; unpadded batches)."""
    from .fa4 import fa4_block_sparse_attention as fn

    return fn(q, k, v, block_idx, block_count, block_size, scale=scale, seq_offsets=seq_offsets,
              return_lse=return_lse)


__all__ = ["naive_block_sparse_attention", "triton_block_sparse_attention",
           "flex_block_sparse_attention", "fa4_block_sparse_attention"]
