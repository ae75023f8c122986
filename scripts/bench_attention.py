"""Time block-sparse and pooled attention against SDPA (cuDNN, flash) and FlexAttention on one GPU.

Llama-3.1-8B attention shape by default (B1, 32 query heads, 8 KV heads, D 128, bf16, causal).
Random masks keep the diagonal block plus each earlier block with probability `density`, so density
is the share of causal blocks kept. TFLOP/s count only the computed causal work (4 * D flops per
attended query-key pair). Prints a markdown table last and writes every record to --output.

    PYTHONPATH=. python scripts/bench_attention.py --seqlens 8192 32768 65536 131072 \
        --densities 1.0 0.5 0.3 0.1 --block-size 64 --output results.json

All four lengths with every baseline take about 2 minutes on an H200 (mostly compilation), so no
baseline is skipped by default (--fa2-max-seqlen / --flex-max-seqlen / --no-flex can). --sweep adds
launcher-config variants. Measured numbers: docs/kernels.md.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from seerattn_hf.ops.block_sparse_attn import naive_block_sparse_attention
from seerattn_hf.ops.block_sparse_attn.triton import block_sparse_attn_fwd
from seerattn_hf.ops.pooled_attn import naive_pooled_attention
from seerattn_hf.ops.pooled_attn.triton import pooled_attn_fwd


def random_block_lists(B, HM, T, block_size, density, device, seed=0):
    """[B, HM, NB, NB] int32 ascending kept blocks (diagonal always kept) and [B, HM, NB] counts."""
    gen = torch.Generator(device=device).manual_seed(seed)
    NB = triton.cdiv(T, block_size)
    rows = torch.arange(NB, device=device)
    keep = torch.rand(B, HM, NB, NB, device=device, generator=gen) < density
    keep &= rows[None, :] < rows[:, None]
    keep |= rows[None, :] == rows[:, None]
    count = keep.sum(-1, dtype=torch.int32)
    idx = torch.where(keep, rows, NB + rows).sort(-1).values.to(torch.int32)
    del keep
    return idx, count


def causal_pairs(count, block_size, T):
    """Attended (query, key) pairs of a random mask (diagonal blocks counted half): for TFLOP/s."""
    n_off = count.sum().item() - count.numel()
    return n_off * block_size**2 + count.numel() * block_size * (block_size + 1) / 2


def bench(fn, args):
    """Median ms; NaN (and the error printed) when the variant fails to compile or run."""
    try:
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")
    except Exception as error:  # one failing variant must not end a timed run
        print(f"# failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
        return float("nan")


def rel_rms(out, ref):
    out, ref = out.float(), ref.float()
    if not out.isfinite().all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def sdpa(q, k, v, backend):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


# overrides of the Triton heuristic: name -> (mask per KV head, launcher keywords)
VARIANTS = {
    "bsa_q": (False, {}),
    "bsa_kv": (True, {}),
}
SWEEP = {
    "bsa_q_s2": (False, dict(num_warps=4, num_stages=2)),
    "bsa_kv_g1": (True, dict(heads_per_tile=1, num_warps=4, num_stages=3)),
    "bsa_kv_g2_w8": (True, dict(heads_per_tile=2, num_warps=8, num_stages=3)),
    "bsa_kv_g4_w8": (True, dict(heads_per_tile=4, num_warps=8, num_stages=3)),
}
# the pooled target (one pass), and dense attention with lse alone (the sparse kernel in dense mode)
TARGETS = {"target": {}}
TARGET_SWEEP = {
    "target_n128_w8": dict(block_n=128, num_warps=8, num_stages=3, programs_per_sm=1, chunk=64),
    "target_g2q64_w8": dict(block_q=64, heads_per_tile=2, block_n=128, num_warps=8, num_stages=3,
                            programs_per_sm=1, chunk=64),
}
DENSE = {"dense_pass": {}}
DENSE_SWEEP = {
    "dense_pass_n64": dict(block_n=64),
    "dense_pass_g2q64": dict(block_q=64, heads_per_tile=2, block_n=64),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.3, 0.1])
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--output", default="results.json")
    parser.add_argument("--warmup", type=int, default=10, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=60, help="do_bench repetitions, ms")
    parser.add_argument("--sweep", action="store_true", help="also time the launcher-config sweep")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (compiles)")
    parser.add_argument("--flex-max-seqlen", type=int, default=131072)
    parser.add_argument("--fa2-max-seqlen", type=int, default=131072)
    parser.add_argument("--check-seqlen", type=int, default=8192,
                        help="check every variant against the torch reference at this length (0: no)")
    args = parser.parse_args()

    dev = "cuda"
    H, HKV, D, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    variants = dict(VARIANTS, **(SWEEP if args.sweep else {}))
    targets = dict(TARGETS, **(TARGET_SWEEP if args.sweep else {}))
    dense_passes = dict(DENSE, **(DENSE_SWEEP if args.sweep else {}))
    records = []

    def record(name, T, density, ms, pairs, **extra):
        """pairs: attended (query, key) pairs summed over all query heads."""
        tflops = 4 * D * pairs / ms / 1e9
        records.append(dict(name=name, seqlen=T, density=density, ms=ms, tflops=tflops, **extra))
        print(f"{name:28s} T={T:6d} density={density:4.2f} {ms:9.3f} ms {tflops:6.1f} TFLOP/s "
              + " ".join(f"{k}={v}" for k, v in extra.items()), flush=True)

    if args.check_seqlen:
        T = args.check_seqlen
        q = torch.randn(1, T, H, D, device=dev, dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn(1, T, HKV, D, device=dev, dtype=torch.bfloat16).transpose(1, 2)
        v = torch.randn(1, T, HKV, D, device=dev, dtype=torch.bfloat16).transpose(1, 2)
        for shared in (False, True):
            idx, count = random_block_lists(1, HKV if shared else H, T, bs, 0.3, dev, seed=1)
            ref = naive_block_sparse_attention(q, k, v, idx, count, bs)
            for name, (v_shared, kw) in variants.items():
                if v_shared == shared:
                    try:
                        out = block_sparse_attn_fwd(q, k, v, idx, count, bs, **kw)
                    except Exception as error:
                        print(f"# {name} failed: {str(error)[:300]}")
                        continue
                    records.append(dict(name=name, check="rel_rms", seqlen=T, value=rel_rms(out, ref)))
                    print(f"check {name:24s} rel_rms {records[-1]['value']:.2e}", flush=True)
        ref_o, ref_p = naive_pooled_attention(q[:, :, :4096], k[:, :, :4096], v[:, :, :4096], bs)
        for name, kw in targets.items():
            try:
                o, p = pooled_attn_fwd(q[:, :, :4096], k[:, :, :4096], v[:, :, :4096], bs, **kw)
            except Exception as error:
                print(f"# {name} failed: {str(error)[:300]}")
                continue
            records.append(dict(name=name, check="rel_rms", seqlen=4096,
                                value=max(rel_rms(o, ref_o), rel_rms(p, ref_p))))
            print(f"check {name:24s} rel_rms {records[-1]['value']:.2e}", flush=True)
        del q, k, v, ref, ref_o, ref_p

    for T in args.seqlens:
        t_start = time.time()
        q = torch.randn(1, T, H, D, device=dev, dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn(1, T, HKV, D, device=dev, dtype=torch.bfloat16).transpose(1, 2)
        v = torch.randn(1, T, HKV, D, device=dev, dtype=torch.bfloat16).transpose(1, 2)
        dense_pairs = H * T * (T + 1) / 2
        qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
        record("sdpa_cudnn", T, 1.0, bench(lambda: sdpa(qc, kc, vc, SDPBackend.CUDNN_ATTENTION), args),
               dense_pairs)
        if T <= args.fa2_max_seqlen:
            record("sdpa_flash", T, 1.0, bench(lambda: sdpa(qc, kc, vc, SDPBackend.FLASH_ATTENTION), args),
                   dense_pairs)
        del qc, kc, vc
        use_flex = not args.no_flex and T <= args.flex_max_seqlen
        if use_flex:
            from seerattn_hf.ops.block_sparse_attn.flex import _compiled_flex, build_block_mask

            flex = _compiled_flex()
            # dense causal mask with Flex's default 128-token blocks, built from lists (create_block_mask
            # would materialize T x T)
            nb = triton.cdiv(T, 128)
            causal = build_block_mask(torch.arange(nb, device=dev, dtype=torch.int32).expand(1, 1, nb, nb),
                                      torch.arange(1, nb + 1, device=dev, dtype=torch.int32).view(1, 1, nb),
                                      128, T, 1)
            record("flex_dense", T, 1.0, bench(lambda: flex(q, k, v, block_mask=causal, enable_gqa=True),
                                               args), dense_pairs)
            del causal

        for density in args.densities:
            for shared in (False, True):
                idx, count = random_block_lists(1, HKV if shared else H, T, bs, density, dev, seed=2)
                pairs = causal_pairs(count, bs, T) * (H // count.shape[1])
                actual = pairs / dense_pairs
                for name, (v_shared, kw) in variants.items():
                    if v_shared == shared:
                        ms = bench(lambda: block_sparse_attn_fwd(q, k, v, idx, count, bs, **kw), args)
                        record(name, T, density, ms, pairs, kept=round(actual, 4))
                if use_flex and not shared:
                    opts = {"BLOCK_M": bs, "BLOCK_N": bs} if bs < 128 else None
                    try:
                        mask = build_block_mask(idx, count, bs, T, H)
                    except Exception as error:
                        print(f"# flex mask failed: {str(error)[:300]}")
                        use_flex = False
                        continue
                    ms = bench(lambda: flex(q, k, v, block_mask=mask, enable_gqa=True, kernel_options=opts), args)
                    record(f"flex_mask_{bs}x{bs}", T, density, ms, pairs, kept=round(actual, 4))
                    del mask
                del idx, count

        for name, kw in dense_passes.items():
            ms = bench(lambda: block_sparse_attn_fwd(q, k, v, None, None, bs, dense=True, return_lse=True,
                                                     **kw), args)
            record(name, T, 1.0, ms, dense_pairs)
        for name, kw in targets.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            try:
                o, p = pooled_attn_fwd(q, k, v, bs, **kw)
            except Exception as error:
                print(f"# {name} failed: {str(error)[:300]}")
                continue
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - base - o.numel() * o.element_size()
            del o, p
            ms = bench(lambda: pooled_attn_fwd(q, k, v, bs, **kw), args)
            record(name, T, 1.0, ms, dense_pairs, extra_mem_mb=round(extra / 2**20, 1))
        del q, k, v
        torch.cuda.empty_cache()
        print(f"# T={T} took {time.time() - t_start:.0f} s", flush=True)
        with open(args.output, "w") as f:  # after every length, so a run cut short keeps its numbers
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=triton.__version__, block_size=bs, heads=H, kv_heads=HKV, head_dim=D,
                           args=vars(args), records=records), f, indent=1)
    print_table(records, bs)


def print_table(records, bs):
    timed = [r for r in records if "ms" in r]
    get = {(r["name"], r["seqlen"], r["density"]): r["ms"] for r in timed if r["ms"] == r["ms"]}
    names = sorted({r["name"] for r in timed if r["name"].startswith("bsa")})
    print(f"\n| T | density | {' | '.join(names)} | flex {bs}x{bs} | cuDNN dense | FA2 dense | flex dense | "
          "best bsa / cuDNN | best bsa / flex mask |")
    print("|" + "---|" * (len(names) + 8))
    for T in sorted({r["seqlen"] for r in timed}):
        cudnn = get.get(("sdpa_cudnn", T, 1.0))
        for d in sorted({r["density"] for r in timed if r["name"].startswith("bsa")}, reverse=True):
            ours = [get.get((n, T, d)) for n in names]
            fm = get.get((f"flex_mask_{bs}x{bs}", T, d))
            best = min(x for x in ours if x) if any(ours) else None
            cells = [f"{x:.2f}" if x else "-" for x in ours + [fm, cudnn, get.get(("sdpa_flash", T, 1.0)),
                                                              get.get(("flex_dense", T, 1.0))]]
            r1 = f"{best / cudnn:.3f}" if best and cudnn else "-"
            r2 = f"{best / fm:.3f}" if best and fm else "-"
            print(f"| {T} | {d} | {' | '.join(cells)} | {r1} | {r2} |")
    print("\n| T | kernel | ms | TFLOP/s | / cuDNN dense | extra MiB |\n|---|---|---|---|---|---|")
    for r in timed:
        if r["name"].startswith(("target", "dense_pass")):
            cudnn = get.get(("sdpa_cudnn", r["seqlen"], 1.0))
            ratio = f"{r['ms'] / cudnn:.3f}" if cudnn else "-"
            print(f"| {r['seqlen']} | {r['name']} | {r['ms']:.2f} | {r['tflops']:.0f} | {ratio} | "
                  f"{r.get('extra_mem_mb', '-')} |")


if __name__ == "__main__":
    main()
