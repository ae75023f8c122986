"""Gate adapters: a folder holding the gate tensors (safetensors), a JSON config and a model card.

Loading also reads the gates the SeerAttention authors published (`config.json` and
`attn_gate_weights.pth`, see `published.py`), and `convert_published_gates` writes them in this
library's format. Loading is strict: every expected tensor must be present with its shape, nothing
else may be, and the model the gates go into must have the architecture they were trained for.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import nn

from .config import CONFIG_NAME, SeerAttentionConfig, read_json_object
from .decode_gate import decode_gate_weight_shapes
from .embedded import resolve_model_path
from .gate import gate_weight_shapes
from .gate_config import GATE_FIELDS, LOAD_TIME_GATE_FIELDS
from .patching import (
    apply_seer_attention,
    causal_lm,
    is_patched,
    patched_attention_modules,
    remove_seer_attention,
    require_patched,
)
from .published import (
    PUBLISHED_CONFIG_NAME,
    PUBLISHED_WEIGHTS_NAME,
    is_published_config,
    load_published_tensors,
    published_config,
    published_key,
)
from .utils import atomic_files, atomic_write_safetensors, atomic_write_text
from .version import __version__

WEIGHTS_NAME = "seer_gates.safetensors"
# Decode-gate tensors sit beside the prefill gate's: `layers.{i}.decode.{name}`.
DECODE_PREFIX = "decode."
LIBRARY_NAME = "seerattn_hf"
# Keys of the adapter config that describe the base model the gates fit.
LAYOUT_KEYS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
# What a Hub download of an adapter fetches: either format's files and the model card.
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, "README.md", PUBLISHED_CONFIG_NAME, PUBLISHED_WEIGHTS_NAME)


def config_layout(values: dict, source: str) -> dict:
    """The base-model facts a gate file depends on (`LAYOUT_KEYS`), from a model config's values."""
    missing = [key for key in ("model_type", "num_hidden_layers", "num_attention_heads") if values.get(key) is None]
    if values.get("head_dim") is None and values.get("hidden_size") is None:
        missing.append("head_dim or hidden_size")
    if missing:
        raise ValueError(f"{source}: expected the base model's config fields, found no {missing}")
    heads = values["num_attention_heads"]
    return {"model_type": values["model_type"], "num_hidden_layers": values["num_hidden_layers"],
            "num_attention_heads": heads, "num_key_value_heads": values.get("num_key_value_heads") or heads,
            "head_dim": values.get("head_dim") or values["hidden_size"] // heads}


def model_layout(model: nn.Module) -> dict:
    """The base-model facts a gate file depends on."""
    return config_layout(causal_lm(model).config.to_dict(), "the model's config")


def gate_tensors(attention: nn.Module) -> dict[str, torch.Tensor]:
    """The gate tensors of one gated attention module, as they are (no copy), keyed as in the adapter
    file: `layers.{i}.{q_weight|k_weight}` and, for a decode gate, `layers.{i}.decode.{name}`."""
    prefix = f"layers.{attention.seer_state.layer_idx}."
    tensors = {prefix + name: tensor for name, tensor in attention.seer_gate.state_dict().items()}
    decode_gate = getattr(attention, "seer_decode_gate", None)
    if decode_gate is not None:
        tensors.update({f"{prefix}{DECODE_PREFIX}{name}": tensor for name, tensor in decode_gate.state_dict().items()})
    return tensors


def gate_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gate tensors keyed `layers.{i}.{q_weight|k_weight}`, float32 on the CPU."""
    return {key: tensor.detach().float().cpu().contiguous()
            for attention in patched_attention_modules(model) for key, tensor in gate_tensors(attention).items()}


def _model_card(config: SeerAttentionConfig, layout: dict, converted_from: str | None = None) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    base = config.base_model_name_or_path
    data = ModelCardData(library_name=LIBRARY_NAME, base_model=base if base and not os.path.isdir(base) else None,
                         tags=["seerattention", "sparse-attention", "long-context", layout["model_type"]])
    origin = (f"Converted by `seerattn-convert` from `{converted_from}`, gates published by the SeerAttention "
              "authors: the same tensors, stored as safetensors.\n\n" if converted_from else "")
    body = (f"# SeerAttention gates for {base or 'a ' + layout['model_type'] + ' model'}\n\n"
            f"Learned block-sparse attention gates ({config.block_size}-token blocks, gate width "
            f"{config.gate_hidden_size}) for the {layout['num_hidden_layers']}-layer base model.\n\n{origin}"
            "```python\nimport seerattn_hf\n\nmodel = seerattn_hf.from_pretrained(\"<this repo or folder>\")\n```\n")
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def _is_our_model_card(path: Path) -> bool:
    """Whether README.md at `path` is a card this library wrote (its metadata names the library)."""
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(path).data.to_dict().get("library_name") == LIBRARY_NAME
    except Exception:  # not a model card at all: someone else's README
        return False


def save_gates(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the gate adapter of a patched model to folder `path` (created if needed).

    Files: `seer_gates.safetensors`, `seer_config.json` (the SeerAttentionConfig, the library version
    and the base model's layout) and a `README.md` model card, replaced together (all or none). A
    README.md that this library did not write is left as it is. `model` may be a PEFT model or
    another wrapper.
    """
    model = causal_lm(model)
    require_patched(model)
    layers = [attention.seer_state.layer_idx for attention in patched_attention_modules(model)]
    return _write_adapter(Path(path), model.seer_config.replace(layers=layers), model_layout(model),
                          gate_state_dict(model))


def _write_adapter(folder: Path, config: SeerAttentionConfig, layout: dict, tensors: dict[str, torch.Tensor],
                   converted_from: str | None = None) -> Path:
    """The adapter files of `save_gates`, from a config, the base model's layout and the gate tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_files():  # a failed save leaves the previous adapter whole, never new tensors with an old config
        atomic_write_safetensors(folder / WEIGHTS_NAME, tensors, metadata={"format": "pt", "library": LIBRARY_NAME})
        config.save_json(folder / CONFIG_NAME, extra={"library_version": __version__, "base_model_layout": layout})
        card = folder / "README.md"
        if card.exists() and not _is_our_model_card(card):
            warnings.warn(f"{card} exists and was not written by {LIBRARY_NAME}: left unchanged (no model card "
                          "written)", stacklevel=3)
        else:
            atomic_write_text(card, _model_card(config, layout, converted_from))
    return folder


def _looks_like_a_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else can only be meant as a local path.
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def _resolve_folder(path_or_hub_id: str | os.PathLike, revision: str | None, cache_dir, token,
                    local_files_only: bool) -> Path:
    if os.path.isdir(path_or_hub_id):
        return Path(path_or_hub_id)
    if os.path.exists(path_or_hub_id) or str(path_or_hub_id).endswith((".json", ".safetensors", ".pth")):
        raise ValueError(f"expected a gate adapter folder or a Hub repo id, found the file {path_or_hub_id!r}")
    if isinstance(path_or_hub_id, os.PathLike) or _looks_like_a_path(str(path_or_hub_id)):
        raise FileNotFoundError(f"expected a gate adapter folder at {str(path_or_hub_id)!r}, found no such folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(str(path_or_hub_id), revision=revision, cache_dir=cache_dir, token=token,
                                      local_files_only=local_files_only,
                                      allow_patterns=list(ADAPTER_FILES)))
    except HFValidationError as error:
        raise ValueError(f"expected a gate adapter folder or a Hub repo id ('owner/name'), found {path_or_hub_id!r}, "
                         f"which is neither a folder here nor a valid repo id ({error})") from None
    except OSError as error:  # not found on the Hub, not cached offline, no connection
        raise FileNotFoundError(f"{path_or_hub_id!r} is neither a folder here nor a Hub repo that could be reached "
                                f"({type(error).__name__}: {error})") from error


@dataclass(frozen=True)
class StoredGates:
    """An adapter folder as read from disk, in this library's format or the published one.

    layout: the base-model facts the gates fit (`LAYOUT_KEYS`; adapters of release 0.1.0 may lack some).
    shapes: the file's tensor names -> shapes. read_tensors: the file's tensors, by their names there.
    published: the published format, whose tensor names differ from ours (`file_key`).
    """

    config: SeerAttentionConfig
    layout: dict
    weights_path: Path
    shapes: dict[str, tuple[int, ...]]
    read_tensors: Callable[[], dict[str, torch.Tensor]]
    published: bool = False

    def file_key(self, key: str) -> str:
        """Our tensor name (`layers.{i}.k_weight`) -> its name in the file."""
        return published_key(key) if self.published else key


def read_stored_gates(folder: Path) -> StoredGates:
    """Read an adapter folder: `seer_config.json` and `seer_gates.safetensors` (only the header now),
    or the published `config.json` and `attn_gate_weights.pth` (its tensors now: a pickle has no header)."""
    config_path = folder / CONFIG_NAME
    if config_path.is_file():
        values = read_json_object(config_path)
        _warn_if_newer(values.get("library_version"), config_path)
        config = SeerAttentionConfig.from_dict(values, source=str(config_path))
        weights_path = folder / WEIGHTS_NAME
        return StoredGates(config, values.get("base_model_layout") or {}, weights_path, _stored_shapes(weights_path),
                           lambda: load_file(str(weights_path)))
    published_path = folder / PUBLISHED_CONFIG_NAME
    values = read_json_object(published_path) if published_path.is_file() else {}
    if not is_published_config(values):
        raise FileNotFoundError(f"{folder} is not a SeerAttention gate adapter: {CONFIG_NAME} is missing, and it "
                                f"holds no {PUBLISHED_CONFIG_NAME} with seerattn_* settings (the published gates)")
    layout = config_layout(values, str(published_path))
    config = published_config(values, layout["head_dim"], str(published_path))
    tensors = load_published_tensors(folder / PUBLISHED_WEIGHTS_NAME)
    return StoredGates(config, layout, folder / PUBLISHED_WEIGHTS_NAME,
                       {key: tuple(tensor.shape) for key, tensor in tensors.items()}, lambda: tensors, published=True)


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


def _stored_shapes(weights_path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a safetensors file, read from its header (no tensor is loaded)."""
    from safetensors import SafetensorError, safe_open

    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path.parent} holds no {WEIGHTS_NAME}")
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights_path} is not a readable safetensors file ({error})") from error


def expected_gate_shapes(config: SeerAttentionConfig, layout: dict) -> dict[str, tuple[int, ...]]:
    """The gate tensors (name -> shape) that gates of `config` have in a model of `layout`."""
    layers = config.layers if config.layers is not None else range(layout["num_hidden_layers"])
    heads = (layout["num_attention_heads"], layout["num_key_value_heads"], layout["head_dim"])
    per_layer = gate_weight_shapes(config.gate, *heads)
    shapes = {f"layers.{i}.{name}": shape for i in layers for name, shape in per_layer.items()}
    if config.decode_gate is not None:
        decode_layers = config.decode_gate.layers if config.decode_gate.layers is not None else layers
        per_layer = decode_gate_weight_shapes(config.decode_gate, *heads)
        shapes.update({f"layers.{i}.{DECODE_PREFIX}{name}": shape for i in decode_layers
                       for name, shape in per_layer.items()})
    return shapes


def check_gate_file(stored: StoredGates, expected: dict[str, tuple[int, ...]]) -> None:
    """Raise `ValueError` unless the file holds exactly the `expected` tensors (our names -> shapes);
    the messages name the tensors as the file does."""
    expected = {stored.file_key(key): shape for key, shape in expected.items()}
    found, path = stored.shapes, stored.weights_path
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the gated layers: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    wrong = [f"{key}: file {found[key]}, model {expected[key]}" for key in expected if found[key] != expected[key]]
    if wrong:
        raise ValueError(f"{path} has tensors of the wrong shape: {'; '.join(wrong[:8])}")


def _copy_gate_tensors(model: nn.Module, stored: StoredGates) -> None:
    targets = {key: tensor for attention in patched_attention_modules(model)
               for key, tensor in gate_tensors(attention).items()}
    check_gate_file(stored, {key: tuple(tensor.shape) for key, tensor in targets.items()})
    loaded = stored.read_tensors()
    with torch.no_grad():
        for key, tensor in targets.items():
            tensor.copy_(loaded[stored.file_key(key)])


def load_gate_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load the gate tensors of an adapter folder (either format) into a patched model, checking keys
    and shapes strictly."""
    _copy_gate_tensors(model, read_stored_gates(Path(folder)))


def from_pretrained(path_or_hub_id: str | os.PathLike, model: nn.Module | None = None, *,
                    revision: str | None = None, cache_dir: str | None = None, token: str | bool | None = None,
                    local_files_only: bool = False, model_kwargs: dict | None = None, **overrides) -> nn.Module:
    """Load a gate adapter (folder or Hub id) into `model`, or into the base model it names.

    The adapter is this library's (`seer_config.json`, `seer_gates.safetensors`) or one of the gates
    the SeerAttention authors published (`config.json` with `seerattn_*` settings,
    `attn_gate_weights.pth`, read without unpickling anything but tensors). `overrides` change
    sparse-prefill settings at load time (e.g. `threshold=5e-4`, `sparsity_method="density",
    density=0.3`) and `compute_dtype`; fields that fix the gates' shape cannot be overridden.
    `model_kwargs` go to `AutoModelForCausalLM.from_pretrained` when `model` is None.
    """
    folder = _resolve_folder(path_or_hub_id, revision, cache_dir, token, local_files_only)
    stored = read_stored_gates(folder)
    fixed = sorted(set(overrides) & (set(GATE_FIELDS) - set(LOAD_TIME_GATE_FIELDS)))
    if fixed:
        raise ValueError(f"{fixed} are fixed by the saved gates and cannot be overridden at load time")
    config, layout = stored.config.replace(**overrides), stored.layout
    layout_known = set(LAYOUT_KEYS) <= set(layout)
    if layout_known:  # checked before any base-model weight is loaded
        check_gate_file(stored, expected_gate_shapes(config, layout))
    if model is None:
        if not config.base_model_name_or_path:
            raise ValueError(f"the gates in {folder} name no base model; pass model=")
        from transformers import AutoModelForCausalLM

        path, gguf_file = resolve_model_path(config.base_model_name_or_path)
        model_kwargs = {**({"gguf_file": gguf_file} if gguf_file else {}), **(model_kwargs or {})}
        model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
    wrapper, model = model, causal_lm(model)
    _check_layout(model, layout, folder)
    if is_patched(model):
        raise ValueError("the model already has SeerAttention gates; call remove_seer_attention first")
    if not layout_known:  # checked before any gate exists
        check_gate_file(stored, expected_gate_shapes(config, model_layout(model)))
    apply_seer_attention(model, config)
    try:
        _copy_gate_tensors(model, stored)
    except Exception:
        remove_seer_attention(model)
        raise
    return wrapper


def convert_published_gates(source: str | os.PathLike, destination: str | os.PathLike, *,
                            revision: str | None = None, cache_dir: str | None = None,
                            token: str | bool | None = None, local_files_only: bool = False) -> Path:
    """Write published gates (folder or Hub id) as this library's adapter in folder `destination`.

    The tensors are the published ones, unchanged (bf16), stored as safetensors, and the config
    carries the published settings (see `published_config`): loading the result gives exactly what
    loading `source` gives, and unpickles nothing. Keys and shapes are checked as when loading.
    """
    stored = read_stored_gates(_resolve_folder(source, revision, cache_dir, token, local_files_only))
    if not stored.published:
        raise ValueError(f"expected published gates ({PUBLISHED_CONFIG_NAME}, {PUBLISHED_WEIGHTS_NAME}) at "
                         f"{str(source)!r}, found a {LIBRARY_NAME} adapter ({CONFIG_NAME}): nothing to convert")
    expected = expected_gate_shapes(stored.config, stored.layout)
    check_gate_file(stored, expected)
    tensors = stored.read_tensors()
    ours = {key: tensors[stored.file_key(key)].contiguous() for key in expected}
    return _write_adapter(Path(destination), stored.config, stored.layout, ours, converted_from=str(source))


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
