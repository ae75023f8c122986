"""`GateConfig`: the shape of a layer's gate, fixed once gates exist (what a gate adapter saves)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .validation import check, is_integer, reject_unknown

Q_POOLINGS = ("avg", "max", "min")
K_POOLINGS = ("max", "min", "avg")
# The kernels tile key blocks with power-of-two widths.
BLOCK_SIZES = (16, 32, 64, 128)
K_PROJECTIONS = ("kv_head", "query_head")
COMPUTE_DTYPES = ("float32", "model")
# Gate fields that leave the stored tensors as they are: a loader may override them.
LOAD_TIME_GATE_FIELDS = ("compute_dtype",)


@dataclass(frozen=True)
class GateConfig:
    """What a trained gate file depends on.

    block_size: tokens per block, one of 16, 32, 64, 128.
    gate_hidden_size: width `h` of the per-head gate projections (even: block RoPE rotates pairs).
    q_pooling / k_pooling: pooling kinds along the sequence, concatenated on the feature axis.
    q_projection: map the pooled query of each query head to the gate width (`q_weight`). False uses
        the pooled query itself as the gate query, as the published gates do: it then needs a single
        q pooling kind and a gate width equal to the model's head_dim.
    k_projection: "kv_head" (one map per KV head, its result shared by the KV group's query heads) or
        "query_head" (the pooled keys repeated to the query heads first, query head i reading KV head
        i // G, then one map per query head: the published gates' layout).
    compute_dtype: "float32", or "model": the dtype of the model's query and key states (the
        published gates run in bf16). The parameters stay float32 either way.
    layers: indices of the attention layers that get a gate; None means all.
    base_model_name_or_path: the model the gates were trained for (a record, not part of the shape).
    """

    block_size: int = 64
    gate_hidden_size: int = 128
    q_pooling: tuple[str, ...] = ("avg",)
    k_pooling: tuple[str, ...] = ("max", "min", "avg")
    q_projection: bool = True
    k_projection: str = "kv_head"
    compute_dtype: str = "float32"
    layers: tuple[int, ...] | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        owner = type(self).__name__
        check_shape_fields(self, owner, {"q_pooling": Q_POOLINGS, "k_pooling": K_POOLINGS})
        check(isinstance(self.q_projection, bool), owner, "q_projection", "a bool", self.q_projection)
        check(self.q_projection or len(self.q_pooling) == 1, owner, "q_pooling",
              "a single pooling kind with q_projection=False (the pooled query is then the gate query)",
              list(self.q_pooling))
        check(self.k_projection in K_PROJECTIONS, owner, "k_projection", f"one of {list(K_PROJECTIONS)}",
              self.k_projection)
        check(self.compute_dtype in COMPUTE_DTYPES, owner, "compute_dtype", f"one of {list(COMPUTE_DTYPES)}",
              self.compute_dtype)
        check(self.base_model_name_or_path is None or isinstance(self.base_model_name_or_path, str), owner,
              "base_model_name_or_path", "None or a string", self.base_model_name_or_path)

    @property
    def shape_fields(self) -> dict[str, Any]:
        """The fields that fix the gate's parameter shapes (a gate file only fits this shape)."""
        names = ("block_size", "gate_hidden_size", "q_pooling", "k_pooling", "q_projection", "k_projection")
        return {name: getattr(self, name) for name in names}

    def replace(self, **changes) -> "GateConfig":
        reject_unknown(type(self).__name__, changes, field_names(type(self)))
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (lists, not tuples)."""
        values = dataclasses.asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}


def check_shape_fields(config, owner: str, poolings: dict[str, tuple[str, ...]]) -> None:
    """Validate (and normalise to sorted tuples) the fields every gate kind shares: its pooling lists,
    `layers`, `block_size` and `gate_hidden_size`. `config` is a frozen dataclass under construction."""
    for name, allowed in poolings.items():
        kinds = getattr(config, name)
        check(isinstance(kinds, (list, tuple)) and len(kinds) > 0 and len(set(kinds)) == len(kinds)
              and all(isinstance(kind, str) for kind in kinds) and set(kinds) <= set(allowed),
              owner, name, f"a non-empty list of distinct values from {list(allowed)}", kinds)
        object.__setattr__(config, name, tuple(kinds))
    if config.layers is not None:
        check(isinstance(config.layers, (list, tuple)) and len(config.layers) > 0
              and all(is_integer(i) and i >= 0 for i in config.layers),
              owner, "layers", "None or a non-empty list of integer layer indices >= 0", config.layers)
        object.__setattr__(config, "layers", tuple(sorted(set(config.layers))))
    check(is_integer(config.block_size) and config.block_size in BLOCK_SIZES, owner, "block_size",
          f"one of {list(BLOCK_SIZES)}", config.block_size)
    check(is_integer(config.gate_hidden_size) and config.gate_hidden_size > 0 and config.gate_hidden_size % 2 == 0,
          owner, "gate_hidden_size", "a positive even integer (RoPE rotates pairs)", config.gate_hidden_size)


def field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


GATE_FIELDS = field_names(GateConfig)
