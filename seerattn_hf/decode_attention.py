"""Sparse decoding inside the registered attention function: each generated token reads only the
KV blocks its layer's decode selector keeps.

Every call on a layer that decodes sparsely keeps the per-block key summaries beside the model's
KV cache in step (prefill and continued prefill included); a call with one new token per sequence
then scores the complete blocks, keeps the best ones plus the token's own block, and runs the
block-sparse decode kernel over the cache in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from .decode_cache import static_address, key_blocks_of
from .decode_selection import decode_block_lists, oracle_mass_scores, oracle_scores, quest_scores, streaming_scores
from .ops.decode_attn import sparse_decode_attention


@dataclass
class DecodeLayerState:
    """Decoding state of one patched attention module.

    key_rope: the model's own rope (inverse frequencies, scaling) at head_dim, which recovers the
    pre-RoPE keys the decode gate pools from the cache's post-RoPE keys. cache: the transformers
    cache of the current forward (set by a forward pre-hook: the attention function is not given it).
    """

    layer_idx: int
    block_size: int
    key_rope: tuple[torch.Tensor, float]
    cache: object | None = None
    # Whether some cache of this layer has key summaries, which every later call must keep counting.
    keeps_summaries: bool = False
    kept_blocks: torch.Tensor | None = None
    total_blocks: torch.Tensor | None = None

    def rope_on(self, device) -> tuple[torch.Tensor, float]:
        """`key_rope` on `device`, moved once (a copy from the host at every use would synchronise)."""
        inv_freq, scaling = self.key_rope
        if inv_freq.device != device:
            self.key_rope = (inv_freq.to(device), scaling)
        return self.key_rope

    def cache_layer(self):
        layers = getattr(self.cache, "layers", None)
        return layers[self.layer_idx] if layers is not None and self.layer_idx < len(layers) else None

    def surely_decoding(self, new_tokens: int) -> bool:
        """Whether a call adding `new_tokens` positions to `cache` is a decoding step (one token on a
        cache that holds positions already), where that can be told without reading the device: a
        DynamicCache layer counts its positions in a Python int. False where it cannot (a StaticCache
        counts them in a device tensor): the caller then treats the call as a prompt."""
        if new_tokens != 1:
            return False
        cache_layer = self.cache_layer()
        return isinstance(cache_layer, DynamicLayer) and cache_layer.get_seq_length() > 0

    def prepare_counts(self, kv_heads: int, device) -> None:
        """Allocate the per-KV-head counters (before decoding: a compiled step only adds to them)."""
        if self.kept_blocks is None or self.kept_blocks.shape != (kv_heads,) or self.kept_blocks.device != device:
            self.kept_blocks = static_address(torch.zeros(kv_heads, dtype=torch.long, device=device))
            self.total_blocks = static_address(torch.zeros(kv_heads, dtype=torch.long, device=device))

    def add_counts(self, kept: torch.Tensor, total: torch.Tensor) -> None:
        # Kept on the device, and added in place: reading them would synchronise every layer at
        # every step, and a CUDA graph replays writes into the same memory.
        self.kept_blocks.add_(kept)
        self.total_blocks.add_(total)

    def reset_counts(self) -> None:
        if self.kept_blocks is not None:
            self.kept_blocks.zero_()
            self.total_blocks.zero_()


def cache_argument(kwargs: dict):
    """The cache an attention module is called with (`cache` in transformers >= 5.2x,
    `past_key_values` before); recorded by the module's forward pre-hook (see `patching`)."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def sequence_extent(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, batch: int,
                    key_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(seq_offsets, seq_lens) `[B]` of the newest query row: the leading padding positions and the
    real tokens each sequence holds in the cache, from the mask transformers built (or the position
    ids, or the key length when the batch has neither padding nor spare cache room)."""
    if attention_mask is not None and attention_mask.dim() == 4:
        last_row = attention_mask[:, 0, -1, :]
        allowed = last_row if last_row.dtype == torch.bool else last_row == 0
        allowed = allowed.expand(batch, -1)
        return allowed.int().argmax(dim=-1), allowed.sum(dim=-1)
    if attention_mask is not None and attention_mask.dim() == 2:
        allowed = attention_mask[:, -key_length:].bool()
        return allowed.int().argmax(dim=-1), allowed.sum(dim=-1)
    zeros = torch.zeros(batch, dtype=torch.long, device=device)
    if position_ids is not None:
        # Shared by the batch ([1, T]) when transformers derived them from the cache position.
        return zeros, position_ids[:, -1].to(device).long().expand(batch) + 1
    return zeros, torch.full((batch,), key_length, dtype=torch.long, device=device)


def decode_is_sparse(policy, state: DecodeLayerState, has_decode_gate: bool) -> bool:
    return (policy.decode_selector is not None and state.layer_idx >= policy.decode_start_layer
            and (policy.decode_selector != "gate" or has_decode_gate))


def sparse_decode_step(module, policy, sparse: bool, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask, scale: float, position_ids, captured_query) -> torch.Tensor | None:
    """Keep the layer's key summaries in step and, for one new token per sequence, return the sparse
    decode attention `[B, 1, HQ, D]`; None where the caller computes dense attention (several new
    tokens, no cache, dense decoding, `sparse=False` for the model's dense mode)."""
    state: DecodeLayerState = module.seer_decode_state
    decode_gate = getattr(module, "seer_decode_gate", None)
    cache_layer = state.cache_layer()
    new_tokens = query.shape[2]
    if cache_layer is None:
        return None
    if not (sparse and decode_is_sparse(policy, state, decode_gate is not None)):
        summaries = getattr(cache_layer, "seer_key_blocks", None)
        if summaries is not None:
            summaries.count(new_tokens)
        return None
    batch = query.shape[0]
    offsets, lens = sequence_extent(attention_mask, position_ids, batch, key.shape[2], key.device)
    selector = policy.decode_selector
    summaries = key_blocks_of(cache_layer, state.block_size,
                              lambda: int((offsets + lens)[0]) - new_tokens)
    state.keeps_summaries = True
    summaries.refresh(key, offsets, lens, new_tokens, decode_gate if selector == "gate" else None,
                      state.rope_on(key.device), quest=selector == "quest")
    state.prepare_counts(key.shape[1], key.device)
    if new_tokens != 1:
        return None

    size = state.block_size
    num_blocks = -(-key.shape[2] // size)
    newest = query[:, :, -1]
    if selector == "gate":
        if captured_query is None:
            raise RuntimeError(f"layer {state.layer_idx}: the decode gate's pre-RoPE query was not captured")
        gate_queries = decode_gate.queries(captured_query[:, -1:].detach(), (lens - 1)[:, None])
        scores = decode_gate.scores(gate_queries, summaries.gate_keys[:, :, :num_blocks])[:, :, 0]
    elif selector == "quest":
        scores = quest_scores(newest, summaries.key_max[:, :, :num_blocks], summaries.key_min[:, :, :num_blocks])
    elif selector in ("oracle", "oracle_mass"):
        pooled = oracle_scores if selector == "oracle" else oracle_mass_scores
        scores = pooled(newest, key, offsets, lens, size, num_blocks, scale)
    else:
        scores = streaming_scores(batch, key.shape[1], num_blocks, key.device)
    current_block = (lens - 1) // size
    block_idx, block_count = decode_block_lists(
        scores, current_block, size, policy.decode_sparsity_method, policy.decode_token_budget,
        policy.decode_threshold, policy.decode_keep_first_block, probabilities=selector == "gate")
    state.add_counts(block_count.sum(dim=0), (current_block + 1).sum().expand(block_count.shape[1]))
    use_triton = key.is_cuda and policy.backend != "torch"  # FA4 has no sparse decoding: our kernel serves it
    output = sparse_decode_attention(newest, key, value, block_idx, block_count, size, lens, scale, offsets,
                                     use_triton)
    return output[:, None]
