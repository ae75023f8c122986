"""`SeerAttentionConfig`: the user-facing pair of a gate config (the gates' shape) and a sparsity
policy (how their scores become a block mask), and the JSON form a gate adapter stores.

Both parts are immutable; `replace` returns a validated copy. Flat keyword arguments are split
between the two parts, so `SeerAttentionConfig(block_size=64, density=0.3)` works as before.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

from .decode_gate import DECODE_GATE_FIELDS, DecodeGateConfig
from .gate_config import GATE_FIELDS, K_POOLINGS, Q_POOLINGS, GateConfig  # noqa: F401  (re-exported)
from .policy import (  # noqa: F401  (re-exported)
    BACKENDS,
    MASK_SHARINGS,
    POLICY_FIELDS,
    SELECTORS,
    SPARSITY_METHODS,
    SparsityPolicy,
)
from .validation import InvalidSetting, reject_unknown

CONFIG_NAME = "seer_config.json"
# The adapter JSON keeps the gate fields at the top level and the policy under this key.
POLICY_KEY = "sparsity_policy"
DECODE_GATE_KEY = "decode_gate"
# Keys of the adapter JSON that are records, not configuration.
METADATA_KEYS = ("library_version", "base_model_layout")
# A policy key that releases up to 0.1.x wrote, read as its successor: a bool becomes 0 or 1 rows.
LEGACY_DENSE_LAST_ROW_KEY = "dense_last_query_block"


class SeerAttentionConfig:
    """A gate config and a sparsity policy. Fields of either are read as attributes
    (`config.block_size`, `config.density`); lists come back as lists.

    Gate shape (fixed once gates exist; see `GateConfig`): block_size, gate_hidden_size, q_pooling,
    k_pooling, q_projection, k_projection, compute_dtype, layers, base_model_name_or_path.
    Sparsity policy (changeable at load and run time; see `SparsityPolicy`): selector,
    sparsity_method, threshold, density, coverage, nz_ratio, target_density, calibrated_thresholds,
    keep_first_blocks, keep_recent_blocks,
    keep_diagonal, dense_last_query_blocks, mask_sharing, backend, min_sparse_length.
    """

    __slots__ = ("gate", "policy", "decode_gate")
    gate: GateConfig
    policy: SparsityPolicy
    decode_gate: DecodeGateConfig | None

    def __init__(self, gate: GateConfig | None = None, policy: SparsityPolicy | None = None,
                 decode_gate: DecodeGateConfig | None = None, **fields):
        reject_unknown("SeerAttentionConfig", fields, GATE_FIELDS + POLICY_FIELDS)
        gate = GateConfig() if gate is None else gate
        policy = SparsityPolicy() if policy is None else policy
        gate_changes = {k: v for k, v in fields.items() if k in GATE_FIELDS}
        policy_changes = {k: v for k, v in fields.items() if k in POLICY_FIELDS}
        try:
            gate = gate.replace(**gate_changes) if gate_changes else gate
            policy = policy.replace(**policy_changes) if policy_changes else policy
        except InvalidSetting as error:
            raise error.for_owner("SeerAttentionConfig") from None
        if decode_gate is not None and not isinstance(decode_gate, DecodeGateConfig):
            raise TypeError(f"SeerAttentionConfig.decode_gate: expected a DecodeGateConfig or None, found "
                            f"{type(decode_gate).__name__}")
        object.__setattr__(self, "gate", gate)
        object.__setattr__(self, "policy", policy)
        object.__setattr__(self, "decode_gate", decode_gate)

    def __getattr__(self, name: str):
        # Only called for names that are not slots: the fields of the two parts.
        if name in GATE_FIELDS:
            value = getattr(self.gate, name)
            return list(value) if isinstance(value, tuple) else value
        if name in POLICY_FIELDS:
            return getattr(self.policy, name)
        raise AttributeError(f"SeerAttentionConfig has no field {name!r}")

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"SeerAttentionConfig is immutable (cannot set {name!r}): use config.replace("
                             f"{name}=...), or update_sparsity_config(model, {name}=...) on a patched model")

    def _parts(self) -> tuple:
        return self.gate, self.policy, self.decode_gate

    def __reduce__(self):
        return type(self), self._parts()

    def __eq__(self, other) -> bool:
        return isinstance(other, SeerAttentionConfig) and self._parts() == other._parts()

    def __hash__(self) -> int:
        return hash(self._parts())

    def __repr__(self) -> str:
        decode = f", decode_gate={self.decode_gate!r}" if self.decode_gate is not None else ""
        return f"SeerAttentionConfig(gate={self.gate!r}, policy={self.policy!r}{decode})"

    @property
    def gate_shape_fields(self) -> dict[str, Any]:
        return self.gate.shape_fields

    def replace(self, **changes) -> "SeerAttentionConfig":
        """A validated copy with some fields changed; unknown names raise `ValueError`."""
        decode_gate = changes.pop("decode_gate", self.decode_gate)
        return SeerAttentionConfig(self.gate, self.policy, decode_gate, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field, flat."""
        return {**self.gate.to_dict(), **self.policy.to_dict()}

    def to_json_dict(self) -> dict[str, Any]:
        """The stored form: gate fields at the top level, the policy under "sparsity_policy"."""
        values = {**self.gate.to_dict(), POLICY_KEY: self.policy.to_dict()}
        if self.decode_gate is not None:
            values[DECODE_GATE_KEY] = self.decode_gate.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "the config") -> "SeerAttentionConfig":
        """Read the stored form, or the flat form (every field at the top level) that release 0.1.0
        wrote. Unknown keys are named in a warning and ignored."""
        values = dict(values)
        policy_values = values.pop(POLICY_KEY, None)
        if policy_values is None:
            policy_values = {k: values.pop(k) for k in POLICY_FIELDS if k in values}
        elif not isinstance(policy_values, dict):
            raise ValueError(f"{source}: expected {POLICY_KEY!r} to be a JSON object, found {policy_values!r}")
        policy_values = _read_legacy_policy_key(dict(policy_values), values)
        gate_values = {k: values.pop(k) for k in GATE_FIELDS if k in values}
        decode_values = values.pop(DECODE_GATE_KEY, None)
        if decode_values is not None and not isinstance(decode_values, dict):
            raise ValueError(f"{source}: expected {DECODE_GATE_KEY!r} to be a JSON object, found {decode_values!r}")
        unknown = (sorted(set(values) - set(METADATA_KEYS)) + sorted(set(policy_values) - set(POLICY_FIELDS))
                   + sorted(set(decode_values or {}) - set(DECODE_GATE_FIELDS)))
        if unknown:
            warnings.warn(f"{source}: ignoring unknown keys {unknown} (written by another version of seerattn_hf?)",
                          stacklevel=2)
        policy_values = {k: v for k, v in policy_values.items() if k in POLICY_FIELDS}
        decode_gate = None
        if decode_values is not None:
            try:
                decode_gate = DecodeGateConfig(**{k: v for k, v in decode_values.items() if k in DECODE_GATE_FIELDS})
            except InvalidSetting as error:
                raise error.for_owner(f"{source}: decode_gate") from None
        return cls(decode_gate=decode_gate, **gate_values, **policy_values)

    def to_json_string(self, extra: dict[str, Any] | None = None) -> str:
        return json.dumps({**self.to_json_dict(), **(extra or {})}, indent=2, sort_keys=True) + "\n"

    def save_json(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        """Write the stored form (plus `extra` keys such as the library version) atomically."""
        from .utils import atomic_write_text

        atomic_write_text(path, self.to_json_string(extra))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "SeerAttentionConfig":
        return cls.from_dict(read_json_object(path), source=str(path))


def _read_legacy_policy_key(policy_values: dict[str, Any], top_level: dict[str, Any]) -> dict[str, Any]:
    """`dense_last_query_block: bool` (in the policy, or at the top level of a 0.1.0 flat file) reads as
    `dense_last_query_blocks` 0 or 1; a value that is not a bool is passed on for validation to name."""
    for place in (policy_values, top_level):
        if LEGACY_DENSE_LAST_ROW_KEY in place:
            value = place.pop(LEGACY_DENSE_LAST_ROW_KEY)
            policy_values.setdefault("dense_last_query_blocks", int(value) if isinstance(value, bool) else value)
    return policy_values


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        try:
            values = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path} should hold a JSON object, found {type(values).__name__}")
    return values
