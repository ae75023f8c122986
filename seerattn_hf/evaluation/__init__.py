"""Evaluation of SeerAttention: long-document perplexity, RULER-style retrieval, prefill timing,
with result tables and figures. The scripts in `scripts/` are thin wrappers over `cli`."""

from ..embedded import resolve_model_path
from ..models import build_random_model, load_model_and_tokenizer
from .perplexity import batch_token_nll, document_windows, evaluate_perplexity, token_nll
from .settings import AttentionSetting, apply_setting, build_settings

__all__ = [
    "AttentionSetting", "apply_setting", "batch_token_nll", "build_random_model", "build_settings", "document_windows",
    "evaluate_perplexity", "load_model_and_tokenizer", "resolve_model_path", "token_nll",
]
