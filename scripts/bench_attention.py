"""Time block-sparse and pooled attention against SDPA (cuDNN, flash), FlexAttention and, where
installed, FlashAttention-4 (dense and block-sparse) and the cuDNN frontend's block-sparse attention
on one GPU. Speed-ups are stated against the fastest dense kernel of the run, named in the table.

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

from seerattn_hf.ops.block_sparse_attn import fa4_block_sparse_attention, naive_block_sparse_attention
from seerattn_hf.ops.block_sparse_attn.fa4 import fa4_block_lists, fa4_dense_attention, fa4_unsupported_reason
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


def trimmed(idx, count):
    """The lists cut to their longest row (every kernel reads only the first `count` entries), as
    the gate's top-k selection makes them."""
    return idx[..., : int(count.max())].contiguous(), count


def cudnn_block_sparse():
    """The cuDNN frontend's block-sparse forward, or None with the reason printed."""
    try:
        from cudnn.block_sparse_attention import block_sparse_attention_forward
    except Exception as error:
        print(f"# cuDNN frontend block-sparse attention not importable: {type(error).__name__}: {error}")
        return None
    return block_sparse_attention_forward


def cudnn_lists(idx, count, n_heads):
    """Our lists as cuDNN reads them: one per query head, every entry a valid block index."""
    if idx.shape[1] != n_heads:
        idx, count = (x.repeat_interleave(n_heads // idx.shape[1], dim=1) for x in (idx, count))
    return idx.clamp(0, idx.shape[2] - 1).contiguous(), count.contiguous()


def cudnn_bsa(forward, q, k, v, lists, block_size):
    """cuDNN's non-causal block-sparse attention on `cudnn_lists` (kept diagonal blocks are computed
    whole, so its output differs from causal attention there). [B, T, HQ, D]."""
    idx, count = lists
    out = forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), idx, q2k_block_nums=count,
                  sparse_block_size=block_size, layout="bshd")
    return out["o_tensor"]


def noncausal_reference(q, k, v, idx, count, block_size):
    """float32 attention over the kept blocks, diagonal blocks whole (cuDNN's semantics). Short
    sequences only: builds the [B, HQ, T, T] mask. Returns [B, T, HQ, D]."""
    T, NB = q.shape[2], idx.shape[2]
    kept = torch.arange(idx.shape[-1], device=q.device) < count[..., None]
    blocks = torch.zeros(*idx.shape[:3], NB + 1, dtype=torch.bool, device=q.device)
    blocks.scatter_(-1, torch.where(kept, idx.long().clamp(0, NB), NB), True)
    mask = blocks[..., :NB].repeat_interleave(block_size, 2).repeat_interleave(block_size, 3)[..., :T, :T]
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


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
    fa4_missing = fa4_unsupported_reason(torch.device(dev), torch.bfloat16, D)
    fa4_sparse_missing = fa4_unsupported_reason(torch.device(dev), torch.bfloat16, D, bs)
    for reason in dict.fromkeys(r for r in (fa4_missing, fa4_sparse_missing) if r):
        print(f"# FA4 baseline skipped: {reason}")
    cudnn_forward = cudnn_block_sparse()
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
            others = {}
            if not fa4_sparse_missing:
                others[f"fa4_bsa_{'kv' if shared else 'q'}"] = lambda: fa4_block_sparse_attention(
                    q, k, v, idx, count, bs)
            for name, run in others.items():
                try:
                    out = run()
                except Exception as error:
                    print(f"# {name} failed: {type(error).__name__}: {str(error)[:300]}")
                    continue
                records.append(dict(name=name, check="rel_rms", seqlen=T, value=rel_rms(out, ref)))
                print(f"check {name:24s} rel_rms {records[-1]['value']:.2e}", flush=True)
        if cudnn_forward is not None and bs == 64:
            # cuDNN's attention is non-causal: checked against kept blocks computed whole
            t = min(T, 2048)
            idx, count = random_block_lists(1, H, t, bs, 0.3, dev, seed=3)
            sub = [x[:, :, :t] for x in (q, k, v)]
            try:
                out = cudnn_bsa(cudnn_forward, *sub, cudnn_lists(idx, count, H), bs)
                records.append(dict(name="cudnn_bsa_q", check="rel_rms", seqlen=t,
                                    value=rel_rms(out, noncausal_reference(*sub, idx, count, bs))))
                print(f"check {'cudnn_bsa_q (non-causal)':24s} rel_rms {records[-1]['value']:.2e}", flush=True)
            except Exception as error:
                print(f"# cudnn_bsa_q failed: {type(error).__name__}: {str(error)[:300]}")
        if not fa4_missing:
            nb = triton.cdiv(T, bs)
            every = torch.arange(nb, device=dev, dtype=torch.int32).expand(q.shape[0], k.shape[1], nb, nb)
            ref = naive_block_sparse_attention(q, k, v, every,
                                               torch.arange(1, nb + 1, device=dev).expand(q.shape[0], k.shape[1], nb), bs)
            records.append(dict(name="fa4_dense", check="rel_rms", seqlen=T,
                                value=rel_rms(fa4_dense_attention(q, k, v), ref)))
            print(f"check {'fa4_dense':24s} rel_rms {records[-1]['value']:.2e}", flush=True)
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
        if not fa4_missing:
            record("fa4_dense", T, 1.0, bench(lambda: fa4_dense_attention(q, k, v), args), dense_pairs)
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
                idx, count = trimmed(*random_block_lists(1, HKV if shared else H, T, bs, density, dev, seed=2))
                pairs = causal_pairs(count, bs, T) * (H // count.shape[1])
                actual = pairs / dense_pairs
                for name, (v_shared, kw) in variants.items():
                    if v_shared == shared:
                        ms = bench(lambda: block_sparse_attn_fwd(q, k, v, idx, count, bs, **kw), args)
                        record(name, T, density, ms, pairs, kept=round(actual, 4))
                heads = "kv" if shared else "q"
                if not fa4_sparse_missing:
                    # the conversion of the lists is part of the call, as in the model; timed alone too
                    ms = bench(lambda: fa4_block_sparse_attention(q, k, v, idx, count, bs), args)
                    record(f"fa4_bsa_{heads}", T, density, ms, pairs, kept=round(actual, 4))
                    ms = bench(lambda: fa4_block_lists(idx, count, H), args)
                    record(f"fa4_lists_{heads}", T, density, ms, pairs, kept=round(actual, 4))
                if cudnn_forward is not None and bs == 64 and T % 64 == 0:
                    lists = cudnn_lists(idx, count, H)
                    ms = bench(lambda: cudnn_bsa(cudnn_forward, q, k, v, lists, bs), args)
                    record(f"cudnn_bsa_{heads}", T, density, ms, pairs, kept=round(actual, 4))
                    del lists
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


DENSE_KERNELS = ("sdpa_cudnn", "sdpa_flash", "flex_dense", "fa4_dense")
SPARSE_PREFIXES = ("bsa", "fa4_bsa", "cudnn_bsa", "flex_mask")


def fastest_dense(get, T):
    """(name, ms) of the fastest dense kernel timed at length T, or (None, None)."""
    timed = [(get[(n, T, 1.0)], n) for n in DENSE_KERNELS if (n, T, 1.0) in get]
    return (min(timed)[1], min(timed)[0]) if timed else (None, None)


def print_table(records, bs):
    timed = [r for r in records if "ms" in r]
    get = {(r["name"], r["seqlen"], r["density"]): r["ms"] for r in timed if r["ms"] == r["ms"]}
    names = sorted({r["name"] for r in timed if r["name"].startswith(SPARSE_PREFIXES)})
    ours = [n for n in names if n.startswith("bsa")]
    print(f"\n{bs}-token blocks, ms. Speed-ups are against the fastest dense kernel of the run at that length "
          "(named); cudnn_bsa is non-causal (kept diagonal blocks computed whole).")
    print(f"| T | density | {' | '.join(names)} | fastest dense | speed-up of best ours over it | "
          "fastest sparse | best ours / fastest other sparse |")
    print("|" + "---|" * (len(names) + 6))
    for T in sorted({r["seqlen"] for r in timed}):
        dense_name, dense_ms = fastest_dense(get, T)
        for d in sorted({r["density"] for r in timed if r["name"].startswith("bsa")}, reverse=True):
            row = {n: get.get((n, T, d)) for n in names}
            best_ours = min((row[n] for n in ours if row[n]), default=None)
            others = [(ms, n) for n, ms in row.items() if ms and not n.startswith("bsa")]
            fastest = min([(ms, n) for n, ms in row.items() if ms], default=(None, "-"))
            cells = [f"{row[n]:.2f}" if row[n] else "-" for n in names]
            speedup = f"{dense_ms / best_ours:.2f}x" if best_ours and dense_ms else "-"
            vs_other = f"{best_ours / min(others)[0]:.3f} ({min(others)[1]})" if best_ours and others else "-"
            dense_cell = f"{dense_name} {dense_ms:.2f}" if dense_name else "-"
            print(f"| {T} | {d} | {' | '.join(cells)} | {dense_cell} | {speedup} | {fastest[1]} | {vs_other} |")
    print("\n| T | kernel | ms | TFLOP/s | / fastest dense (name) | extra MiB |\n|---|---|---|---|---|---|")
    for r in timed:
        if r["name"].startswith(("target", "dense_pass", "sdpa", "flex_dense", "fa4_dense")):
            dense_name, dense_ms = fastest_dense(get, r["seqlen"])
            ratio = f"{r['ms'] / dense_ms:.3f} ({dense_name})" if dense_ms else "-"
            print(f"| {r['seqlen']} | {r['name']} | {r['ms']:.2f} | {r['tflops']:.0f} | {ratio} | "
                  f"{r.get('extra_mem_mb', '-')} |")

if __name__ == "__main__":
    main()
