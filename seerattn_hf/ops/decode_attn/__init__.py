"""Sparse decoding attention over a KV cache: torch reference and Triton split-KV kernel, and the
custom op that compiled decoding calls.

The Triton function imports its module on first call, so importing this package needs no Triton.
"""

from __future__ import annotations

import torch

from .naive import naive_sparse_decode_attention


def triton_sparse_decode_attention(q, k_cache, v_cache, block_idx, block_count, block_size, seq_lens,
                                   scale=None, seq_offsets=None):
    """Triton version of `naive_sparse_decode_attention` (same arguments, shapes and results)."""
    from .triton import triton_sparse_decode_attention as fn

    return fn(q, k_cache, v_cache, block_idx, block_count, block_size, seq_lens, scale=scale,
              seq_offsets=seq_offsets)


# A custom op is opaque to torch.compile: the graph calls it as one node (the Triton launcher's
# Python and the reference's loops are not traced), and CUDA graphs capture the kernels it launches.
@torch.library.custom_op("seerattn_hf::sparse_decode_attention", mutates_args=())
def sparse_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_idx: torch.Tensor | None, block_count: torch.Tensor | None, block_size: int,
                            seq_lens: torch.Tensor, scale: float, seq_offsets: torch.Tensor | None,
                            use_triton: bool) -> torch.Tensor:
    """`naive_sparse_decode_attention` (use_triton False) or its Triton kernel, as one op."""
    attend = triton_sparse_decode_attention if use_triton else naive_sparse_decode_attention
    return attend(q, k_cache, v_cache, block_idx, block_count, block_size, seq_lens, scale=scale,
                  seq_offsets=seq_offsets)


@sparse_decode_attention.register_fake
def _(q, k_cache, v_cache, block_idx, block_count, block_size, seq_lens, scale, seq_offsets, use_triton):
    if q.dim() == 3:
        return q.new_empty(q.shape)
    batch, heads, new_tokens, dim = q.shape
    return q.new_empty(batch, new_tokens, heads, dim)


__all__ = ["naive_sparse_decode_attention", "sparse_decode_attention", "triton_sparse_decode_attention"]
