"""Gate-distillation training speed and peak memory for a model shape with random weights.

The step timed is the trainer's: a distillation forward (dense attention plus the block max-pooled
target on every gated layer), the KL loss, a backward through the gates only, and an AdamW step.
With `--gate_type decode` the target is each token's decode target (`ops/decode_pooled_attn`) over the
last `--decode_token_share` of the sequence (`--decode_distill_target` block_max or block_mass), and
each layer back-propagates its loss inside the forward, as the trainer does. Random token ids and
weights cost what real ones do.

    python scripts/bench_training.py --config_preset llama-3.1-8b --seq_lens 8192 32768 --output bench_training.json
    python scripts/bench_training.py --gate_type decode --seq_lens 32768 --output bench_decode_training.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import seerattn_hf as sa
from seerattn_hf.models import CONFIG_PRESETS, build_random_model, resolve_device
from seerattn_hf.decode_distill import DecodeDistillSettings
from seerattn_hf.decode_gate import DecodeGateConfig
from seerattn_hf.ops.decode_pooled_attn import DECODE_TARGETS
from seerattn_hf.training.metrics import distillation_loss
from seerattn_hf.utils import atomic_write_text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_preset", default="llama-3.1-8b", choices=sorted(CONFIG_PRESETS))
    parser.add_argument("--num_layers", type=int, default=None, help="shrink the preset to N layers")
    parser.add_argument("--seq_lens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--gate_type", default="prefill", choices=["prefill", "decode", "both"])
    parser.add_argument("--decode_token_share", type=float, default=0.5)
    parser.add_argument("--decode_distill_target", default="block_max", choices=list(DECODE_TARGETS))
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--output", default=None, help="JSON file for the results")
    return parser.parse_args(argv)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(model, optimizer, seq_len: int, batch_size: int, steps: int, device: torch.device,
                  prefill: bool = True) -> dict:
    vocab = model.config.vocab_size
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    durations = []
    for step in range(steps + 1):
        input_ids = torch.randint(0, vocab, (batch_size, seq_len), device=device)
        _synchronize(device)
        start = time.perf_counter()
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)  # decode layers back-propagate here
        if prefill:
            loss, _ = distillation_loss(sa.pop_distill_records(model))
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(device)
        if step:  # the first step compiles kernels
            durations.append(time.perf_counter() - start)
    seconds = sorted(durations)[len(durations) // 2]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"seq_len": seq_len, "batch_size": batch_size, "step_seconds": seconds,
            "tokens_per_s": batch_size * seq_len / seconds, "peak_memory_gib": peak}


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    model = build_random_model(args.config_preset, device, args.dtype, args.num_layers)
    model.requires_grad_(False)
    kinds = {"prefill": ("prefill",), "decode": ("decode",), "both": ("prefill", "decode")}[args.gate_type]
    decode_gate = DecodeGateConfig(block_size=args.block_size) if "decode" in kinds else None
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=args.block_size, decode_gate=decode_gate))
    sa.set_attention_mode(model, "distill")
    sa.patching.set_distill_targets(model, kinds, DecodeDistillSettings(args.decode_token_share,
                                                                        lambda kl: (10.0 * kl).backward(),
                                                                        args.decode_distill_target))
    gates = sa.gate_parameters(model, kinds)
    for parameter in gates:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(gates, lr=1e-3)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    results = []
    print(f"{args.config_preset} ({model.config.num_hidden_layers} layers, {weights_gib:.1f} GiB of weights), "
          f"{sum(p.numel() for p in gates) / 1e6:.1f}M {args.gate_type} gate parameters, {device}")
    print("| tokens | batch | step (s) | tokens/s | peak memory (GiB) |\n|---|---|---|---|---|")
    for seq_len in args.seq_lens:
        row = time_training(model, optimizer, seq_len, args.batch_size, args.steps, device, "prefill" in kinds)
        results.append({"config_preset": args.config_preset, "num_layers": model.config.num_hidden_layers,
                        "gate_type": args.gate_type, **row})
        if "decode" in kinds:
            results[-1]["decode_distill_target"] = args.decode_distill_target
        peak = "n/a" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.1f}"
        print(f"| {seq_len} | {args.batch_size} | {row['step_seconds']:.3f} | {row['tokens_per_s']:.0f} | {peak} |")
        if args.output:
            atomic_write_text(args.output, json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
