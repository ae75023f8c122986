"""FlashAttention-4 (`flash-attn-4`, CuTe DSL kernels): dense causal and block-sparse attention.

An optional backend (`pip install "seerattn_hf[fa4]"`), imported on first use only.

Layout: FA4 takes q/k/v as `[B, T, H, D]`. Ours are `[B, H, T, D]` views whose memory is usually
`[B, T, H, D]` (the projections' layout), so the transposes below cost nothing; FA4 copies only
tensors whose strides it cannot read (a non-contiguous head dim, misaligned strides).

Block sparsity: per query block FA4 reads a list of "full" key blocks (computed without a mask) and
a list of "mask" blocks (computed with the mask: with `causal=True`, causality and the sequence end).
Our lists are ascending and hold causal blocks only, so the blocks before the diagonal are a prefix
of each list: FA4's full list is our list itself with a shorter count (no copy, FA4 reads only the
first `count` entries), and its mask list is the diagonal block where the row keeps it.
"""

from __future__ import annotations

import functools

import torch

INSTALL_HINT = 'pip install "seerattn_hf[fa4]"'
# Compute-capability majors FA4 is built for (SM90 Hopper, SM100/SM110 Blackwell). FA4 also has an
# SM80-style path for 8.x and 12.x, untuned, so it is not offered here.
DENSE_ARCHS = (9, 10, 11)


def sparse_block_size_supported(major: int, block_size: int) -> bool:
    """Square blocks FA4's block-sparse forward takes. SM90 fits its tiles to 64- and 128-token
    blocks. SM100/SM110 runs two 128-row query tiles per program on prompts over 128 tokens, so a
    query block must span 256 tokens (read in FA4's source; not run here)."""
    if major == 9:
        return block_size in (64, 128)
    if major in (10, 11):
        return block_size % 256 == 0
    return False


def head_dim_supported(major: int, head_dim: int) -> bool:
    if head_dim % 8:
        return False
    if major == 9:
        return 8 <= head_dim <= 256
    return 8 <= head_dim <= 128 or head_dim == 256


def compute_capability(device: torch.device) -> tuple[int, int]:
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _import_error() -> str | None:
    """Why `flash_attn.cute` cannot be imported, or None (checked once: the import is slow)."""
    try:
        from flash_attn.cute import flash_attn_func  # noqa: F401
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch  # noqa: F401
    except Exception as error:  # a missing wheel shows up as ImportError, a broken one as anything
        return f"{type(error).__name__}: {error}"
    return None


def fa4_unsupported_reason(device: torch.device, dtype: torch.dtype, head_dim: int,
                           block_size: int | None = None) -> str | None:
    """Why FA4 cannot run this configuration (block_size None: dense), or None when it can."""
    if device.type != "cuda":
        return f"FA4 needs CUDA tensors, found tensors on {device}"
    major = compute_capability(device)[0]
    if major not in DENSE_ARCHS:
        return (f"FA4 is offered on compute capability {list(DENSE_ARCHS)}.x (Hopper, Blackwell), "
                f"found {major}.x")
    if dtype not in (torch.float16, torch.bfloat16):
        return f"FA4 takes float16 or bfloat16 tensors, found {dtype}"
    if not head_dim_supported(major, head_dim):
        return f"FA4 on compute capability {major}.x does not take head_dim={head_dim}"
    if block_size is not None and not sparse_block_size_supported(major, block_size):
        taken = "64 or 128" if major == 9 else "a multiple of 256"
        return (f"FA4's block-sparse kernel on compute capability {major}.x takes {taken}-token blocks, "
                f"found block_size={block_size}")
    error = _import_error()
    if error is not None:
        return f"FA4 (flash_attn.cute) is not importable ({error}); install it with {INSTALL_HINT}"
    return None


def require_fa4(device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int | None = None) -> None:
    """Raise one `RuntimeError` naming what is missing when FA4 cannot run this configuration."""
    reason = fa4_unsupported_reason(device, dtype, head_dim, block_size)
    if reason is not None:
        raise RuntimeError(f"backend='fa4' cannot run here: {reason}")


def fa4_block_lists(block_idx: torch.Tensor, block_count: torch.Tensor, n_heads: int) -> dict[str, torch.Tensor]:
    """Our kept-block lists as FA4's block-sparse tensors (pure torch; no loop, no [T, T] tensor).

    Args:
        block_idx: [B, HM, NB, K] int, ascending causal kept blocks of each query block; the first
            block_count entries are read. HM is n_heads or divides it (a list per KV group).
        block_count: [B, HM, NB] int.
        n_heads: query heads (lists of HM < n_heads heads are repeated to it: FA4 reads a list per
            query head or one for all).

    Returns int32 tensors: full_block_idx [B, HQ, NB, K] and full_block_cnt [B, HQ, NB] (the blocks
    before the diagonal), mask_block_idx [B, HQ, NB, 1] and mask_block_cnt [B, HQ, NB] (the diagonal
    block, count 0 or 1).
    """
    B, HM, NB, K = block_idx.shape
    if n_heads % HM:
        raise ValueError(f"expected the lists' heads to divide the query heads; found {HM} and {n_heads}")
    if HM != n_heads:
        block_idx = block_idx.repeat_interleave(n_heads // HM, dim=1)
        block_count = block_count.repeat_interleave(n_heads // HM, dim=1)
    rows = torch.arange(NB, device=block_idx.device, dtype=torch.int32)
    kept = torch.arange(K, device=block_idx.device) < block_count[..., None]
    full_count = (kept & (block_idx < rows[:, None])).sum(-1, dtype=torch.int32)
    has_diagonal = (kept & (block_idx == rows[:, None])).any(-1)
    return {
        "full_block_idx": block_idx.to(torch.int32).contiguous(),
        "full_block_cnt": full_count,
        "mask_block_idx": rows.view(1, 1, NB, 1).expand(B, n_heads, NB, 1).contiguous(),
        "mask_block_cnt": has_diagonal.to(torch.int32),
    }


def _bthd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


def fa4_dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                        return_lse: bool = False):
    """Causal attention through FA4 (bottom-right aligned when q is shorter than k, as in a
    continued prompt). q: [B, HQ, Tq, D]; k, v: [B, HKV, Tk, D]. Returns o: [B, Tq, HQ, D] in q.dtype
    (with return_lse also lse: [B, HQ, Tq] float32)."""
    from flash_attn.cute import flash_attn_func

    o, lse = flash_attn_func(_bthd(q), _bthd(k), _bthd(v), softmax_scale=scale, causal=True, return_lse=return_lse)
    return (o, lse) if return_lse else o


def fa4_block_sparse_attention(q, k, v, block_idx, block_count, block_size, scale=None,
                               seq_offsets=None, return_lse=False):
    """FA4 version of `naive_block_sparse_attention` (same arguments, shapes and results), for
    unpadded batches: `seq_offsets` must be None (left padding goes through the Triton kernel).
    Forward only (no backward lists are built)."""
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    if seq_offsets is not None:
        raise ValueError("the FA4 block-sparse path takes unpadded batches; found seq_offsets "
                         "(left padding): use the Triton backend for these")
    T = q.shape[2]
    if k.shape[2] != T:
        raise ValueError(f"expected keys as long as queries (a prefill); found {k.shape[2]} and {T}")
    lists = fa4_block_lists(block_idx, block_count, q.shape[1])
    sparse = BlockSparseTensorsTorch(**lists, block_size=(block_size, block_size))
    o, lse = flash_attn_func(_bthd(q), _bthd(k), _bthd(v), softmax_scale=scale, causal=True,
                             block_sparse_tensors=sparse, return_lse=return_lse)
    return (o, lse) if return_lse else o
