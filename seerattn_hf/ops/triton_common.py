"""What the Triton attention kernels share: the online-softmax step (a jit function their loops call),
the launchers' argument checks, the tensor-descriptor helpers and the query-tile count.

This module imports triton. Only the kernel modules (`block_sparse_attn/triton.py`,
`pooled_attn/triton.py`) import it, and the packages import those on first call, so importing
`seerattn_hf` still needs no Triton.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # the kernels work in exp2/log2: scores are scaled by scale * LOG2E


def interpreting() -> bool:
    """True under Triton's CPU interpreter (TRITON_INTERPRET=1): tensors may live on the CPU and the
    launchers pick small tiles."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def online_softmax_step(s, qk_scale, m_step, m_i, l_i, acc, v_tile, MAY_BE_EMPTY: tl.constexpr,
                        INPUT_PRECISION: tl.constexpr):
    """One flash-attention step: s = raw scores of the step (-inf where masked), m_step = its row
    maxima already scaled (qk_scale > 0, so the max of s times the scale); returns (m, l, acc).
    MAY_BE_EMPTY: rows may have seen only -inf so far (masked steps), which must not give NaN."""
    m_new = tl.maximum(m_i, m_step)
    m_use = m_new
    if MAY_BE_EMPTY:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s * qk_scale - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v_tile.dtype), v_tile, acc * alpha[:, None], input_precision=INPUT_PRECISION)
    return m_new, l_i, acc


def check_attention_inputs(q, k, v, block_size, query_chunk=False):
    """Argument checks of the Triton attention launchers; returns (B, HQ, HKV, T, D), T the key
    length. query_chunk: q may hold fewer positions than k (the last ones)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected q [B, HQ, T, D], k/v [B, HKV, T, D]; found {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, HQ, TQ, D = q.shape
    HKV, T = k.shape[1], (k.shape[2] if query_chunk else TQ)
    if TQ > T:
        raise ValueError(f"expected k and v with at least the {TQ} query positions; found {T}")
    if k.shape != (B, HKV, T, D) or v.shape != k.shape or HQ % HKV != 0:
        raise ValueError(f"expected k and v of shape [B={B}, HKV, T={T}, D={D}] with HQ={HQ} a multiple "
                         f"of HKV; found {tuple(k.shape)} and {tuple(v.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"expected q, k, v of one dtype among float16, bfloat16, float32; found "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.is_cuda or interpreting()) or k.device != q.device or v.device != q.device:
        raise ValueError(f"expected q, k, v on one CUDA device (or TRITON_INTERPRET=1); found "
                         f"{q.device}, {k.device}, {v.device}")
    check_power_of_two("head_dim", D, 16, 256)
    check_power_of_two("block_size", block_size, 16, 128)
    return B, HQ, HKV, T, D


def check_seq_offsets(seq_offsets, B):
    """seq_offsets must be None or one left-padding length per sequence."""
    if seq_offsets is not None and tuple(seq_offsets.shape) != (B,):
        raise ValueError(f"expected seq_offsets [B={B}]; found {tuple(seq_offsets.shape)}")


def query_tile_count(T, block_q, seq_offsets):
    """Query tiles per sequence in the grid: with left padding one more, whose programs zero the
    padding rows instead (every output row is written)."""
    return triton.cdiv(T, block_q) + (1 if seq_offsets is not None else 0)


def input_precision(dtype):
    """The kernels' tl.dot precision: exact products for float32 inputs (TF32 would round them to
    10 mantissa bits); 16-bit inputs do not read the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def descriptor_scratch(size, alignment, stream):
    """Global scratch Triton asks for when a kernel builds tensor descriptors on the device
    (the launchers pass this to `triton.set_allocator`)."""
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def descriptor_ready(x):
    """x with a contiguous last dim and 16-byte aligned base and strides (a tensor descriptor's needs)."""
    aligned = x.data_ptr() % 16 == 0 and all(st * x.element_size() % 16 == 0 for st in x.stride()[:-1])
    return x if x.stride(-1) == 1 and aligned else x.contiguous()


def check_power_of_two(name, value, low, high):
    """Tile sizes the kernels take: a power of two in [low, high]."""
    if not low <= value <= high or value & (value - 1):
        raise ValueError(f"expected {name} a power of two in [{low}, {high}]; found {value}")
