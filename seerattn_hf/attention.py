"""The attention function registered with transformers: dense, sparse prefill or distillation.

Each patched attention module carries a `SeerLayerState`. The registered function reads it, so
per-layer settings never travel through `forward` keyword arguments (which `generate()` rejects).
Dependencies point one way: this module uses the gate, the selectors and the kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
import torch

from .blocks import num_blocks, valid_block_rows
from .decode_attention import sparse_decode_step
from .decode_distill import DecodeDistillRecord, DecodeDistillSettings, decode_distill_attention
from .gate import SeerGate
from .ops.block_sparse_attn import (
    flex_block_sparse_attention,
    naive_block_sparse_attention,
    triton_block_sparse_attention,
)
from .ops.pooled_attn import naive_pooled_attention, triton_pooled_attention
from .policy import RANKING_METHODS, SparsityPolicy
from .selectors import (
    kept_block_counts,
    pooled_score_probs,
    select_block_lists,
    share_across_kv_group,
    streaming_scores,
)

MODES = ("dense", "sparse", "distill")


@dataclass
class DistillRecord:
    """What one layer produced in distillation mode (one forward).

    target: `[B, HQ, NB, NB]` float32 block max-pooled attention map, rows summing to 1.
    gate_log_probs: `[B, HQ, NB, NB]` float32, differentiable w.r.t. the gate, -inf above the diagonal.
    row_valid: `[B, NB]` bool, query blocks holding real tokens.
    """

    layer_idx: int
    target: torch.Tensor
    gate_log_probs: torch.Tensor
    row_valid: torch.Tensor


@dataclass
class SeerLayerState:
    """Runtime state of one patched attention module. `policy` is replaced (never changed in place)
    by `update_sparsity_config`."""

    layer_idx: int
    block_size: int
    policy: SparsityPolicy
    mode: str = "sparse"
    captured_query: torch.Tensor | None = None
    captured_key: torch.Tensor | None = None
    kept_blocks: torch.Tensor | None = None
    causal_blocks: torch.Tensor | None = None
    distill_record: DistillRecord | None = None
    # What distillation mode trains ("prefill", "decode"), and how decode gates are distilled.
    distill_kinds: tuple[str, ...] = ("prefill",)
    decode_distill: DecodeDistillSettings | None = None
    decode_distill_record: DecodeDistillRecord | None = None
    hooks: list = field(default_factory=list)

    @property
    def needs_gate_inputs(self) -> bool:
        return self.mode == "distill" or (self.mode == "sparse" and "gate" in (self.policy.selector,
                                                                              self.policy.decode_selector))

    def take_captured(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        query, key = self.captured_query, self.captured_key
        self.captured_query = self.captured_key = None
        return query, key

    def add_counts(self, kept: torch.Tensor, causal: torch.Tensor) -> None:
        """Add per-query-head counts (`[HQ]` tensors), kept on the device: reading them would
        synchronise every layer."""
        if self.kept_blocks is None:
            self.kept_blocks, self.causal_blocks = kept, causal
        else:
            self.kept_blocks = self.kept_blocks + kept
            self.causal_blocks = self.causal_blocks + causal


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend in ("triton", "flex") and device.type != "cuda":
        raise ValueError(f"backend={backend!r} needs CUDA tensors, found tensors on {device}; "
                         "use backend='torch' or 'auto' on this device")
    return backend


def block_sparse_attention(query, key, value, block_idx, block_count, block_size, scale,
                           seq_offsets, backend: str) -> torch.Tensor:
    """Dispatch to the block-sparse attention of `backend`; returns `[B, T, HQ, D]`."""
    implementation = {
        "torch": naive_block_sparse_attention,
        "triton": triton_block_sparse_attention,
        "flex": flex_block_sparse_attention,
    }[resolve_backend(backend, query.device)]
    return implementation(query, key, value, block_idx, block_count, block_size, scale=scale,
                          seq_offsets=seq_offsets)


def pooled_attention(query, key, value, block_size, scale, seq_offsets,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention `[B, T, HQ, D]` and the block max-pooled map `[B, HQ, NB, NB]`."""
    implementation = (triton_pooled_attention if resolve_backend(backend, query.device) == "triton"
                      else naive_pooled_attention)
    return implementation(query, key, value, block_size, scale=scale, seq_offsets=seq_offsets)


def same_dtype(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """q, k and v in one dtype for the kernels. They differ under autocast (RoPE promotes q and k to
    the float32 of cos/sin while v stays in the autocast dtype); take the autocast dtype then."""
    if query.dtype == key.dtype == value.dtype:
        return query, key, value
    device_type = query.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else value.dtype
    return query.to(dtype), key.to(dtype), value.to(dtype)


def left_padding_offsets(attention_mask: torch.Tensor | None, batch: int,
                         kv_length: int) -> torch.Tensor | None:
    """Left-padding length of each sequence, read off the mask transformers built, or None.

    Accepts 2D padding masks, 4D boolean (sdpa) and 4D additive float (eager) masks. Anything that
    is not causal attention with left padding is refused: sparse prefill would silently ignore it.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        last_row = attention_mask[:, 0, -1, :]
        allowed = last_row if last_row.dtype == torch.bool else last_row == 0
    elif attention_mask.dim() == 2:
        allowed = attention_mask.bool()
    else:
        raise ValueError(f"SeerAttention expects a 2D or 4D attention mask, found shape {tuple(attention_mask.shape)}")
    allowed = allowed[:, -kv_length:].expand(batch, kv_length)
    offsets = kv_length - allowed.sum(dim=-1)
    positions = torch.arange(kv_length, device=allowed.device)
    if not torch.equal(allowed, positions[None, :] >= offsets[:, None]):
        raise ValueError("SeerAttention sparse prefill supports causal attention with left padding only; "
                         "found a mask with padding on the right or holes (pad on the left: "
                         "tokenizer.padding_side = 'left')")
    return offsets if bool(offsets.any()) else None


def _gate_inputs_or_fail(state: SeerLayerState):
    captured_query, captured_key = state.take_captured()
    if captured_query is None or captured_key is None:
        raise RuntimeError(f"layer {state.layer_idx}: the gate's pre-RoPE query/key were not captured; "
                           "the attention module was called without its q/k projections running")
    return captured_query.detach(), captured_key.detach()


def _selection_scores(state: SeerLayerState, gate: SeerGate, query, key, value, scale,
                      seq_offsets) -> torch.Tensor:
    """`[B, HQ, NB, NB]` block scores for `select_block_lists`: probabilities, or for the ranking
    methods anything in the same order."""
    policy = state.policy
    if policy.selector == "gate":
        captured_query, captured_key = _gate_inputs_or_fail(state)
        # A threshold reads the gate's softmax in its compute dtype, as the published gates do. The
        # ranking methods read float32 log-probabilities, ordered as the raw scores the published
        # top-k ranks (a bf16 softmax would tie the blocks whose probabilities round alike or underflow).
        with torch.no_grad():
            return gate(captured_query, captured_key, seq_offsets,
                        probabilities=policy.sparsity_method not in RANKING_METHODS)
    if policy.selector == "oracle":
        return pooled_attention(query, key, value, state.block_size, scale, seq_offsets, policy.backend)[1]
    if policy.selector == "pooled_score":
        return pooled_score_probs(query, key, state.block_size, seq_offsets)
    # "streaming": the policy guarantees a ranking method (its scores are a ranking, not probabilities).
    blocks = num_blocks(query.shape[2], state.block_size)
    return streaming_scores(query.shape[0], query.shape[1], blocks, query.device)


def seer_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None,
                           dropout: float = 0.0, **kwargs):
    """The function transformers calls in place of its own attention (same signature and result).

    query: `[B, HQ, T, D]` post-RoPE; key/value: `[B, HKV, S, D]`. Returns (`[B, T, HQ, D]`, None).
    """
    state: SeerLayerState | None = getattr(module, "seer_state", None)
    decoding = getattr(module, "seer_decode_state", None)
    # Dense decoding that never kept key summaries has nothing to do here: the model's own attention.
    if (state is not None and state.mode != "distill" and decoding is not None
            and (state.policy.decode_selector is not None or decoding.keeps_summaries)):
        decoded = sparse_decode_step(module, state.policy, state.mode == "sparse", *same_dtype(query, key, value),
                                     attention_mask, scaling if scaling is not None else query.shape[-1] ** -0.5,
                                     kwargs.get("position_ids"), state.captured_query)
        if decoded is not None:
            state.take_captured()
            return decoded.to(value.dtype), None
    query_length, key_length = query.shape[2], key.shape[2]
    prefill = query_length == key_length
    short = state is not None and state.mode == "sparse" and query_length < state.policy.min_sparse_length
    if state is None or state.mode == "dense" or not prefill or short:
        # Layers left without a gate (GateConfig.layers), dense mode, decoding steps, prompts continued
        # from a cache and (sparse mode) short prompts run the model's own attention.
        if state is not None:
            state.take_captured()
        return module.seer_dense_attention(module, query, key, value, attention_mask, scaling=scaling,
                                           dropout=dropout, **kwargs)

    policy, block_size = state.policy, state.block_size
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    query, key, value = same_dtype(query, key, value)
    batch = query.shape[0]
    seq_offsets = left_padding_offsets(attention_mask, batch, key_length)
    row_valid = valid_block_rows(query_length, block_size, seq_offsets, batch, query.device)
    gate: SeerGate = module.seer_gate

    if state.mode == "distill":
        captured_query, captured_key = _gate_inputs_or_fail(state)
        output = None
        if "decode" in state.distill_kinds and hasattr(module, "seer_decode_gate"):
            output, state.decode_distill_record = decode_distill_attention(
                module, state.layer_idx, state.decode_distill, query, key, value, captured_query, captured_key,
                scale, seq_offsets, policy.backend)
        if "prefill" in state.distill_kinds:
            with torch.no_grad():
                output, target = pooled_attention(query, key, value, block_size, scale, seq_offsets,
                                                  policy.backend)
            gate_log_probs = gate(captured_query, captured_key, seq_offsets)
            state.distill_record = DistillRecord(state.layer_idx, target, gate_log_probs, row_valid)
        if output is None:  # decode distillation only, on a layer without a decode gate
            return module.seer_dense_attention(module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
        return output, None

    scores = _selection_scores(state, gate, query, key, value, scale, seq_offsets)
    if policy.mask_sharing == "kv_group":
        scores = share_across_kv_group(scores, key.shape[1])
    block_idx, block_count = select_block_lists(policy, scores, row_valid)
    kept, causal = kept_block_counts(block_count, row_valid)
    # Counted per query head whatever the mask sharing, so the statistics outlive a policy change.
    groups = query.shape[1] // kept.shape[0]
    state.add_counts(kept.repeat_interleave(groups), causal.repeat_interleave(groups))
    output = block_sparse_attention(query, key, value, block_idx, block_count, block_size, scale,
                                    seq_offsets, policy.backend)
    return output, None
