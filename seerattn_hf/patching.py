"""Add SeerAttention gates to a loaded Hugging Face model, and take them out again.

One table says, per `config.model_type`, which submodules of an attention layer emit the pre-RoPE
query and key states (forward hooks capture them there, so no modeling code is copied). Attention
itself is rerouted through transformers' attention-function registry.
"""

from __future__ import annotations

import importlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .attention import MODES, SeerLayerState, seer_attention_forward
from .attention_registry import attention_function, register_attention_function
from .config import SeerAttentionConfig
from .decode_attention import DecodeLayerState, DecodeStep, cache_argument, decode_is_sparse
from .decode_distill import DISTILL_KINDS, DecodeDistillSettings
from .decode_gate import SeerDecodeGate
from .gate import SeerGate, gate_weight_shapes
from .gate_config import GATE_FIELDS, GateConfig
from .ops.pooled_attn import check_pooled_target
from .policy import SparsityPolicy, check_calibrated_thresholds
from .rope import rope_frequencies


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where an architecture's attention layer exposes its pre-RoPE query and key states, and the
    modeling module whose `eager_attention_forward` is its eager attention."""

    query_source: str
    key_source: str
    modeling_module: str

    def eager_attention(self) -> Callable:
        # Eager attention is a module-level function of each modeling file, not a registry entry.
        return importlib.import_module(self.modeling_module).eager_attention_forward


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": ArchitectureSpec("q_proj", "k_proj", "transformers.models.llama.modeling_llama"),
    "qwen2": ArchitectureSpec("q_proj", "k_proj", "transformers.models.qwen2.modeling_qwen2"),
    # Qwen3 normalises q and k per head before RoPE: the gate sees what RoPE sees.
    "qwen3": ArchitectureSpec("q_norm", "k_norm", "transformers.models.qwen3.modeling_qwen3"),
}
SUPPORTED_MODEL_TYPES = tuple(sorted(ARCHITECTURES))
# The model's own attention implementations that sparse prefill can stand in for.
SUPPORTED_ATTENTION = ("sdpa", "eager")
ATTENTION_PREFIX = "seer_"


def _registered_name(original: str) -> str:
    """The SeerAttention function, registered under a name tied to the model's own implementation:
    dense calls go back to that implementation and its mask format is kept."""
    return register_attention_function(ATTENTION_PREFIX + original, seer_attention_forward, mask_of=original)


def _dense_attention_function(original: str, spec: ArchitectureSpec) -> Callable:
    return spec.eager_attention() if original == "eager" else attention_function(original)


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model that `model` wraps: through DDP / FSDP / torch.compile wrappers
    (accelerate's unwrapping) and a PEFT model (its base model, adapters injected), or `model` itself."""
    from accelerate.utils import extract_model_from_parallel

    for _ in range(4):  # a PEFT model inside DDP, and the like
        inner = extract_model_from_parallel(model)
        get_base_model = getattr(type(inner), "get_base_model", None)
        if callable(get_base_model):
            inner = inner.get_base_model()
        if inner is model:
            return model
        model = inner
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"expected a causal LM whose base model has `.layers`, found {type(model).__name__}")
    return layers


def patched_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules that carry a gate, in layer order."""
    return [module for module in causal_lm(model).modules() if hasattr(module, "seer_state")]


def is_patched(model: nn.Module) -> bool:
    return "seer_config" in vars(causal_lm(model))


def _architecture(model: nn.Module) -> ArchitectureSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"SeerAttention supports model_type {sorted(ARCHITECTURES)}; found {model_type!r} "
                         f"({type(model).__name__})")
    return ARCHITECTURES[model_type]


def _target_layers(model: nn.Module, gate_config: GateConfig) -> list[int]:
    count = len(decoder_layers(model))
    layers = list(range(count)) if gate_config.layers is None else list(gate_config.layers)
    if layers[-1] >= count:
        raise ValueError(f"SeerAttentionConfig.layers: the model has {count} layers (0..{count - 1}); "
                         f"found {layers[-1]}")
    layer_types = getattr(model.config, "layer_types", None) or []
    windowed = [i for i in layers if i < len(layer_types) and layer_types[i] != "full_attention"]
    if windowed:
        raise ValueError(f"layers {windowed} use {layer_types[windowed[0]]!r}; SeerAttention gates only "
                         "full causal attention layers (leave these out with SeerAttentionConfig.layers)")
    return layers


def _gate_device(attention: nn.Module, spec: ArchitectureSpec, layer_idx: int) -> torch.device:
    """Where the gate of one layer lives: beside its layer's weights, or, for a layer that accelerate
    offloads (weights on `meta`, brought in by a hook for each forward), on the hook's execution device."""
    source = getattr(attention, spec.query_source)
    device = source.weight.device
    if device.type != "meta":
        return device
    execution_device = getattr(getattr(source, "_hf_hook", None), "execution_device", None)
    if execution_device is None:
        raise ValueError(f"layer {layer_idx}: the weights of {spec.query_source} are on the meta device and no "
                         "accelerate hook loads them (a model built under init_empty_weights?); load the weights "
                         "(from_pretrained, or accelerate's load_checkpoint_and_dispatch) before adding gates")
    return torch.device("cuda", execution_device) if isinstance(execution_device, int) else torch.device(execution_device)


def _decode_layers(decode_config, gated_layers: list[int]) -> set[int]:
    """The layers that get a decode gate: a subset of the gated layers (they hold the decoding state)."""
    if decode_config is None:
        return set()
    if decode_config.layers is None:
        return set(gated_layers)
    outside = sorted(set(decode_config.layers) - set(gated_layers))
    if outside:
        raise ValueError(f"DecodeGateConfig.layers: expected layers that also have a prefill gate "
                         f"({gated_layers}), found {outside}")
    return set(decode_config.layers)


def _capture_hook(state: SeerLayerState, attribute: str, head_dim: int):
    """Forward hook of a q/k source: store its `[B, T, H, D]` output as `state.<attribute>` where
    the call's plan (`_attention_pre_hook`) says something will read it."""
    flag = attribute.replace("captured_", "capture_")

    def hook(_module, _inputs, output):
        if getattr(state, flag):
            setattr(state, attribute, output.view(*output.shape[:2], -1, head_dim))
    return hook


def _attention_pre_hook(state: SeerLayerState, decode_state: DecodeLayerState):
    """Forward pre-hook of a patched attention module, run before its q/k projections: remember the
    cache (the attention function is not given it) and plan what the capture hooks store."""
    def hook(module, args, kwargs):
        decode_state.cache = cache_argument(kwargs)
        decode_state.step.begin(decode_state.layer_idx)
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        state.plan_captures(decode_state.surely_decoding(hidden_states.shape[1]),
                            lambda: decode_is_sparse(state.policy, decode_state, hasattr(module, "seer_decode_gate")))
    return hook


def _release_cache_hook(decode_state: DecodeLayerState):
    """Forward hook of a patched attention module: forget the call's cache, which the module would
    otherwise keep alive (with all its memory) after the caller has dropped it."""
    def hook(_module, _args, _output):
        decode_state.cache = None
    return hook


def apply_seer_attention(model: nn.Module, config: SeerAttentionConfig | GateConfig | None = None) -> nn.Module:
    """Add an initialised gate to every targeted attention layer and route attention through
    SeerAttention (mode "sparse"). Works on a loaded model in any dtype and on any device; each gate
    is created on the device of its layer's weights.

    `config` is a `SeerAttentionConfig` (gate shape and sparsity policy) or a `GateConfig` (with the
    default policy). Raises `ValueError` for an unsupported `model_type`, an attention implementation
    other than sdpa/eager, or a model that is already patched; the model is then left unchanged.
    """
    wrapper, model = model, causal_lm(model)
    if config is None:
        config = SeerAttentionConfig()
    elif isinstance(config, GateConfig):
        config = SeerAttentionConfig(gate=config)
    elif not isinstance(config, SeerAttentionConfig):
        raise TypeError(f"config: expected a SeerAttentionConfig or a GateConfig, found {type(config).__name__}")
    spec = _architecture(model)
    if is_patched(model):
        raise ValueError("this model already has SeerAttention gates; call remove_seer_attention first")
    original = model.config._attn_implementation or "eager"
    if original not in SUPPORTED_ATTENTION:
        raise ValueError(f"SeerAttention wraps attn_implementation {list(SUPPORTED_ATTENTION)}; the model "
                         f"uses {original!r}. Load it with attn_implementation='sdpa'")
    if config.gate.base_model_name_or_path is None and getattr(model, "name_or_path", None):
        config = config.replace(base_model_name_or_path=model.name_or_path)
    gate_config = config.gate
    layers = _target_layers(model, gate_config)
    text_config = model.config
    num_heads, num_kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    head_dim = decoder_layers(model)[layers[0]].self_attn.head_dim
    # Raises, while the model is still unchanged, if the gate layout or the policy cannot fit this model.
    gate_weight_shapes(gate_config, num_heads, num_kv_heads, head_dim)
    _check_policy_fits(model, config.policy, layers)
    inv_freq, rope_scaling = rope_frequencies(text_config, gate_config.gate_hidden_size)
    dense_attention = _dense_attention_function(original, spec)
    devices = {i: _gate_device(decoder_layers(model)[i].self_attn, spec, i) for i in layers}
    decode_config = config.decode_gate
    decode_layers = _decode_layers(decode_config, layers)
    decode_rope = rope_frequencies(text_config, decode_config.gate_hidden_size) if decode_config else None
    # The model's own rope at head_dim: the decode summaries undo it to recover pre-RoPE keys.
    key_rope = rope_frequencies(text_config, head_dim)
    decode_block_size = decode_config.block_size if decode_config else gate_config.block_size
    registered_name = _registered_name(original)

    # Everything is checked: from here on the model changes.
    decode_step = DecodeStep()  # what the decoding layers of one forward share
    for layer in decoder_layers(model):
        layer.self_attn.seer_dense_attention = dense_attention
    for layer_idx in layers:
        attention = decoder_layers(model)[layer_idx].self_attn
        gate = SeerGate(num_heads, num_kv_heads, head_dim, gate_config, inv_freq, rope_scaling)
        attention.seer_gate = gate.to(device=devices[layer_idx])
        state = SeerLayerState(layer_idx, gate_config.block_size, config.policy)
        state.hooks = [
            getattr(attention, spec.query_source).register_forward_hook(_capture_hook(state, "captured_query", head_dim)),
            getattr(attention, spec.key_source).register_forward_hook(_capture_hook(state, "captured_key", head_dim)),
        ]
        attention.seer_state = state
        # Every gated layer can decode sparsely (oracle, Quest and streaming need no decode gate).
        decode_state = DecodeLayerState(layer_idx, decode_block_size, key_rope, step=decode_step)
        state.hooks.append(attention.register_forward_pre_hook(_attention_pre_hook(state, decode_state),
                                                               with_kwargs=True))
        state.hooks.append(attention.register_forward_hook(_release_cache_hook(decode_state)))
        attention.seer_decode_state = decode_state
        if layer_idx in decode_layers:
            decode_gate = SeerDecodeGate(num_heads, num_kv_heads, head_dim, decode_config, *decode_rope)
            attention.seer_decode_gate = decode_gate.to(device=devices[layer_idx])

    model.seer_config = config
    model.seer_original_attn_implementation = original
    # `save_pretrained` writes the base model alone (plain transformers reloads it); gates go through save_gates.
    model.seer_original_keys_to_ignore_on_save = model._keys_to_ignore_on_save
    model._keys_to_ignore_on_save = set(model._keys_to_ignore_on_save or ()) | {
        name for name, _ in model.named_parameters() if ".seer_gate." in name or ".seer_decode_gate." in name}
    model.set_attn_implementation(registered_name)
    return wrapper


def remove_seer_attention(model: nn.Module) -> nn.Module:
    """Take the gates and hooks out and restore the model's own attention implementation
    (`model` may be a PEFT model or another wrapper; the model it wraps is changed)."""
    wrapper, model = model, causal_lm(model)
    if not is_patched(model):
        raise ValueError("this model has no SeerAttention gates to remove")
    for attention in patched_attention_modules(model):
        for hook in attention.seer_state.hooks:
            hook.remove()
        del attention.seer_state, attention.seer_gate, attention.seer_decode_state
        if hasattr(attention, "seer_decode_gate"):
            del attention.seer_decode_gate
    for layer in decoder_layers(model):
        del layer.self_attn.seer_dense_attention
    model.set_attn_implementation(model.seer_original_attn_implementation)
    model._keys_to_ignore_on_save = model.seer_original_keys_to_ignore_on_save
    del model.seer_config, model.seer_original_attn_implementation, model.seer_original_keys_to_ignore_on_save
    return wrapper


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


def update_sparsity_config(model: nn.Module, policy: SparsityPolicy | None = None, **changes) -> SeerAttentionConfig:
    """Replace the sparsity policy of a patched model: by `policy`, or by the current one with
    `changes` (threshold, density, selector, backend, ...). The new policy is validated whole before
    anything changes; fields that fix the gate's shape cannot change once gates exist.

    Returns the model's new `seer_config`.
    """
    model = causal_lm(model)
    require_patched(model)
    fixed = sorted(set(changes) & set(GATE_FIELDS))
    if fixed:
        raise ValueError(f"{fixed} fix the gates' shape and cannot change on a patched model")
    if policy is not None and not isinstance(policy, SparsityPolicy):
        raise TypeError(f"policy: expected a SparsityPolicy, found {type(policy).__name__}")
    policy = (policy or model.seer_config.policy).replace(**changes)
    _check_policy_fits(model, policy, [a.seer_state.layer_idx for a in patched_attention_modules(model)])
    model.seer_config = SeerAttentionConfig(gate=model.seer_config.gate, policy=policy,
                                            decode_gate=model.seer_config.decode_gate)
    for attention in patched_attention_modules(model):
        attention.seer_state.policy = policy
    return model.seer_config


def _check_policy_fits(model: nn.Module, policy: SparsityPolicy, layers: list[int]) -> None:
    """Raise `InvalidSetting` where a policy needs per-layer values this model's gated layers lack."""
    heads = model.config.num_attention_heads if policy.mask_sharing == "head" else model.config.num_key_value_heads
    check_calibrated_thresholds(policy, layers, heads)


def gate_parameters(model: nn.Module, kinds: tuple[str, ...] = DISTILL_KINDS) -> list[nn.Parameter]:
    """The parameters of every gate of the given kinds ("prefill", "decode"; default both), in layer order."""
    attributes = [name for kind, name in (("prefill", "seer_gate"), ("decode", "seer_decode_gate")) if kind in kinds]
    return [parameter for attention in require_patched(model)
            for gate in (getattr(attention, name, None) for name in attributes) if gate is not None
            for parameter in gate.parameters()]


def pop_distill_records(model: nn.Module) -> list:
    """The `DistillRecord`s of the last distillation forward, in layer order, cleared after reading."""
    records = []
    for attention in require_patched(model):
        if attention.seer_state.distill_record is not None:
            records.append(attention.seer_state.distill_record)
            attention.seer_state.distill_record = None
    return records


def set_distill_targets(model: nn.Module, kinds: tuple[str, ...] = ("prefill",),
                        settings: DecodeDistillSettings | None = None,
                        prefill_target: str = "block_max") -> nn.Module:
    """Which gates distillation mode trains on every gated layer: "prefill", "decode" or both (in
    decode-only distillation, layers without a decode gate run the model's own attention), and the
    prefill gates' target (`POOLED_TARGETS`: "block_max" or "block_mass")."""
    if not kinds or not set(kinds) <= set(DISTILL_KINDS):
        raise ValueError(f"distillation kinds: expected a non-empty subset of {list(DISTILL_KINDS)}, "
                         f"found {list(kinds)}")
    check_pooled_target(prefill_target)
    attentions = require_patched(model)
    if "decode" in kinds and not any(hasattr(attention, "seer_decode_gate") for attention in attentions):
        raise ValueError("decode distillation needs decode gates: patch the model with a SeerAttentionConfig "
                         "whose decode_gate is set")
    for attention in attentions:
        attention.seer_state.distill_kinds = tuple(kinds)
        attention.seer_state.decode_distill = settings
        attention.seer_state.distill_target = prefill_target
    return model


def pop_decode_distill_records(model: nn.Module) -> list:
    """The `DecodeDistillRecord`s of the last distillation forward, in layer order, cleared after reading."""
    records = []
    for attention in require_patched(model):
        if attention.seer_state.decode_distill_record is not None:
            records.append(attention.seer_state.decode_distill_record)
            attention.seer_state.decode_distill_record = None
    return records


def get_sparsity_stats(model: nn.Module) -> dict:
    """Block density of the sparse forwards since the gates were applied or the stats were reset.

    Returns {"density": computed causal blocks / all causal blocks over all layers, heads and rows,
    "per_layer": [{"layer": i, "density": d}, ...], "kept_blocks": int, "causal_blocks": int,
    "decode_density": KV blocks read / blocks up to each generated token (per KV head, over the
    sparsely decoding layers and steps), "decode_kept_blocks": int, "decode_blocks": int,
    "paths": {path: layer calls}, the path each gated layer's attention took on prompts ("sparse",
    "dense", "sparse_continued", "distill"; see `attention.prefill_path`), and "backends":
    {"<path>:<backend>": layer calls}, the kernels the policy's backend chose for them ("fa4",
    "triton", "torch", "flex", or "model" for the model's own attention); decoding steps are not
    counted}.
    """
    per_layer, kept_total, causal_total = [], 0, 0
    paths, backends = Counter(), Counter()
    for attention in require_patched(model):
        state = attention.seer_state
        for (path, backend), calls in state.calls.items():
            paths[path] += calls
            backends[f"{path}:{backend}"] += calls
        if state.kept_blocks is None:
            continue
        kept, causal = int(state.kept_blocks.sum()), int(state.causal_blocks.sum())
        per_layer.append({"layer": state.layer_idx, "density": kept / causal})
        kept_total, causal_total = kept_total + kept, causal_total + causal
    density = kept_total / causal_total if causal_total else None
    decode_kept = decode_total = 0
    for attention in patched_attention_modules(model):
        decode = attention.seer_decode_state
        if decode.kept_blocks is not None:
            decode_kept += int(decode.kept_blocks.sum())
            decode_total += int(decode.total_blocks.sum())
    return {"density": density, "per_layer": per_layer, "kept_blocks": kept_total, "causal_blocks": causal_total,
            "decode_density": decode_kept / decode_total if decode_total else None,
            "decode_kept_blocks": decode_kept, "decode_blocks": decode_total,
            "paths": dict(sorted(paths.items())), "backends": dict(sorted(backends.items()))}


def reset_sparsity_stats(model: nn.Module) -> None:
    for attention in require_patched(model):
        attention.seer_state.kept_blocks = attention.seer_state.causal_blocks = None
        attention.seer_state.calls.clear()
        attention.seer_decode_state.reset_counts()
