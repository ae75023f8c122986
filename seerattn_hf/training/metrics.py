"""Distillation losses and gate-quality metrics on `DistillRecord`s (shared by training and evaluation).

All functions take the per-layer tensors of a `DistillRecord`:
    target: `[B, H, NB, NB]` float32 block-pooled attention, rows summing to 1 (0 above the diagonal);
    gate_log_probs: `[B, H, NB, NB]` float32 gate log-probabilities, -inf above the diagonal;
    row_valid: `[B, NB]` bool, query blocks holding real tokens.
"""

from __future__ import annotations

import torch

from ..policy import SparsityPolicy
from ..selectors import block_density_counts, select_blocks

# "kl": KL(target || gate); "recall": the target mass a gate's budget share misses (`row_budget_recall`).
DISTILL_LOSSES = ("kl", "recall")


def loss_rows(row_valid: torch.Tensor, skip_fraction: float) -> torch.Tensor:
    """`[B, NB]` bool: the valid query blocks after leaving out the first `skip_fraction` of each
    sequence's blocks (at least one block is always kept)."""
    # A sequence's real blocks come first (blocks are counted from its first real token).
    own_blocks = row_valid.sum(dim=-1, keepdim=True)  # [B, 1]
    skip = torch.minimum((own_blocks * skip_fraction).floor().long(), (own_blocks - 1).clamp(min=0))
    index = torch.arange(row_valid.shape[-1], device=row_valid.device)[None, :]
    return row_valid & (index >= skip)


def row_kl(target: torch.Tensor, gate_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(target || gate) per query block row, `[B, H, NB]`.

    Entries where the target is 0 contribute 0 (xlogy), and the gate's -inf entries above the
    diagonal are never multiplied (they are replaced by 0 where the target is 0), so no 0 * -inf.
    """
    safe_log_gate = gate_log_probs.masked_fill(target <= 0, 0.0)
    return (torch.xlogy(target, target) - target * safe_log_gate).sum(dim=-1)


def layer_kl(target: torch.Tensor, gate_log_probs: torch.Tensor, row_valid: torch.Tensor,
             skip_fraction: float = 0.0) -> torch.Tensor:
    """Mean KL(target || gate) over heads and the loss rows of `row_valid` (a scalar)."""
    rows = loss_rows(row_valid, skip_fraction)  # [B, NB]
    kl = row_kl(target, gate_log_probs)  # [B, H, NB]
    weights = rows[:, None, :].expand_as(kl).to(kl.dtype)
    return (kl * weights).sum() / weights.sum().clamp(min=1.0)


def row_budget_recall(target: torch.Tensor, gate_log_probs: torch.Tensor, density: float) -> torch.Tensor:
    """Target mass recalled by the gate's share of a density budget, per query block row, `[B, H, NB]`.

    Row i (of a sequence's own blocks) may keep k = ceil(density * (i + 1)) blocks, the budget of
    density selection. Block j is kept "fractionally", `c_j = min(1, k * g_j)` (g the gate's
    probabilities): the gate spends its unit of probability on the budget, and a block holding at
    least 1/k of it is wholly kept. As `sum_j c_j <= k`, c is a fractional selection within the budget,
    so the recall `sum_j t_j c_j` never exceeds the target mass of the row's k best blocks (the
    oracle's recall), and reaches it exactly when the gate gives each of those blocks >= 1/k. The
    surrogate is differentiable almost everywhere; saturated blocks stop pulling probability to
    themselves, which goes to the blocks still short of their share, unlike KL, which also spends it
    matching the shape of the target among blocks that are kept (or dropped) either way.
    """
    rows = torch.arange(1, target.shape[-1] + 1, device=target.device, dtype=torch.float64)
    budget = torch.ceil(density * rows).to(target.dtype)  # [NB]
    kept_share = (budget[:, None] * gate_log_probs.exp()).clamp(max=1.0)
    return (target * kept_share).sum(dim=-1)


def layer_missed_mass(target: torch.Tensor, gate_log_probs: torch.Tensor, row_valid: torch.Tensor,
                      densities=(0.5, 0.3, 0.1), skip_fraction: float = 0.0) -> torch.Tensor:
    """Mean over budgets, heads and the loss rows of `row_valid` of 1 - `row_budget_recall` (a scalar in
    [0, 1]: the target mass the budgets miss). Several budgets reward a ranking, not one cut."""
    rows = loss_rows(row_valid, skip_fraction)
    missed = torch.stack([1.0 - row_budget_recall(target, gate_log_probs, d) for d in densities]).mean(dim=0)
    weights = rows[:, None, :].expand_as(missed).to(missed.dtype)
    return (missed * weights).sum() / weights.sum().clamp(min=1.0)


def distillation_loss(records, loss_scale: float = 10.0, skip_fraction: float = 0.25, loss: str = "kl",
                      recall_densities=(0.5, 0.3, 0.1)) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss `loss_scale * sum over layers` of `layer_kl` (loss "kl") or of
    `layer_missed_mass` at `recall_densities` (loss "recall"), and the per-layer values `[L]`
    (detached) for logging."""
    if loss not in DISTILL_LOSSES:
        raise ValueError(f"distillation loss: expected one of {list(DISTILL_LOSSES)}, found {loss!r}")
    if loss == "kl":
        values = [layer_kl(r.target, r.gate_log_probs, r.row_valid, skip_fraction) for r in records]
    else:
        values = [layer_missed_mass(r.target, r.gate_log_probs, r.row_valid, recall_densities, skip_fraction)
                  for r in records]
    per_layer = torch.stack(values)
    return loss_scale * per_layer.sum(), per_layer.detach()


def block_recall(target: torch.Tensor, mask: torch.Tensor, row_valid: torch.Tensor) -> torch.Tensor:
    """Mean over heads and valid rows of the target's mass in the kept blocks `mask` (a scalar)."""
    kept_mass = (target * mask).sum(dim=-1) / target.sum(dim=-1).clamp(min=torch.finfo(target.dtype).tiny)
    weights = row_valid[:, None, :].expand_as(kept_mass).to(kept_mass.dtype)
    return (kept_mass * weights).sum() / weights.sum().clamp(min=1.0)


def mask_density(mask: torch.Tensor, row_valid: torch.Tensor) -> tuple[int, int]:
    """(kept causal blocks, causal blocks) of the valid rows."""
    kept, causal = block_density_counts(mask, row_valid)
    return int(kept.sum()), int(causal.sum())


def causal_block_count(row_valid: torch.Tensor, heads: int) -> int:
    """Causal blocks of the valid rows over `heads` heads (row i of a sequence has i + 1)."""
    per_row = torch.arange(1, row_valid.shape[-1] + 1, device=row_valid.device)
    return heads * int((row_valid * per_row).sum())


class GateQuality:
    """Accumulates KL and recall at fixed densities and at thresholds, over layers and batches.

    `add(records)` after each distillation forward; `result()` gives `{"kl", "kl_per_layer",
    "recall@density=d", "recall@threshold=t", "density@threshold=t"}`, where recall is the share of the
    target's pooled mass that falls in the blocks the gate keeps and `density@threshold=t` the share of
    causal blocks a threshold keeps. Rows: every valid query block (none left out, unlike the loss).
    """

    def __init__(self, policy: SparsityPolicy, densities=(0.5, 0.3, 0.1), thresholds=None):
        thresholds = [policy.threshold] if thresholds is None else thresholds
        self.selectors = {f"density={d:g}": policy.replace(sparsity_method="density", density=float(d))
                          for d in densities}
        self.selectors.update({f"threshold={t:g}": policy.replace(sparsity_method="threshold", threshold=float(t))
                               for t in thresholds})
        self.kl_sum: dict[int, float] = {}
        self.kl_count: dict[int, int] = {}
        self.recall_sum = {name: 0.0 for name in self.selectors}
        self.recall_count = 0
        self.kept = {name: 0 for name in self.selectors if name.startswith("threshold")}
        self.causal = 0

    @torch.no_grad()
    def add(self, records) -> None:
        for record in records:
            layer = record.layer_idx
            kl = layer_kl(record.target, record.gate_log_probs, record.row_valid)
            self.kl_sum[layer] = self.kl_sum.get(layer, 0.0) + float(kl)
            self.kl_count[layer] = self.kl_count.get(layer, 0) + 1
            probs = record.gate_log_probs.exp()
            for name, policy in self.selectors.items():
                mask = select_blocks(policy, probs, record.row_valid)
                self.recall_sum[name] += float(block_recall(record.target, mask, record.row_valid))
                if name in self.kept:
                    self.kept[name] += mask_density(mask, record.row_valid)[0]
            self.causal += causal_block_count(record.row_valid, record.target.shape[1])
            self.recall_count += 1

    def result(self) -> dict:
        if not self.recall_count:
            return {}
        per_layer = {layer: self.kl_sum[layer] / self.kl_count[layer] for layer in sorted(self.kl_sum)}
        values = {"kl": sum(per_layer.values()) / len(per_layer), "kl_per_layer": per_layer}
        for name, total in self.recall_sum.items():
            values[f"recall@{name}"] = total / self.recall_count
        for name, kept in self.kept.items():
            values[f"density@{name}"] = kept / self.causal if self.causal else None
        return values


def decode_recall(target: torch.Tensor, gate_log_probs: torch.Tensor, rows: torch.Tensor, share: float) -> torch.Tensor:
    """Mean over KV heads and `rows` of the decode target's mass in the gate's top `ceil(share * n)` of a
    token's n candidate blocks (at least one) (a scalar). target, gate_log_probs: `[B, HKV, TQ, NB]`;
    rows: `[B, TQ]`."""
    order = gate_log_probs.argsort(dim=-1, descending=True)
    kept_mass = target.gather(-1, order).cumsum(dim=-1)
    candidates = gate_log_probs.isfinite().sum(dim=-1, keepdim=True)
    kept = (candidates * share).ceil().long().clamp(min=1, max=target.shape[-1])
    recall = kept_mass.gather(-1, kept - 1).squeeze(-1)  # [B, HKV, TQ]
    weights = rows[:, None].expand_as(recall).to(recall.dtype)
    return (recall * weights).sum() / weights.sum().clamp(min=1.0)


class DecodeGateQuality:
    """Accumulates the decode gates' KL and recall over layers and batches: `add(records)` after each
    decode distillation forward (records with their targets); `result()` gives `{"decode_kl",
    "decode_kl_per_layer", "decode_recall@share=s"}`, recall being the share of each token's target
    mass in the blocks its gate ranks first, when it keeps a share s of its candidate blocks."""

    def __init__(self, shares=(1 / 16, 1 / 8, 1 / 4)):
        self.shares = tuple(shares)
        self.kl: dict[int, list[float]] = {}
        self.recall = {share: [] for share in self.shares}

    @torch.no_grad()
    def add(self, records) -> None:
        for record in records:
            self.kl.setdefault(record.layer_idx, []).append(float(record.kl))
            for share in self.shares:
                self.recall[share].append(float(decode_recall(record.target, record.gate_log_probs, record.rows,
                                                              share)))

    def result(self) -> dict:
        if not self.kl:
            return {}
        per_layer = {layer: sum(values) / len(values) for layer, values in sorted(self.kl.items())}
        values = {"decode_kl": sum(per_layer.values()) / len(per_layer), "decode_kl_per_layer": per_layer}
        for share, recalls in self.recall.items():
            values[f"decode_recall@share={share:g}"] = sum(recalls) / len(recalls)
        return values
