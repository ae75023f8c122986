"""Time the prefill gate (torch path and fused Triton kernels) and the block selection against dense
attention (SDPA cuDNN) of the same layer, on one GPU: the gate's cost as a share of dense attention.

Llama-3.1-8B attention shape by default (B1, 32 query heads, 8 KV heads, D 128, bf16; the gate's
default layout: 64-token blocks, width 128, avg-pooled Q, max/min/avg-pooled K, float32 compute).
Prints a markdown table and writes every record to --output (JSON):

    PYTHONPATH=. python scripts/bench_gate.py --seqlens 8192 32768 65536 131072 --output gate.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from seerattn_hf.gate import SeerGate
from seerattn_hf.gate_config import GateConfig
from seerattn_hf.ops.block_sparse_attn import triton_block_sparse_attention
from seerattn_hf.policy import SparsityPolicy
from seerattn_hf.selectors import select_block_lists
from seerattn_hf.utils import atomic_write_text


def median_ms(fn, args) -> float:
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    parser.add_argument("--density", type=float, default=0.1, help="per-row top-k share for the selection")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=10, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=50, help="do_bench repetitions, ms")
    parser.add_argument("--output", default="gate.json")
    args = parser.parse_args()

    device = torch.device("cuda")
    config = GateConfig(block_size=args.block_size)
    hidden = config.gate_hidden_size
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, hidden, 2).float() / hidden))
    gate = SeerGate(args.heads, args.kv_heads, args.head_dim, config, inv_freq).to(device).requires_grad_(False)
    policy = SparsityPolicy(sparsity_method="density", density=args.density)
    records = []
    for length in args.seqlens:
        # As the capture hooks hand them over: per-head views of the projections' outputs.
        query = torch.randn(1, length, args.heads * args.head_dim, device=device, dtype=torch.bfloat16)
        query = query.view(1, length, args.heads, args.head_dim)
        key = torch.randn(1, length, args.kv_heads * args.head_dim, device=device, dtype=torch.bfloat16)
        key = key.view(1, length, args.kv_heads, args.head_dim)
        value = torch.randn_like(key)
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        with torch.no_grad():
            scores = gate(query, key, fused=True)
            fused_error = (scores.exp() - gate(query, key).exp()).abs().max().item()
        block_idx, block_count = select_block_lists(policy, scores)
        fused_idx, fused_count = select_block_lists(policy, scores, fused=True)
        width = block_idx.shape[-1]
        same_lists = bool(torch.equal(fused_count, block_count) and torch.equal(
            torch.where(torch.arange(width, device=device) < block_count[..., None], fused_idx[..., :width], 0),
            torch.where(torch.arange(width, device=device) < block_count[..., None], block_idx, 0)))

        def dense():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        times = {
            "dense_attention_ms": median_ms(dense, args),
            "gate_torch_ms": median_ms(lambda: gate(query, key), args),
            "gate_fused_ms": median_ms(lambda: gate(query, key, fused=True), args),
            "selection_torch_ms": median_ms(lambda: select_block_lists(policy, scores), args),
            "selection_fused_ms": median_ms(lambda: select_block_lists(policy, scores, fused=True), args),
            "sparse_attention_ms": median_ms(
                lambda: triton_block_sparse_attention(q, k, v, block_idx, block_count, args.block_size), args),
        }
        dense_ms = times["dense_attention_ms"]
        record = {"seqlen": length, "density": args.density, **{name: round(ms, 4) for name, ms in times.items()},
                  "gate_torch_share": times["gate_torch_ms"] / dense_ms,
                  "gate_fused_share": times["gate_fused_ms"] / dense_ms,
                  "gate_torch_and_selection_share": (times["gate_torch_ms"] + times["selection_torch_ms"]) / dense_ms,
                  "gate_fused_and_selection_share": (times["gate_fused_ms"] + times["selection_fused_ms"]) / dense_ms,
                  "fused_max_probability_error": fused_error, "fused_lists_equal": same_lists}
        records.append(record)
        print(json.dumps(record), flush=True)
        del query, key, value, q, k, v, scores, block_idx, block_count, fused_idx, fused_count
        torch.cuda.empty_cache()

    atomic_write_text(args.output, json.dumps({"device": torch.cuda.get_device_name(), "heads": args.heads,
                                               "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                                               "block_size": args.block_size, "records": records}, indent=2) + "\n")
    print("\n| tokens | dense attention ms | gate torch / fused ms | selection torch / fused ms | sparse attention ms "
          "| gate torch / dense | gate fused / dense | torch gate + selection / dense | fused gate + selection / dense "
          "| fused lists equal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['seqlen']} | {r['dense_attention_ms']:.3f} | {r['gate_torch_ms']:.3f} / {r['gate_fused_ms']:.3f} "
              f"| {r['selection_torch_ms']:.3f} / {r['selection_fused_ms']:.3f} | {r['sparse_attention_ms']:.3f} "
              f"| {100 * r['gate_torch_share']:.1f}% | {100 * r['gate_fused_share']:.1f}% "
              f"| {100 * r['gate_torch_and_selection_share']:.1f}% | {100 * r['gate_fused_and_selection_share']:.1f}% "
              f"| {r['fused_lists_equal']} |")


if __name__ == "__main__":
    main()
