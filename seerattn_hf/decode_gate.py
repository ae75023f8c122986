"""The decode gate (SeerAttention-R): which KV blocks a generated token reads.

One gate query per KV head, mapped from its GQA group's query heads; one gate key per complete
block, from the block's pre-RoPE keys pooled (max, min, avg) and projected per KV head. Both are
RMS-normalised over the gate width and rotated to their positions (the token's, the block's first
token's) with the base model's rope parameters recomputed for the gate width.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .decode_selection import as_float32
from .gate_config import K_POOLINGS, check_shape_fields, field_names
from .rope import rope_angles, rotate
from .validation import check, reject_unknown

Q_HEAD_MAPS = ("linear", "mean")
NORM_EPS = 1e-6


@dataclass(frozen=True)
class DecodeGateConfig:
    """The shape of a layer's decode gate (fixed once gates exist).

    block_size: tokens per KV block, one of 16, 32, 64, 128.
    gate_hidden_size: gate width `h` (even: RoPE rotates pairs).
    k_pooling: pooling kinds of a block's keys, concatenated on the feature axis.
    q_head_map: "linear" (a learned map from the G query heads of a group to one gate query,
        `q_weight: [HKV, G, D, h]`) or "mean" (the group's queries averaged, then `[HKV, D, h]`).
    qk_norm: RMS-normalise gate queries and keys over the gate width (learned scales `[h]`).
    rope: rotate gate queries and keys to their positions.
    layers: indices of the attention layers that get a decode gate; None means all.
    """

    block_size: int = 64
    gate_hidden_size: int = 128
    k_pooling: tuple[str, ...] = ("max", "min", "avg")
    q_head_map: str = "linear"
    qk_norm: bool = True
    rope: bool = True
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        owner = type(self).__name__
        check_shape_fields(self, owner, {"k_pooling": K_POOLINGS})
        check(self.q_head_map in Q_HEAD_MAPS, owner, "q_head_map", f"one of {list(Q_HEAD_MAPS)}", self.q_head_map)
        for name in ("qk_norm", "rope"):
            check(isinstance(getattr(self, name), bool), owner, name, "a bool", getattr(self, name))

    def replace(self, **changes) -> "DecodeGateConfig":
        reject_unknown(type(self).__name__, changes, DECODE_GATE_FIELDS)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}


DECODE_GATE_FIELDS = field_names(DecodeGateConfig)


def decode_gate_weight_shapes(config: DecodeGateConfig, num_heads: int, num_kv_heads: int,
                              head_dim: int) -> dict[str, tuple[int, ...]]:
    """The parameters (name -> shape) of one layer's decode gate in a model with these attention heads."""
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    hidden, groups = config.gate_hidden_size, num_heads // num_kv_heads
    shapes = {"q_weight": (num_kv_heads, groups, head_dim, hidden) if config.q_head_map == "linear"
              else (num_kv_heads, head_dim, hidden),
              "k_weight": (num_kv_heads, head_dim * len(config.k_pooling), hidden)}
    if config.qk_norm:
        shapes.update(q_norm_weight=(hidden,), k_norm_weight=(hidden,))
    return shapes


def pool_key_blocks(keys: torch.Tensor, valid: torch.Tensor, kinds: tuple[str, ...]) -> torch.Tensor:
    """Pool blocks of keys over their valid tokens.

    keys: `[..., NB, BS, D]`; valid: `[..., NB, BS]` bool (broadcastable). Returns `[..., NB, D * len(kinds)]`
    float32; a block without a valid token pools to zeros.
    """
    keys = keys.float()
    mask = valid[..., None]
    count = valid.sum(dim=-1, keepdim=True).clamp(min=1)
    pooled = []
    for kind in kinds:
        if kind == "avg":
            pooled.append(keys.masked_fill(~mask, 0.0).sum(dim=-2) / count)
        elif kind == "max":
            pooled.append(keys.masked_fill(~mask, float("-inf")).amax(dim=-2))
        else:
            pooled.append(keys.masked_fill(~mask, float("inf")).amin(dim=-2))
    result = torch.cat(pooled, dim=-1)
    return torch.where(valid.any(dim=-1, keepdim=True), result, torch.zeros_like(result))


class SeerDecodeGate(nn.Module):
    """The decode gate of one attention layer. Parameters, float32:
    `q_weight: [HKV, G, D, h]` ("linear") or `[HKV, D, h]` ("mean"), `k_weight: [HKV, D * len(k_pooling), h]`,
    and with qk_norm `q_norm_weight`, `k_norm_weight: [h]`."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, config: DecodeGateConfig,
                 rope_inv_freq: torch.Tensor, rope_scaling: float = 1.0):
        super().__init__()
        shapes = decode_gate_weight_shapes(config, num_heads, num_kv_heads, head_dim)
        hidden = config.gate_hidden_size
        if rope_inv_freq.shape != (hidden // 2,):
            raise ValueError(f"rope_inv_freq should have shape ({hidden // 2},), found {tuple(rope_inv_freq.shape)}")
        self.config = config
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.ones(shape)))
        self.register_buffer("rope_inv_freq", rope_inv_freq.float(), persistent=False)
        self.rope_scaling = rope_scaling
        # The frequencies as built (the buffer is never changed in place; `.to()` moves or casts it).
        self._rope_values = tuple(rope_inv_freq.float().cpu().tolist())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The fan-in uniform initialisation of nn.Linear, per head (fan-in: the group's queries).
        fan_in_q = self.q_weight[0].numel() // self.q_weight.shape[-1]
        for weight, fan_in in ((self.q_weight, fan_in_q), (self.k_weight, self.k_weight.shape[1])):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(weight, -bound, bound)
        if self.config.qk_norm:
            nn.init.ones_(self.q_norm_weight)
            nn.init.ones_(self.k_norm_weight)

    # The gate computes in float32 whatever dtype its parameters were cast to (`model.to(bf16)`).
    def _finish(self, x: torch.Tensor, positions: torch.Tensor, norm_weight_name: str,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """RMS norm, then the rotation to `positions` (`rope`: `rope_angles` of them, if made already)."""
        if self.config.qk_norm:
            x = F.rms_norm(x, (x.shape[-1],), as_float32(getattr(self, norm_weight_name)), eps=NORM_EPS)
        if not self.config.rope:
            return x
        if rope is None:
            rope = rope_angles(positions, self.rope_inv_freq, x.device)
        return rotate(x, *rope, self.rope_scaling)

    def rope_key(self) -> tuple:
        """What the gate's rotation depends on besides the positions: equal in two gates built from
        one model's rope parameters (and moved or cast alike), which then share `query_rope`."""
        inv_freq = self.rope_inv_freq
        return (self._rope_values, inv_freq.dtype, inv_freq.device, self.rope_scaling)

    def query_rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotation `queries` applies at `positions: [B, T]` (None without rope)."""
        if not self.config.rope:
            return None
        return rope_angles(positions[:, None, :], self.rope_inv_freq, positions.device)

    def queries(self, query: torch.Tensor, positions: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """query: `[B, T, HQ, D]` pre-RoPE states; positions: `[B, T]` -> gate queries `[B, HKV, T, h]`.
        rope: `query_rope(positions)`, where it was computed already (the same in every layer)."""
        batch, length = query.shape[:2]
        grouped = as_float32(query).view(batch, length, self.num_kv_heads, -1, self.head_dim)
        if self.config.q_head_map == "linear":
            projected = torch.einsum("btkgd,kgdo->bkto", grouped, as_float32(self.q_weight))
        else:
            projected = torch.einsum("btkd,kdo->bkto", grouped.mean(dim=3), as_float32(self.q_weight))
        return self._finish(projected, positions[:, None, :], "q_norm_weight", rope)

    def keys(self, pooled: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """pooled: `[B, HKV, NB, D * len(k_pooling)]` (`pool_key_blocks` of pre-RoPE keys);
        positions: `[B, NB]` (each block's first token) -> gate keys `[B, HKV, NB, h]`."""
        projected = torch.einsum("bkni,kio->bkno", pooled.float(), self.k_weight.float())
        return self._finish(projected, positions[:, None, :], "k_norm_weight")

    def scores(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Logits `[B, HKV, T, NB]` of gate queries `[B, HKV, T, h]` against gate keys `[B, HKV, NB, h]`."""
        return queries @ keys.transpose(-1, -2) / math.sqrt(queries.shape[-1])
