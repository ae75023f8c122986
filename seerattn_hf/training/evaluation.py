"""Held-out evaluation of trained gates: gate quality in distillation mode, perplexity dense vs sparse."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..evaluation.perplexity import batch_token_nll
from ..evaluation.reports import markdown_table
from ..patching import (
    get_sparsity_stats,
    pop_decode_distill_records,
    pop_distill_records,
    reset_sparsity_stats,
    set_attention_mode,
    update_sparsity_config,
)
from ..policy import setting_label
from .metrics import DecodeGateQuality, GateQuality


@torch.no_grad()
def gate_quality(model: nn.Module, sequences: torch.Tensor, batch_size: int, densities, thresholds,
                 forward: nn.Module | None = None) -> dict:
    """`GateQuality` metrics of a patched model on `sequences` (`[N, T]` token ids).

    `forward` is the module to call (an accelerate-prepared wrapper of `model`), default `model`.
    The model is left in distillation mode.
    """
    forward = model if forward is None else forward
    set_attention_mode(model, "distill")
    quality = GateQuality(model.seer_config.policy, densities, thresholds)
    device = next(model.parameters()).device
    for chunk in sequences.split(batch_size):
        forward(input_ids=chunk.long().to(device), use_cache=False, logits_to_keep=1)
        quality.add(pop_distill_records(model))
    return quality.result()


@torch.no_grad()
def decode_gate_quality(model: nn.Module, sequences: torch.Tensor, batch_size: int, shares=(1 / 16, 1 / 8, 1 / 4),
                        forward: nn.Module | None = None) -> dict:
    """`DecodeGateQuality` metrics of a patched model in decode distillation mode on `sequences`
    (`[N, T]` token ids). `forward`: the module to call, default `model`."""
    forward = model if forward is None else forward
    set_attention_mode(model, "distill")
    quality = DecodeGateQuality(shares)
    device = next(model.parameters()).device
    for chunk in sequences.split(batch_size):
        forward(input_ids=chunk.long().to(device), use_cache=False, logits_to_keep=1)
        quality.add(pop_decode_distill_records(model))
    return quality.result()


@torch.no_grad()
def perplexity(model: nn.Module, sequences: torch.Tensor, batch_size: int = 1,
               forward: nn.Module | None = None) -> float:
    """exp(mean next-token negative log-likelihood) over `sequences` (`[N, T]` token ids).

    `forward` is the module to call (an accelerate-prepared wrapper of `model`, called as a whole: see
    `batch_token_nll`), default `model` with its lm head applied in chunks.
    """
    nlls = [batch_token_nll(model, chunk, forward) for chunk in sequences.split(batch_size)]
    return math.exp(torch.cat(nlls).double().mean().item())


@torch.no_grad()
def sparse_perplexity_report(model: nn.Module, sequences: torch.Tensor, densities, thresholds,
                             batch_size: int = 1, forward: nn.Module | None = None) -> list[dict]:
    """Perplexity with dense attention, then with gate-selected sparse attention at each density and
    each threshold, with the block density actually computed. Rows: `{"setting", "perplexity", "density"}`,
    the setting as its label ("dense", "gate d=0.5", "gate t=0.002").

    `forward` is the module to call (an accelerate-prepared wrapper of `model`), default `model`.
    The model's sparsity settings are restored and it is left in distillation mode.
    """
    saved = model.seer_config.policy
    rows = []
    set_attention_mode(model, "dense")
    rows.append({"setting": "dense", "perplexity": perplexity(model, sequences, batch_size, forward), "density": 1.0})
    set_attention_mode(model, "sparse")
    settings = [("density", float(d)) for d in densities] + [("threshold", float(t)) for t in thresholds]
    for method, value in settings:
        update_sparsity_config(model, selector="gate", sparsity_method=method, **{method: value})
        reset_sparsity_stats(model)
        measured = perplexity(model, sequences, batch_size, forward)
        rows.append({"setting": setting_label("gate", method, value), "perplexity": measured,
                     "density": get_sparsity_stats(model)["density"]})
    update_sparsity_config(model, policy=saved)
    set_attention_mode(model, "distill")
    return rows


def format_perplexity_report(rows: list[dict], title: str) -> str:
    """`title` and the rows of `sparse_perplexity_report` as a markdown table (the evaluation scripts' format)."""
    table = [[row["setting"], row["perplexity"], row["density"]] for row in rows]
    return f"{title}\n\n" + markdown_table(["attention", "perplexity", "density"], table)
