"""transformers' attention registries, read and extended through their public mappings.

Each registered attention implementation needs two entries: the attention function
(`ALL_ATTENTION_FUNCTIONS`) and the builder of the mask it receives (`ALL_MASK_ATTENTION_FUNCTIONS`);
without the second, padded batches reach the function with no mask at all.
"""

from __future__ import annotations

from typing import Callable

from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def attention_function(name: str) -> Callable:
    """The attention function registered under `name` ("sdpa", "flex_attention", ...)."""
    if name not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"no attention function registered as {name!r}; registered: {sorted(ALL_ATTENTION_FUNCTIONS)}")
    return ALL_ATTENTION_FUNCTIONS[name]


def register_attention_function(name: str, function: Callable, mask_of: str) -> str:
    """Register `function` under `name`, with the mask builder of implementation `mask_of` (the
    masks `function` expects); registering the same name again replaces it. Returns `name`."""
    if mask_of not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise ValueError(f"no attention mask builder registered as {mask_of!r}; registered: "
                         f"{sorted(ALL_MASK_ATTENTION_FUNCTIONS)}")
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_of])
    return name
