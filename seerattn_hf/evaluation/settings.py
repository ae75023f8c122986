"""What one evaluation run computes with: dense attention, or a block selector at one threshold,
density or coverage. Every method runs through the same patched model and the same kernels; which
selector accepts which sparsity method is the sparsity policy's rule, not repeated here."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from ..policy import SELECTORS, SPARSITY_METHODS, SparsityPolicy, setting_label
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


@dataclass(frozen=True)
class AttentionSetting:
    """method: one of METHODS; sparsity_method/value: how the selector's scores become a mask
    (None for dense)."""

    method: str
    sparsity_method: str | None = None
    value: float | None = None

    @property
    def label(self) -> str:
        return setting_label(self.method, self.sparsity_method, self.value)

    def policy_changes(self) -> dict:
        """The sparsity-policy fields this setting sets (empty for dense)."""
        if self.method == "dense":
            return {}
        return {"selector": self.method, "sparsity_method": self.sparsity_method, self.sparsity_method: self.value}

    def to_dict(self) -> dict:
        return {**asdict(self), "label": self.label}


def build_settings(methods: list[str], densities: list[float] = (), thresholds: list[float] = (),
                   coverages: list[float] = ()) -> list[AttentionSetting]:
    """Every method crossed with every value of the sparsity methods it accepts, in the order given."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods: expected some of {list(METHODS)}, found {unknown}")
    values = {"density": list(densities), "threshold": list(thresholds), "coverage": list(coverages)}
    settings = []
    for method in dict.fromkeys(methods):
        if method == "dense":
            settings.append(AttentionSetting("dense"))
            continue
        knobs = [(knob, value) for knob in accepted_sparsity_methods(method) for value in values.get(knob, ())]
        if not knobs:
            raise ValueError(f"method {method!r} needs at least one of "
                             f"{['--' + knob + 's' for knob in accepted_sparsity_methods(method)]}")
        settings.extend(AttentionSetting(method, knob, float(value)) for knob, value in knobs)
    return settings


def apply_setting(model: nn.Module, setting: AttentionSetting) -> None:
    """Switch a patched model to `setting` (no re-patching: the policy is read at each forward)."""
    import seerattn_hf as sa

    if setting.method == "dense":
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
