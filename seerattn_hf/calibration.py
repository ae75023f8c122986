"""Thresholds calibrated to a share of blocks: one per layer (or per head), fitted on calibration text.

One fixed threshold keeps very different shares in different layers (gates are sharp in some, flat
in others); `calibrate_thresholds` fits each layer's own threshold so that, on the calibration text,
every layer keeps the same target share of its causal blocks. The result is a `SparsityPolicy` with
`sparsity_method="calibrated_threshold"`: set it with `update_sparsity_config`, and `save_gates`
stores the thresholds in the adapter's JSON with the rest of the policy.

Calibration is one sparse forward in which each layer, in order, fits its thresholds to its own
scores and attends with them at once, so a layer is fitted on the inputs it gets in use (the
earlier layers already sparse); rerunning the calibrated policy on the same text keeps the target
share in every layer (up to blocks tied at a cut).
"""

from __future__ import annotations

import torch
from torch import nn

from .patching import causal_lm, require_patched
from .policy import SparsityPolicy
from .validation import InvalidSetting


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, input_ids: torch.Tensor, target_density: float, per_head: bool = False,
                         attention_mask: torch.Tensor | None = None) -> SparsityPolicy:
    """The model's sparsity policy with `sparsity_method="calibrated_threshold"` and thresholds fitted
    so that on `input_ids` (`[B, T]`, left-padded with `attention_mask` where lengths differ) each gated
    layer keeps `target_density` of its causal blocks, forced blocks included (per_head: each mask head
    of each layer does). The scores are those of the policy's selector ("gate", "oracle" or
    "pooled_score"), under its forced blocks and mask sharing; the model itself is left as it was.

    Calibrate at the prompt length you will run: a threshold keeps a smaller share of longer prompts.

        policy = calibrate_thresholds(model, calibration_ids, target_density=0.15)
        update_sparsity_config(model, policy)
    """
    model = causal_lm(model)
    attentions = require_patched(model)
    if not isinstance(per_head, bool):
        raise InvalidSetting("calibrate_thresholds", "per_head", "a bool", per_head)
    if not (isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2):
        found = list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"calibrate_thresholds: expected input_ids of shape [B, T], found {found}")
    try:
        policy = model.seer_config.policy.replace(sparsity_method="calibrated_threshold",
                                                  target_density=target_density, calibrated_thresholds=None)
    except InvalidSetting as error:
        raise error.for_owner("calibrate_thresholds") from None
    states = [attention.seer_state for attention in attentions]
    saved = [(s.policy, s.mode, s.kept_blocks, s.causal_blocks, s.calls.copy()) for s in states]
    try:
        for state in states:
            state.policy, state.mode, state.calibrated = policy, "sparse", None
            state.calibration = "head" if per_head else "layer"
        device = next(model.parameters()).device
        model.get_decoder()(input_ids=input_ids.to(device), use_cache=False,
                            attention_mask=None if attention_mask is None else attention_mask.to(device))
        fitted = {state.layer_idx: state.calibrated for state in states}
    finally:
        for state, (old_policy, mode, kept, causal, calls) in zip(states, saved):
            state.policy, state.mode, state.kept_blocks, state.causal_blocks = old_policy, mode, kept, causal
            state.calls, state.calibration, state.calibrated = calls, None, None
    dense = sorted(layer for layer, thresholds in fitted.items() if thresholds is None)
    if dense:
        raise ValueError(f"calibrate_thresholds: layers {dense} ran dense attention on the calibration text of "
                         f"{input_ids.shape[1]} tokens (shorter than min_sparse_length="
                         f"{policy.min_sparse_length!r}?), so they have no scores to fit")
    return policy.replace(calibrated_thresholds={layer: thresholds.tolist() for layer, thresholds in fitted.items()})


__all__ = ["calibrate_thresholds"]
