"""Add SeerAttention gates to a loaded Hugging Face model, and take them out again.

One table says, per `config.model_type`, which submodules of an attention layer emit the pre-RoPE
query and key states (forward hooks capture them there, so no modeling code is copied). Attention
itself is rerouted through transformers' attention-function registry.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .attention import MODES, SeerLayerState, seer_attention_forward
from .config import SeerAttentionConfig
from .gate import SeerGate


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where an architecture's attention layer exposes its pre-RoPE query and key states."""

    query_source: str
    key_source: str


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": ArchitectureSpec(query_source="q_proj", key_source="k_proj"),
    "qwen2": ArchitectureSpec(query_source="q_proj", key_source="k_proj"),
    # Qwen3 normalises q and k per head before RoPE: the gate sees what RoPE sees.
    "qwen3": ArchitectureSpec(query_source="q_norm", key_source="k_norm"),
}
SUPPORTED_MODEL_TYPES = tuple(sorted(ARCHITECTURES))
# The model's own attention implementations that sparse prefill can stand in for.
SUPPORTED_ATTENTION = ("sdpa", "eager")
ATTENTION_PREFIX = "seer_"


def _registered_name(original: str) -> str:
    """Register (once) the SeerAttention function under a name tied to the model's own
    implementation: dense calls go back to that implementation and its mask format is kept."""
    name = ATTENTION_PREFIX + original
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, seer_attention_forward)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[original])
    return name


def _dense_attention_function(original: str, attention_module: nn.Module):
    if original == "eager":
        import sys

        return sys.modules[type(attention_module).__module__].eager_attention_forward
    return AttentionInterface._global_mapping[original]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"expected a causal LM whose base model has `.layers`, found {type(model).__name__}")
    return layers


def patched_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules that carry a gate, in layer order."""
    return [module for module in model.modules() if hasattr(module, "seer_state")]


def is_patched(model: nn.Module) -> bool:
    return hasattr(model, "seer_config")


def _architecture(model: nn.Module) -> ArchitectureSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"SeerAttention supports model_type {sorted(ARCHITECTURES)}; found {model_type!r} "
                         f"({type(model).__name__})")
    return ARCHITECTURES[model_type]


def _gate_rope(model: nn.Module, gate_hidden_size: int) -> tuple[torch.Tensor, float]:
    """The base model's rope type and parameters, recomputed for the gate width."""
    gate_config = copy.deepcopy(model.config)
    gate_config.head_dim = gate_hidden_size
    rope_parameters = getattr(gate_config, "rope_parameters", None) or {}
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        theta = rope_parameters.get("rope_theta") or getattr(model.config, "rope_theta", None) or 10000.0
        steps = torch.arange(0, gate_hidden_size, 2, dtype=torch.float32)
        return 1.0 / (theta ** (steps / gate_hidden_size)), 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](gate_config, "cpu")
    return inv_freq.float(), float(scaling)


def _target_layers(model: nn.Module, config: SeerAttentionConfig) -> list[int]:
    count = len(decoder_layers(model))
    layers = list(range(count)) if config.layers is None else sorted(set(config.layers))
    if layers[-1] >= count:
        raise ValueError(f"SeerAttentionConfig.layers: the model has {count} layers (0..{count - 1}); "
                         f"found {layers[-1]}")
    layer_types = getattr(model.config, "layer_types", None) or []
    windowed = [i for i in layers if i < len(layer_types) and layer_types[i] != "full_attention"]
    if windowed:
        raise ValueError(f"layers {windowed} use {layer_types[windowed[0]]!r}; SeerAttention gates only "
                         "full causal attention layers (leave these out with SeerAttentionConfig.layers)")
    return layers


def _capture_hook(state: SeerLayerState, attribute: str, head_dim: int):
    def hook(_module, _inputs, output):
        if state.needs_gate_inputs:
            setattr(state, attribute, output.view(*output.shape[:2], -1, head_dim))
    return hook


def apply_seer_attention(model: nn.Module, config: SeerAttentionConfig | None = None) -> nn.Module:
    """Add an initialised gate to every targeted attention layer and route attention through
    SeerAttention (mode "sparse"). Works on a loaded model in any dtype and on any device.

    Raises `ValueError` for an unsupported `model_type`, an attention implementation other than
    sdpa/eager, or a model that is already patched.
    """
    config = copy.deepcopy(config) if config is not None else SeerAttentionConfig()
    spec = _architecture(model)
    if is_patched(model):
        raise ValueError("this model already has SeerAttention gates; call remove_seer_attention first")
    original = model.config._attn_implementation or "eager"
    if original not in SUPPORTED_ATTENTION:
        raise ValueError(f"SeerAttention wraps attn_implementation {list(SUPPORTED_ATTENTION)}; the model "
                         f"uses {original!r}. Load it with attn_implementation='sdpa'")
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
    layers = _target_layers(model, config)
    text_config = model.config
    num_heads, num_kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    inv_freq, rope_scaling = _gate_rope(model, config.gate_hidden_size)

    for layer in decoder_layers(model):
        layer.self_attn.seer_dense_attention = _dense_attention_function(original, layer.self_attn)
    for layer_idx in layers:
        attention = decoder_layers(model)[layer_idx].self_attn
        head_dim = attention.head_dim
        anchor = getattr(attention, spec.query_source).weight
        gate = SeerGate(num_heads, num_kv_heads, head_dim, config, inv_freq, rope_scaling)
        attention.seer_gate = gate.to(device=anchor.device)
        state = SeerLayerState(layer_idx, config)
        state.hooks = [
            getattr(attention, spec.query_source).register_forward_hook(_capture_hook(state, "captured_query", head_dim)),
            getattr(attention, spec.key_source).register_forward_hook(_capture_hook(state, "captured_key", head_dim)),
        ]
        attention.seer_state = state

    model.seer_config = config
    model.seer_original_attn_implementation = original
    model.set_attn_implementation(_registered_name(original))
    return model


def remove_seer_attention(model: nn.Module) -> nn.Module:
    """Take the gates and hooks out and restore the model's own attention implementation."""
    if not is_patched(model):
        raise ValueError("this model has no SeerAttention gates to remove")
    for attention in patched_attention_modules(model):
        for hook in attention.seer_state.hooks:
            hook.remove()
        del attention.seer_state
        del attention.seer_gate
    for layer in decoder_layers(model):
        del layer.self_attn.seer_dense_attention
    model.set_attn_implementation(model.seer_original_attn_implementation)
    del model.seer_config, model.seer_original_attn_implementation
    return model


def require_patched(model: nn.Module) -> list[nn.Module]:
    if not is_patched(model):
        raise ValueError("this model has no SeerAttention gates; call apply_seer_attention or from_pretrained first")
    return patched_attention_modules(model)


def set_attention_mode(model: nn.Module, mode: str) -> nn.Module:
    """Switch every gated layer to "dense" (gates idle, the model's own attention), "sparse"
    (gate-selected block-sparse prefill) or "distill" (dense attention plus training targets)."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {list(MODES)}, found {mode!r}")
    for attention in require_patched(model):
        attention.seer_state.mode = mode
        attention.seer_state.take_captured()
    return model


def update_sparsity_config(model: nn.Module, **changes) -> SeerAttentionConfig:
    """Change sparse-prefill settings (threshold, density, selector, backend, ...) of a patched model.

    Fields that fix the gate's shape cannot change once gates exist.
    """
    require_patched(model)
    fixed = sorted(set(changes) & (set(model.seer_config.gate_shape_fields) | {"layers"}))
    if fixed:
        raise ValueError(f"{fixed} fix the gates' shape and cannot change on a patched model")
    updated = model.seer_config.replace(**changes)
    for name, value in updated.to_dict().items():
        setattr(model.seer_config, name, value)
    return model.seer_config


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every gate (what distillation trains)."""
    return [parameter for attention in require_patched(model) for parameter in attention.seer_gate.parameters()]


def pop_distill_records(model: nn.Module) -> list:
    """The `DistillRecord`s of the last distillation forward, in layer order, cleared after reading."""
    records = []
    for attention in require_patched(model):
        if attention.seer_state.distill_record is not None:
            records.append(attention.seer_state.distill_record)
            attention.seer_state.distill_record = None
    return records


def get_sparsity_stats(model: nn.Module) -> dict:
    """Block density of the sparse forwards since the gates were applied or the stats were reset.

    Returns {"density": computed causal blocks / all causal blocks over all layers, heads and rows,
    "per_layer": [{"layer": i, "density": d}, ...], "kept_blocks": int, "causal_blocks": int}.
    """
    per_layer, kept_total, causal_total = [], 0, 0
    for attention in require_patched(model):
        state = attention.seer_state
        if state.kept_blocks is None:
            continue
        kept, causal = int(state.kept_blocks.sum()), int(state.causal_blocks.sum())
        per_layer.append({"layer": state.layer_idx, "density": kept / causal})
        kept_total, causal_total = kept_total + kept, causal_total + causal
    density = kept_total / causal_total if causal_total else None
    return {"density": density, "per_layer": per_layer, "kept_blocks": kept_total, "causal_blocks": causal_total}


def reset_sparsity_stats(model: nn.Module) -> None:
    for attention in require_patched(model):
        attention.seer_state.kept_blocks = attention.seer_state.causal_blocks = None
