"""What the compiler makes of the attention kernels: registers, stack, shared memory and register
spills inside the hot loop, for the launch configurations the launchers pick.

Compiles ahead of time for a chosen NVIDIA architecture (default sm_90, the H100/H200) with the
ptxas, cuobjdump and nvdisasm that ship with Triton, so it needs no GPU. Prints a table and writes
--output. A loop that issues local loads or stores (LDL / STL) per step spills registers on the
path that bounds the kernel's speed.

    python scripts/kernel_resources.py --head-dim 128 --block-size 64 --output kernel_resources.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

# Compiled kernels and the GPU's launch configurations, also where TRITON_INTERPRET=1 is set (Triton
# reads it when the kernels are defined, the launchers when they pick tiles).
os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from seerattn_hf.ops.block_sparse_attn.triton import block_sparse_attn_fwd_kernel, default_config  # noqa: E402
from seerattn_hf.ops.decode_pooled_attn.triton import decode_pooled_attn_fwd_kernel, decode_pooled_config  # noqa: E402
from seerattn_hf.ops.pooled_attn.triton import fused_config, pooled_attn_fused_kernel  # noqa: E402

TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def compile_kernel(kernel, pointers: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int):
    """Compile `kernel` for sm_<arch>: pointers maps pointer arguments to element types, constexprs
    gives the compile-time arguments, every other argument is an int32 except the float qk_scale."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _tool(name: str) -> str:
    return getattr(triton.knobs.nvidia, name).path


def resources(compiled) -> dict:
    """Registers, stack and shared memory of the compiled kernel, and for its main step loop (loops
    are found by backward branches in the machine code) the instruction count, matrix (HGMMA) and
    exp2 instructions, and the local loads / stores of spilled registers per step."""
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    found = re.search(r"REG:(\d+).*?STACK:(\d+)", usage, re.S)
    labels, instructions = {}, []
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        instruction = re.match(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", line)
        if instruction:
            instructions.append((instruction.group(1), line))
    loops = []
    for end, (opcode, line) in enumerate(instructions):
        target = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line) if opcode == "BRA" else None
        if target and labels.get(target.group(1), end + 1) < end:
            counts = collections.Counter(op for op, _ in instructions[labels[target.group(1)]:end + 1])
            loops.append({"instructions": sum(counts.values()),
                          "matrix": sum(n for op, n in counts.items() if op.startswith("HGMMA")),
                          "exp2": counts["MUFU.EX2"],
                          "local_loads": sum(n for op, n in counts.items() if op.startswith("LDL")),
                          "local_stores": sum(n for op, n in counts.items() if op.startswith("STL"))})
    # The main step loop: the shortest loop with matrix instructions (the steps without a mask; the
    # diagonal steps add masking, a persistent kernel's tile loop holds whole tiles).
    step = min((loop for loop in loops if loop["matrix"]), key=lambda loop: loop["instructions"], default=None)
    return {"registers": int(found.group(1)), "stack_bytes": int(found.group(2)),
            "shared_kib": round(compiled.metadata.shared / 1024, 1), "main_step_loop": step}


def block_sparse_variants(D: int, block_size: int, dtype, HQ: int, HKV: int) -> dict:
    G = HQ // HKV
    variants = {}
    for label, per_qhead in (("block-sparse, mask per KV head", False), ("block-sparse, mask per query head", True)):
        gm, block_n, warps, stages = default_config(block_size, block_size, D, G, 1 if per_qhead else G, dtype)
        variants[label] = (dict(GM=gm, MASK_PER_QHEAD=per_qhead and G > 1, BLOCK_Q=block_size, KBS=block_size,
                                BLOCK_N=block_n, DENSE=False), warps, stages)
    gm, block_n, warps, stages = default_config(128, 128, D, G, G, dtype)
    variants["dense pass (128-row tiles)"] = (dict(GM=gm, MASK_PER_QHEAD=False, BLOCK_Q=128, KBS=block_n,
                                                   BLOCK_N=block_n, DENSE=True), warps, stages)
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    element = TRITON_TYPES[dtype]
    D, bs, HQ, HKV = args.head_dim, args.block_size, args.heads, args.kv_heads
    precision = "tf32"  # what the launchers pass for 16-bit inputs

    rows = []
    common = dict(HQ=HQ, G=HQ // HKV, D=D, HAS_OFFSETS=False, RETURN_LSE=False, INPUT_PRECISION=precision)
    pointers = {"q": element, "k": element, "v": element, "o": element, "lse": "fp32", "block_idx": "i32",
                "block_count": "i32", "seq_offsets": "i32"}
    for label, (config, warps, stages) in block_sparse_variants(D, bs, dtype, HQ, HKV).items():
        compiled = compile_kernel(block_sparse_attn_fwd_kernel, pointers, {**common, **config}, warps, stages,
                                  args.arch)
        rows.append({"kernel": label, "num_warps": warps, "num_stages": stages, **config, **resources(compiled)})

    block_q, gm, block_n, warps, stages, _, chunk = fused_config(bs, D, dtype)
    config = dict(B=1, HQ=HQ, G=HQ // HKV, GM=gm, D=D, BLOCK_Q=block_q, BS=bs, BLOCK_N=block_n, CHUNK=chunk,
                  HAS_OFFSETS=False, INPUT_PRECISION=precision, MASS=False)
    pointers = {"q": element, "k": element, "v": element, "o": element, "pooled": "fp32", "scratch": "fp32",
                "seq_offsets": "i32"}
    compiled = compile_kernel(pooled_attn_fused_kernel, pointers, config, warps, stages, args.arch)
    rows.append({"kernel": "distillation target (one pass)", "num_warps": warps, "num_stages": stages, **config,
                 **resources(compiled)})

    block_q, block_n, warps, stages, _, chunk = decode_pooled_config(bs, D, dtype)
    pointers = {"q": element, "k": element, "v": element, "o": element, "target": "fp32", "scratch": "fp32",
                "seq_offsets": "i32"}
    for label, mass in (("decode distillation target (one pass)", False),
                        ("decode distillation target, block_mass (one pass)", True)):
        config = dict(B=1, HQ=HQ, G=HQ // HKV, D=D, BLOCK_Q=block_q, BS=bs, BLOCK_N=block_n, CHUNK=chunk,
                      HAS_OFFSETS=False, INPUT_PRECISION=precision, MASS=mass)
        compiled = compile_kernel(decode_pooled_attn_fwd_kernel, pointers, config, warps, stages, args.arch)
        rows.append({"kernel": label, "num_warps": warps, "num_stages": stages, **config, **resources(compiled)})

    print(f"\nsm_{args.arch}, head_dim {D}, {args.dtype}, {bs}-token blocks, {HQ} / {HKV} heads, Triton "
          f"{triton.__version__}\n")
    print("| kernel | warps | stages | registers | stack bytes | shared KiB | main step loop: instructions, "
          "matrix, exp2, local loads, local stores |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        loop = row["main_step_loop"] or {}
        cells = ", ".join(str(loop.get(key, "-")) for key in ("instructions", "matrix", "exp2", "local_loads",
                                                               "local_stores"))
        print(f"| {row['kernel']} | {row['num_warps']} | {row['num_stages']} | {row['registers']} | "
              f"{row['stack_bytes']} | {row['shared_kib']} | {cells} |")
    if args.output:
        Path(args.output).write_text(json.dumps({"arch": args.arch, "triton": triton.__version__, "kernels": rows},
                                                indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
