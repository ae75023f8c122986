"""Loading the models that evaluation runs on: a path or Hub id, an embedded model, or a config preset
with random weights (for timing), plus the SeerAttention patch that every evaluation shares."""

from __future__ import annotations

import torch
from torch import nn

from ..embedded import EMBEDDED_MODELS, resolve_model_path  # noqa: F401  (re-exported)
from ..gate_config import GATE_FIELDS

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}

_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# Shapes of known models for timing with random weights; "tiny-llama" keeps CPU runs fast.
CONFIG_PRESETS = {
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_parameters=_LLAMA3_ROPE,
                         tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128009),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, head_dim=128, vocab_size=152064,
                       max_position_embeddings=131072, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                       tie_word_embeddings=False),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=131072, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                     tie_word_embeddings=False),
    "tiny-llama": dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512,
                       max_position_embeddings=131072, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       tie_word_embeddings=False),
}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, found {name!r}")
    return DTYPES[name]


def resolve_device(name: str | None) -> torch.device:
    """`None` or "auto" picks CUDA when present."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model_and_tokenizer(model: str, gguf_file: str | None = None, device: str | torch.device | None = None,
                             dtype: str = "bf16", attn_implementation: str = "sdpa"):
    """(model in eval mode on `device`, tokenizer) for a folder, a Hub id or an embedded model name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf = resolve_model_path(model, gguf_file)
    extra = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype),
                                                  attn_implementation=attn_implementation, **extra)
    return loaded.to(resolve_device(device)).eval(), tokenizer


def build_random_model(preset: str, device: str | torch.device | None = None, dtype: str = "bf16",
                       num_layers: int | None = None, attn_implementation: str = "sdpa") -> nn.Module:
    """A model of a preset's shape with random weights, built directly on `device` (for timing:
    the cost of a forward does not depend on the weights' values)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if preset not in CONFIG_PRESETS:
        raise ValueError(f"config preset: expected one of {sorted(CONFIG_PRESETS)}, found {preset!r}")
    values = dict(CONFIG_PRESETS[preset])
    if num_layers is not None:
        values["num_hidden_layers"] = num_layers
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device(resolve_device(device)):
        model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(dtype),
                                                 attn_implementation=attn_implementation)
    return model.eval()


def patch_model(model: nn.Module, gates: str | None = None, **config_fields) -> nn.Module:
    """Add SeerAttention to `model`: trained gates from the adapter folder `gates`, else untrained gates
    (enough for the oracle, pooled-score and streaming selectors, and for timing at a density)."""
    import seerattn_hf as sa

    if gates:
        # The trained gates fix their own shape (block size, ...): only policy fields apply.
        return sa.from_pretrained(gates, model=model,
                                  **{k: v for k, v in config_fields.items() if k not in GATE_FIELDS})
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(**config_fields))
    return model
