"""What one evaluation run computes with: dense attention, or a block selector at one threshold,
density or coverage. Every method runs through the same patched model and the same kernels."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

METHODS = ("dense", "gate", "oracle", "pooled_score", "streaming")
# streaming ranks blocks by position: only a density (a share of blocks) makes sense for it.
METHOD_KNOBS = {"gate": ("threshold", "density", "coverage"), "oracle": ("threshold", "density", "coverage"),
                "pooled_score": ("threshold", "density", "coverage"), "streaming": ("density",)}
KNOB_SYMBOLS = {"threshold": "t", "density": "d", "coverage": "p"}


@dataclass(frozen=True)
class AttentionSetting:
    """method: one of METHODS; sparsity_method/value: how the selector's scores become a mask
    (None for dense)."""

    method: str
    sparsity_method: str | None = None
    value: float | None = None

    @property
    def label(self) -> str:
        if self.method == "dense":
            return "dense"
        return f"{self.method} {KNOB_SYMBOLS[self.sparsity_method]}={self.value:g}"

    def to_dict(self) -> dict:
        return {**asdict(self), "label": self.label}


def build_settings(methods: list[str], densities: list[float] = (), thresholds: list[float] = (),
                   coverages: list[float] = ()) -> list[AttentionSetting]:
    """Every method crossed with every value of the knobs it accepts, in the order given."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods: expected some of {list(METHODS)}, found {unknown}")
    values = {"density": list(densities), "threshold": list(thresholds), "coverage": list(coverages)}
    settings = []
    for method in dict.fromkeys(methods):
        if method == "dense":
            settings.append(AttentionSetting("dense"))
            continue
        knobs = [(knob, value) for knob in METHOD_KNOBS[method] for value in values[knob]]
        if not knobs:
            raise ValueError(f"method {method!r} needs at least one of "
                             f"{['--' + knob + 's' for knob in METHOD_KNOBS[method]]}")
        settings.extend(AttentionSetting(method, knob, float(value)) for knob, value in knobs)
    return settings


def apply_setting(model: nn.Module, setting: AttentionSetting) -> None:
    """Switch a patched model to `setting` (no re-patching: the selector is read at each forward)."""
    import seerattn_hf as sa

    if setting.method == "dense":
        sa.set_attention_mode(model, "dense")
        return
    sa.set_attention_mode(model, "sparse")
    sa.update_sparsity_config(model, selector=setting.method, sparsity_method=setting.sparsity_method,
                              **{setting.sparsity_method: setting.value})


def achieved_density(model: nn.Module, setting: AttentionSetting) -> float | None:
    """Share of causal blocks computed since the last `reset_sparsity_stats` (1.0 for dense)."""
    import seerattn_hf as sa

    if setting.method == "dense":
        return 1.0
    return sa.get_sparsity_stats(model)["density"]
