"""The attention function registered with transformers: dense, sparse prefill or distillation.

Each patched attention module carries a `SeerLayerState`. The registered function reads it, so
per-layer settings never travel through `forward` keyword arguments (which `generate()` rejects).
Dependencies point one way: this module uses the gate, the selectors and the kernels.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
import torch

from .blocks import num_blocks, query_block_diagonals, valid_block_rows
from .crossover import auto_min_sparse_length
from .decode_attention import sparse_decode_step
from .decode_distill import DecodeDistillRecord, DecodeDistillSettings, decode_distill_attention
from .gate import SeerGate
from .ops.block_sparse_attn import (
    fa4_block_sparse_attention,
    flex_block_sparse_attention,
    naive_block_sparse_attention,
    triton_block_sparse_attention,
)
from .ops.block_sparse_attn.fa4 import compute_capability, fa4_dense_attention, fa4_unsupported_reason, require_fa4
from .ops.pooled_attn import naive_pooled_attention, triton_pooled_attention
from .policy import RANKING_METHODS, SparsityPolicy
from .rope import apply_rope
from .selectors import (
    fit_thresholds,
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

    target: `[B, HQ, NB, NB]` float32 block-pooled attention map (`SeerLayerState.distill_target`),
        rows summing to 1.
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
    # Whether the capture hooks store the pre-RoPE query / key during the current call: set before
    # the call's projections run, by the attention module's pre-hook (`patching`).
    capture_query: bool = False
    capture_key: bool = False
    kept_blocks: torch.Tensor | None = None
    causal_blocks: torch.Tensor | None = None
    distill_record: DistillRecord | None = None
    # What distillation mode trains ("prefill", "decode"), and how decode gates are distilled.
    distill_kinds: tuple[str, ...] = ("prefill",)
    # The prefill gates' target: a `POOLED_TARGETS` name of ops/pooled_attn.
    distill_target: str = "block_max"
    decode_distill: DecodeDistillSettings | None = None
    decode_distill_record: DecodeDistillRecord | None = None
    hooks: list = field(default_factory=list)
    # (path, backend) -> prompt calls of this layer that took them: the report of
    # `get_sparsity_stats` ("paths", "backends"); decoding steps are not counted.
    calls: Counter = field(default_factory=Counter)
    # Set by `calibration.calibrate_thresholds` for one forward ("layer" or "head"): this layer fits
    # its calibrated thresholds to its own scores, selects with them and keeps them in `calibrated`.
    calibration: str | None = None
    calibrated: torch.Tensor | None = None
    # (policy, device, thresholds tensor): the policy's thresholds of this layer, made once per policy.
    threshold_cache: tuple | None = None

    @property
    def needs_gate_inputs(self) -> bool:
        return self.mode == "distill" or (self.mode == "sparse" and "gate" in (self.policy.selector,
                                                                              self.policy.decode_selector))

    def plan_captures(self, decoding: bool, decodes_with_gate) -> None:
        """Say what this call's capture hooks store. A prompt (or a call that might be one) stores
        both states wherever the gates read them; a decoding step reads the query alone, and only to
        decode sparsely with the decode gate (`decodes_with_gate()`, asked only then): a dense
        decoding step stores nothing, which it would otherwise do in every layer at every token."""
        if not self.needs_gate_inputs:
            self.capture_query = self.capture_key = False
        elif not decoding:
            self.capture_query = self.capture_key = True
        else:
            self.capture_key = False
            self.capture_query = (self.mode == "sparse" and self.policy.decode_selector == "gate"
                                  and decodes_with_gate())

    def take_captured(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        query, key = self.captured_query, self.captured_key
        self.captured_query = self.captured_key = None
        return query, key

    def selection_thresholds(self, scores: torch.Tensor, row_valid: torch.Tensor | None,
                             diagonal: torch.Tensor | None) -> torch.Tensor | None:
        """This layer's calibrated thresholds (`[H]` or `[1]`) under "calibrated_threshold", else None:
        fitted to `scores` while calibrating, else the policy's."""
        policy = self.policy
        if policy.sparsity_method != "calibrated_threshold":
            return None
        if self.calibration is not None:
            self.calibrated = fit_thresholds(policy, scores, row_valid, diagonal, per_head=self.calibration == "head")
            return self.calibrated
        cache = self.threshold_cache
        if cache is None or cache[0] is not policy or cache[1] != scores.device:
            # The model-level check (`check_calibrated_thresholds`) guarantees this layer has them.
            thresholds = torch.tensor(policy.layer_thresholds(self.layer_idx), dtype=torch.float32,
                                      device=scores.device)
            self.threshold_cache = cache = (policy, scores.device, thresholds)
        return cache[2]

    def count_call(self, path: str, backend: str) -> None:
        self.calls[path, backend] += 1

    def add_counts(self, kept: torch.Tensor, causal: torch.Tensor) -> None:
        """Add per-query-head counts (`[HQ]` tensors), kept on the device: reading them would
        synchronise every layer."""
        if self.kept_blocks is None:
            self.kept_blocks, self.causal_blocks = kept, causal
        else:
            self.kept_blocks = self.kept_blocks + kept
            self.causal_blocks = self.causal_blocks + causal


# backend="auto" on CUDA, block-sparse prefill: the configurations (compute-capability major, block
# size, mask sharing) where FlashAttention-4's block-sparse kernel beats our Triton kernel, each with
# the prompt length (key positions) from which it does. scripts/bench_attention.py on the H200, density
# 0.1, ms ours / FA4: 128-token blocks 0.25 / 0.38-0.43 at 8k, 2.03 / 1.72 at 32k, 27.45 / 24.66-25.02
# at 128k (both mask sharings); at 64-token blocks ours is 10-23% faster at every length. Every other
# configuration takes Triton. Dense passes take FA4 wherever it can run (5-24% faster than cuDNN).
AUTO_FA4_SPARSE = {(9, 128, "head"): 32768, (9, 128, "kv_group"): 32768}


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend of the kernels FA4 does not have (pooled attention): "fa4" runs Triton there."""
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend in ("triton", "flex", "fa4") and device.type != "cuda":
        raise ValueError(f"backend={backend!r} needs CUDA tensors, found tensors on {device}; "
                         "use backend='torch' or 'auto' on this device")
    return "triton" if backend == "fa4" else backend


def fused_gate(policy: SparsityPolicy, device: torch.device) -> bool:
    """Whether the gate and the selection run as fused Triton kernels: on CUDA under every backend
    but the torch reference (the block-sparse kernel's backend is chosen separately)."""
    return device.type == "cuda" and policy.backend != "torch"


def sparse_backend(backend: str, query: torch.Tensor, key: torch.Tensor, block_idx: torch.Tensor,
                   block_size: int, seq_offsets) -> str:
    """The block-sparse kernel that runs a call under `backend` (a policy value, or a name this
    returned: it maps to itself): "torch", "triton", "flex" or "fa4". FA4 takes unpadded one-shot
    prefills; left-padded batches and prompts continued from a cache run Triton, also under "fa4"."""
    fa4_takes = seq_offsets is None and key.shape[2] == query.shape[2]
    if backend == "fa4":
        require_fa4(query.device, query.dtype, query.shape[-1], block_size)
        return "fa4" if fa4_takes else "triton"
    sharing = "head" if block_idx.shape[1] == query.shape[1] else "kv_group"
    if (backend == "auto" and query.is_cuda and fa4_takes
            and key.shape[2] >= AUTO_FA4_SPARSE.get((compute_capability(query.device)[0], block_size, sharing),
                                                    math.inf)
            and fa4_unsupported_reason(query.device, query.dtype, query.shape[-1], block_size) is None):
        return "fa4"
    return resolve_backend(backend, query.device)


def block_sparse_attention(query, key, value, block_idx, block_count, block_size, scale,
                           seq_offsets, backend: str) -> torch.Tensor:
    """Dispatch to the block-sparse attention `sparse_backend` picks under `backend`; returns
    `[B, T, HQ, D]`."""
    implementation = {
        "torch": naive_block_sparse_attention,
        "triton": triton_block_sparse_attention,
        "flex": flex_block_sparse_attention,
        "fa4": fa4_block_sparse_attention,
    }[sparse_backend(backend, query, key, block_idx, block_size, seq_offsets)]
    return implementation(query, key, value, block_idx, block_count, block_size, scale=scale,
                          seq_offsets=seq_offsets)


def dense_backend(backend: str, query, key, value, attention_mask, dropout: float, kwargs) -> str:
    """"fa4" where FlashAttention-4 takes this dense pass, else "model" (the model's own attention).

    FA4 takes causal inference passes of more than one query with no mask (transformers passes None
    for an unpadded causal batch), no dropout and no sliding window or soft-capping. Decoding steps
    stay with the model's attention (and the sparse-decoding path)."""
    if backend not in ("auto", "fa4") or query.shape[2] == 1:  # decoding steps: checked first, cheaply
        return "model"
    if backend == "fa4":
        require_fa4(query.device, query.dtype, query.shape[-1])
    elif fa4_unsupported_reason(query.device, query.dtype, query.shape[-1]) is not None:
        return "model"
    takes = (attention_mask is None and not dropout
             and kwargs.get("sliding_window") is None and not kwargs.get("softcap")
             and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)))
    return "fa4" if takes else "model"


def pooled_attention(query, key, value, block_size, scale, seq_offsets, backend: str,
                     target: str = "block_max") -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention `[B, T, HQ, D]` and the block-pooled map `[B, HQ, NB, NB]` of `target`
    ("block_max" or "block_mass")."""
    implementation = (triton_pooled_attention if resolve_backend(backend, query.device) == "triton"
                      else naive_pooled_attention)
    return implementation(query, key, value, block_size, scale=scale, seq_offsets=seq_offsets, target=target)


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
                        probabilities=policy.sparsity_method not in RANKING_METHODS,
                        fused=fused_gate(policy, query.device))
    if policy.selector in ("oracle", "oracle_mass"):
        target = "block_max" if policy.selector == "oracle" else "block_mass"
        return pooled_attention(query, key, value, state.block_size, scale, seq_offsets, policy.backend,
                                target)[1]
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
    if state is not None and query_length == 1 and key_length > 1:
        # A decoding step left to dense attention: the model's own (what `prefill_path` and
        # `dense_backend` choose for it), reached with no more work than this at every token.
        state.take_captured()
        return module.seer_dense_attention(module, query, key, value, attention_mask, scaling=scaling,
                                           dropout=dropout, **kwargs)
    path = "dense" if state is None else prefill_path(state, query, key, attention_mask)
    if path == "dense":
        # Layers left without a gate (GateConfig.layers), dense mode, decoding steps, short prompts
        # and what continued prefill cannot take run dense: the model's own attention, or FA4
        # where `dense_backend` picks it.
        if state is None:
            return module.seer_dense_attention(module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
        state.take_captured()
        backend = dense_backend(state.policy.backend, query, key, value, attention_mask, dropout, kwargs)
        if query_length > 1:  # prompt calls only: decoding steps stay free of bookkeeping
            state.count_call("dense", backend)
        if backend == "fa4":
            return fa4_dense_attention(*same_dtype(query, key, value), scale=scaling), None
        return module.seer_dense_attention(module, query, key, value, attention_mask, scaling=scaling,
                                           dropout=dropout, **kwargs)

    policy, block_size = state.policy, state.block_size
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    query, key, value = same_dtype(query, key, value)
    batch = query.shape[0]
    seq_offsets = left_padding_offsets(attention_mask, batch, key_length)
    gate: SeerGate = module.seer_gate

    if path == "sparse_continued":
        diagonal, row_valid = query_block_diagonals(query_length, key_length, block_size, seq_offsets, batch,
                                                    query.device)
        captured_query, captured_key = _gate_inputs_or_fail(state)
        with torch.no_grad():
            scores = gate(captured_query, _pre_rope_keys(module, key, captured_key, seq_offsets), seq_offsets,
                          probabilities=policy.sparsity_method not in RANKING_METHODS,
                          fused=fused_gate(policy, query.device))
    else:
        diagonal = None
        row_valid = valid_block_rows(query_length, block_size, seq_offsets, batch, query.device)
        if state.mode == "distill":
            return _distill(module, state, query, key, value, attention_mask, scale, seq_offsets, row_valid,
                            scaling, dropout, kwargs)
        scores = _selection_scores(state, gate, query, key, value, scale, seq_offsets)

    if policy.mask_sharing == "kv_group":
        scores = share_across_kv_group(scores, key.shape[1])
    block_idx, block_count = select_block_lists(policy, scores, row_valid, diagonal,
                                                fused=fused_gate(policy, query.device),
                                                thresholds=state.selection_thresholds(scores, row_valid, diagonal))
    kept, causal = kept_block_counts(block_count, row_valid, diagonal)
    # Counted per query head whatever the mask sharing, so the statistics outlive a policy change.
    groups = query.shape[1] // kept.shape[0]
    state.add_counts(kept.repeat_interleave(groups), causal.repeat_interleave(groups))
    state.count_call(path, sparse_backend(policy.backend, query, key, block_idx, block_size, seq_offsets))
    output = block_sparse_attention(query, key, value, block_idx, block_count, block_size, scale,
                                    seq_offsets, policy.backend)
    return output, None


def _distill(module, state: SeerLayerState, query, key, value, attention_mask, scale, seq_offsets, row_valid,
             scaling, dropout, kwargs):
    """Distillation mode: dense attention, and the targets of the gate kinds being trained (each
    layer's `DistillRecord` for prefill gates; for decode gates, the per-token block target of
    `decode_distill_attention`)."""
    policy, block_size, gate = state.policy, state.block_size, module.seer_gate
    captured_query, captured_key = _gate_inputs_or_fail(state)
    output = None
    if "decode" in state.distill_kinds and hasattr(module, "seer_decode_gate"):
        output, state.decode_distill_record = decode_distill_attention(
            module, state.layer_idx, state.decode_distill, query, key, value, captured_query, captured_key,
            scale, seq_offsets, policy.backend)
    if "prefill" in state.distill_kinds:
        with torch.no_grad():
            output, target = pooled_attention(query, key, value, block_size, scale, seq_offsets, policy.backend,
                                              state.distill_target)
        gate_log_probs = gate(captured_query, captured_key, seq_offsets)
        state.distill_record = DistillRecord(state.layer_idx, target, gate_log_probs, row_valid)
    state.count_call("distill", resolve_backend(policy.backend, query.device))
    if output is None:  # decode distillation only, on a layer without a decode gate
        return module.seer_dense_attention(module, query, key, value, attention_mask, scaling=scaling,
                                           dropout=dropout, **kwargs)
    return output, None


def prefill_path(state: SeerLayerState, query: torch.Tensor, key: torch.Tensor, attention_mask) -> str:
    """How a call (query `[B, HQ, TQ, D]`, key `[B, HKV, T, D]`) computes attention: "sparse" (a whole
    prompt), "distill", "sparse_continued" (a chunk of new tokens on top of a cache) or "dense"
    (decoding steps, dense mode, prompts shorter than `min_sparse_length` or, with "auto", than the
    device's crossover, continued prefill with a selector other than the gate or over a cache with
    room for later tokens, e.g. a StaticCache)."""
    query_length, key_length = query.shape[2], key.shape[2]
    continued = query_length < key_length
    # Decoding steps leave first: nothing below runs at every generated token.
    if state.mode == "dense" or (continued and (query_length == 1 or state.mode != "sparse"
                                                or state.policy.selector != "gate")):
        return "dense"
    if state.mode == "sparse":  # distillation trains on every prompt, short ones too
        min_length = state.policy.min_sparse_length
        if min_length == "auto":
            min_length = auto_min_sparse_length(state.policy, query.device, state.block_size, query.shape[1],
                                                key.shape[1], query.shape[3], query.dtype)
        if key_length < min_length:
            return "dense"
    if not continued:
        return state.mode
    return "sparse_continued" if _keys_end_at_the_query(attention_mask) else "dense"


def _keys_end_at_the_query(attention_mask) -> bool:
    """Whether the last key is the last query's own token (a cache allocated ahead, such as a
    StaticCache, hands the attention its empty slots too, masked)."""
    if attention_mask is None or attention_mask.dim() != 4:
        return True
    last = attention_mask[:, 0, -1, -1]
    return bool((last if last.dtype == torch.bool else last == 0).all())


def _pre_rope_keys(module, key: torch.Tensor, captured_key: torch.Tensor,
                   seq_offsets: torch.Tensor | None) -> torch.Tensor:
    """`[B, T, HKV, D]` pre-RoPE keys of all T positions: the cached ones recovered from the cache's
    post-RoPE keys `key: [B, HKV, T, D]` by undoing the model's rotation exactly (at each sequence's
    positions, counted from its first real token as transformers counts them), the new ones as
    captured (`[B, TQ, HKV, D]`). Recomputed at each chunk rather than kept: one elementwise pass
    over the cached keys, with nothing to keep in step with the cache (crops, beam reordering,
    caches built elsewhere)."""
    cached = key.shape[2] - captured_key.shape[1]
    positions = torch.arange(cached, device=key.device)[None, None]
    if seq_offsets is not None:
        positions = positions - seq_offsets.to(key.device)[:, None, None]
    inv_freq, scaling = module.seer_decode_state.rope_on(key.device)
    recovered = apply_rope(key[:, :, :cached], positions, inv_freq, scaling, inverse=True)
    return torch.cat((recovered.to(captured_key.dtype).transpose(1, 2), captured_key), dim=1)
