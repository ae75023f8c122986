"""Decoding speed: per-step latency and tokens/s of `model(next_token, cache)` after a long prompt,
for the unpatched model, the patched model decoding densely, and sparse decoding settings; eager
(a DynamicCache, or a GrowableCache that writes each step in place instead of copying the cache) and
compiled (a StaticCache, `torch.compile(mode="reduce-overhead")`: CUDA graphs).

Every setting decodes from the same prefilled cache: after a setting's steps the cache is cropped
back to the prompt (the key summaries follow the crop), or, for a static cache, the next setting
writes the same positions again. A GrowableCache is allocated for the prompt and every step at once,
so no step of any setting includes a growth of its buffers. Untrained (random) decode gates cost what trained ones do: the
kernel reads as many blocks either way.

`python scripts/bench_decode.py --config_preset llama-3.1-8b --batch_sizes 1 16 --contexts 32768`
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch._dynamo
from torch import nn

from ..decode_selection import DECODE_SELECTORS
from ..models import CONFIG_PRESETS, build_random_model, resolve_device
from .prefill import time_runs
from .reports import environment, markdown_table, write_json, write_text


@dataclass(frozen=True)
class DecodeSetting:
    """"unpatched" (the model's own attention), "dense" (patched, decode_selector None) or a decode
    selector at a token budget."""

    selector: str
    token_budget: int | None = None
    # The share of the context the budget stands for, when it was given as one (labels only).
    budget_fraction: float | None = None

    @property
    def label(self) -> str:
        if self.budget_fraction is not None:
            return f"{self.selector} budget=1/{round(1 / self.budget_fraction)}"
        return self.selector if self.token_budget is None else f"{self.selector} budget={self.token_budget}"


def fraction_budget(fraction: float, context: int, block_size: int) -> int:
    """A token budget of `fraction` of a `context`-token context, in whole blocks (at least two: the
    token's own block and one more)."""
    return max(2, round(fraction * context / block_size)) * block_size


BASELINES = ("unpatched", "dense")


def build_decode_settings(selectors: list[str], budgets: list[int],
                          baselines: tuple[str, ...] = BASELINES) -> list[DecodeSetting]:
    """The baselines (the unpatched model; dense decoding through the patch), then every selector at
    every budget."""
    settings = [DecodeSetting(baseline) for baseline in baselines]
    return settings + [DecodeSetting(selector, budget) for selector in selectors for budget in budgets]


# eager: a DynamicCache (what generate() uses by default); growable: a GrowableCache, eager, allocated
# for every position the run writes; static: a StaticCache, eager; compiled: a StaticCache under
# torch.compile(mode="reduce-overhead"), i.e. CUDA graphs.
MODES = ("eager", "growable", "static", "compiled")


def _takes_cache_position(model: nn.Module) -> bool:
    import inspect

    return "cache_position" in inspect.signature(model.forward).parameters


@torch.inference_mode()
def time_decoding(model: nn.Module, cache, token: torch.Tensor, context: int, warmup: int, steps: int,
                  compile_backend: str | None = None) -> list[float]:
    """Seconds of each of `steps` decoding steps after `warmup` untimed ones, over a cache holding
    `context` prompt positions; positions are passed as tensors, as generate() does, and the cache
    is rewound to the prompt afterwards.

    compile_backend: decode through `torch.compile(fullgraph=True)` with this backend ("inductor":
    mode "reduce-overhead", CUDA graphs), compiled afresh; the first warm-up step stays eager, as
    generate()'s prefill does, so that anything decoding allocates is allocated outside the graph.
    """
    forward = model.forward
    if compile_backend is not None:
        torch._dynamo.reset()
        forward = torch.compile(model.forward, backend=compile_backend, fullgraph=True,
                                mode="reduce-overhead" if compile_backend == "inductor" else None)
    batch, device = token.shape[0], token.device
    positions = iter(range(context, context + warmup + steps))
    with_cache_position = _takes_cache_position(model)
    calls = iter([model.forward] + [forward] * (warmup + steps))

    def step():
        position = torch.full((1,), next(positions), dtype=torch.long, device=device)
        extra = {"cache_position": position} if with_cache_position else {}
        next(calls)(input_ids=token, past_key_values=cache, position_ids=position.expand(batch, 1), use_cache=True,
                    logits_to_keep=1, **extra)

    times = time_runs(step, device, warmup, steps)
    _rewind(cache, warmup + steps)
    return times


def _rewind(cache, tokens: int) -> None:
    """Take the last `tokens` positions off every layer of the cache (a GrowableLayer's crop shortens
    its views; the next setting writes the same buffer positions again). A StaticLayer of transformers
    5.17 cannot crop: its write position (`cumulative_length`) is moved back instead, and the key
    summaries beside it are told, as a crop would tell them."""
    from ..decode_cache import CACHE_ATTRIBUTE

    for layer in cache.layers:
        if hasattr(layer, "crop"):
            layer.crop(-tokens)
            continue
        layer.cumulative_length.sub_(tokens)
        summaries = getattr(layer, CACHE_ATTRIBUTE, None)
        if summaries is not None:
            summaries.cropped(int(layer.cumulative_length))


def _new_cache(mode: str, model: nn.Module, positions: int):
    """The empty cache of a mode, for prompts and steps of `positions` positions in all."""
    from transformers import DynamicCache, StaticCache

    from ..growable_cache import GrowableCache

    if mode == "eager":
        return DynamicCache(config=model.config)
    if mode == "growable":
        return GrowableCache(config=model.config, initial_capacity=positions)
    return StaticCache(config=model.config, max_cache_len=positions)


def _prefill(model: nn.Module, ids: torch.Tensor, cache, chunk: int) -> None:
    with_cache_position = _takes_cache_position(model)
    for start in range(0, ids.shape[1], chunk):
        piece = ids[:, start:start + chunk]
        extra = ({"cache_position": torch.arange(start, start + piece.shape[1], device=ids.device)}
                 if with_cache_position else {})
        model(input_ids=piece, past_key_values=cache, use_cache=True, logits_to_keep=1, **extra)


def _apply(model: nn.Module, setting: DecodeSetting, patch) -> None:
    import seerattn_hf as sa

    patched = sa.patching.is_patched(model)
    if setting.selector == "unpatched":
        if patched:
            sa.remove_seer_attention(model)
        return
    if not patched:
        patch(model)
    sa.set_attention_mode(model, "sparse")
    selector = None if setting.selector == "dense" else setting.selector
    sa.update_sparsity_config(model, decode_selector=selector, decode_token_budget=setting.token_budget or 2048)
    sa.reset_sparsity_stats(model)


@torch.inference_mode()
def benchmark_decoding(model: nn.Module, batch_sizes: list[int], contexts: list[int], settings: list[DecodeSetting],
                       warmup: int, steps: int, patch, on_point_done=None, prefill_chunk: int = 8192,
                       modes: tuple[str, ...] = ("eager",), compile_backend: str = "inductor") -> list[dict]:
    """One row per (batch, context, mode, setting): median step latency, tokens/s and the decode
    density. The prompt is prefilled in chunks of `prefill_chunk` tokens (the activations of a whole
    batch of long prompts at once would not fit beside the cache); one cache at a time."""
    import seerattn_hf as sa

    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(0)
    low = max(int(model.config.pad_token_id or 0), 1) + 1  # random ids above the pad id: no holes in masks
    rows = []
    for batch in batch_sizes:
        for context in contexts:
            ids = torch.randint(low, model.config.vocab_size, (batch, context), generator=generator).to(device)
            token = ids[:, -1:]
            for mode in modes:
                point = {"batch": batch, "context": context, "mode": mode}
                cache = None
                try:
                    _apply(model, settings[0], patch)
                    if sa.patching.is_patched(model):
                        sa.set_attention_mode(model, "dense")
                    cache = _new_cache(mode, model, context + warmup + steps)
                    _prefill(model, ids, cache, prefill_chunk)
                    # An untimed pass first: a DynamicCache's first growth past the prompt allocates
                    # device memory that every later pass reuses, and would be charged to the first setting
                    # (the other caches hold every position already; the pass warms them up alike).
                    time_decoding(model, cache, token, context, warmup, steps)
                    for setting in settings:
                        _apply(model, setting, patch)
                        try:
                            times = time_decoding(model, cache, token, context, warmup, steps,
                                                  compile_backend if mode == "compiled" else None)
                        except torch.OutOfMemoryError:
                            raise
                        except Exception as error:  # a setting that fails to compile is reported, not fatal
                            rows.append({**point, **asdict(setting), "label": setting.label,
                                         "error": f"{type(error).__name__}: {error}"[:300]})
                            continue
                        latency = statistics.median(times)
                        density = (sa.get_sparsity_stats(model)["decode_density"] if sa.patching.is_patched(model)
                                   else None)
                        rows.append({**point, **asdict(setting), "label": setting.label, "step_s": latency,
                                     "tokens_per_s": batch / latency, "decode_density": density})
                except torch.OutOfMemoryError as error:
                    rows.append({**point, "label": "all", "error": f"out of memory: {error}"[:200]})
                finally:
                    if mode == "compiled":
                        torch._dynamo.reset()  # its graphs hold the static cache and their memory pools
                    del cache
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                if on_point_done is not None:
                    on_point_done(rows)
    return rows


def decode_markdown(summary: dict) -> str:
    lines = [f"# Decoding: {summary['config_preset']} ({summary['num_layers']} layers, {summary['dtype']}, "
             f"{summary['device']})", "",
             f"Median of {summary['steps']} steps after {summary['warmup']} warm-up, each step one token per "
             "sequence after a random prompt of `context` tokens. Speed-up: against the unpatched model "
             "(its own SDPA attention) at the same batch, context and mode. Modes: eager (DynamicCache, which "
             "copies the whole cache at every step), growable (GrowableCache, eager, allocated for the prompt "
             "and every step: each step written in place), static (StaticCache), compiled (StaticCache, "
             "torch.compile(mode=\"reduce-overhead\")). "
             "Density: share of KV blocks read.", ""]
    base = {(r["batch"], r["context"], r.get("mode", "eager")): r for r in summary["results"]
            if r.get("selector") == "unpatched" and "error" not in r}
    table = []
    for r in summary["results"]:
        mode = r.get("mode", "eager")
        if "error" in r:
            table.append([r["batch"], r["context"], mode, r["label"], None, None, None, None, r["error"][:80]])
            continue
        reference = base.get((r["batch"], r["context"], mode))
        table.append([r["batch"], r["context"], mode, r["label"], 1000 * r["step_s"], r["tokens_per_s"],
                      reference["step_s"] / r["step_s"] if reference else None, r["decode_density"], None])
    lines.append(markdown_table(["batch", "context", "mode", "setting", "ms / step", "tokens/s", "speed-up",
                                 "density", "error"], table))
    return "\n".join(lines)


def plot_decode(results: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    points = sorted({(r["batch"], r["context"], r.get("mode", "eager")) for r in results if "error" not in r})
    labels = list(dict.fromkeys(r["label"] for r in results if "error" not in r))
    figure, axis = plt.subplots(figsize=(max(6, 1.6 * len(points)), 4))
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        values = [next((1000 * r["step_s"] for r in results if "error" not in r and r["label"] == label
                        and (r["batch"], r["context"], r.get("mode", "eager")) == point), 0.0) for point in points]
        axis.bar([p + i * width for p in range(len(points))], values, width, label=label)
    axis.set_xticks([p + 0.4 - width / 2 for p in range(len(points))])
    axis.set_xticklabels([f"B{b} x {c // 1024}k {mode}" for b, c, mode in points], fontsize=7)
    axis.set_ylabel("ms per decoding step")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def _add_decode_arguments(parser: argparse.ArgumentParser, dtype: str, selectors: list[str], choices: list[str],
                          budgets: list[int], nargs: str = "+") -> None:
    """The options both decoding scripts take: device, dtype, selectors, token budgets, block size, output."""
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=dtype, choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--selectors", nargs=nargs, default=selectors, choices=choices)
    parser.add_argument("--budgets", nargs=nargs, type=int, default=budgets, help="token budgets")
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--output", required=True)


def decode_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Writes results.json, results.md "
                                     "and decode.png to --output.")
    parser.add_argument("--config_preset", default="llama-3.1-8b", choices=sorted(CONFIG_PRESETS))
    parser.add_argument("--num_layers", type=int, default=None, help="shrink the model to N layers")
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--contexts", nargs="+", type=int, default=[32768])
    _add_decode_arguments(parser, "bf16", ["gate", "quest"], list(DECODE_SELECTORS), [2048, 4096],
                          nargs="*")  # none: only the unpatched model and dense decoding
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--prefill_chunk", type=int, default=8192, help="prompt tokens per prefill forward")
    parser.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=list(BASELINES),
                        help="none: the sparse settings alone (speed-ups then need an earlier run's baselines)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                        help="eager: DynamicCache; growable: GrowableCache (eager, each step written in place, "
                        "allocated for the prompt and every step); static: StaticCache; compiled: StaticCache + "
                        "torch.compile(mode='reduce-overhead'), CUDA only")
    return parser


def decode_main(argv: list[str] | None = None) -> dict:
    import seerattn_hf as sa
    from seerattn_hf.decode_gate import DecodeGateConfig

    args = decode_parser().parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    model = build_random_model(args.config_preset, device, args.dtype, args.num_layers)
    head_dim = model.config.head_dim

    def patch(target: nn.Module) -> None:
        config = sa.SeerAttentionConfig(block_size=args.block_size, gate_hidden_size=head_dim,
                                        decode_gate=DecodeGateConfig(block_size=args.block_size,
                                                                     gate_hidden_size=head_dim))
        sa.apply_seer_attention(target, config)

    header = {"task": "decode", "config_preset": args.config_preset, "num_layers": model.config.num_hidden_layers,
              "dtype": args.dtype, "device": str(device), "warmup": args.warmup, "steps": args.steps,
              "environment": environment()}

    def save(rows: list[dict]) -> dict:
        summary = {**header, "results": rows}
        write_json(output / "results.json", summary)
        write_text(output / "results.md", decode_markdown(summary))
        return summary

    settings = build_decode_settings(args.selectors, args.budgets, tuple(args.baselines))
    if not settings:
        raise ValueError("nothing to time: give --selectors or --baselines")
    if "compiled" in args.modes and device.type != "cuda":
        raise ValueError(f"--modes compiled needs a CUDA device (CUDA graphs); found {device}: use --modes eager "
                         "growable static")
    rows = benchmark_decoding(model, args.batch_sizes, args.contexts, settings, args.warmup, args.steps, patch,
                              on_point_done=save, prefill_chunk=args.prefill_chunk, modes=tuple(args.modes))
    summary = save(rows)
    plot_decode(rows, output / "decode.png")
    print(decode_markdown(summary))
    return summary


@torch.inference_mode()
def decoding_quality(model: nn.Module, input_ids: torch.Tensor, prompt_length: int, settings: list[DecodeSetting],
                     greedy_tokens: int = 64, on_row_done=None) -> list[dict]:
    """How sparse decoding changes what a patched model predicts.

    input_ids: `[1, T]` one document. After a dense prefill of its first `prompt_length` tokens, the
    rest is fed one token per step, every step decoded with the setting (teacher forcing): the
    perplexity of those tokens. Then `greedy_tokens` are generated from the prompt alone: the share
    equal to the dense generation's and how many come before the first difference.
    Rows: `{"label", "ppl", "decode_density", "greedy_agreement", "greedy_prefix"}`; "dense" first.
    `on_row_done(rows)` is called after each setting (partial results of a long run).
    """
    import math

    import seerattn_hf as sa
    from transformers import DynamicCache

    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    prompt = input_ids[:, :prompt_length]
    rows, dense_generation = [], None
    for setting in [DecodeSetting("dense")] + [s for s in settings if s.selector not in ("dense", "unpatched")]:
        selector = None if setting.selector == "dense" else setting.selector
        sa.set_attention_mode(model, "sparse")
        sa.update_sparsity_config(model, decode_selector=selector, decode_token_budget=setting.token_budget or 2048)
        sa.reset_sparsity_stats(model)
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        losses = []
        for position in range(prompt_length, input_ids.shape[1]):
            target = input_ids[:, position]
            losses.append(torch.nn.functional.cross_entropy(logits.float(), target))
            logits = model(input_ids=target[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
        density = sa.get_sparsity_stats(model)["decode_density"]
        generation = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=greedy_tokens,
                                    min_new_tokens=greedy_tokens, do_sample=False)[0, prompt_length:]
        dense_generation = generation if dense_generation is None else dense_generation
        same = (generation == dense_generation[: len(generation)]).tolist()
        rows.append({"label": setting.label, "selector": setting.selector, "token_budget": setting.token_budget,
                     "ppl": math.exp(float(torch.stack(losses).mean())), "decode_density": density,
                     "greedy_agreement": sum(same) / len(same),
                     "greedy_prefix": same.index(False) if False in same else len(same)})
        if on_row_done is not None:
            on_row_done(rows)
    return rows


@torch.inference_mode()
def decode_retrieval(model: nn.Module, tokenizer, prompts, settings: list[DecodeSetting], block_size: int,
                     max_new_tokens: int = 16) -> list[dict]:
    """Needle retrieval answered by generation, every generated token decoded with the setting (the
    prompt prefilled densely). prompts: `retrieval.RetrievalPrompt`s; a setting with `budget_fraction`
    gets that share of each prompt's length. Rows: `{"label", "selector", "budget_fraction", "task",
    "length", "accuracy", "decode_density", "samples"}`; "dense" first."""
    import seerattn_hf as sa

    from .retrieval import greedy_answer, is_correct

    rows = []
    for setting in [DecodeSetting("dense")] + [s for s in settings if s.selector not in ("dense", "unpatched")]:
        cells: dict[tuple, dict] = {}
        for prompt in prompts:
            budget = setting.token_budget or 2048
            if setting.budget_fraction is not None:
                budget = fraction_budget(setting.budget_fraction, prompt.input_ids.shape[1], block_size)
            sa.update_sparsity_config(model, decode_selector=None if setting.selector == "dense" else setting.selector,
                                      decode_token_budget=budget)
            sa.reset_sparsity_stats(model)
            generated = greedy_answer(model, tokenizer, prompt.input_ids, max_new_tokens)
            cell = cells.setdefault((prompt.task, prompt.length), {
                "label": setting.label, "selector": setting.selector, "budget_fraction": setting.budget_fraction,
                "task": prompt.task, "length": prompt.length, "samples": []})
            cell["samples"].append({"depth": prompt.depth, "answer": prompt.answer, "generated": generated,
                                    "correct": is_correct(prompt.answer, generated), "token_budget": budget,
                                    "decode_density": sa.get_sparsity_stats(model)["decode_density"]})
        for cell in cells.values():
            samples = cell["samples"]
            densities = [s["decode_density"] for s in samples if s["decode_density"] is not None]
            rows.append({**cell, "accuracy": sum(s["correct"] for s in samples) / len(samples),
                         "decode_density": sum(densities) / len(densities) if densities else None})
    return rows


def quality_markdown(summary: dict) -> str:
    """The decode-quality tables: teacher-forced perplexity and greedy agreement, then retrieval."""
    rows = summary["results"]
    dense = next(r["ppl"] for r in rows if r["selector"] == "dense")
    table = [[r["label"], r["token_budget"], r["decode_density"], r["ppl"], r["ppl"] - dense, r["greedy_agreement"],
              r["greedy_prefix"]] for r in rows]
    lines = [f"# Sparse decoding quality: {summary['model']}" + (f" with decode gates {summary['gates']}"
                                                                  if summary.get("gates") else ""), "",
             f"Prompt {summary['prompt_length']} tokens (dense prefill), {summary['continuation']} tokens decoded "
             f"with teacher forcing; greedy: {summary['greedy_tokens']} tokens against dense. Budgets 1/n: that "
             "share of the whole context (prompt and continuation), in blocks.", "",
             markdown_table(["setting", "token budget", "density", "ppl", "ppl - dense", "greedy agreement",
                             "tokens before the first difference"], table)]
    retrieval = summary.get("retrieval") or []
    if retrieval:
        lines += ["", "## Retrieval answered by sparse decoding", "",
                  f"Needle prompts (dense prefill), {summary['retrieval_samples']} per task and length; each "
                  "generated token decoded with the setting, budgets a share of the prompt.", "",
                  markdown_table(["setting", "task", "length", "accuracy", "density"],
                                 [[r["label"], r["task"], r["length"], r["accuracy"], r["decode_density"]]
                                  for r in retrieval])]
    return "\n".join(lines)


def plot_quality(rows: list[dict], path: Path) -> Path | None:
    """Perplexity against the budget (share of the context) per selector, dense as a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    dense = next(r["ppl"] for r in rows if r["selector"] == "dense")
    axis.axhline(dense, color="black", linestyle="--", label="dense")
    for selector in dict.fromkeys(r["selector"] for r in rows if r["selector"] != "dense"):
        points = sorted((r["token_budget"], r["ppl"]) for r in rows if r["selector"] == selector)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=selector)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("token budget")
    axis.set_ylabel("teacher-forced perplexity")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def quality_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Sparse decoding quality: teacher-forced perplexity of a "
                                     "document's continuation decoded token by token, greedy-generation agreement "
                                     "with dense decoding and (--retrieval_lengths) needle retrieval answered by "
                                     "sparse decoding, for trained decode gates (--gates) against the oracle, "
                                     "Quest and streaming. Writes results.json, results.md and decode_quality.png "
                                     "to --output.")
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--gates", default=None, help="adapter folder or Hub id holding decode gates (selector gate)")
    _add_decode_arguments(parser, "fp32", ["oracle", "quest", "streaming"], list(DECODE_SELECTORS),
                          [256, 512, 1024], nargs="*")
    parser.add_argument("--budget_fractions", nargs="*", type=float, default=[],
                        help="budgets as shares of the context, e.g. 0.0625 0.125 0.25 (beside --budgets)")
    parser.add_argument("--document", type=int, default=0, help="index of the embedded held-out play")
    parser.add_argument("--prompt_length", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=256, help="tokens decoded with teacher forcing")
    parser.add_argument("--greedy_tokens", type=int, default=64)
    parser.add_argument("--retrieval_lengths", nargs="*", type=int, default=[],
                        help="needle-retrieval prompt lengths (none: no retrieval)")
    parser.add_argument("--retrieval_samples", type=int, default=4, help="prompts per task and length")
    parser.add_argument("--retrieval_tasks", nargs="+", default=["niah_single"],
                        choices=["niah_single", "niah_multikey"])
    return parser


def quality_main(argv: list[str] | None = None) -> dict:
    import seerattn_hf as sa
    from seerattn_hf.data import load_default_corpus
    from seerattn_hf.models import load_model_and_tokenizer

    parser = quality_parser()
    args = parser.parse_args(argv)
    if "gate" in args.selectors and args.gates is None:
        parser.error("--selectors gate: expected --gates, an adapter folder holding decode gates; found none")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device, dtype=args.dtype)
    # Prefill stays dense: what is measured is decoding alone.
    dense_prefill = 2**62
    if args.gates is not None:
        sa.from_pretrained(args.gates, model, min_sparse_length=dense_prefill)
        if model.seer_config.decode_gate is None:
            parser.error(f"--gates: expected an adapter with decode gates; {args.gates} has none")
        block_size = model.seer_config.decode_gate.block_size
    else:
        sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=args.block_size,
                                                              min_sparse_length=dense_prefill))
        block_size = args.block_size
    text = load_default_corpus("test")[args.document]["text"]
    ids = tokenizer(text[: 16 * (args.prompt_length + args.continuation)], return_tensors="pt").input_ids
    ids = ids[:, : args.prompt_length + args.continuation]
    context = ids.shape[1]
    settings = [DecodeSetting(selector, budget) for selector in args.selectors for budget in args.budgets]
    settings += [DecodeSetting(selector, fraction_budget(fraction, context, block_size), fraction)
                 for selector in args.selectors for fraction in args.budget_fractions]
    summary = {"task": "decode_quality", "model": args.model, "gates": args.gates, "prompt_length": args.prompt_length,
               "continuation": context - args.prompt_length, "greedy_tokens": args.greedy_tokens,
               "environment": environment()}

    def save(rows: list[dict]) -> None:
        summary["results"] = rows
        write_json(output / "results.json", summary)
        write_text(output / "results.md", quality_markdown(summary))

    rows = decoding_quality(model, ids, args.prompt_length, settings, args.greedy_tokens, on_row_done=save)
    plot_quality(rows, output / "decode_quality.png")
    if args.retrieval_lengths:
        from ..documents import load_document_records
        from .retrieval import PromptBuilder, haystack_text

        builder = PromptBuilder(tokenizer, haystack_text(load_document_records(None)))
        prompts = [builder.build(task, length, (sample + 0.5) / args.retrieval_samples, sample)
                   for task in args.retrieval_tasks for length in args.retrieval_lengths
                   for sample in range(args.retrieval_samples)]
        retrieval_settings = [DecodeSetting(s.selector, None, s.budget_fraction) for s in settings
                              if s.budget_fraction is not None]
        summary.update(retrieval_samples=args.retrieval_samples,
                       retrieval=decode_retrieval(model, tokenizer, prompts, retrieval_settings, block_size))
        save(rows)
    markdown = quality_markdown(summary)
    print(markdown)
    return summary
