"""Sparse decoding inside the registered attention function: each generated token reads only the
KV blocks its layer's decode selector keeps.

Every call on a layer that decodes sparsely keeps the per-block key summaries beside the model's
KV cache in step (prefill and continued prefill included); a call with one new token per sequence
then scores the complete blocks, keeps the best ones plus the token's own block, and runs the
block-sparse decode kernel over the cache in place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicLayer

from .decode_cache import static_address, key_blocks_of
from .decode_selection import (blocked_slots, decode_block_lists, oracle_mass_scores, oracle_scores, quest_scores,
                               streaming_scores)
from .ops.decode_attn import sparse_decode_attention


class StepExtent:
    """The extent of the sequences in one forward (`sequence_extent`) and what the decoding layers
    derive from it alike, computed by the first layer that needs it (`derived`). Holds the mask and
    position ids it was computed from, so that their ids, which key it, stay unique."""

    def __init__(self, attention_mask, position_ids, offsets: torch.Tensor, lens: torch.Tensor):
        self.attention_mask, self.position_ids = attention_mask, position_ids
        self.offsets, self.lens = offsets, lens
        self.values: dict = {}

    def derived(self, key, make):
        value = self.values.get(key)
        if value is None:
            value = self.values[key] = make()
        return value


class DecodeStep:
    """What the sparse-decoding layers of one forward share: the sequences' extent and the tensors
    every layer derives from it alike (positions, current blocks, candidate masks, the decode gate's
    query rotation), computed once per forward instead of once per layer.

    One object serves all the patched layers of a model. It is emptied when a pass through the layers
    begins (`begin`, from the attention pre-hook: a layer index no later than the last one seen), and
    an entry is found only for the very mask and position-id tensors (and key length) it was made
    from: the layers of one forward are handed the same ones. Not used while compiling (nothing is
    kept: the compiled graph computes each layer's own)."""

    def __init__(self):
        self.last_layer = -1
        self.entries: dict = {}

    def begin(self, layer_idx: int) -> None:
        if layer_idx <= self.last_layer:
            self.entries.clear()
        self.last_layer = layer_idx

    def extent(self, attention_mask, position_ids, batch: int, key_length: int, device) -> StepExtent:
        if torch.compiler.is_compiling():
            return StepExtent(None, None, *sequence_extent(attention_mask, position_ids, batch, key_length, device))
        key = (id(attention_mask), id(position_ids), batch, key_length, device)
        entry = self.entries.get(key)
        if entry is None or entry.attention_mask is not attention_mask or entry.position_ids is not position_ids:
            entry = StepExtent(attention_mask, position_ids,
                               *sequence_extent(attention_mask, position_ids, batch, key_length, device))
            self.entries[key] = entry
        return entry


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
    # Shared by the model's layers (`apply_seer_attention`); a state of its own otherwise.
    step: DecodeStep = field(default_factory=DecodeStep)

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
        # every step, and a CUDA graph replays writes into the same memory. total: `[HKV]` or a
        # scalar, the same for every head.
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
        last = position_ids[:, -1]
        if last.device != device or last.dtype != torch.long:
            last = last.to(device=device, dtype=torch.long)
        return zeros, (last + 1).expand(batch)
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
    extent = state.step.extent(attention_mask, position_ids, batch, key.shape[2], key.device)
    offsets, lens = extent.offsets, extent.lens
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
    current_block, current_column, total = extent.derived(("blocks", size), lambda: _current_blocks(lens, size))
    if selector == "gate":
        if captured_query is None:
            raise RuntimeError(f"layer {state.layer_idx}: the decode gate's pre-RoPE query was not captured")
        if captured_query.shape[1] != 1:
            captured_query = captured_query[:, -1:]
        if captured_query.requires_grad:
            captured_query = captured_query.detach()
        positions = extent.derived("positions", lambda: (lens - 1)[:, None])
        rope = (extent.derived(("gate rope", decode_gate.rope_key()), lambda: decode_gate.query_rope(positions))
                if decode_gate.config.rope else None)
    elif selector in ("oracle", "oracle_mass"):
        pooled = oracle_scores if selector == "oracle" else oracle_mass_scores
        scores = pooled(newest, key, offsets, lens, size, num_blocks, scale)
    elif selector != "quest":
        scores = streaming_scores(batch, key.shape[1], num_blocks, key.device)

    def blocked():  # the slots that are not candidates, `[B, 1, NB]`
        return extent.derived(("blocked", size, num_blocks), lambda: blocked_slots(current_block, num_blocks))

    method, budget = policy.decode_sparsity_method, policy.decode_token_budget
    lists = (current_block, size, method, budget, policy.decode_threshold, policy.decode_keep_first_block)
    if selector in ("gate", "quest"):
        plain = gate_block_lists if selector == "gate" else quest_block_lists
        inputs = ((decode_gate, captured_query, positions, rope, summaries.gate_keys) if selector == "gate"
                  else (newest, summaries.key_max, summaries.key_min))
        compiled = COMPILED_SELECTION.function(plain, key.device)
        if compiled is plain:
            block_idx, block_count = plain(*inputs, num_blocks, *lists, blocked=blocked(),
                                           current_column=current_column)
        else:  # the candidate masks are computed in the graph, fused
            block_idx, block_count = compiled(*inputs, num_blocks, *lists)
    else:
        block_idx, block_count = decode_block_lists(
            scores, current_block, size, method, budget, policy.decode_threshold, policy.decode_keep_first_block,
            probabilities=False, blocked=blocked(), current_column=current_column)
    state.add_counts(block_count.sum(dim=0), total)
    use_triton = key.is_cuda and policy.backend != "torch"  # FA4 has no sparse decoding: our kernel serves it
    output = sparse_decode_attention(newest, key, value, block_idx, block_count, size, lens, scale, offsets,
                                     use_triton)
    return output[:, None]


def _current_blocks(lens: torch.Tensor, size: int):
    """Each sequence's current block `[B]`, as `[B, 1, 1]` int32, and the blocks a step's token
    can read, summed over the batch (a scalar)."""
    current_block = (lens - 1) // size
    return current_block, current_block.view(-1, 1, 1).to(torch.int32), (current_block + 1).sum()


# -- the selection of one layer, optionally compiled -------------------------------------------

def gate_block_lists(gate, query, positions, rope, gate_keys, num_blocks: int, current_block, *lists,
                     blocked=None, current_column=None):
    """The decode gate's kept-block lists: gate query `[B, HKV, 1, h]` of the pre-RoPE query
    `[B, 1, HQ, D]` at `positions` (rotated by `rope`, `SeerDecodeGate.query_rope`, or None), its
    logits against the first `num_blocks` gate keys of `gate_keys: [B, HKV, >= NB, h]`, then
    `decode_block_lists(scores, current_block, *lists, ...)`."""
    scores = gate.scores(gate.queries(query, positions, rope), gate_keys[:, :, :num_blocks])[:, :, 0]
    return decode_block_lists(scores, current_block, *lists, probabilities=True, blocked=blocked,
                              current_column=current_column)


def quest_block_lists(query, key_max, key_min, num_blocks: int, current_block, *lists, blocked=None,
                      current_column=None):
    """Quest's kept-block lists: the bound of the post-RoPE query `[B, HQ, D]` over the extremes of
    the first `num_blocks` blocks of `key_max` / `key_min: [B, HKV, >= NB, D]`."""
    scores = quest_scores(query, key_max[:, :, :num_blocks], key_min[:, :, :num_blocks])
    return decode_block_lists(scores, current_block, *lists, probabilities=False, blocked=blocked,
                              current_column=current_column)


@dataclass
class CompiledSelection:
    """Whether eager decoding runs each layer's selection (gate query, scores, kept-block lists; the
    Quest bound and lists) as one `torch.compile`d graph on `devices`, a few fused kernels in place of
    some thirty launches. Off by default (`SEERATTN_COMPILE_SELECTION=1` turns it on): the first
    decoding step pays the compilation (seconds), and the results, while the same selection, can
    differ from the eager ones in the last bits of the scores (fused arithmetic), hence in a tie.
    Shapes are dynamic (`dynamic=True`): the block count growing, a new batch size or cache capacity
    do not recompile. Under an outer `torch.compile`, and on other devices, the plain functions run."""

    enabled: bool = os.environ.get("SEERATTN_COMPILE_SELECTION", "0") == "1"
    devices: tuple[str, ...] = ("cuda",)
    backend: str = "inductor"
    compiled: dict = field(default_factory=dict)

    def function(self, plain, device):
        if not self.enabled or device.type not in self.devices or torch.compiler.is_compiling():
            return plain
        compiled = self.compiled.get(plain)
        if compiled is None:
            compiled = self.compiled[plain] = torch.compile(plain, fullgraph=True, dynamic=True,
                                                            backend=self.backend)
        return compiled


COMPILED_SELECTION = CompiledSelection()


def compile_selection(enabled: bool = True, backend: str = "inductor", devices: tuple[str, ...] = ("cuda",)) -> None:
    """Turn the compiled per-layer selection of eager decoding on or off (see `CompiledSelection`)."""
    COMPILED_SELECTION.enabled, COMPILED_SELECTION.backend = enabled, backend
    COMPILED_SELECTION.devices = tuple(devices)
    COMPILED_SELECTION.compiled.clear()
