"""`min_sparse_length="auto"`: sparse prefill only from the prompt length where it is faster than dense.

A cost model per layer: dense attention costs `dense_s_per_token2 * T**2`; the sparse path (gate,
selection, kernel) costs `fixed_s + sparse_slope * density * dense_s_per_token2 * T**2`, a fixed part
(launches, pooling, selection: what dominates short prompts) plus kernel work proportional to the
kept blocks. Sparse is faster from the crossover

    T* = sqrt(fixed_s / (dense_s_per_token2 * (1 - sparse_slope * density)))

and never when `sparse_slope * density >= 1`. Where FlashAttention-4 takes the dense passes
(`backend` "auto" or "fa4" with FA4 installed), dense costs `fa4_dense_ratio` of that, and the saving
is `fa4_dense_ratio - sparse_slope * density`. The model of a device comes from, in order:
1. a measurement cached in `crossover.json` in the user's cache folder ($SEERATTN_CACHE_DIR, else
   $XDG_CACHE_HOME/seerattn_hf, else ~/.cache/seerattn_hf), keyed by device name, block size,
   head layout and dtype, written atomically;
2. the table below (`DEFAULT_COST_MODELS`);
3. a measurement made on first use (`measure_cost_model`, a few seconds), then cached.
On the CPU the sparse path is the torch reference, never faster than SDPA: "auto" means dense there.

The density the model is evaluated at is the policy's own for "density" and "nz_ratio" (the target
density of calibrated thresholds, which keep it on text like the calibration text); a threshold
or a coverage keeps a share known only after the gate ran, so "auto" assumes `UNKNOWN_DENSITY`
(conservative: a longer crossover, never a slower prefill).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .utils import atomic_write_text

CACHE_FILE = "crossover.json"
UNKNOWN_DENSITY = 0.5
MEASURED_LENGTHS = (8192, 32768)
MEASURED_DENSITY = 0.1


@dataclass(frozen=True)
class CostModel:
    """Per-layer prefill attention cost (seconds) of one device, block size, head layout and dtype."""

    fixed_s: float
    sparse_slope: float
    dense_s_per_token2: float
    # FA4's dense time over SDPA's (None: not measured, FA4 then assumed as fast as SDPA).
    fa4_dense_ratio: float | None = None
    source: str = "measured"

    def crossover(self, density: float, fa4_dense: bool = False) -> float:
        """The prompt length from which sparse prefill at `density` is faster than the dense pass
        (FA4's where `fa4_dense`, else SDPA's) (inf: never)."""
        dense = self.fa4_dense_ratio if fa4_dense and self.fa4_dense_ratio is not None else 1.0
        saving = dense - self.sparse_slope * density
        if saving <= 0:
            return math.inf
        return math.sqrt(self.fixed_s / (self.dense_s_per_token2 * saving))


# Fitted to the H200 measurements of docs (8B shape: 32 query / 8 KV heads, head_dim 128, 64-token
# blocks, bf16, 32 layers; scripts/bench_prefill.py): dense attention 0.513 s at 32k (TTFT minus the
# no-attention time), the sparse path at density 0.1 0.050 s at 8k and 0.131 s at 32k. Per layer:
# dense 16.0 ms at 32k, fixed part 1.34 ms, slope 1.72 (predicts 64k / 128k TTFT within 2% / 6%).
# Crossovers: 10.4k tokens at density 0.1, 13.6k at 0.3, 25k at 0.5, never above 0.58. FA4 dense takes
# 0.90 of cuDNN SDPA's time at 32k (13.61 against 15.12 ms, scripts/bench_attention.py): against it
# the crossover at density 0.1 is 11.1k tokens.
DEFAULT_COST_MODELS = {
    "NVIDIA H200|block64|heads32x8|dim128|bfloat16": CostModel(1.34e-3, 1.72, 0.513 / 32 / 32768**2, 0.90,
                                                               "H200 table"),
}


def cost_model_key(device_name: str, block_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> str:
    return f"{device_name}|block{block_size}|heads{num_heads}x{num_kv_heads}|dim{head_dim}|{str(dtype).removeprefix('torch.')}"


def cache_path() -> Path:
    folder = os.environ.get("SEERATTN_CACHE_DIR")
    if folder is None:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seerattn_hf"
    return Path(folder) / CACHE_FILE


def _read_cache(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        return {key: CostModel(**{**value, "source": f"measured ({path})"}) for key, value in entries.items()}
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: expected the crossover measurements min_sparse_length='auto' caches "
                         f"(JSON of {{key: {{fixed_s, sparse_slope, dense_s_per_token2}}}}), found unreadable "
                         f"content ({error}); delete the file to measure again") from error


def _write_cache(path: Path, key: str, model: CostModel) -> None:
    entries = {name: {k: v for k, v in asdict(value).items() if k != "source"}
               for name, value in _read_cache(path).items()}
    entries[key] = {k: v for k, v in asdict(model).items() if k != "source"}
    atomic_write_text(path, json.dumps(entries, indent=2, sort_keys=True) + "\n")


def cost_model_for(device: torch.device, block_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> CostModel | None:
    """The cost model of a CUDA device (cached measurement, table, or measured now and cached);
    None on other devices (dense prefill always)."""
    if device.type != "cuda":
        return None
    return _cuda_cost_model(torch.cuda.get_device_name(device), device.index or 0, block_size, num_heads,
                            num_kv_heads, head_dim, dtype)


@lru_cache(maxsize=None)
def _cuda_cost_model(device_name: str, device_index: int, block_size: int, num_heads: int, num_kv_heads: int,
                     head_dim: int, dtype: torch.dtype) -> CostModel:
    key = cost_model_key(device_name, block_size, num_heads, num_kv_heads, head_dim, dtype)
    path = cache_path()
    cached = _read_cache(path).get(key)
    if cached is not None:
        return cached
    if key in DEFAULT_COST_MODELS:
        return DEFAULT_COST_MODELS[key]
    warnings.warn(f"min_sparse_length='auto': measuring the dense/sparse crossover of {key} (a few seconds, "
                  f"once; cached in {path})", stacklevel=2)
    return _measured(key, torch.device("cuda", device_index), block_size, num_heads, num_kv_heads, head_dim, dtype)


def _measured(key: str, device: torch.device, *shape) -> CostModel:
    model = measure_cost_model(device, *shape)
    _write_cache(cache_path(), key, model)
    return model


def measure_and_cache(device: torch.device, block_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                      dtype: torch.dtype) -> CostModel:
    """Measure the cost model of a CUDA device and cache it (it then takes precedence over the table)."""
    key = cost_model_key(torch.cuda.get_device_name(device), block_size, num_heads, num_kv_heads, head_dim, dtype)
    model = _measured(key, device, block_size, num_heads, num_kv_heads, head_dim, dtype)
    _cuda_cost_model.cache_clear()
    return model


def expected_density(policy) -> float:
    """The share of causal blocks the policy is expected to keep (see the module docstring)."""
    if policy.sparsity_method in ("density", "nz_ratio", "calibrated_threshold"):
        return float(policy.value)
    return UNKNOWN_DENSITY


def auto_min_sparse_length(policy, device: torch.device, block_size: int, num_heads: int, num_kv_heads: int,
                           head_dim: int, dtype: torch.dtype) -> float:
    """The prompt length from which "auto" runs sparse prefill (inf: never): against FA4's dense pass
    where the policy's backend sends dense passes to FA4, else against SDPA."""
    model = cost_model_for(device, block_size, num_heads, num_kv_heads, head_dim, dtype)
    if model is None:
        return math.inf
    return model.crossover(expected_density(policy), _fa4_takes_dense(policy, device, head_dim, dtype))


def _fa4_takes_dense(policy, device: torch.device, head_dim: int, dtype: torch.dtype) -> bool:
    from .ops.block_sparse_attn.fa4 import fa4_unsupported_reason

    return policy.backend in ("auto", "fa4") and fa4_unsupported_reason(device, dtype, head_dim) is None


def measure_cost_model(device: torch.device, block_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype, lengths: tuple[int, int] = MEASURED_LENGTHS,
                       density: float = MEASURED_DENSITY, repeats: int = 5) -> CostModel:
    """Fit the cost model from one layer's dense attention (SDPA, and FA4 where it can run) and sparse
    path (a random gate, density selection, the Triton kernel) timed at two prompt lengths."""
    from .attention import block_sparse_attention
    from .ops.block_sparse_attn.fa4 import fa4_dense_attention, fa4_unsupported_reason
    from .gate import SeerGate
    from .gate_config import GateConfig
    from .policy import SparsityPolicy
    from .selectors import select_block_lists

    config = GateConfig(block_size=block_size)
    # The rope parameters do not change the gate's cost: the default ones.
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, config.gate_hidden_size, 2).float() / config.gate_hidden_size))
    gate = SeerGate(num_heads, num_kv_heads, head_dim, config, inv_freq).to(device)
    policy = SparsityPolicy(sparsity_method="density", density=density)
    scale = head_dim ** -0.5
    with_fa4 = fa4_unsupported_reason(device, dtype, head_dim) is None
    dense_s, sparse_s, fa4_s = [], [], []
    for length in lengths:
        q = torch.randn(1, num_heads, length, head_dim, device=device, dtype=dtype)
        k = torch.randn(1, num_kv_heads, length, head_dim, device=device, dtype=dtype)
        v = torch.randn_like(k)

        def dense():
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def sparse():
            with torch.no_grad():
                scores = gate(q.transpose(1, 2), k.transpose(1, 2), fused=True)
            block_idx, block_count = select_block_lists(policy, scores, fused=True)
            block_sparse_attention(q, k, v, block_idx, block_count, block_size, scale, None, "triton")

        dense_s.append(_median_seconds(dense, device, repeats))
        sparse_s.append(_median_seconds(sparse, device, repeats))
        if with_fa4:
            fa4_s.append(_median_seconds(lambda: fa4_dense_attention(q, k, v, scale=scale), device, repeats))
    dense_coefficient = dense_s[1] / lengths[1] ** 2
    dense_work = [density * dense_coefficient * length**2 for length in lengths]
    slope = max((sparse_s[1] - sparse_s[0]) / (dense_work[1] - dense_work[0]), 0.0)
    fixed = max(sparse_s[0] - slope * dense_work[0], 0.0)
    return CostModel(fixed, slope, dense_coefficient, fa4_s[1] / dense_s[1] if with_fa4 else None)


def _median_seconds(function, device: torch.device, repeats: int) -> float:
    function()  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1000.0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    """`python -m seerattn_hf.crossover`: measure this GPU's cost model, cache it and print its crossovers."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv_heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    key = cost_model_key(torch.cuda.get_device_name(device), args.block_size, args.heads, args.kv_heads,
                         args.head_dim, dtype)
    model = measure_and_cache(device, args.block_size, args.heads, args.kv_heads, args.head_dim, dtype)
    table = DEFAULT_COST_MODELS.get(key)
    print(json.dumps({"key": key, "cache": str(cache_path()), "measured": asdict(model),
                      "table": None if table is None else asdict(table),
                      "crossover_tokens": {f"{d:g}": {"measured": model.crossover(d),
                                                      "measured_against_fa4": model.crossover(d, fa4_dense=True),
                                                      "table": None if table is None else table.crossover(d)}
                                           for d in (0.1, 0.3, 0.5)}}, indent=2))


if __name__ == "__main__":
    main()
