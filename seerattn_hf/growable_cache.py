"""A DynamicCache whose layers write new tokens into preallocated buffers instead of concatenating.

transformers' `DynamicLayer.update` appends a step's keys and values with `torch.cat`, which copies
the whole cache at every step: at batch 16 x 32k context (Llama-3.1-8B shape) that copy was about three
quarters of an eager decoding step's GPU time, more than sparse decoding saves by reading fewer blocks.
A `GrowableLayer` keeps its keys and values in buffers `[B, H, capacity, D]` with room to spare, writes
each call's tokens in place, and exposes `keys` / `values` as views of the filled part,
`buffer[:, :, :length]`: everything that reads a DynamicLayer (its own methods, masks, `generate()`, our
decode path) sees what a DynamicLayer would hold. A full buffer is copied once into a larger one
(`growth` times the capacity, at least `min_growth` more positions), so a position is copied a bounded
number of times over a whole generation; `initial_capacity` reserves room up front, and a cache
reserved for the prompt and every new token never grows.

Eager decoding only: `is_compileable` stays False (compiled decoding takes a StaticCache), and no
gradients flow through the cache (autograd refuses, at backward, tensors written in place after it
saved them). Layers that
are not plain full-attention `DynamicLayer`s (sliding window, linear attention, KV sharing) stay as
transformers makes them.
"""

from __future__ import annotations

import functools
import math

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from .validation import check, is_integer, is_number


def _settings(owner: str, initial_capacity, growth, min_growth) -> dict:
    """The buffer settings, checked (errors name `owner`, the class the user built)."""
    check(is_integer(initial_capacity) and initial_capacity >= 0, owner, "initial_capacity",
          "an int >= 0 (positions allocated per layer at the first update)", initial_capacity)
    check(is_number(growth) and growth >= 1, owner, "growth", "a number >= 1 (the factor a full buffer grows by)",
          growth)
    check(is_integer(min_growth) and min_growth >= 1, owner, "min_growth",
          "an int >= 1 (the fewest positions a buffer grows by)", min_growth)
    return {"initial_capacity": initial_capacity, "growth": growth, "min_growth": min_growth}


class GrowableLayer(DynamicLayer):
    """A DynamicLayer over buffers with spare room: `update` writes in place, `keys` / `values` are views
    `buffer[:, :, :length]` (the length is `keys.shape[-2]`, as for a DynamicLayer).

    initial_capacity: positions allocated at the first update (if it brings more: its length plus
    `min_growth`). growth / min_growth: a full buffer grows to hold `max(min_growth, (growth - 1) *
    capacity)` positions past what the update needs. `capacity`: the positions allocated now.

    The inherited `crop` slices the views, which stay views of the buffers (the positions it removes
    are overwritten by the next update); every method that would replace the views with new tensors
    (batch reorders, offloading) is overridden to act on the buffers.
    """

    def __init__(self, initial_capacity: int = 0, growth: float = 1.5, min_growth: int = 256, **kwargs):
        super().__init__(**kwargs)
        settings = _settings(type(self).__name__, initial_capacity, growth, min_growth)
        self.initial_capacity = settings["initial_capacity"]
        self.growth, self.min_growth = settings["growth"], settings["min_growth"]
        self.key_buffer: torch.Tensor | None = None  # [B, H, capacity, D]
        self.value_buffer: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        """Positions the buffers hold room for (0 before the first update)."""
        return 0 if self.key_buffer is None else self.key_buffer.shape[2]

    def __repr__(self):
        return f"{type(self).__name__}(length={self.get_seq_length()}, capacity={self.capacity})"

    # -- writing -----------------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for name, states in (("key_states", key_states), ("value_states", value_states)):
            if states.dim() != 4:
                raise ValueError(f"{type(self).__name__}.update: expected {name} [B, H, T, D]; found shape "
                                 f"{tuple(states.shape)}")
        super().lazy_initialization(key_states, value_states)  # device (and dtype) as transformers records them
        self.key_buffer = self.value_buffer = None
        capacity = self._capacity_for(key_states.shape[2])
        # Unwritten positions stay uninitialised: nothing reads past the views.
        self.key_buffer = key_states.new_empty(*key_states.shape[:2], capacity, key_states.shape[3])
        self.value_buffer = value_states.new_empty(*value_states.shape[:2], capacity, value_states.shape[3])
        self._expose(0)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new states after the cached ones, in place, and return the views of every cached
        position (new ones included)."""
        if not self.is_initialized or (self.get_seq_length() == 0 and self._mismatch(key_states, value_states)):
            # A new layer, or an empty one (reset, cropped to nothing) taking another batch or dtype.
            self.lazy_initialization(key_states, value_states)
        mismatch = self._mismatch(key_states, value_states)
        if mismatch:
            raise ValueError(f"{type(self).__name__}.update: {mismatch}")
        length = self.get_seq_length()
        end = length + key_states.shape[2]
        if not self._writable(end):
            self._reallocate(end)
        self.key_buffer[:, :, length:end].copy_(key_states)
        self.value_buffer[:, :, length:end].copy_(value_states)
        self._expose(end)
        return self.keys, self.values

    def _mismatch(self, key_states: torch.Tensor, value_states: torch.Tensor) -> str | None:
        """What keeps the states from being appended to the cached ones (None: they fit)."""
        for name, states, cached in (("key_states", key_states, self.keys),
                                     ("value_states", value_states, self.values)):
            same_shape = (states.dim() == 4 and states.shape[:2] == cached.shape[:2]
                          and states.shape[3] == cached.shape[3])
            if not same_shape or states.dtype != cached.dtype or states.device != cached.device:
                batch, heads, _, dim = cached.shape
                return (f"expected {name} [B={batch}, H={heads}, T, D={dim}] {cached.dtype} on {cached.device}, "
                        f"like the cached ones; found {tuple(states.shape)} {states.dtype} on {states.device}")
        return None

    def _capacity_for(self, needed: int) -> int:
        """Positions to allocate for `needed`: `initial_capacity` if it holds them (room reserved up
        front), else spare room past them of `min_growth`, or `growth - 1` times the current capacity
        if more (geometric growth: O(1) copies per position)."""
        if needed <= self.initial_capacity:
            return self.initial_capacity
        return needed + max(self.min_growth, math.ceil(self.capacity * (self.growth - 1)))

    def _reallocate(self, needed: int) -> None:
        """Move the cached positions into new buffers with room for `needed` and more."""
        capacity = self._capacity_for(needed)
        length = self.get_seq_length()
        buffers = []
        for cached in (self.keys, self.values):
            buffer = cached.new_empty(*cached.shape[:2], capacity, cached.shape[3])
            buffer[:, :, :length].copy_(cached)
            buffers.append(buffer)
        self.key_buffer, self.value_buffer = buffers
        self._expose(length)

    def _expose(self, length: int) -> None:
        self.keys = self.key_buffer[:, :, :length]
        self.values = self.value_buffer[:, :, :length]

    def _writable(self, end: int) -> bool:
        """Whether the buffers can take positions up to `end` in place. Not when they are full; not when
        `keys` / `values` are no longer their leading positions (code from outside assigned other
        tensors); not when they were made under `torch.inference_mode()` and this update runs outside it
        (inference tensors cannot be written there). The update then moves the cached positions into
        new buffers."""
        def leads(view, buffer):
            return (view.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
                    and view.storage_offset() == 0 and view.stride() == buffer.stride())

        return (end <= self.capacity and leads(self.keys, self.key_buffer) and leads(self.values, self.value_buffer)
                and not (self.key_buffer.is_inference() and not torch.is_inference_mode_enabled()))

    # -- DynamicLayer's operations, on the buffers -----------------------------------------------

    def reset(self) -> None:
        """Empty the layer, keeping its buffers for the next prompt (transformers >= 5.2x's DynamicLayer
        drops its tensors, 5.17's zeroes them: empty, or as long as before, either way nothing usable)."""
        if self.is_initialized:
            self._expose(0)

    def _on_buffers(self, method: str, *args) -> None:
        """Run DynamicLayer's own `method` on the whole buffers instead of the views, so that what it
        returns keeps the spare room (a batch reorder, selection or repeat; moving the layer between
        devices), then take the views again."""
        if not self.is_initialized:
            return
        length = self.get_seq_length()
        self.keys, self.values = self.key_buffer, self.value_buffer
        try:
            getattr(super(), method)(*args)
            self.key_buffer, self.value_buffer = self.keys, self.values
        finally:
            self._expose(length)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._on_buffers("reorder_cache", beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._on_buffers("batch_repeat_interleave", repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._on_buffers("batch_select_indices", indices)

    def offload(self):
        self._on_buffers("offload")

    def prefetch(self):
        self._on_buffers("prefetch")


class GrowableCache(DynamicCache):
    """A `DynamicCache` whose full-attention layers are `GrowableLayer`s: no copy of the cache at every
    step. Takes DynamicCache's arguments (`config`, offloading, ...), plus the buffer settings of its
    layers (see `GrowableLayer`):

        cache = GrowableCache(config=model.config, initial_capacity=prompt_length + max_new_tokens)
        model.generate(input_ids, past_key_values=cache, max_new_tokens=max_new_tokens)

    initial_capacity: positions allocated per layer at the first update (0, or fewer than it brings:
    its length plus `min_growth`); a cache allocated for every token it will hold never grows.
    """

    def __init__(self, *args, initial_capacity: int = 0, growth: float = 1.5, min_growth: int = 256, **kwargs):
        settings = _settings(type(self).__name__, initial_capacity, growth, min_growth)
        super().__init__(*args, **kwargs)
        make_layer = functools.partial(GrowableLayer, **settings)
        self.layers = [self._growable(layer, make_layer) for layer in self.layers]
        if self.layer_class_to_replicate is DynamicLayer:  # no config: layers are added as the model calls them
            self.layer_class_to_replicate = make_layer

    @staticmethod
    def _growable(layer, make_layer):
        """A plain DynamicLayer as a GrowableLayer (with its contents, for cache data given to
        DynamicCache's constructor); any other layer as it is."""
        if type(layer) is not DynamicLayer:
            return layer
        growable = make_layer()
        if layer.is_initialized:
            growable.update(layer.keys, layer.values)
        return growable
