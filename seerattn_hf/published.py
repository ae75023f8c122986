"""The gates the SeerAttention authors published (`SeerAttention/SeerAttention-*-AttnGates` on the Hub).

Such a folder holds `config.json` (the base model's config plus `seerattn_*` settings, `base_model`
naming the base model) and `attn_gate_weights.pth` (a `torch.save` of the gate tensors, keyed
`model.layers.{i}.self_attn.attn_gate.mask_linear_{q,k}.weight`). This module knows that format: it
translates the settings into a `SeerAttentionConfig`, names the tensors, and reads the `.pth` without
running code from it. Adapter I/O (`from_pretrained`, `seerattn-convert`) lives in `adapter.py`.

Only the prefill gates are read. The decode gates of SeerAttention-R (`attngate_*` keys) are
refused by name, so that they can be added here beside the prefill format.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from .config import SeerAttentionConfig
from .gate_config import GateConfig
from .policy import SparsityPolicy
from .validation import InvalidSetting

PUBLISHED_CONFIG_NAME = "config.json"
PUBLISHED_WEIGHTS_NAME = "attn_gate_weights.pth"
SETTINGS_PREFIX = "seerattn_"
# Our tensor names (`layers.{i}.<name>`) and the published ones.
PUBLISHED_TENSOR_NAMES = {"q_weight": "mask_linear_q.weight", "k_weight": "mask_linear_k.weight"}
PUBLISHED_KEY = "model.layers.{layer}.self_attn.attn_gate.{name}"
# What the paper's config class uses for a setting that a config.json leaves out.
PAPER_DEFAULTS = {
    "seerattn_sparsity_method": "threshold", "seerattn_threshold": 0.0, "seerattn_nz_ratio": 1.0,
    "seerattn_gate_type": "Qavg_Kmaxminavg", "seerattn_gate_block_size": 64, "seerattn_gate_hidden_size": 128,
    "seerattn_last_block_dense": True, "seerattn_gate_force_double": False,
}
# With `seerattn_last_block_dense` the paper's code computes the last two query-block rows densely.
PUBLISHED_DENSE_LAST_ROWS = 2
# Settings only the decode gates (SeerAttention-R) have.
DECODE_SETTINGS = ("seerattn_token_budget", "seerattn_q_head_pooling_type", "seerattn_k_seq_pooling_type")
POOLING_NAMES = "max|min|avg"


def is_published_config(values: dict[str, Any]) -> bool:
    """Whether a config.json's values carry the published gates' settings."""
    return any(key.startswith(SETTINGS_PREFIX) for key in values)


def published_key(key: str) -> str:
    """Our tensor name `layers.{i}.{q_weight|k_weight}` -> its name in `attn_gate_weights.pth`."""
    _, layer, name = key.split(".")
    return PUBLISHED_KEY.format(layer=layer, name=PUBLISHED_TENSOR_NAMES[name])


def parse_gate_type(gate_type: Any, source: str) -> tuple[list[str], list[str]]:
    """`"Qavg_Kmaxminavg"` -> (["avg"], ["max", "min", "avg"]): the pooling kinds, in feature order."""
    pattern = rf"Q((?:{POOLING_NAMES})+)_K((?:{POOLING_NAMES})+)"
    match = re.fullmatch(pattern, gate_type) if isinstance(gate_type, str) else None
    if match is None:
        raise ValueError(f"{source}: seerattn_gate_type: expected 'Q<poolings>_K<poolings>' with poolings from "
                         f"max, min, avg (e.g. 'Qavg_Kmaxminavg'), found {gate_type!r}")
    return [re.findall(POOLING_NAMES, side) for side in match.groups()]


def published_config(values: dict[str, Any], head_dim: int, source: str) -> SeerAttentionConfig:
    """The `SeerAttentionConfig` that computes what the paper's code computes with these settings.

    Gate: the paper's gate has a Q projection only with several Q poolings, a gate width other than
    head_dim, or `seerattn_gate_force_double`; without one, K is projected per query head. It runs in
    the model's dtype. Selection: threshold or nz_ratio, the diagonal not forced, the last two
    query-block rows dense with `seerattn_last_block_dense`.
    """
    decode = sorted(key for key in DECODE_SETTINGS if key in values)
    if decode:
        raise ValueError(f"{source} describes SeerAttention-R decode gates ({', '.join(decode)}); this version "
                         "of seerattn_hf loads the published prefill gates only")
    settings = {**PAPER_DEFAULTS, **{key: value for key, value in values.items() if key in PAPER_DEFAULTS}}
    q_pooling, k_pooling = parse_gate_type(settings["seerattn_gate_type"], source)
    hidden = settings["seerattn_gate_hidden_size"]
    q_projection = len(q_pooling) > 1 or hidden != head_dim or bool(settings["seerattn_gate_force_double"])
    method = settings["seerattn_sparsity_method"]
    if method not in ("threshold", "nz_ratio"):
        raise ValueError(f"{source}: seerattn_sparsity_method: expected 'threshold' or 'nz_ratio', found {method!r}")
    try:
        gate = GateConfig(block_size=settings["seerattn_gate_block_size"], gate_hidden_size=hidden,
                          q_pooling=q_pooling, k_pooling=k_pooling, q_projection=q_projection,
                          k_projection="kv_head" if q_projection else "query_head", compute_dtype="model",
                          base_model_name_or_path=values.get("base_model"))
        policy = SparsityPolicy(sparsity_method=method, **{method: settings[f"seerattn_{method}"]},
                                keep_diagonal=False,
                                dense_last_query_blocks=PUBLISHED_DENSE_LAST_ROWS
                                if settings["seerattn_last_block_dense"] else 0)
    except InvalidSetting as error:
        raise ValueError(f"{source}: its seerattn_* settings give {error}") from None
    return SeerAttentionConfig(gate=gate, policy=policy)


def load_published_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an `attn_gate_weights.pth`, by their names in the file.

    `torch.load(weights_only=True)` unpickles tensors and plain containers only, so no code in the
    file runs; anything that is not a dict of tensors is refused.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} holds no {PUBLISHED_WEIGHTS_NAME}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: expected a dict of tensors that torch.load(weights_only=True) reads; refused "
                         f"({reason})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a dict of tensors, found a {type(loaded).__name__}")
    others = [f"{key!r}: {type(value).__name__}" for key, value in loaded.items()
              if not (isinstance(key, str) and isinstance(value, torch.Tensor))]
    if others:
        raise ValueError(f"{path}: expected a dict of tensors, found entries that are not tensors "
                         f"({', '.join(others[:8])}{' ...' if len(others) > 8 else ''})")
    return dict(loaded)
