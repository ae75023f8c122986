"""The frozen base model and its tokenizer, as the trainer loads them (through `seerattn_hf.models`),
and the checks that run before any base weight loads."""

from __future__ import annotations

import torch

from .. import models
from ..embedded import resolve_model_path
from .arguments import Arguments


def base_model_dtype(model_dtype: str, mixed_precision: str, gguf: bool) -> torch.dtype:
    if model_dtype == "auto":
        # GGUF weights stay quantized in transformers; its kernels compute in float32.
        if gguf:
            return torch.float32
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    return getattr(torch, model_dtype)


def check_before_loading(arguments: Arguments) -> None:
    """Fail (or warn) on what would otherwise surface only after the base weights load: an unsupported
    model type, data files that do not exist or mix kinds, sequences longer than the model's context."""
    from ..documents import expand_data_files

    model_args = arguments.model
    config = models.load_model_config(model_args.model_name_or_path, model_args.gguf_file,
                                      model_args.trust_remote_code)
    models.warn_if_beyond_context(config, arguments.data.seq_len)
    if arguments.data.data_files:
        expand_data_files(arguments.data.data_files)


def load_model_and_tokenizer(arguments: Arguments, mixed_precision: str = "no", device: torch.device | None = None):
    """The frozen base model (eval mode, SDPA attention, no parameter requiring grad, on `device`; with
    the PEFT adapter of `peft_adapter` when given) and the tokenizer (`tokenizer_name_or_path`,
    default the model's)."""
    model_args = arguments.model
    gguf_file = resolve_model_path(model_args.model_name_or_path, model_args.gguf_file)[1]
    dtype = base_model_dtype(model_args.model_dtype, mixed_precision, gguf_file is not None)
    return models.load_model_and_tokenizer(
        model_args.model_name_or_path, model_args.gguf_file, device or "cpu", dtype,
        tokenizer=model_args.tokenizer_name_or_path, random_weights=model_args.random_weights,
        trust_remote_code=model_args.trust_remote_code, peft_adapter=model_args.peft_adapter, frozen=True)
