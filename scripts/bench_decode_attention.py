"""Time one decoding step's attention over a KV cache on one GPU: the sparse decode kernel at token
budgets and dense, against SDPA (flash and cuDNN; GQA through enable_gqa), the kept blocks
gathered into a copy then SDPA (flash), and FlexAttention's decoding kernel (same blocks).

Llama-3.1-8B attention shape by default (32 query heads, 8 KV heads, D 128, bf16), one new token per
sequence, every sequence filling its cache (length = capacity). A budget of N tokens keeps N / 64
blocks per KV head: the current (last) block and random earlier ones, in arbitrary order.

Each variant is timed twice with `triton.testing.do_bench` (median, L2 flushed before each call):
eager calls, and replays of a CUDA graph of one call ("graph": no launch overhead, the kernel time a
CUDA-graphed decode step sees). Bandwidth = bytes of K/V the variant must read (kept blocks, or the
whole cache for dense) / graph time, against the H200's 4.8 TB/s. Prints a markdown table and writes
every record to --output (after each shape, so a run cut short keeps its numbers).

    PYTHONPATH=. python scripts/bench_decode_attention.py --output decode.json

GPU only (never run in CI). --sweep adds split counts and launch configs of the kernel.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from seerattn_hf.ops.decode_attn import naive_sparse_decode_attention
from seerattn_hf.ops.decode_attn.triton import sparse_decode_attn_fwd, split_count

PEAK_TBPS = 4.8  # H200 HBM3e, datasheet
# (the efficient backend has no kernel for enable_gqa on torch 2.11: left out)
SDPA_BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}
# launcher overrides timed with --sweep (the default: the heuristic's split count, 4 warps, 3 stages)
SWEEP = {**{f"s{n}": dict(num_splits=n) for n in (1, 2, 4, 8, 16, 32, 64)},
         **{f"w{w}_st{st}": dict(num_warps=w, num_stages=st) for w, st in ((2, 3), (4, 2), (4, 4), (8, 3))}}


def kept_lists(B, HKV, L, block_size, budget, device, gen):
    """[B, HKV, K] int32 (K = budget / block_size: the last block, then random earlier ones) and
    [B, HKV] counts."""
    n_blocks = triton.cdiv(L, block_size)
    K = budget // block_size
    earlier = torch.rand(B, HKV, n_blocks - 1, device=device, generator=gen).topk(K - 1, dim=-1).indices
    last = torch.full((B, HKV, 1), n_blocks - 1, device=device)
    idx = torch.cat([last, earlier], -1).to(torch.int32)
    return idx, torch.full((B, HKV), K, dtype=torch.int32, device=device)


def flex_decode_mask(block_idx, block_count, HQ, L, block_size):
    """BlockMask of one query row over L keys from [B, HKV, K] lists: every kept block a full block
    (no mask_mod call). Indices padded to the cache's block count, so one compiled kernel serves
    every budget of a shape."""
    n_blocks = triton.cdiv(L, block_size)
    G = HQ // block_idx.shape[1]
    idx = F.pad(block_idx.repeat_interleave(G, 1), (0, n_blocks - block_idx.shape[-1]))[:, :, None]
    count = block_count.repeat_interleave(G, 1)[:, :, None]
    none = torch.zeros_like(count)
    return BlockMask.from_kv_blocks(none, torch.zeros_like(idx), count, idx.contiguous(),
                                    BLOCK_SIZE=(128, block_size), seq_lengths=(1, L), compute_q_blocks=False)


def every_block(B, HKV, L, block_size, device):
    """Lists keeping every block (FlexAttention's dense decoding)."""
    n_blocks = triton.cdiv(L, block_size)
    idx = torch.arange(n_blocks, device=device, dtype=torch.int32).expand(B, HKV, n_blocks)
    return idx, torch.full((B, HKV), n_blocks, device=device, dtype=torch.int32)


def gathered_sdpa(q4, k, v, block_idx, block_size):
    """The comparison that copies: kept blocks gathered into new K/V tensors, then flash SDPA."""
    pos = (block_idx.long()[..., None] * block_size + torch.arange(block_size, device=q4.device)).flatten(-2)
    index = pos[..., None].expand(-1, -1, -1, k.shape[-1])
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q4, k.gather(2, index), v.gather(2, index), enable_gqa=True)


def rel_rms(out, ref):
    out, ref = out.float(), ref.float()
    if not out.isfinite().all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def timed(fn, args, eager=True):
    """(eager ms, graph ms): do_bench medians over eager calls and over replays of a CUDA graph
    holding one call; NaN (the error printed) where a variant fails."""
    times = []
    for mode in ("eager", "graph") if eager else ("graph",):
        try:
            if mode == "graph":
                fn()
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                call = graph.replay
            else:
                call = fn
            times.append(triton.testing.do_bench(call, warmup=args.warmup, rep=args.rep, return_mode="median"))
        except Exception as error:  # one failing variant must not end a timed run
            print(f"# {mode} failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
            times.append(float("nan"))
        torch.cuda.synchronize()
    return (times[0] if eager else float("nan")), times[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("--batches", [1, 16]), ("--lengths", [32768, 131072]), ("--budgets", [2048, 4096])):
        parser.add_argument(name, type=int, nargs="+", default=default)
    # the Llama-3.1-8B attention shape; 64-token blocks as the decode gate's
    for name, default in (("--heads", 32), ("--kv-heads", 8), ("--head-dim", 128), ("--block-size", 64)):
        parser.add_argument(name, type=int, default=default)
    parser.add_argument("--output", default="decode.json")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (compiles per shape)")
    parser.add_argument("--sweep", action="store_true", help="also time split counts and launch configs")
    args = parser.parse_args()

    dev = "cuda"
    HQ, HKV, D, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    gen = torch.Generator(device=dev).manual_seed(0)
    flex = None if args.no_flex else torch.compile(flex_attention, dynamic=False)
    records = []

    def record(name, B, L, budget, times, kv_bytes, **extra):
        eager_ms, graph_ms = times
        tbps = kv_bytes / graph_ms / 1e9
        records.append(dict(name=name, batch=B, length=L, budget=budget, eager_ms=eager_ms, graph_ms=graph_ms,
                            kv_bytes=kv_bytes, tbps=tbps, peak_share=tbps / PEAK_TBPS, **extra))
        print(f"{name:22s} B={B:3d} L={L:6d} budget={budget!s:>6s} eager {eager_ms:8.4f} ms graph "
              f"{graph_ms:8.4f} ms {tbps:5.2f} TB/s " + " ".join(f"{k}={v}" for k, v in extra.items()),
              flush=True)

    def check(name, B, L, budget, fn, ref):
        """Relative RMS error of a variant's output against the torch reference (same kept blocks)."""
        try:
            value = rel_rms(fn().reshape(ref.shape), ref)
        except Exception as error:
            print(f"# {name} failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
            value = float("nan")
        records.append(dict(name=name, check="rel_rms", batch=B, length=L, budget=budget, value=value))
        print(f"check {name:22s} B={B} L={L} budget={budget} rel_rms {value:.2e}", flush=True)

    for B in args.batches:
        for L in args.lengths:
            t_start = time.time()
            q = torch.randn(B, HQ, D, device=dev, dtype=torch.bfloat16)
            k = torch.randn(B, HKV, L, D, device=dev, dtype=torch.bfloat16)
            v = torch.randn(B, HKV, L, D, device=dev, dtype=torch.bfloat16)
            lens = torch.full((B,), L, device=dev, dtype=torch.int32)
            q4 = q[:, :, None]
            token_bytes = 2 * D * k.element_size()  # K and V of one token of one KV head
            dense_bytes = B * HKV * L * token_bytes

            for name, backend in SDPA_BACKENDS.items():
                def sdpa(backend=backend):
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
                record(name, B, L, "dense", timed(sdpa, args), dense_bytes)

            settings = [(budget, *kept_lists(B, HKV, L, bs, budget, dev, gen)) for budget in args.budgets]
            settings.append(("dense", None, None))
            for budget, idx, count in settings:
                dense = idx is None
                kv_bytes = dense_bytes if dense else B * HKV * (budget // bs) * bs * token_bytes
                ns = split_count(B * HKV, triton.cdiv(L, bs) if dense else idx.shape[-1], q.device)
                variants = {"decode_kernel": lambda: sparse_decode_attn_fwd(q, k, v, idx, count, bs, lens)}
                if not dense:
                    variants["gather_sdpa_flash"] = lambda: gathered_sdpa(q4, k, v, idx, bs)
                if flex is not None:
                    lists = every_block(B, HKV, L, bs, dev) if dense else (idx, count)
                    mask = flex_decode_mask(*lists, HQ, L, bs)
                    variants["flex"] = lambda: flex(q4, k, v, block_mask=mask, enable_gqa=True)
                ref = naive_sparse_decode_attention(q, k, v, idx, count, bs, lens)
                for name, fn in variants.items():
                    check(name, B, L, budget, fn, ref)
                    record(name, B, L, budget, timed(fn, args), kv_bytes,
                           **({"splits": ns} if name == "decode_kernel" else {}))
                del ref, variants
                for variant, overrides in SWEEP.items() if args.sweep else ():
                    record(f"decode_kernel_{variant}", B, L, budget,
                           timed(lambda: sparse_decode_attn_fwd(q, k, v, idx, count, bs, lens, **overrides), args,
                                 eager=False), kv_bytes, splits=overrides.get("num_splits", ns))
            del q, k, v, q4, settings
            torch.cuda.empty_cache()
            print(f"# B={B} L={L} took {time.time() - t_start:.0f} s", flush=True)
            with open(args.output, "w") as f:
                json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                               triton=triton.__version__, heads=HQ, kv_heads=HKV, head_dim=D, block_size=bs,
                               peak_tbps=PEAK_TBPS, args=vars(args), records=records), f, indent=1)
    print_table(records)


def print_table(records):
    timed_records = [r for r in records if "graph_ms" in r]
    get = {(r["name"], r["batch"], r["length"], r["budget"]): r for r in timed_records}
    shapes = sorted({(r["batch"], r["length"]) for r in timed_records})
    print("\nMicroseconds per decode step's attention, CUDA-graph replay (the kernel's eager time in brackets);"
          " TB/s and share of 4.8 TB/s are the kernel's; speed-ups are best dense SDPA / kernel and the"
          " kernel's own dense / kernel.\n")
    print("| B | L | budget | kernel us (eager) | TB/s | of peak | gather+SDPA | flex | SDPA flash dense | "
          "SDPA cuDNN dense | vs best SDPA | vs own dense |")
    print("|---" * 12 + "|")
    for B, L in shapes:
        sdpa = [get[(n, B, L, "dense")]["graph_ms"] for n in SDPA_BACKENDS if (n, B, L, "dense") in get]
        best = min((x for x in sdpa if x == x), default=float("nan"))
        own_dense = get.get(("decode_kernel", B, L, "dense"), {}).get("graph_ms", float("nan"))
        for budget in budgets_of(timed_records, B, L):
            ours = get.get(("decode_kernel", B, L, budget))
            if ours is None:
                continue
            us = ours["graph_ms"] * 1e3
            cells = [f"{us:.1f} ({ours['eager_ms'] * 1e3:.1f})", f"{ours['tbps']:.2f}",
                     f"{ours['peak_share']:.0%}"]
            cells += [cell(get, n, B, L, budget) for n in ("gather_sdpa_flash", "flex")]
            cells += [cell(get, n, B, L, "dense") for n in SDPA_BACKENDS]
            cells += [f"{best / ours['graph_ms']:.2f}x", f"{own_dense / ours['graph_ms']:.2f}x"]
            print(f"| {B} | {L} | {budget} | " + " | ".join(cells) + " |")
    variants = list(dict.fromkeys(r["name"] for r in timed_records if r["name"].startswith("decode_kernel_")))
    if variants:
        print("\nSweep, graph-replay us (default: the heuristic's split count, 4 warps, 3 stages)\n")
        print("| B | L | budget | default (splits) | " + " | ".join(v[len("decode_kernel_"):] for v in variants)
              + " |\n" + "|---" * (len(variants) + 4) + "|")
        for B, L in shapes:
            for budget in budgets_of(timed_records, B, L):
                ours = get.get(("decode_kernel", B, L, budget))
                default = f"{ours['graph_ms'] * 1e3:.1f} ({ours['splits']})" if ours else "-"
                print(f"| {B} | {L} | {budget} | {default} | "
                      + " | ".join(cell(get, v, B, L, budget) for v in variants) + " |")


def budgets_of(records, B, L):
    """The budgets timed at a shape, ascending, dense last."""
    found = {r["budget"] for r in records if r["batch"] == B and r["length"] == L}
    return sorted(found, key=lambda b: (b == "dense", 0 if b == "dense" else b))


def cell(get, name, B, L, budget):
    r = get.get((name, B, L, budget))
    return f"{r['graph_ms'] * 1e3:.1f}" if r and r["graph_ms"] == r["graph_ms"] else "-"


if __name__ == "__main__":
    main()
