"""Figures of the evaluation results. matplotlib is optional (the `eval` extra): without it the
figures are skipped with a warning and every other output is still written."""

from __future__ import annotations

import warnings
from pathlib import Path

from .reports import fastest_dense


_KNOB_STYLES = {"density": {"marker": "o", "linestyle": "-"}, "threshold": {"marker": "s", "linestyle": ":"},
                "coverage": {"marker": "^", "linestyle": "--"},
                "calibrated_threshold": {"marker": "D", "linestyle": "-."}}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install seerattn_hf[eval]); skipping figures")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl_vs_density(results: list[dict], path: str | Path) -> Path | None:
    """Perplexity against achieved density, one panel per length, one line per method (dense as a
    horizontal reference line)."""
    plt = _pyplot()
    if plt is None:
        return None
    lengths = sorted({r["length"] for r in results})
    figure, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4.2), squeeze=False)
    for axis, length in zip(axes[0], lengths):
        rows = [r for r in results if r["length"] == length]
        for row in rows:
            if row["method"] == "dense":
                axis.axhline(row["ppl"], color="black", linestyle="--", linewidth=1, label=f"dense ({row['ppl']:.2f})")
        series = {}
        for row in rows:
            if row["method"] != "dense" and row["density"] is not None:
                series.setdefault((row["method"], row["sparsity_method"]), []).append(row)
        methods = list(dict.fromkeys(method for method, _ in series))
        for (method, knob), points in series.items():
            points = sorted(points, key=lambda r: r["density"])
            # One colour per method, one line style per way of selecting (density, threshold, ...).
            axis.plot([p["density"] for p in points], [p["ppl"] for p in points], color=f"C{methods.index(method)}",
                      **_KNOB_STYLES[knob], label=f"{method} by {knob}")
        axis.set_xlabel("achieved density (share of causal blocks computed)")
        axis.set_ylabel("perplexity")
        axis.set_title(f"{length} tokens")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def plot_retrieval_heatmaps(results: list[dict], path: str | Path) -> Path | None:
    """Accuracy by depth (rows) and length (columns), one panel per (task, setting)."""
    plt = _pyplot()
    if plt is None:
        return None
    panels = list(dict.fromkeys((r["task"], r["label"]) for r in results))
    columns = min(len(panels), 4)
    rows_count = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows_count, columns, figsize=(3.6 * columns + 1, 3.2 * rows_count), squeeze=False)
    image = None
    for index, (axis, (task, label)) in enumerate(zip(axes.flat, panels)):
        cells = [r for r in results if r["task"] == task and r["label"] == label]
        lengths = sorted({r["length"] for r in cells})
        depths = sorted({r["depth"] for r in cells})
        grid = [[next((c["accuracy"] for c in cells if c["length"] == n and c["depth"] == d), float("nan"))
                 for n in lengths] for d in depths]
        image = axis.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        axis.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        axis.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        for row, values in enumerate(grid):
            for column, value in enumerate(values):
                if value == value:  # not NaN
                    axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7)
        axis.set_xlabel("tokens")
        if index % columns == 0:
            axis.set_ylabel("needle depth")
        mean = sum(c["accuracy"] for c in cells) / len(cells)
        axis.set_title(f"{task}\n{label} (mean {mean:.2f})", fontsize=8)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.8, label="accuracy")
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return Path(path)


def plot_prefill(results: list[dict], path: str | Path) -> Path | None:
    """Left: time to first token against length per setting (log-log). Right: speed-up over the
    fastest dense setting at each length.
    Points that failed (out of memory) hold an "error" instead of timings and are left out."""
    results = [r for r in results if "ttft_s" in r]
    plt = _pyplot()
    if plt is None:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = list(dict.fromkeys(r["label"] for r in results))
    dense = {length: r["ttft_s"] for length, r in fastest_dense(results).items()}  # speed-ups against the fastest
    for index, label in enumerate(labels):
        points = sorted((r for r in results if r["label"] == label), key=lambda r: r["length"])
        lengths = [p["length"] for p in points]
        left.plot(lengths, [p["ttft_s"] for p in points], marker="o", color=f"C{index}", label=label)
        if not label.startswith("dense") and dense:
            speedups = [(p["length"], dense[p["length"]] / p["ttft_s"]) for p in points if p["length"] in dense]
            right.plot([s[0] for s in speedups], [s[1] for s in speedups], marker="o", color=f"C{index}", label=label)
    # The floor no sparsity can go below: the same prefill with attention replaced by a no-op.
    floor = sorted({(r["length"], r["ttft_no_attention_s"]) for r in results if r.get("ttft_no_attention_s")})
    if floor:
        left.plot([f[0] for f in floor], [f[1] for f in floor], color="black", linestyle="--", label="no attention")
        if dense:
            right.plot([f[0] for f in floor if f[0] in dense], [dense[f[0]] / f[1] for f in floor if f[0] in dense],
                       color="black", linestyle="--", label="bound (no attention)")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("prompt tokens")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    left.set_yscale("log")
    left.set_ylabel("time to first token (s)")
    right.axhline(1.0, color="black", linewidth=1)
    right.set_ylabel("speed-up over the fastest dense")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)
