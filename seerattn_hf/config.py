"""`SeerAttentionConfig`: what the gates look like and how their scores become a block mask."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

Q_POOLINGS = ("avg", "max", "min")
K_POOLINGS = ("max", "min", "avg")
SELECTORS = ("gate", "oracle", "pooled_score", "streaming")
SPARSITY_METHODS = ("threshold", "density", "coverage")
BACKENDS = ("auto", "triton", "torch", "flex")
MASK_SHARINGS = ("head", "kv_group")
CONFIG_NAME = "seer_config.json"


@dataclass
class SeerAttentionConfig:
    """Configuration of SeerAttention gates and of sparse prefill.

    Gate shape (fixed once gates are trained):
        block_size: tokens per block, 16 to 128.
        gate_hidden_size: width `h` of the per-head gate projections.
        q_pooling / k_pooling: pooling kinds along the sequence, concatenated on the feature axis.
        layers: indices of the attention layers that get a gate; None means all.
        base_model_name_or_path: the model the gates were trained for.

    Sparse prefill (can be changed at any time, also at load time):
        selector: where block scores come from: "gate" (trained gates), "oracle" (the true block
            max-pooled attention map), "pooled_score" (mean-pooled q.k per block, training free) or
            "streaming" (first block plus the most recent blocks).
        sparsity_method: "threshold" (keep blocks whose probability exceeds `threshold`),
            "density" (keep the top `density` share of each row's causal blocks) or "coverage"
            (keep per row the fewest blocks whose probabilities sum to at least `coverage`).
        keep_first_blocks / keep_recent_blocks: blocks always kept at the start of the sequence and
            before the diagonal (the diagonal block itself is always kept).
        dense_last_query_block: compute the last query block densely (the question of a prompt).
        mask_sharing: "head" (one mask per query head) or "kv_group" (one mask per KV head, shared by
            its query heads: the kernel then packs a group's heads into one tile).
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton", "torch" or "flex".
        min_sparse_length: prompts shorter than this run dense attention.
    """

    block_size: int = 64
    gate_hidden_size: int = 128
    q_pooling: list[str] = field(default_factory=lambda: ["avg"])
    k_pooling: list[str] = field(default_factory=lambda: ["max", "min", "avg"])
    layers: list[int] | None = None
    base_model_name_or_path: str | None = None
    selector: str = "gate"
    sparsity_method: str = "threshold"
    threshold: float = 2e-3
    density: float = 0.5
    coverage: float = 0.9
    keep_first_blocks: int = 0
    keep_recent_blocks: int = 0
    dense_last_query_block: bool = False
    mask_sharing: str = "head"
    backend: str = "auto"
    min_sparse_length: int = 0

    def __post_init__(self):
        self.q_pooling = list(self.q_pooling)
        self.k_pooling = list(self.k_pooling)
        if self.layers is not None:
            self.layers = [int(i) for i in self.layers]
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the first field whose value is not accepted."""
        _check(isinstance(self.block_size, int) and 16 <= self.block_size <= 128,
               "block_size", "an integer from 16 to 128", self.block_size)
        _check(isinstance(self.gate_hidden_size, int) and self.gate_hidden_size > 0
               and self.gate_hidden_size % 2 == 0,
               "gate_hidden_size", "a positive even integer (block RoPE rotates pairs)",
               self.gate_hidden_size)
        for name, allowed in (("q_pooling", Q_POOLINGS), ("k_pooling", K_POOLINGS)):
            kinds = getattr(self, name)
            _check(len(kinds) > 0 and len(set(kinds)) == len(kinds) and set(kinds) <= set(allowed),
                   name, f"a non-empty list of distinct values from {list(allowed)}", kinds)
        _check(self.layers is None or (len(self.layers) > 0 and min(self.layers) >= 0),
               "layers", "None or a non-empty list of layer indices >= 0", self.layers)
        _check(self.selector in SELECTORS, "selector", f"one of {list(SELECTORS)}", self.selector)
        _check(self.sparsity_method in SPARSITY_METHODS, "sparsity_method",
               f"one of {list(SPARSITY_METHODS)}", self.sparsity_method)
        _check(_is_number(self.threshold) and 0.0 <= self.threshold < 1.0,
               "threshold", "a number in [0, 1)", self.threshold)
        _check(_is_number(self.density) and 0.0 < self.density <= 1.0,
               "density", "a number in (0, 1]", self.density)
        _check(_is_number(self.coverage) and 0.0 < self.coverage <= 1.0,
               "coverage", "a number in (0, 1]", self.coverage)
        for name in ("keep_first_blocks", "keep_recent_blocks", "min_sparse_length"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 0, name, "an integer >= 0", value)
        _check(isinstance(self.dense_last_query_block, bool), "dense_last_query_block",
               "a bool", self.dense_last_query_block)
        _check(self.mask_sharing in MASK_SHARINGS, "mask_sharing",
               f"one of {list(MASK_SHARINGS)}", self.mask_sharing)
        _check(self.backend in BACKENDS, "backend", f"one of {list(BACKENDS)}", self.backend)

    @property
    def gate_shape_fields(self) -> dict[str, Any]:
        """The fields that fix the gate's parameter shapes (a gate file only fits this shape)."""
        return {name: getattr(self, name)
                for name in ("block_size", "gate_hidden_size", "q_pooling", "k_pooling")}

    def replace(self, **changes) -> "SeerAttentionConfig":
        """A validated copy with some fields changed; unknown names raise `ValueError`."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"Unknown SeerAttentionConfig field(s) {unknown}; expected some of "
                             f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SeerAttentionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_json(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        """Write the config (plus `extra` keys such as the library version) atomically."""
        from .utils import atomic_write_text

        values = {**self.to_dict(), **(extra or {})}
        atomic_write_text(path, json.dumps(values, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "SeerAttentionConfig":
        with open(path, encoding="utf-8") as handle:
            try:
                values = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} is not valid JSON: {error}") from error
        if not isinstance(values, dict):
            raise ValueError(f"{path} should hold a JSON object, found {type(values).__name__}")
        return cls.from_dict(values)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, name: str, expected: str, found) -> None:
    if not ok:
        raise ValueError(f"SeerAttentionConfig.{name}: expected {expected}, found {found!r}")
