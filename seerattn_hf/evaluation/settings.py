"""What one evaluation run computes with: dense attention, or a block selector at one threshold,
density, coverage or target density of calibrated thresholds. Every method runs through the same
patched model and the same kernels; which selector accepts which sparsity method is the sparsity
policy's rule, not repeated here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from ..policy import METHOD_VALUE_FIELDS, SELECTORS, SPARSITY_METHODS, SparsityPolicy, setting_label
from ..validation import InvalidSetting

METHODS = ("dense", *SELECTORS)


def accepted_sparsity_methods(selector: str) -> list[str]:
    """The sparsity methods a `SparsityPolicy` accepts with `selector` (streaming: density only)."""
    accepted = []
    for method in SPARSITY_METHODS:
        try:
            SparsityPolicy(selector=selector, sparsity_method=method)
        except InvalidSetting:
            continue
        accepted.append(method)
    return accepted


# The backend of a dense setting that runs the model's own attention (SDPA, eager): the policy's
# dense passes take it under any backend but "auto" and "fa4".
MODEL_ATTENTION = "model"


@dataclass(frozen=True)
class AttentionSetting:
    """method: one of METHODS; sparsity_method/value: how the selector's scores become a mask
    (None for dense); backend: the policy backend it runs with (None: leave the model's), or
    MODEL_ATTENTION for a dense setting on the model's own attention. Named in the label.
    calibrated_thresholds: those of a "calibrated_threshold" setting, once `calibrate_settings` fitted
    them (value is then the target density)."""

    method: str
    sparsity_method: str | None = None
    value: float | None = None
    backend: str | None = None
    calibrated_thresholds: tuple | None = None

    @property
    def label(self) -> str:
        label = setting_label(self.method, self.sparsity_method, self.value)
        return label if self.backend is None else f"{label} [{self.backend}]"

    def policy_changes(self) -> dict:
        """The sparsity-policy fields this setting sets (for dense at most the backend)."""
        changes = {}
        if self.backend is not None:
            changes["backend"] = "triton" if self.backend == MODEL_ATTENTION else self.backend
        if self.method == "dense":
            return changes
        if self.calibrated_thresholds is not None:
            changes["calibrated_thresholds"] = self.calibrated_thresholds
        return {**changes, "selector": self.method, "sparsity_method": self.sparsity_method,
                METHOD_VALUE_FIELDS[self.sparsity_method]: self.value}

    def to_dict(self) -> dict:
        values = {**asdict(self), "label": self.label}
        if self.calibrated_thresholds is not None:
            values["calibrated_thresholds"] = {str(layer): list(t) for layer, t in self.calibrated_thresholds}
        return values


def build_settings(methods: list[str], densities: list[float] = (), thresholds: list[float] = (),
                   coverages: list[float] = (), calibrated_densities: list[float] = ()) -> list[AttentionSetting]:
    """Every method crossed with every value of the sparsity methods it accepts, in the order given
    (calibrated thresholds are still to be fitted: `calibrate_settings`)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods: expected some of {list(METHODS)}, found {unknown}")
    values = {"density": list(densities), "threshold": list(thresholds), "coverage": list(coverages),
              "calibrated_threshold": list(calibrated_densities)}
    settings = []
    for method in dict.fromkeys(methods):
        if method == "dense":
            settings.append(AttentionSetting("dense"))
            continue
        knobs = [(knob, value) for knob in accepted_sparsity_methods(method) for value in values.get(knob, ())]
        if not knobs:
            raise ValueError(f"method {method!r} needs at least one of "
                             f"{[OPTIONS[knob] for knob in accepted_sparsity_methods(method)]}")
        settings.extend(AttentionSetting(method, knob, float(value)) for knob, value in knobs)
    return settings


# The command-line option listing each sparsity method's values.
OPTIONS = {"density": "--densities", "threshold": "--thresholds", "coverage": "--coverages",
           "nz_ratio": "--nz_ratios", "calibrated_threshold": "--calibrated_densities"}


def calibrate_settings(model: nn.Module, settings: list[AttentionSetting], input_ids: torch.Tensor,
                       per_head: bool = False) -> list[AttentionSetting]:
    """`settings` with the thresholds of every "calibrated_threshold" setting fitted on `input_ids`
    (`[B, T]`, text held apart from the evaluation text) by `calibrate_thresholds`, with the
    setting's selector and the model's other policy fields; the model's policy is left as it was."""
    import seerattn_hf as sa

    policy = sa.patching.causal_lm(model).seer_config.policy
    calibrated = []
    for setting in settings:
        if setting.sparsity_method == "calibrated_threshold":
            sa.update_sparsity_config(model, selector=setting.method)
            fitted = sa.calibrate_thresholds(model, input_ids, setting.value, per_head=per_head)
            setting = replace(setting, calibrated_thresholds=fitted.calibrated_thresholds)
        calibrated.append(setting)
    sa.update_sparsity_config(model, policy)
    return calibrated


def apply_setting(model: nn.Module, setting: AttentionSetting) -> None:
    """Switch a patched model to `setting` (no re-patching: the policy is read at each forward)."""
    import seerattn_hf as sa

    if setting.method == "dense":
        if setting.policy_changes():
            sa.update_sparsity_config(model, **setting.policy_changes())
        sa.set_attention_mode(model, "dense")
        return
    sa.set_attention_mode(model, "sparse")
    sa.update_sparsity_config(model, **setting.policy_changes())


def achieved_density(model: nn.Module, setting: AttentionSetting) -> float | None:
    """Share of causal blocks computed since the last `reset_sparsity_stats` (1.0 for dense)."""
    import seerattn_hf as sa

    if setting.method == "dense":
        return 1.0
    return sa.get_sparsity_stats(model)["density"]
