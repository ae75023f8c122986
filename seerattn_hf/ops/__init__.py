"""Attention kernels, each with its torch reference.

`block_sparse_attn`: causal attention over kept key blocks only (prefill with a gate mask).
`pooled_attn`: dense causal attention that also returns the block-max-pooled probability map
(the gate's distillation target).
`decode_attn`: attention of each sequence's newest token(s) over the kept key blocks of its KV cache,
read in place (sparse decoding). `gate_scores`: the gate's block RoPE, scores and softmax in one
kernel. `triton_common`: helpers the Triton kernels share.
Triton is imported only when a Triton function is first called.
"""
