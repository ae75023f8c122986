"""Prefill timing: time to first token (`model(input_ids, logits_to_keep=1)`) and where it goes.

Breakdown, measured in two ways:
- end to end: the same prefill with attention replaced by a no-op (a function registered with
  transformers' attention registry that returns its query as the output) gives the time of
  everything but attention; TTFT minus that is what attention (gate included) costs.
- fed in chunks (`chunk_sizes`): the prompt goes in as consecutive chunks through one cache (chunked
  prefill; each chunk after the first is a continued prefill), timed end to end like the one-shot run.
- inside one instrumented prefill: timing events around every gate forward (forward hooks on
  `seer_gate`) and around every call of the attention function (a timing wrapper registered under
  its own name) split the time into gate, attention (mask selection + kernel; SDPA when dense) and
  the rest. CUDA events are recorded asynchronously, so they barely disturb the run.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

NOOP_ATTENTION = "seer_eval_noop"
TIMED_PREFIX = "seer_eval_timed_"


class Stopwatch:
    """Intervals on one device: CUDA events (read once at the end) or CPU wall time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.intervals: list = []

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, started) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.intervals.append((started, event))
        else:
            self.intervals.append((started, time.perf_counter()))

    def total_seconds(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(start.elapsed_time(end) for start, end in self.intervals) / 1000.0
        return sum(end - start for start, end in self.intervals)


def time_runs(function: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 3) -> list[float]:
    """Seconds of each of `repeats` calls after `warmup` untimed ones (synchronised on CUDA)."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        watch = Stopwatch(device)
        if watch.cuda:
            torch.cuda.synchronize(device)
        started = watch.start()
        function()
        watch.stop(started)
        times.append(watch.total_seconds())
    return times


def prefill_function(model: nn.Module, input_ids: torch.Tensor, chunk_size: int | None = None) -> Callable[[], None]:
    """One end-to-end prefill as a user's generate() runs it: KV cache filled, logits of the last token.
    With `chunk_size`, the prompt goes in chunks of that many tokens through one DynamicCache."""
    from transformers import DynamicCache

    @torch.inference_mode()
    def run():
        if chunk_size is None:
            model(input_ids=input_ids, logits_to_keep=1)
            return
        cache = DynamicCache()
        for start in range(0, input_ids.shape[1], chunk_size):
            model(input_ids=input_ids[:, start: start + chunk_size], past_key_values=cache, use_cache=True,
                  logits_to_keep=1)
    return run


def noop_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention that does no work: the output has the right shape `[B, T, HQ, D]` (the query)."""
    return query.transpose(1, 2), None


@contextmanager
def attention_replaced(model: nn.Module, name: str, function: Callable):
    """Run the model with `function` as its attention function (receiving the masks of the model's
    own implementation), then restore its own."""
    from ..attention_registry import register_attention_function

    original = model.config._attn_implementation
    register_attention_function(name, function, mask_of=original)
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(original)


@contextmanager
def no_attention(model: nn.Module):
    """The model with attention replaced by a no-op (for the time of everything else)."""
    with attention_replaced(model, NOOP_ATTENTION, noop_attention):
        yield model


def instrumented_prefill(model: nn.Module, input_ids: torch.Tensor, chunk_size: int | None = None) -> dict:
    """One prefill (in chunks with `chunk_size`) with timing events around every gate and every
    attention call.

    Returns seconds: {"total_s", "gate_s", "attention_s" (attention function minus gate), "other_s"}.
    """
    from ..attention_registry import attention_function

    device = input_ids.device
    total, gate, attention = Stopwatch(device), Stopwatch(device), Stopwatch(device)
    original = model.config._attn_implementation
    inner = attention_function(original)

    def timed(*args, **kwargs):
        started = attention.start()
        result = inner(*args, **kwargs)
        attention.stop(started)
        return result

    handles = []
    for module in model.modules():
        if hasattr(module, "seer_gate"):
            pending = []
            handles.append(module.seer_gate.register_forward_pre_hook(
                lambda _m, _a, pending=pending: pending.append(gate.start())))
            handles.append(module.seer_gate.register_forward_hook(
                lambda _m, _a, _o, pending=pending: gate.stop(pending.pop())))
    try:
        with attention_replaced(model, TIMED_PREFIX + original, timed):
            run = prefill_function(model, input_ids, chunk_size)
            if total.cuda:
                torch.cuda.synchronize(device)
            started = total.start()
            run()
            total.stop(started)
    finally:
        for handle in handles:
            handle.remove()
    total_s, gate_s, attention_s = total.total_seconds(), gate.total_seconds(), attention.total_seconds()
    return {"total_s": total_s, "gate_s": gate_s, "attention_s": attention_s - gate_s,
            "other_s": total_s - attention_s}


def benchmark_prefill(model: nn.Module, lengths: list[int], settings: list, warmup: int = 1, repeats: int = 3,
                      on_length_done: Callable[[list[dict]], None] | None = None, progress=None,
                      chunk_sizes: list[int] = ()) -> list[dict]:
    """TTFT of every setting at every length (random token ids, batch 1), the TTFT without attention,
    the instrumented breakdown, the achieved density and the attention paths the layers took; with
    `chunk_sizes`, also each setting's TTFT with the prompt fed in chunks of each size shorter than
    the prompt (rows labelled "<setting>, <n>-token chunks", `chunk_size` set). A setting that runs out
    of memory is recorded with its error and the benchmark goes on."""
    import seerattn_hf as sa

    from .settings import achieved_density, apply_setting

    device = next(model.parameters()).device
    results = []
    for length in lengths:
        input_ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
        run = prefill_function(model, input_ids)
        sa.set_attention_mode(model, "dense")
        try:
            with no_attention(model):
                noop = statistics.median(time_runs(run, device, warmup, repeats))
        except torch.OutOfMemoryError as error:
            noop = None
            _free(device)
            results.append({"length": length, "method": "no attention", "label": "no attention", "error": str(error)})
        runs = [(setting, chunk) for setting in settings for chunk in [None, *chunk_sizes]
                if chunk is None or chunk < length]
        for setting, chunk in runs:
            label = setting.label if chunk is None else f"{setting.label}, {chunk}-token chunks"
            if progress is not None:
                progress.set_postfix_str(f"{length} tokens, {label}")
            row = {"length": length, **setting.to_dict(), "label": label, "chunk_size": chunk}
            try:
                apply_setting(model, setting)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times = time_runs(run if chunk is None else prefill_function(model, input_ids, chunk), device,
                                  warmup, repeats)
                sa.reset_sparsity_stats(model)
                breakdown = instrumented_prefill(model, input_ids, chunk)
                row.update(ttft_s=statistics.median(times), ttft_runs_s=times, ttft_no_attention_s=noop,
                           attention_end_to_end_s=None if noop is None else statistics.median(times) - noop,
                           density=achieved_density(model, setting), paths=sa.get_sparsity_stats(model)["paths"],
                           backends=sa.get_sparsity_stats(model)["backends"],
                           breakdown={k: round(v, 6) for k, v in breakdown.items()})
                if device.type == "cuda":
                    row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            except torch.OutOfMemoryError as error:
                row["error"] = f"out of memory: {error}".splitlines()[0]
                _free(device)
            results.append(row)
            if progress is not None:
                progress.update(1)
        del input_ids, run
        _free(device)
        if on_length_done is not None:
            on_length_done(results)
    return results


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
