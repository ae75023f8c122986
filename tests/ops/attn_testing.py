"""Helpers of the kernel tests: random kept-block lists, a float64 dense reference, relative RMS."""

from __future__ import annotations

import torch


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over finite reference entries; NaN anywhere in out gives inf."""
    out, ref = out.double(), ref.double()
    if out.isnan().any():
        return float("inf")
    finite = ref.isfinite()
    if not torch.equal(out.isfinite(), finite) or not torch.equal(out[~finite], ref[~finite]):
        return float("inf")
    diff = (out[finite] - ref[finite]).norm()
    return (diff / ref[finite].norm().clamp_min(1e-30)).item()


def make_block_lists(B, HM, T, block_size, density, kind="random", seq_offsets=None, device="cpu"):
    """Kept-block lists [B, HM, NB, K=NB] int32 and counts [B, HM, NB] int32, in each sequence's
    own block frame, with garbage after the counted entries.

    kind: "random" (diagonal plus a `density` share of earlier blocks), "full", "diag" (diagonal
    only), "holes" (random, but some rows lose the diagonal, some keep nothing, and some list blocks
    after the diagonal, which must contribute nothing).
    """
    NB = (T + block_size - 1) // block_size
    causal = torch.ones(NB, NB, dtype=torch.bool).tril(-1)
    diag = torch.eye(NB, dtype=torch.bool)
    if kind == "full":
        keep = (causal | diag).expand(B, HM, NB, NB).clone()
    elif kind == "diag":
        keep = diag.expand(B, HM, NB, NB).clone()
    else:
        keep = (torch.rand(B, HM, NB, NB) < density) & causal | diag
    if kind == "holes":
        keep &= ~(diag & (torch.rand(B, HM, NB, 1) < 0.3))
        keep &= torch.rand(B, HM, NB, 1) > 0.15
        keep |= (torch.rand(B, HM, NB, NB) < 0.2) & ~causal
    count = keep.sum(-1).int()
    order = torch.where(keep, torch.arange(NB), NB + torch.arange(NB))
    idx = order.sort(-1).values
    garbage = torch.randint(-3, 3 * NB + 3, idx.shape)
    idx = torch.where(torch.arange(NB) < count[..., None], idx, garbage).int()
    return idx.to(device), count.to(device)


def lists_to_dense(block_idx, block_count):
    """[B, HM, NB, NB] bool of the kept blocks (entries past the count ignored)."""
    NB = block_idx.shape[2]
    kept = torch.arange(block_idx.shape[-1], device=block_idx.device) < block_count[..., None]
    dense = torch.zeros(*block_idx.shape[:3], NB + 1, dtype=torch.bool, device=block_idx.device)
    return dense.scatter_(-1, torch.where(kept, block_idx.long().clamp(0, NB), NB), True)[..., :NB]


def dense_reference(q, k, v, keep, block_size, scale=None, seq_offsets=None):
    """float64 masked dense attention: q [B, HQ, T, D], k/v [B, HKV, T, D], keep [B, HM, NB, NB]
    (sequence frame). Returns o [B, T, HQ, D] float64, lse [B, HQ, T] and P [B, HQ, T, T]."""
    B, HQ, T, D = q.shape
    G = HQ // k.shape[1]
    keep = keep.repeat_interleave(HQ // keep.shape[1], dim=1)
    scale = D**-0.5 if scale is None else scale
    qd = q.double()
    kd = k.double().repeat_interleave(G, 1)
    vd = v.double().repeat_interleave(G, 1)
    pos = torch.arange(T, device=q.device)
    off = torch.zeros(B, dtype=torch.long, device=q.device) if seq_offsets is None else seq_offsets.long()
    rel = pos - off[:, None]  # [B, T]
    blk = (rel.clamp(min=0) // block_size).clamp(max=keep.shape[-1] - 1)
    inside = rel >= 0
    allowed = keep[torch.arange(B)[:, None, None, None], torch.arange(HQ)[None, :, None, None],
                   blk[:, None, :, None], blk[:, None, None, :]]
    allowed &= (pos[None, :] <= pos[:, None]) & inside[:, None, :, None] & inside[:, None, None, :]
    s = (qd @ kd.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return (p @ vd).transpose(1, 2), lse, p


def make_qkv(B, HQ, HKV, T, D, dtype=torch.float32, device="cpu"):
    """q as Hugging Face hands it (a [B, T, HQ, D] tensor viewed as [B, HQ, T, D]); k, v likewise."""
    q = torch.randn(B, T, HQ, D, device=device).to(dtype).transpose(1, 2)
    k = torch.randn(B, T, HKV, D, device=device).to(dtype).transpose(1, 2)
    v = torch.randn(B, T, HKV, D, device=device).to(dtype).transpose(1, 2)
    return q, k, v


def growing_keys(k, top=12.0):
    """k scaled by a ramp along the sequence, 1 at the start to `top` at the end: a row's scores grow
    from step to step by far more than random inputs give, so the kernels' running maximum moves a
    long way in the middle of a row (the rescaling of the partial sums must be right)."""
    T = k.shape[2]
    ramp = torch.linspace(1.0, top, T, device=k.device)[:, None]
    return (k.float() * ramp).to(k.dtype)


def make_offsets(B, T, device="cpu"):
    """Left padding: sequence 0 unpadded, the others start at random positions (maybe past T/2)."""
    off = torch.randint(0, max(T, 1), (B,))
    off[0] = 0
    return off.to(device)
