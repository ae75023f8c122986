"""Rotary position embeddings as the gates use them: the base model's rope type and parameters,
recomputed for another width, applied (or undone) at arbitrary positions."""

from __future__ import annotations

import copy

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def rope_frequencies(model_config, dim: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies `[dim / 2]` float32, attention scaling) of the model's rope type
    (default, llama3, yarn, ...) for rotary width `dim`."""
    config = copy.deepcopy(model_config)
    config.head_dim = dim
    rope_parameters = getattr(config, "rope_parameters", None) or {}
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        theta = rope_parameters.get("rope_theta") or getattr(model_config, "rope_theta", None) or 10000.0
        steps = torch.arange(0, dim, 2, dtype=torch.float32)
        return 1.0 / (theta ** (steps / dim)), 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(scaling)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor, device,
                inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin) `[..., N, dim]` float32 of `positions` (`[..., N]`) for `rotate`: the sine's
    halves carry the sign of the rotate-half convention (`-sin, sin`; `sin, -sin` to undo it)."""
    if positions.dtype != torch.float32:
        positions = positions.to(torch.float32)
    if inv_freq.device != device:
        inv_freq = inv_freq.to(device)
    angles = positions[..., None] * inv_freq
    sin = angles.sin()
    return torch.cat((angles, angles), dim=-1).cos(), torch.cat((sin, -sin) if inverse else (-sin, sin), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, scaling: float = 1.0,
           inverse: bool = False) -> torch.Tensor:
    """`x` rotated by `rope_angles`, in float32: exactly `x * cos +- rotate_half(x) * sin`, as the
    halves swapped (`roll`) times the signed sine are `rotate_half(x) * sin` term by term."""
    if x.dtype != torch.float32:
        x = x.float()
    rotated = x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
    if scaling == 1.0:
        return rotated
    return rotated / scaling if inverse else rotated * scaling


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0,
               inverse: bool = False) -> torch.Tensor:
    """Rotate `x: [..., N, dim]` to `positions` (broadcastable to `[..., N]`), rotate-half convention,
    in float32. `inverse=True` undoes the rotation (and the scaling) exactly."""
    return rotate(x, *rope_angles(positions, inv_freq, x.device, inverse), scaling, inverse)
