"""Gate adapters: a folder holding the gate tensors (safetensors), a JSON config and a model card.

Loading is strict: every expected tensor must be present with its shape, nothing else may be, and
the model the gates go into must have the architecture they were trained for.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import CONFIG_NAME, SeerAttentionConfig, read_json_object
from .embedded import resolve_model_path
from .gate_config import GATE_FIELDS
from .patching import (
    apply_seer_attention,
    is_patched,
    patched_attention_modules,
    remove_seer_attention,
    require_patched,
)
from .utils import atomic_path, atomic_write_text
from .version import __version__

WEIGHTS_NAME = "seer_gates.safetensors"
LIBRARY_NAME = "seerattn_hf"
# Keys of the adapter config that describe the base model the gates fit.
LAYOUT_KEYS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")


def model_layout(model: nn.Module) -> dict:
    """The base-model facts a gate file depends on."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"model_type": config.model_type, "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads, "head_dim": head_dim}


def gate_tensors(attention: nn.Module) -> dict[str, torch.Tensor]:
    """The gate tensors of one gated attention module, as they are (no copy), keyed as in the adapter
    file: `layers.{i}.{q_weight|k_weight}`."""
    return {f"layers.{attention.seer_state.layer_idx}.{name}": tensor
            for name, tensor in attention.seer_gate.state_dict().items()}


def gate_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gate tensors keyed `layers.{i}.{q_weight|k_weight}`, float32 on the CPU."""
    return {key: tensor.detach().float().cpu().contiguous()
            for attention in patched_attention_modules(model) for key, tensor in gate_tensors(attention).items()}


def _model_card(config: SeerAttentionConfig, layout: dict) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    base = config.base_model_name_or_path
    data = ModelCardData(library_name=LIBRARY_NAME, base_model=base if base and not os.path.isdir(base) else None,
                         tags=["seerattention", "sparse-attention", "long-context", layout["model_type"]])
    body = (f"# SeerAttention gates for {base or 'a ' + layout['model_type'] + ' model'}\n\n"
            f"Learned block-sparse attention gates ({config.block_size}-token blocks, gate width "
            f"{config.gate_hidden_size}) for the {layout['num_hidden_layers']}-layer base model.\n\n"
            "```python\nimport seerattn_hf\n\nmodel = seerattn_hf.from_pretrained(\"<this repo or folder>\")\n```\n")
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def save_gates(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the gate adapter of a patched model to folder `path` (created if needed).

    Files: `seer_gates.safetensors`, `seer_config.json` (the SeerAttentionConfig, the library version
    and the base model's layout) and a `README.md` model card. Each file is written atomically.
    """
    require_patched(model)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config, layout = model.seer_config, model_layout(model)
    layers = [attention.seer_state.layer_idx for attention in patched_attention_modules(model)]
    with atomic_path(folder / WEIGHTS_NAME) as temporary:
        save_file(gate_state_dict(model), temporary, metadata={"format": "pt", "library": LIBRARY_NAME})
    config.replace(layers=layers).save_json(folder / CONFIG_NAME,
                                            extra={"library_version": __version__, "base_model_layout": layout})
    atomic_write_text(folder / "README.md", _model_card(config, layout))
    return folder


def _resolve_folder(path_or_hub_id: str | os.PathLike, revision: str | None, cache_dir, token,
                    local_files_only: bool) -> Path:
    if os.path.isdir(path_or_hub_id):
        return Path(path_or_hub_id)
    if os.path.exists(path_or_hub_id) or str(path_or_hub_id).endswith((".json", ".safetensors")):
        raise ValueError(f"expected a gate adapter folder or a Hub repo id, found the file {path_or_hub_id!r}")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path_or_hub_id), revision=revision, cache_dir=cache_dir, token=token,
                                  local_files_only=local_files_only,
                                  allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "README.md"]))


def _read_adapter_config(folder: Path) -> tuple[SeerAttentionConfig, dict]:
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a SeerAttention gate adapter: {CONFIG_NAME} is missing")
    values = read_json_object(config_path)
    _warn_if_newer(values.get("library_version"), config_path)
    config = SeerAttentionConfig.from_dict(values, source=str(config_path))
    return config, values.get("base_model_layout") or {}


def _warn_if_newer(written_by, source: Path) -> None:
    from packaging.version import InvalidVersion, Version

    try:
        newer = written_by is not None and Version(str(written_by)) > Version(__version__)
    except InvalidVersion:
        newer = True
    if newer:
        warnings.warn(f"{source} was written by seerattn_hf {written_by}, newer than this {__version__}; "
                      "settings it adds are ignored", stacklevel=3)


def _check_layout(model: nn.Module, layout: dict, source: Path) -> None:
    found = model_layout(model)
    differences = [f"{key}: gates {layout[key]!r}, model {found[key]!r}"
                   for key in LAYOUT_KEYS if key in layout and layout[key] != found[key]]
    if differences:
        raise ValueError(f"the gates in {source} were trained for another model ({'; '.join(differences)})")


def load_gate_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load `seer_gates.safetensors` into a patched model, checking keys and shapes strictly."""
    weights_path = Path(folder) / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{folder} holds no {WEIGHTS_NAME}")
    loaded = load_file(str(weights_path))
    expected = {key: tensor for attention in patched_attention_modules(model)
                for key, tensor in gate_tensors(attention).items()}
    missing, unexpected = sorted(set(expected) - set(loaded)), sorted(set(loaded) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not match the gated layers: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    wrong = [f"{key}: file {tuple(loaded[key].shape)}, model {tuple(expected[key].shape)}"
             for key in expected if loaded[key].shape != expected[key].shape]
    if wrong:
        raise ValueError(f"{weights_path} has tensors of the wrong shape: {'; '.join(wrong[:8])}")
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(loaded[key])


def from_pretrained(path_or_hub_id: str | os.PathLike, model: nn.Module | None = None, *,
                    revision: str | None = None, cache_dir: str | None = None, token: str | bool | None = None,
                    local_files_only: bool = False, model_kwargs: dict | None = None, **overrides) -> nn.Module:
    """Load a gate adapter (folder or Hub id) into `model`, or into the base model it names.

    `overrides` change sparse-prefill settings at load time (e.g. `threshold=5e-4`,
    `sparsity_method="density", density=0.3`); fields that fix the gates' shape cannot be
    overridden. `model_kwargs` go to `AutoModelForCausalLM.from_pretrained` when `model` is None.
    """
    folder = _resolve_folder(path_or_hub_id, revision, cache_dir, token, local_files_only)
    config, layout = _read_adapter_config(folder)
    fixed = sorted(set(overrides) & set(GATE_FIELDS))
    if fixed:
        raise ValueError(f"{fixed} are fixed by the saved gates and cannot be overridden at load time")
    config = config.replace(**overrides)
    if model is None:
        if not config.base_model_name_or_path:
            raise ValueError(f"{folder / CONFIG_NAME} names no base model; pass model=")
        from transformers import AutoModelForCausalLM

        path, gguf_file = resolve_model_path(config.base_model_name_or_path)
        model_kwargs = {**({"gguf_file": gguf_file} if gguf_file else {}), **(model_kwargs or {})}
        model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
    _check_layout(model, layout, folder)
    if is_patched(model):
        raise ValueError("the model already has SeerAttention gates; call remove_seer_attention first")
    apply_seer_attention(model, config)
    try:
        load_gate_weights(model, folder)
    except Exception:
        remove_seer_attention(model)
        raise
    return model


def push_gates_to_hub(model: nn.Module, repo_id: str, *, private: bool | None = None, token: str | None = None,
                      revision: str | None = None, commit_message: str = "Upload SeerAttention gates") -> str:
    """Save the gate adapter to a temporary folder and upload it to Hub repo `repo_id`; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as folder:
        save_gates(model, folder)
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                   commit_message=commit_message)
    return str(commit)
