"""Attention kernels, each with its torch reference.

`block_sparse_attn`: causal attention over kept key blocks only (prefill with a gate mask).
`pooled_attn`: dense causal attention that also returns the block-max-pooled probability map
(the gate's distillation target). Triton is imported only when a Triton function is first called.
"""
