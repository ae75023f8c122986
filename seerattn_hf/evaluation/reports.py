"""Result files of the evaluation scripts: JSON with the run's environment, and markdown tables
(`markdown_table`, also the trainer's perplexity report) with the results.md of each script."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch


def environment() -> dict:
    """Versions and hardware, stored with every result so numbers can be compared later."""
    import transformers

    import seerattn_hf

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "seerattn_hf": seerattn_hf.__version__,
            "command": " ".join(sys.argv), "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_json(path: str | Path, values: dict) -> Path:
    from seerattn_hf.utils import atomic_write_text

    atomic_write_text(path, json.dumps(values, indent=2, sort_keys=False) + "\n")
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    from seerattn_hf.utils import atomic_write_text

    atomic_write_text(path, text)
    return Path(path)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats are written with 4 significant digits, None as an empty cell."""
    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def relative_change(value: float | None, reference: float | None) -> str | None:
    """'+2.4%' style change of `value` over `reference`."""
    if value is None or reference is None:
        return None
    change = round(100.0 * (value / reference - 1.0), 1)
    return f"{change + 0.0:+.1f}%"  # + 0.0 turns -0.0 into 0.0


# -------------------------------------------------------------------------- results.md of each script

def _title(kind: str, summary: dict) -> str:
    """The heading of a results.md: what was measured, on which model, with which gates."""
    return f"# {kind}: {summary['model']}" + (f" with gates {summary['gates']}" if summary["gates"] else "")


def ppl_markdown(summary: dict) -> str:
    """results.md of `eval_ppl`: one table per window length."""
    lines = [_title("Perplexity", summary), "",
             "Density: share of causal blocks computed (over all layers, heads and rows). "
             "Second half: tokens at positions L/2 .. L-1 of each window.", ""]
    for length in sorted({r["length"] for r in summary["results"]}):
        rows = [r for r in summary["results"] if r["length"] == length]
        dense = next((r for r in rows if r["method"] == "dense"), None)
        lines += [f"## {length} tokens, {rows[0]['num_documents']} documents", ""]
        table = [[r["method"], r["sparsity_method"], r["value"], r["density"], r["ppl"],
                  relative_change(r["ppl"], dense and dense["ppl"]), r["ppl_second_half"],
                  relative_change(r["ppl_second_half"], dense and dense["ppl_second_half"])] for r in rows]
        lines.append(markdown_table(["method", "by", "value", "density", "ppl", "vs dense", "ppl 2nd half",
                                     "vs dense"], table))
    return "\n".join(lines)


def retrieval_markdown(summary: dict) -> str:
    """results.md of `eval_retrieval`: one table per task, accuracy per setting and length."""
    lines = [_title("Retrieval", summary), "",
             f"Accuracy averaged over depths {summary['depths']} and {summary['num_samples']} sample(s) each; "
             "density: share of causal blocks computed in prefill.", ""]
    for task in dict.fromkeys(r["task"] for r in summary["results"]):
        rows = [r for r in summary["results"] if r["task"] == task]
        lengths = sorted({r["length"] for r in rows})
        table = []
        for label in dict.fromkeys(r["label"] for r in rows):
            cells = [r for r in rows if r["label"] == label]
            by_length = [sum(c["accuracy"] for c in cells if c["length"] == n) /
                         max(1, sum(1 for c in cells if c["length"] == n)) for n in lengths]
            densities = [c["density"] for c in cells if c["density"] is not None]
            table.append([label, sum(densities) / len(densities) if densities else None, *by_length,
                          sum(c["accuracy"] for c in cells) / len(cells)])
        lines += [f"## {task}", "", markdown_table(["setting", "density", *map(str, lengths), "mean"], table)]
    return "\n".join(lines)


def fastest_dense(results: list[dict]) -> dict[int, dict]:
    """length -> the one-shot dense result with the shortest TTFT (the model's attention, FA4, ...);
    prompts fed in chunks are not baselines."""
    fastest = {}
    for r in results:
        if r["method"] == "dense" and "ttft_s" in r and not r.get("chunk_size"):
            if r["length"] not in fastest or r["ttft_s"] < fastest[r["length"]]["ttft_s"]:
                fastest[r["length"]] = r
    return fastest


def prefill_markdown(summary: dict) -> str:
    """results.md of `bench_prefill`: time to first token per length and setting, with its breakdown."""
    name = summary["config_preset"] or summary["model"]
    lines = [f"# Prefill: {name} ({summary['num_layers']} layers, {summary['dtype']}, {summary['device']})", "",
             f"Median of {summary['repeats']} prefills after {summary['warmup']} warm-up. No-attention: the same "
             "prefill with attention replaced by a no-op. Gate / attention / other: one prefill timed inside "
             "(events around each gate and each attention call; attention excludes the gate).", ""]
    dense = fastest_dense(summary["results"])  # chunked rows are compared with it too
    if dense:
        lines += ["Speed-ups are against the fastest dense setting at each length: "
                  + ", ".join(f"{length}: {r['label']}" for length, r in sorted(dense.items())) + ".", ""]
    table = []
    for r in summary["results"]:
        if "error" in r:
            table.append([r["length"], r["label"], *[None] * 10, r["error"][:60]])
            continue
        b, reference = r["breakdown"], dense.get(r["length"])
        speedup = reference["ttft_s"] / r["ttft_s"] if reference else None
        # The gate's cost against the dense attention it is meant to save (goal: at most 2% at 32k+).
        gate_share = (f"{100 * b['gate_s'] / reference['breakdown']['attention_s']:.1f}%"
                      if reference and r["method"] != "dense" and reference["breakdown"]["attention_s"] > 0 else None)
        # Which attention each layer call took (min_sparse_length="auto" may choose dense).
        paths = ", ".join(f"{path} {calls}" for path, calls in r.get("paths", {}).items())
        table.append([r["length"], r["label"], r["density"], r["ttft_s"], speedup, r["ttft_no_attention_s"],
                      b["gate_s"], gate_share, b["attention_s"], b["other_s"], paths or None, None])
    lines.append(markdown_table(["tokens", "setting", "density", "TTFT s", "speed-up", "no-attention s",
                                 "gate s", "gate / dense attention", "attention s", "other s", "layer calls",
                                 "error"], table))
    return "\n".join(lines)
