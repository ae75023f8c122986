"""Loading base models, one way for training and evaluation: a folder, a Hub id or an embedded model
(with its tokenizer), optionally with a PEFT adapter; or a model of a known shape with random weights
(for timing). Model-type and context checks run on the config alone, before any weight loads."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .embedded import resolve_model_path

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


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, found {name!r}")
    return DTYPES[name]


def resolve_device(name: str | torch.device | None) -> torch.device:
    """`None` or "auto" picks CUDA when present."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model_config(model: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    """The transformers config of `model` (a folder, Hub id or embedded name), read without weights,
    checked to be an architecture SeerAttention supports."""
    from transformers import AutoConfig

    from .patching import SUPPORTED_MODEL_TYPES

    path, gguf = resolve_model_path(model, gguf_file)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code,
                                        **({"gguf_file": gguf} if gguf else {}))
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{model}: SeerAttention supports model_type {list(SUPPORTED_MODEL_TYPES)}; found "
                         f"{config.model_type!r}")
    return config


def warn_if_beyond_context(config, seq_len: int) -> None:
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and seq_len > context:
        warnings.warn(f"sequences of {seq_len} tokens are longer than the model's context of {context} "
                      "(max_position_embeddings): positions beyond it were never trained", stacklevel=2)


def load_model_and_tokenizer(model: str, gguf_file: str | None = None, device: str | torch.device | None = None,
                             dtype: str | torch.dtype = "bf16", attn_implementation: str = "sdpa", *,
                             tokenizer: str | None = None, random_weights: bool = False,
                             trust_remote_code: bool = False, peft_adapter: str | None = None,
                             frozen: bool = False):
    """(model in eval mode on `device`, tokenizer) for a folder, a Hub id or an embedded model name.

    tokenizer: another tokenizer to load (default the model's). random_weights: build the model from
    its config with random weights, directly on `device` (timing runs). peft_adapter: a PEFT adapter
    folder or Hub id loaded onto the model (a long-context LoRA, say); the model returned is then the
    `PeftModel`. frozen: no parameter requires grad.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf = resolve_model_path(model, gguf_file)
    gguf_option = {"gguf_file": gguf} if gguf else {}
    if tokenizer is not None:
        tokenizer_path, tokenizer_gguf = resolve_model_path(tokenizer, None)
        tokenizer_option = {"gguf_file": tokenizer_gguf} if tokenizer_gguf else {}
    else:
        tokenizer_path, tokenizer_option = path, gguf_option
    loaded_tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code,
                                                     **tokenizer_option)
    device = resolve_device(device)
    dtype = parse_dtype(dtype)
    if random_weights:
        config = load_model_config(model, gguf_file, trust_remote_code)
        # Initialised on the target device: a CPU init of an 8B model takes minutes.
        with torch.device(device):
            loaded = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                                      trust_remote_code=trust_remote_code)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                      trust_remote_code=trust_remote_code, **gguf_option)
    loaded = loaded.to(device)
    if peft_adapter is not None:
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(loaded, peft_adapter, is_trainable=False)
    if frozen:
        loaded.requires_grad_(False)
    return loaded.eval(), loaded_tokenizer


def build_random_model(preset: str, device: str | torch.device | None = None, dtype: str | torch.dtype = "bf16",
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
