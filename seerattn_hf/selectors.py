"""Block selection: block scores (gate, oracle or a training-free baseline) -> a block mask.

Every selector produces scores `[B, H, NB, NB]` that are probabilities over each row's causal key
blocks (the ranking methods need only their order, so the gate gives them log-probabilities);
`select_blocks` turns them into a boolean block mask by threshold, density (per-row top-k), coverage,
nz_ratio (the published gates' fixed top-k) or calibrated thresholds (one per layer or head, fitted
to a share of blocks by `fit_thresholds`), then adds the blocks that are always kept.
`mask_to_block_lists` packs the mask into the compact per-row lists the kernels walk.

Scores of a query chunk continued from a cache are `[B, H, R, NB]`: R query-block rows against all NB
key blocks, row i of sequence b on its diagonal block `diagonal[b, i]` (`blocks.query_block_diagonals`).
Without `diagonal` the rows are the NB blocks of a whole prompt.
"""

from __future__ import annotations

import math

import torch

from .blocks import causal_block_mask, num_blocks, pool_blocks_padded  # noqa: F401  (num_blocks re-exported)
from .policy import RANKING_METHODS, SparsityPolicy

def pooled_score_probs(query: torch.Tensor, key: torch.Tensor, block_size: int,
                       seq_offsets: torch.Tensor | None) -> torch.Tensor:
    """Training-free block scores (as MoBA and Quest score blocks): softmax over key blocks of the
    mean-pooled, post-RoPE q.k per block.

    query: `[B, HQ, T, D]`, key: `[B, HKV, T, D]` -> `[B, HQ, NB, NB]`.
    """
    pooled_q = pool_blocks_padded(query.transpose(1, 2), ["avg"], block_size, seq_offsets)
    pooled_k = pool_blocks_padded(key.transpose(1, 2), ["avg"], block_size, seq_offsets)
    groups = query.shape[1] // key.shape[1]
    pooled_k = pooled_k.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", pooled_q, pooled_k) / math.sqrt(query.shape[-1])
    blocks = scores.shape[-1]
    causal = causal_block_mask(blocks, scores.device)
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


def streaming_scores(batch: int, heads: int, blocks: int, device: torch.device) -> torch.Tensor:
    """A ranking, not probabilities: the first block first, then key blocks from the most recent back."""
    columns = torch.arange(blocks, device=device, dtype=torch.float32)
    scores = (columns + 1.0).expand(blocks, blocks).clone()
    scores[:, 0] = float(blocks + 1)
    scores = scores.masked_fill(~causal_block_mask(blocks, device), float("-inf"))
    return scores.expand(batch, heads, blocks, blocks)


def row_diagonals(diagonal: torch.Tensor | None, blocks: int, device: torch.device) -> torch.Tensor:
    """`[B or 1, R]`: each row's diagonal key block (a whole prompt's rows when `diagonal` is None)."""
    return torch.arange(blocks, device=device)[None] if diagonal is None else diagonal.to(device)


def causal_rows(diagonal: torch.Tensor, blocks: int) -> torch.Tensor:
    """`[B or 1, 1, R, NB]` bool: the key blocks at or before each row's diagonal."""
    return torch.arange(blocks, device=diagonal.device) <= diagonal[:, None, :, None]


def forced_blocks(policy: SparsityPolicy, blocks: int, device: torch.device,
                  diagonal: torch.Tensor | None = None) -> torch.Tensor:
    """`[B or 1, 1, R, NB]` blocks kept whatever the scores: the diagonal (with `keep_diagonal`), the
    first `keep_first_blocks` blocks and `keep_recent_blocks` blocks before the diagonal."""
    rows = row_diagonals(diagonal, blocks, device)[:, None, :, None]
    columns = torch.arange(blocks, device=device)
    forced = (columns < policy.keep_first_blocks) | ((columns < rows) & (columns >= rows - policy.keep_recent_blocks))
    if policy.keep_diagonal:
        forced = forced | (columns == rows)
    return forced & (columns <= rows)


def select_blocks(policy: SparsityPolicy, scores: torch.Tensor, row_valid: torch.Tensor | None = None,
                  diagonal: torch.Tensor | None = None, thresholds: torch.Tensor | None = None) -> torch.Tensor:
    """Turn block scores `[B, H, R, NB]` into a boolean block mask of the same shape.

    Only causal blocks are ever kept. `row_valid` (`[B, R]`) marks query blocks holding real
    tokens; other rows keep just their diagonal block. `diagonal` (`[B or 1, R]`): each row's
    diagonal key block, for a query chunk (None: R == NB, a whole prompt). Scores may be in any float
    dtype: a threshold is compared in the scores' dtype (as the published gates compare their bf16
    softmax). `thresholds` (`[H]` or `[1]` float32): the layer's calibrated thresholds, needed by
    "calibrated_threshold" and compared in float32 (they are fitted to the float32 values).
    """
    blocks = scores.shape[-1]
    device = scores.device
    diagonal = row_diagonals(diagonal, blocks, device)
    causal = causal_rows(diagonal, blocks)
    forced = forced_blocks(policy, blocks, device, diagonal)
    method = policy.sparsity_method
    if method == "threshold":
        keep = scores > policy.threshold
    elif method == "calibrated_threshold":
        if thresholds is None or thresholds.dim() != 1 or thresholds.shape[0] not in (1, scores.shape[1]):
            raise ValueError(f"calibrated_threshold: expected thresholds of shape [1] or [{scores.shape[1]}] (the "
                             f"scores' heads), found {None if thresholds is None else list(thresholds.shape)}")
        keep = scores.float() > thresholds.to(device=device, dtype=torch.float32)[None, :, None, None]
    elif method in RANKING_METHODS:
        top, within_budget = _top_blocks(policy, scores, causal, forced, diagonal, row_valid)
        keep = torch.zeros_like(causal).expand_as(scores).clone()
        keep.scatter_(-1, top, within_budget.expand_as(top))
    else:
        # Fewest blocks whose probabilities reach the coverage: a block is kept while the mass
        # ranked above it is still short of the target.
        sorted_scores, order = scores.float().masked_fill(~causal, 0.0).sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_scores.cumsum(dim=-1) - sorted_scores
        keep_sorted = mass_before < policy.coverage * sorted_scores.sum(dim=-1, keepdim=True)
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    keep = (keep | forced) & causal
    if not policy.keep_diagonal:
        keep = _keep_best_block_of_empty_rows(keep, scores, causal)
    if policy.dense_last_query_blocks:
        keep = _dense_last_rows(keep, causal, policy.dense_last_query_blocks, row_valid)
    if row_valid is not None:
        diagonal_only = torch.arange(blocks, device=device) == diagonal[:, None, :, None]
        keep = torch.where(row_valid[:, None, :, None], keep, diagonal_only)
    return keep


def _row_budgets(policy: SparsityPolicy, diagonal: torch.Tensor, row_valid: torch.Tensor | None) -> torch.Tensor:
    """`[B or 1, R]`: how many blocks each row keeps under a ranking method (before forced blocks).

    density: `ceil(density * (i + 1))` for the row on diagonal block i. nz_ratio: the same k for
    every row of a sequence, `int((1 - sqrt(1 - nz_ratio)) * NB)` and at least 1, with NB the
    sequence's own block count so far (so a left-padded batch selects as each sequence alone),
    capped by the row's length.
    """
    row_lengths = (diagonal + 1).double()
    if policy.sparsity_method == "density":
        return torch.ceil(policy.density * row_lengths).long()
    # A sequence's blocks end at its last real row's diagonal.
    last_diagonal = (diagonal.expand_as(row_valid) if row_valid is not None else diagonal)
    if row_valid is not None:
        last_diagonal = torch.where(row_valid, last_diagonal, -1)
    sequence_blocks = last_diagonal.amax(dim=-1) + 1
    # Computed as the published code does, in double precision: int((1 - math.sqrt(1 - nz)) * NB).
    share = 1.0 - math.sqrt(1.0 - policy.nz_ratio)
    per_sequence = torch.floor(share * sequence_blocks.double()).long().clamp(min=1)
    return torch.minimum(per_sequence[:, None], row_lengths.long())


def _top_blocks(policy: SparsityPolicy, scores: torch.Tensor, causal: torch.Tensor, forced: torch.Tensor,
                diagonal: torch.Tensor, row_valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row top-k of the ranking methods: the indices of each row's best causal blocks, forced
    blocks first, as `top: [B, H, R, K]` (K the largest budget) and `within_budget: [B or 1, 1, R, K]`.

    topk up to the largest budget costs far less than sorting whole rows at long context.
    """
    ranked = scores.masked_fill(forced, float("inf")).masked_fill(~causal, float("-inf"))
    # Forced blocks are kept even past the budget.
    budget = torch.maximum(_row_budgets(policy, diagonal, row_valid)[:, None], forced.sum(dim=-1))
    top = ranked.topk(int(budget.max()), dim=-1, sorted=True).indices
    within_budget = torch.arange(top.shape[-1], device=scores.device) < budget[..., None]
    return top, within_budget


def _keep_best_block_of_empty_rows(keep: torch.Tensor, scores: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """Without the diagonal a threshold can leave a row with no block, and attention then has no key
    to read (the published kernel returns NaN there): such a row keeps its best block."""
    empty = ~keep.any(dim=-1, keepdim=True)
    best = scores.masked_fill(~causal, float("-inf")).argmax(dim=-1, keepdim=True)
    return keep | (empty & (torch.arange(keep.shape[-1], device=keep.device) == best))


def select_block_lists(policy: SparsityPolicy, scores: torch.Tensor, row_valid: torch.Tensor | None = None,
                       diagonal: torch.Tensor | None = None, fused: bool = False,
                       thresholds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`select_blocks` followed by `mask_to_block_lists`, the same lists, computed more cheaply
    where possible: per-row top-k yields the kept indices directly, with no `[B, H, NB, NB]` mask
    to build and pack (at 128k tokens that mask has 134M entries per layer). Dense last rows hold
    every block, so they take the mask path (their lists would be as large as the mask). `fused`: the
    ranking methods' lists come from one Triton kernel (the same lists; CUDA or Triton's interpreter).
    `thresholds`: as for `select_blocks`."""
    if policy.sparsity_method not in RANKING_METHODS or policy.dense_last_query_blocks:
        return mask_to_block_lists(select_blocks(policy, scores, row_valid, diagonal, thresholds))
    blocks = scores.shape[-1]
    device = scores.device
    diagonal = row_diagonals(diagonal, blocks, device)
    if fused:
        from .ops.gate_scores import triton_topk_block_lists

        return triton_topk_block_lists(scores, diagonal, row_valid, _row_budgets(policy, diagonal, row_valid),
                                       policy.keep_first_blocks, policy.keep_recent_blocks, policy.keep_diagonal)
    top, within_budget = _top_blocks(policy, scores, causal_rows(diagonal, blocks),
                                     forced_blocks(policy, blocks, device, diagonal), diagonal, row_valid)
    block_idx = torch.where(within_budget, top, blocks).sort(dim=-1).values
    block_count = within_budget.sum(dim=-1, dtype=torch.int32).expand(top.shape[:-1])
    if row_valid is not None:
        # Rows of padding keep just their diagonal block.
        padding = ~row_valid[:, None, :, None]
        block_idx = torch.where(padding, diagonal[:, None, :, None], block_idx)
        block_count = torch.where(padding[..., 0], 1, block_count)
    last = block_idx.gather(-1, (block_count.long() - 1).unsqueeze(-1))
    block_idx = torch.where(block_idx == blocks, last, block_idx)
    return block_idx.to(torch.int32).contiguous(), block_count.to(torch.int32).contiguous()


def fit_thresholds(policy: SparsityPolicy, scores: torch.Tensor, row_valid: torch.Tensor | None = None,
                   diagonal: torch.Tensor | None = None, per_head: bool = False) -> torch.Tensor:
    """Thresholds with which "calibrated_threshold" keeps `policy.target_density` of the causal blocks
    of the real rows of `scores` (`[B, H, R, NB]` probabilities; rows as for `select_blocks`): `[H]`,
    each head's share (per_head), or `[1]`, the share over all heads. Float32.

    Blocks kept whatever the scores (forced blocks, dense last rows, an empty row's best block) count
    towards the share: they are kept at any threshold (a row's best block passes every threshold one
    of its blocks passes), so a threshold keeps them plus the other blocks scoring above it. Those are
    taken best first; the threshold sits just below the last one taken, so blocks tied with it are
    kept too (1.0 where the forced blocks alone reach the share, -1.0 where every block is needed).
    """
    blocks = scores.shape[-1]
    rows = row_valid if row_valid is not None else torch.ones(scores.shape[0], scores.shape[2], dtype=torch.bool,
                                                              device=scores.device)
    counted = (causal_rows(row_diagonals(diagonal, blocks, scores.device), blocks)
               & rows[:, None, :, None]).expand_as(scores)
    nothing = torch.ones(1, device=scores.device)  # probabilities never exceed 1: only the forced blocks
    always = select_blocks(policy.replace(sparsity_method="calibrated_threshold"), scores, row_valid, diagonal,
                           nothing) & counted
    candidates = counted & ~always
    values = scores.float()
    groups = [slice(head, head + 1) for head in range(scores.shape[1])] if per_head else [slice(None)]
    thresholds = []
    for heads in groups:
        share = round(policy.target_density * int(counted[:, heads].sum())) - int(always[:, heads].sum())
        pool = values[:, heads][candidates[:, heads]]
        if share <= 0:
            thresholds.append(1.0)
        elif share >= pool.numel():
            thresholds.append(-1.0)
        else:
            last_taken = pool.topk(share).values[-1]
            thresholds.append(float(torch.nextafter(last_taken, last_taken.new_tensor(-math.inf))))
    return torch.tensor(thresholds, dtype=torch.float32, device=scores.device)


def kept_block_counts(block_count: torch.Tensor, row_valid: torch.Tensor | None,
                      diagonal: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept and causal block counts of the real rows, per head (two `[H]` tensors), from the lists'
    `block_count: [B, H, R]` (lists hold causal blocks only; `diagonal` as for `select_blocks`)."""
    batch, heads, blocks = block_count.shape
    rows = (torch.ones(batch, blocks, dtype=torch.bool, device=block_count.device) if row_valid is None
            else row_valid)
    kept = (block_count * rows[:, None, :]).sum(dim=(0, 2))
    row_lengths = row_diagonals(diagonal, blocks, block_count.device) + 1
    total = (rows * row_lengths).sum().expand(heads)
    return kept, total


def _dense_last_rows(keep: torch.Tensor, causal: torch.Tensor, count: int,
                     row_valid: torch.Tensor | None) -> torch.Tensor:
    """Keep every causal block of each sequence's last `count` real query-block rows."""
    blocks = keep.shape[-2]
    real_rows = (torch.full((keep.shape[0],), blocks, device=keep.device) if row_valid is None
                 else row_valid.sum(dim=-1))  # [B]
    rows = torch.arange(blocks, device=keep.device)[None, :]
    dense = (rows >= real_rows[:, None] - count) & (rows < real_rows[:, None])
    return keep | (dense[:, None, :, None] & causal)


def mask_to_block_lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a block mask `[B, H, NB, NB]` into kept-block lists.

    Returns `block_idx: [B, H, NB, K]` int32 (ascending kept key blocks, padded with the row's
    last kept block) and `block_count: [B, H, NB]` int32, with K the largest row count.
    """
    # Each kept block's slot is the number of kept blocks before it (a cumulative sum): no sort.
    blocks = mask.shape[-1]
    slots = mask.cumsum(dim=-1, dtype=torch.int32)
    count = slots[..., -1].contiguous()
    width = max(int(count.max()), 1) if count.numel() else 1
    columns = torch.arange(blocks, device=mask.device, dtype=torch.int32).expand_as(slots)
    # Dropped blocks write to a spare slot `width`, cut off afterwards.
    target = torch.where(mask, slots - 1, width).long()
    idx = torch.zeros(*mask.shape[:-1], width + 1, dtype=torch.int32, device=mask.device)
    idx.scatter_(-1, target, columns)
    idx = idx[..., :width]
    last = idx.gather(-1, (count.long() - 1).clamp(min=0).unsqueeze(-1))
    unused = torch.arange(width, device=mask.device) >= count.unsqueeze(-1)
    return torch.where(unused, last, idx).contiguous(), count


def block_density_counts(mask: torch.Tensor, row_valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept and causal block counts of the real (non-padding) rows of a mask, per head: two `[H]` tensors."""
    blocks = mask.shape[-1]
    causal = causal_block_mask(blocks, mask.device)
    rows = torch.ones(mask.shape[0], blocks, dtype=torch.bool, device=mask.device) if row_valid is None else row_valid
    kept = (mask & causal & rows[:, None, :, None]).sum(dim=(0, 2, 3))
    per_row = torch.arange(1, blocks + 1, device=mask.device)
    total = (rows * per_row).sum().expand(mask.shape[1])
    return kept, total


def share_across_kv_group(probs: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """One score map per KV head for `mask_sharing="kv_group"`: the max over the group's query heads
    (a block any head needs is kept for the whole group; the max of log-probabilities ranks alike)."""
    batch, heads, rows, blocks = probs.shape
    return probs.view(batch, num_kv_heads, heads // num_kv_heads, rows, blocks).amax(dim=2)


__all__ = [
    "block_density_counts", "causal_block_mask", "fit_thresholds", "forced_blocks", "kept_block_counts",
    "mask_to_block_lists", "num_blocks", "pooled_score_probs", "select_block_lists", "select_blocks",
    "share_across_kv_group", "streaming_scores",
]
