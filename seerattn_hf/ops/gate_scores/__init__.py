"""The gate's scoring (block RoPE, scores, softmax): torch reference and fused Triton kernel.

The Triton function imports its module on first call, so importing this package needs no Triton.
"""

from .naive import NORMALIZATIONS, block_rope, naive_gate_scores


def triton_gate_scores(gate_q, gate_k, diagonal, inv_freq, block_size, rope_scaling=1.0, normalize="none"):
    """Triton version of `naive_gate_scores` (float32 inputs; same arguments, shapes and results)."""
    from .triton import triton_gate_scores as fn

    return fn(gate_q, gate_k, diagonal, inv_freq, block_size, rope_scaling=rope_scaling, normalize=normalize)


__all__ = ["NORMALIZATIONS", "block_rope", "naive_gate_scores", "triton_gate_scores"]
