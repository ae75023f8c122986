"""Redraw the tables and figures of finished runs from their results.json (for instance on a machine
with matplotlib, after a GPU run on one without): `python -m seerattn_hf.evaluation.render FOLDER...`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def render(folder: str | Path) -> list[Path]:
    """Rewrite results.md and the figure of the run stored in `folder`; returns the files written."""
    from . import plots
    from .reports import prefill_markdown, ppl_markdown, retrieval_markdown, write_text

    folder = Path(folder)
    summary = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    task = summary.get("task")
    renderers = {
        "perplexity": (ppl_markdown, plots.plot_ppl_vs_density, "ppl_vs_density.png"),
        "retrieval": (retrieval_markdown, plots.plot_retrieval_heatmaps, "retrieval_heatmap.png"),
        "prefill": (prefill_markdown, plots.plot_prefill, "prefill.png"),
    }
    if task not in renderers:
        raise ValueError(f"{folder / 'results.json'}: expected task {sorted(renderers)}, found {task!r}")
    markdown, plot, figure = renderers[task]
    written = [write_text(folder / "results.md", markdown(summary))]
    results = [r for r in summary["results"] if task != "prefill" or "ttft_s" in r]
    drawn = plot(results, folder / figure)
    return written + ([drawn] if drawn else [])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folders", nargs="+", help="output folders of eval_ppl / eval_retrieval / bench_prefill")
    for folder in parser.parse_args(argv).folders:
        for path in render(folder):
            print(path)


if __name__ == "__main__":
    main()
