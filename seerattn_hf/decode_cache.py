"""Per-block key summaries that follow a layer's KV cache through `generate()`.

A generated token's decode selector scores the complete key blocks of its sequence from small
per-block summaries instead of the keys themselves: the decode gate's keys (`[h]` per block and KV
head, 1/128 of the K/V cache at h = D and 64-token blocks) and, for the Quest bound, the per-block
elementwise max and min of the keys.

Summaries are derived data, and only complete blocks are ever scored. A call refreshes the blocks its
new tokens touch, each recomputed whole from the keys in the cache (the cache holds post-RoPE keys; the
gate's pre-RoPE keys are recovered by undoing the rotation exactly); a decoding step whose token
completes no block refreshes nothing, since the block it extends is recomputed when it completes. A
cropped cache needs no more than its new length: blocks past it are recomputed before they are read
again. Only operations that permute or resize the batch (beam search, `batch_select_indices`, ...)
must be mirrored: the summaries hang on the cache layer object and its batch methods are wrapped.

Blocks are counted from each sequence's first real token (left padding: `seq_offsets`).
"""

from __future__ import annotations

import torch

from .decode_gate import SeerDecodeGate, pool_key_blocks
from .rope import apply_rope

CACHE_ATTRIBUTE = "seer_key_blocks"
# Cache-layer methods that reorder or resize the batch, mirrored on the summaries.
BATCH_METHODS = ("reorder_cache", "batch_select_indices", "batch_repeat_interleave")


def static_address(tensor: torch.Tensor) -> torch.Tensor:
    """Tag a tensor that compiled decoding updates in place, as transformers tags its static KV cache:
    CUDA graphs then take it as a fixed input instead of skipping the graph."""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(tensor)
    return tensor


class KeyBlockCache:
    """The summaries of one layer's cache. Tensors are allocated on first use, with one spare block
    slot at the end that takes the writes of blocks that do not exist (every write is a fixed-shape
    scatter, with no data-dependent control flow).

    Eager calls keep two Python ints in step with the cache, so that no call reads a tensor back from
    the device and a decoding step completing no block costs nothing: `cache_tokens`, the cache's
    positions (padding included), and `summarized_tokens`, how many of them the summaries account for
    (None: all of them). A compiled decoding step cannot keep ints without recompiling at every step:
    it recomputes the newest block of each sequence from the cache (a fixed-shape update) and leaves
    `cache_tokens` None (unknown), which the next eager call reads back from the device once.
    """

    def __init__(self, block_size: int, cache_tokens: int | None = 0):
        self.block_size = block_size
        self.gate_keys: torch.Tensor | None = None  # [B, HKV, NB + 1, h] float32
        self.key_max: torch.Tensor | None = None  # [B, HKV, NB + 1, D] the cache's dtype
        self.key_min: torch.Tensor | None = None
        self.cache_tokens: int | None = cache_tokens
        self.summarized_tokens: int | None = 0
        # What the summaries hold ("gate", "quest"); a change means recomputing every block.
        self.kinds: frozenset[str] = frozenset()
        # Each sequence's padding length modulo the block size: where its blocks complete (read from
        # the device once, at the first refresh; a batch reorder keeps the set).
        self.offset_residues: frozenset[int] | None = None

    # -- following the cache ------------------------------------------------------------------

    def _tensors(self):
        return [name for name in ("gate_keys", "key_max", "key_min") if getattr(self, name) is not None]

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        for name in self._tensors():
            tensor = getattr(self, name)
            setattr(self, name, static_address(tensor.index_select(0, beam_idx.to(tensor.device))))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for name in self._tensors():
            setattr(self, name, static_address(getattr(self, name)[indices]))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for name in self._tensors():
            setattr(self, name, static_address(getattr(self, name).repeat_interleave(repeats, dim=0)))

    def cropped(self, cache_tokens: int) -> None:
        """The cache now holds `cache_tokens` positions; summaries of blocks past them are stale. A
        cache that was summarized throughout still is: a block the crop left partial is recomputed
        whole when it completes, as always."""
        if self.summarized_tokens is not None:
            self.summarized_tokens = min(self.summarized_tokens, cache_tokens)
        self.cache_tokens = cache_tokens

    def reset(self) -> None:
        self.cache_tokens, self.summarized_tokens = 0, None
        self.offset_residues = None

    def count(self, new_tokens: int) -> None:
        """A call added `new_tokens` positions without refreshing the summaries."""
        if torch.compiler.is_compiling():
            # Compiled dense decoding: how far the summaries reach is no longer known; the next
            # refresh recomputes every block.
            self.cache_tokens, self.summarized_tokens = None, 0
            return
        if self.summarized_tokens is None:
            self.summarized_tokens = self.cache_tokens if self.cache_tokens is not None else 0
        if self.cache_tokens is not None:
            self.cache_tokens += new_tokens

    # -- refreshing --------------------------------------------------------------------------

    def _storage(self, name: str, shape: tuple[int, ...], dtype, device) -> torch.Tensor:
        """The tensor `name` with room for `shape[2] - 1` blocks, grown (contents kept) when needed."""
        tensor = getattr(self, name)
        if tensor is None or tensor.shape[0] != shape[0] or tensor.dtype != dtype or tensor.device != device:
            tensor = static_address(torch.zeros(shape, dtype=dtype, device=device))
        elif tensor.shape[2] < shape[2]:
            grown = torch.zeros(shape, dtype=dtype, device=device)
            grown[:, :, : tensor.shape[2] - 1] = tensor[:, :, :-1]
            tensor = static_address(grown)
        setattr(self, name, tensor)
        return tensor

    def refresh(self, keys: torch.Tensor, seq_offsets: torch.Tensor, seq_lens: torch.Tensor, new_tokens: int,
                gate: SeerDecodeGate | None, key_rope: tuple[torch.Tensor, float] | None, quest: bool) -> None:
        """Account for a call that added `new_tokens` positions: recompute the summaries of every block
        holding a position not summarized yet.

        keys: `[B, HKV, S, D]` the layer's post-RoPE key cache (S >= the positions in use);
        seq_offsets / seq_lens: `[B]` leading padding positions and real tokens of each sequence (the
        new ones included). key_rope: the model's own rope (inverse frequencies, scaling) at head_dim,
        to recover the gate's pre-RoPE keys. quest: also keep per-block key extremes.
        """
        kinds = frozenset(kind for kind, wanted in (("gate", gate is not None), ("quest", quest)) if wanted)
        if kinds != self.kinds:
            self.kinds, self.summarized_tokens = kinds, 0
        size = self.block_size
        capacity_blocks = -(-keys.shape[2] // size)
        if torch.compiler.is_compiling():
            if self.summarized_tokens is None and new_tokens == 1:
                newest = (seq_lens - 1).clamp(min=0) // size
                self._recompute(keys, seq_offsets, seq_lens, newest, 1, capacity_blocks, gate, key_rope, quest)
            else:  # every block, in one fixed-shape pass
                first = torch.zeros_like(seq_lens)
                self._recompute(keys, seq_offsets, seq_lens, first, capacity_blocks, capacity_blocks, gate,
                                key_rope, quest)
            self.cache_tokens, self.summarized_tokens = None, None
            return
        if self.cache_tokens is None:  # compiled steps ran: one read from the device
            self.cache_tokens = int((seq_offsets + seq_lens)[0]) - new_tokens
        if self.offset_residues is None or self.summarized_tokens == 0:
            self.offset_residues = frozenset(offset % size for offset in seq_offsets.tolist())
        if (new_tokens == 1 and self.summarized_tokens is None
                and all((self.cache_tokens + 1 - residue) % size for residue in self.offset_residues)):
            self.cache_tokens += 1  # no block completes
            return
        first_position = self.cache_tokens if self.summarized_tokens is None else self.summarized_tokens
        self.cache_tokens += new_tokens
        capacity_blocks = max(capacity_blocks, -(-self.cache_tokens // size))
        count = self.cache_tokens - first_position
        first_block = (first_position - seq_offsets).clamp(min=0) // size
        self._recompute(keys, seq_offsets, seq_lens, first_block, (count + size - 2) // size + 1,
                        capacity_blocks, gate, key_rope, quest)
        self.summarized_tokens = None

    def _recompute(self, keys: torch.Tensor, seq_offsets: torch.Tensor, seq_lens: torch.Tensor,
                   first_block: torch.Tensor, num_blocks: int, capacity_blocks: int,
                   gate: SeerDecodeGate | None, key_rope, quest: bool) -> None:
        """Recompute, whole from the cache, the summaries of blocks `first_block[b] + [0, num_blocks)`
        of each sequence b (those past its last token go to the spare slot); storage holds
        `capacity_blocks` blocks."""
        size = self.block_size
        batch, kv_heads, capacity_tokens, dim = keys.shape
        device = keys.device
        last_block = (seq_lens - 1).clamp(min=0) // size
        blocks = first_block[:, None] + torch.arange(num_blocks, device=device)  # [B, R]
        exists = blocks <= last_block[:, None]
        positions = blocks[..., None] * size + torch.arange(size, device=device)  # [B, R, BS] from the start
        valid = exists[..., None] & (positions < seq_lens[:, None, None])
        cache_index = (positions + seq_offsets[:, None, None]).clamp(max=capacity_tokens - 1)
        gathered = keys.gather(2, cache_index.view(batch, 1, -1, 1).expand(batch, kv_heads, -1, dim))
        gathered = gathered.view(batch, kv_heads, num_blocks, size, dim)
        valid_heads = valid[:, None].expand(batch, kv_heads, num_blocks, size)
        slot = torch.where(exists, blocks, capacity_blocks).view(batch, 1, num_blocks, 1)  # spare slot for none

        if gate is not None:
            inv_freq, scaling = key_rope
            pre_rope = apply_rope(gathered, positions[:, None], inv_freq, scaling, inverse=True)
            pooled = pool_key_blocks(pre_rope, valid_heads, gate.config.k_pooling)
            gate_keys = gate.keys(pooled, blocks * size)
            storage = self._storage("gate_keys", (batch, kv_heads, capacity_blocks + 1, gate_keys.shape[-1]),
                                    torch.float32, device)
            storage.scatter_(2, slot.expand(-1, kv_heads, -1, gate_keys.shape[-1]), gate_keys)
        if quest:
            mask = valid_heads[..., None]
            high = gathered.masked_fill(~mask, float("-inf")).amax(dim=3)
            low = gathered.masked_fill(~mask, float("inf")).amin(dim=3)
            for name, values in (("key_max", high), ("key_min", low)):
                storage = self._storage(name, (batch, kv_heads, capacity_blocks + 1, dim), keys.dtype, device)
                storage.scatter_(2, slot.expand(-1, kv_heads, -1, dim), values.to(keys.dtype))


def _follow(cache_layer) -> None:
    """Wrap, once, the cache layer's methods that change its batch or length, so that the summaries
    attached to it follow."""
    def wrap(name, after):
        original = getattr(cache_layer, name, None)
        if original is None:
            return

        def follow(*args, **kwargs):
            result = original(*args, **kwargs)
            summaries = getattr(cache_layer, CACHE_ATTRIBUTE, None)
            if summaries is not None:
                after(summaries, *args, **kwargs)
            return result

        setattr(cache_layer, name, follow)

    for name in BATCH_METHODS:
        wrap(name, lambda summaries, *args, _name=name, **kwargs: getattr(summaries, _name)(*args, **kwargs))
    wrap("crop", lambda summaries, *args, **kwargs: summaries.cropped(int(cache_layer.get_seq_length())))
    wrap("reset", lambda summaries, *args, **kwargs: summaries.reset())


def key_blocks_of(cache_layer, block_size: int, cache_tokens) -> KeyBlockCache:
    """The `KeyBlockCache` beside a transformers cache layer, attached on first use.

    cache_tokens: positions the cache held before this call (an int, or a callable giving it, called
    only when the summaries are new and not while compiling, which leaves the count unknown).
    """
    summaries = getattr(cache_layer, CACHE_ATTRIBUTE, None)
    if summaries is None or summaries.block_size != block_size:
        if summaries is None:  # the layer's methods are wrapped once, with the first summaries
            _follow(cache_layer)
        if callable(cache_tokens):
            cache_tokens = None if torch.compiler.is_compiling() else cache_tokens()
        summaries = KeyBlockCache(block_size, cache_tokens)
        setattr(cache_layer, CACHE_ATTRIBUTE, summaries)
    return summaries
