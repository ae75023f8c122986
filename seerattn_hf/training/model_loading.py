"""The frozen base model and its tokenizer, as the trainer loads them."""

from __future__ import annotations

import torch

from ..embedded import resolve_model_path
from .arguments import Arguments


def base_model_dtype(model_dtype: str, mixed_precision: str, gguf: bool) -> torch.dtype:
    if model_dtype == "auto":
        # GGUF weights stay quantized in transformers; its kernels compute in float32.
        if gguf:
            return torch.float32
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    return getattr(torch, model_dtype)


def load_model_and_tokenizer(arguments: Arguments, mixed_precision: str = "no", device: torch.device | None = None):
    """The frozen base model (eval mode, SDPA attention, no parameter requiring grad, on `device`) and
    the tokenizer (`tokenizer_name_or_path`, default the model's)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_args = arguments.model
    path, gguf_file = resolve_model_path(model_args.model_name_or_path, model_args.gguf_file)
    options = {"trust_remote_code": model_args.trust_remote_code}
    gguf_option = {"gguf_file": gguf_file} if gguf_file else {}
    if model_args.tokenizer_name_or_path:
        tokenizer_path, tokenizer_gguf = resolve_model_path(model_args.tokenizer_name_or_path, None)
        tokenizer_option = {"gguf_file": tokenizer_gguf} if tokenizer_gguf else {}
    else:
        tokenizer_path, tokenizer_option = path, gguf_option
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, **options, **tokenizer_option)
    dtype = base_model_dtype(model_args.model_dtype, mixed_precision, gguf_file is not None)
    if model_args.random_weights:
        config = AutoConfig.from_pretrained(path, **options, **gguf_option)
        # Initialised on the target device: a CPU init of an 8B model takes minutes.
        with torch.device(device or "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa",
                                                     trust_remote_code=model_args.trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                     **options, **gguf_option)
    if device is not None:
        model.to(device)
    model.requires_grad_(False)
    return model.eval(), tokenizer
