"""Redraw the tables and figures of finished runs from their results.json (for instance on a machine
with matplotlib, after a GPU run on one without): `python -m seerattn_hf.evaluation.render FOLDER...`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from .plots import plot_ppl_vs_density, plot_prefill, plot_retrieval_heatmaps
from .reports import ppl_markdown, prefill_markdown, retrieval_markdown, write_text


class Report(NamedTuple):
    """What a script writes besides results.json: results.md and one figure of its results."""

    markdown: Callable[[dict], str]
    plot: Callable[[list[dict], Path], Path | None]
    figure: str


REPORTS = {
    "perplexity": Report(ppl_markdown, plot_ppl_vs_density, "ppl_vs_density.png"),
    "retrieval": Report(retrieval_markdown, plot_retrieval_heatmaps, "retrieval_heatmap.png"),
    "prefill": Report(prefill_markdown, plot_prefill, "prefill.png"),
}


def write_report(folder: str | Path, summary: dict, figure: bool = True) -> list[Path]:
    """Write results.md of the run `summary` into `folder`, and its figure unless `figure` is False;
    returns the files written (no figure without matplotlib). The scripts end with it, as `render` does."""
    folder = Path(folder)
    report = REPORTS[summary["task"]]
    written = [write_text(folder / "results.md", report.markdown(summary))]
    drawn = report.plot(summary["results"], folder / report.figure) if figure else None
    return written + ([drawn] if drawn else [])


def render(folder: str | Path) -> list[Path]:
    """Rewrite results.md and the figure of the run stored in `folder`; returns the files written."""
    folder = Path(folder)
    summary = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    task = summary.get("task")
    if task not in REPORTS:
        raise ValueError(f"{folder / 'results.json'}: expected task {sorted(REPORTS)}, found {task!r}")
    return write_report(folder, summary)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folders", nargs="+", help="output folders of eval_ppl / eval_retrieval / bench_prefill")
    for folder in parser.parse_args(argv).folders:
        for path in render(folder):
            print(path)


if __name__ == "__main__":
    main()
