"""`SparsityPolicy`: how block scores become the blocks that sparse attention computes.

Users set it at load time and change it at run time (`update_sparsity_config`); it is immutable and
validated whole on construction, so a model never holds a policy that would fail mid-forward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .decode_selection import DECODE_SELECTORS, DECODE_SPARSITY_METHODS
from .gate_config import field_names
from .validation import InvalidSetting, check, is_integer, is_number, reject_unknown

SELECTORS = ("gate", "oracle", "oracle_mass", "pooled_score", "streaming")
SPARSITY_METHODS = ("threshold", "density", "coverage", "nz_ratio", "calibrated_threshold")
# The methods that rank blocks (they need no probabilities, so a position ranking can feed them).
RANKING_METHODS = ("density", "nz_ratio")
BACKENDS = ("auto", "triton", "torch", "flex", "fa4")
MASK_SHARINGS = ("head", "kv_group")
# The one short form of a setting in tables, logs and results: "gate d=0.3", "oracle t=0.01".
METHOD_SYMBOLS = {"threshold": "t", "density": "d", "coverage": "p", "nz_ratio": "nz", "calibrated_threshold": "ct"}
# The field holding each method's value: a calibrated threshold is named by the share it was fitted to.
METHOD_VALUE_FIELDS = {"threshold": "threshold", "density": "density", "coverage": "coverage", "nz_ratio": "nz_ratio",
                       "calibrated_threshold": "target_density"}
THRESHOLDS_EXPECTED = ("None, or a mapping from layer index to a non-empty list of thresholds in [-1, 1] "
                       "(what calibrate_thresholds returns)")


@dataclass(frozen=True)
class SparsityPolicy:
    """selector: where block scores come from: "gate" (trained gates), "oracle" (the true block
        max-pooled attention map: the distillation target), "oracle_mass" (the attention mass each key
        block carries, averaged over the query block's rows: what a kept set must cover, so per-row
        top-k on it keeps the most mass a budget can), "pooled_score" (mean-pooled q.k per block, training free) or
        "streaming" (first block plus the most recent blocks; ranks by position, so density or
        nz_ratio only).
    sparsity_method: "threshold" (keep blocks whose probability exceeds `threshold`), "density" (keep
        the top `density` share of each row's causal blocks), "coverage" (keep per row the fewest
        blocks whose probabilities sum to at least `coverage`), "nz_ratio" (the published gates'
        top-k: every row keeps the same number k = int((1 - sqrt(1 - nz_ratio)) * NB), at least 1,
        of its best blocks, NB the sequence's number of blocks; about `nz_ratio` of all causal
        blocks are then kept) or "calibrated_threshold" (keep blocks whose probability exceeds the
        threshold of their layer, or of their head, in `calibrated_thresholds`).
    target_density: the share of causal blocks "calibrated_threshold" was fitted to keep (a record
        and the method's value in labels; the thresholds decide what is kept).
    calibrated_thresholds: `{layer_idx: (t,)}` (one threshold for the layer) or `{layer_idx: (t_0,
        ..., t_H-1)}` (one per mask head: query heads, KV heads under mask_sharing="kv_group"), fitted
        by `calibration.calibrate_thresholds` so that each layer (head) keeps `target_density` of its
        causal blocks on the calibration text, forced blocks included; a negative threshold keeps every
        block. Stored as sorted `(layer, thresholds)` pairs; `to_dict` writes `{"layer": [...]}`. The
        thresholds fit the selector, gates and prompt length they were fitted with: probabilities of
        longer rows are smaller, so a threshold keeps a smaller share of a longer prompt.
    keep_first_blocks / keep_recent_blocks: blocks always kept at the start of the sequence and before
        the diagonal.
    keep_diagonal: always keep each row's diagonal block. The published rules do not; a row whose
        selection is then empty keeps its best block.
    dense_last_query_blocks: how many of the last query-block rows are computed densely (the
        question of a prompt; the published rules use 2).
    mask_sharing: "head" (one mask per query head) or "kv_group" (one mask per KV head, shared by its
        query heads: the kernel then packs a group's heads into one tile).
    backend: "auto" (chosen per configuration: on CUDA FlashAttention-4 where installed and measured
        faster, else Triton; torch elsewhere; the table is `attention.AUTO_FA4_SPARSE`
        and docs/kernels.md), "triton", "torch", "flex" or "fa4" (FlashAttention-4 for the
        block-sparse prefill and the unmasked dense passes; an error where it cannot run). The
        backends that ran are counted in `get_sparsity_stats(model)["backends"]`.
    min_sparse_length: prompts shorter than this (key positions, the cache included) run dense
        attention; "auto": only prompts long enough for sparse prefill to be faster on this device,
        at the policy's expected density (`crossover`; dense on the CPU).

    Decoding (each generated token reads only some KV blocks; see `decode_selection`):
    decode_selector: None (decode densely), "gate" (trained decode gates), "oracle" (the true
        attention, max-pooled per block and GQA group), "oracle_mass" (the true attention mass per
        block, averaged over the GQA group: the selection that keeps the most attention at a token
        budget), "quest" (the Quest bound from per-block key extremes) or "streaming" (the most
        recent blocks; a ranking, so token budgets only).
    decode_sparsity_method: "token_budget" (read at most `decode_token_budget` tokens, in blocks,
        the token's own block included) or "threshold" (the blocks whose probability exceeds
        `decode_threshold`, plus the token's own block).
    decode_keep_first_block: always read the first (sink) block.
    decode_start_layer: layers below this index decode densely.
    """

    selector: str = "gate"
    sparsity_method: str = "threshold"
    threshold: float = 2e-3
    density: float = 0.5
    coverage: float = 0.9
    nz_ratio: float = 0.5
    target_density: float = 0.2
    calibrated_thresholds: tuple[tuple[int, tuple[float, ...]], ...] | None = None
    keep_first_blocks: int = 0
    keep_recent_blocks: int = 0
    keep_diagonal: bool = True
    dense_last_query_blocks: int = 0
    mask_sharing: str = "head"
    backend: str = "auto"
    min_sparse_length: int | str = 0
    decode_selector: str | None = None
    decode_sparsity_method: str = "token_budget"
    decode_token_budget: int = 2048
    decode_threshold: float = 5e-3
    decode_keep_first_block: bool = False
    decode_start_layer: int = 0

    def __post_init__(self):
        owner = type(self).__name__
        check(self.selector in SELECTORS, owner, "selector", f"one of {list(SELECTORS)}", self.selector)
        check(self.sparsity_method in SPARSITY_METHODS, owner, "sparsity_method",
              f"one of {list(SPARSITY_METHODS)}", self.sparsity_method)
        check(is_number(self.threshold) and 0.0 <= self.threshold < 1.0, owner, "threshold",
              "a number in [0, 1)", self.threshold)
        check(is_number(self.density) and 0.0 < self.density <= 1.0, owner, "density",
              "a number in (0, 1]", self.density)
        check(is_number(self.coverage) and 0.0 < self.coverage <= 1.0, owner, "coverage",
              "a number in (0, 1]", self.coverage)
        check(is_number(self.nz_ratio) and 0.0 < self.nz_ratio <= 1.0, owner, "nz_ratio",
              "a number in (0, 1]", self.nz_ratio)
        check(is_number(self.target_density) and 0.0 < self.target_density <= 1.0, owner, "target_density",
              "a number in (0, 1]", self.target_density)
        if self.calibrated_thresholds is not None:
            object.__setattr__(self, "calibrated_thresholds", _threshold_pairs(self.calibrated_thresholds, owner))
        for name in ("keep_first_blocks", "keep_recent_blocks", "dense_last_query_blocks"):
            value = getattr(self, name)
            check(is_integer(value) and value >= 0, owner, name, "an integer >= 0", value)
        check(self.min_sparse_length == "auto" or (is_integer(self.min_sparse_length) and self.min_sparse_length >= 0),
              owner, "min_sparse_length", "an integer >= 0 or 'auto'", self.min_sparse_length)
        check(isinstance(self.keep_diagonal, bool), owner, "keep_diagonal", "a bool", self.keep_diagonal)
        check(self.mask_sharing in MASK_SHARINGS, owner, "mask_sharing", f"one of {list(MASK_SHARINGS)}",
              self.mask_sharing)
        check(self.backend in BACKENDS, owner, "backend", f"one of {list(BACKENDS)}", self.backend)
        check(self.decode_selector is None or self.decode_selector in DECODE_SELECTORS, owner, "decode_selector",
              f"None or one of {list(DECODE_SELECTORS)}", self.decode_selector)
        check(self.decode_sparsity_method in DECODE_SPARSITY_METHODS, owner, "decode_sparsity_method",
              f"one of {list(DECODE_SPARSITY_METHODS)}", self.decode_sparsity_method)
        check(is_integer(self.decode_token_budget) and self.decode_token_budget >= 1, owner, "decode_token_budget",
              "an integer >= 1 (tokens)", self.decode_token_budget)
        check(is_number(self.decode_threshold) and 0.0 <= self.decode_threshold < 1.0, owner, "decode_threshold",
              "a number in [0, 1)", self.decode_threshold)
        check(isinstance(self.decode_keep_first_block, bool), owner, "decode_keep_first_block", "a bool",
              self.decode_keep_first_block)
        check(is_integer(self.decode_start_layer) and self.decode_start_layer >= 0, owner, "decode_start_layer",
              "an integer >= 0", self.decode_start_layer)
        if self.decode_selector == "streaming" and self.decode_sparsity_method != "token_budget":
            raise InvalidSetting(owner, "decode_sparsity_method", "'token_budget' with decode_selector='streaming' "
                                 "(it ranks blocks by position, not by probability)", self.decode_sparsity_method)
        if self.selector == "streaming" and self.sparsity_method not in RANKING_METHODS:
            raise InvalidSetting(owner, "sparsity_method", f"one of {list(RANKING_METHODS)} with "
                                 "selector='streaming' (it ranks blocks by position, not by probability)",
                                 self.sparsity_method)

    @property
    def value(self) -> float:
        """The value of the active sparsity method (the threshold, density, coverage, nz_ratio or,
        for calibrated thresholds, the target density)."""
        return getattr(self, METHOD_VALUE_FIELDS[self.sparsity_method])

    def layer_thresholds(self, layer_idx: int) -> tuple[float, ...] | None:
        """The calibrated thresholds of one layer (one, or one per mask head), None if it has none."""
        return dict(self.calibrated_thresholds or ()).get(layer_idx)

    @property
    def label(self) -> str:
        return setting_label(self.selector, self.sparsity_method, self.value)

    def replace(self, **changes) -> "SparsityPolicy":
        """A validated copy with some fields changed; unknown names raise `ValueError`."""
        reject_unknown(type(self).__name__, changes, POLICY_FIELDS)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values; calibrated thresholds as `{"<layer>": [thresholds]}`."""
        values = dataclasses.asdict(self)
        if self.calibrated_thresholds is not None:
            values["calibrated_thresholds"] = {str(layer): list(thresholds)
                                               for layer, thresholds in self.calibrated_thresholds}
        return values


def _threshold_pairs(value, owner: str) -> tuple[tuple[int, tuple[float, ...]], ...]:
    """Calibrated thresholds given as a mapping (layer keys may be digit strings, as JSON writes them)
    or as `(layer, thresholds)` pairs -> sorted `(layer, thresholds)` pairs."""
    check(isinstance(value, (dict, list, tuple)) and len(value) > 0, owner, "calibrated_thresholds",
          THRESHOLDS_EXPECTED, value)
    pairs = {}
    for item in (value.items() if isinstance(value, dict) else value):
        layer, thresholds = item if isinstance(item, (list, tuple)) and len(item) == 2 else (None, None)
        if isinstance(layer, str) and layer.isdigit():
            layer = int(layer)
        check(is_integer(layer) and layer >= 0 and layer not in pairs and isinstance(thresholds, (list, tuple))
              and len(thresholds) > 0 and all(is_number(t) and -1.0 <= t <= 1.0 for t in thresholds),
              owner, "calibrated_thresholds", THRESHOLDS_EXPECTED, item)
        pairs[layer] = tuple(float(t) for t in thresholds)
    return tuple(sorted(pairs.items()))


def check_calibrated_thresholds(policy: SparsityPolicy, layers: list[int], mask_heads: int) -> None:
    """Raise `InvalidSetting` unless a "calibrated_threshold" policy holds, for each gated layer of a
    model, one threshold or one per mask head (`mask_heads`: query heads, or KV heads under
    mask_sharing="kv_group")."""
    if policy.sparsity_method != "calibrated_threshold":
        return
    expected = (f"thresholds for the gated layers {list(layers)}, 1 or {mask_heads} per layer (fit them with "
                "calibrate_thresholds)")
    if policy.calibrated_thresholds is None:
        raise InvalidSetting("SparsityPolicy", "calibrated_thresholds", expected, None)
    stored = dict(policy.calibrated_thresholds)
    missing = [layer for layer in layers if layer not in stored]
    wrong = {layer: len(stored[layer]) for layer in layers
             if layer in stored and len(stored[layer]) not in (1, mask_heads)}
    if missing or wrong:
        found = "; ".join(([f"no thresholds for layers {missing}"] if missing else [])
                          + ([f"per-layer counts {wrong}"] if wrong else []))
        raise InvalidSetting("SparsityPolicy", "calibrated_thresholds", expected, found)


def setting_label(selector: str, sparsity_method: str | None = None, value: float | None = None) -> str:
    """"dense", or "<selector> <t|d|p>=<value>" (e.g. "gate d=0.3")."""
    if selector == "dense":
        return "dense"
    return f"{selector} {METHOD_SYMBOLS[sparsity_method]}={value:g}"


POLICY_FIELDS = field_names(SparsityPolicy)
