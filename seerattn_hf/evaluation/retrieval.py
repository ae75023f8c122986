"""Needle-in-a-haystack and multi-key retrieval in the RULER manner.

A haystack of public-domain text holds needles "The special magic number for KEY is NNNNNNN."; the
asked needle sits at a given depth (share of the haystack before it), other needles (multi-key)
at random depths. The question comes at the end, followed by an answer prefix; the model generates
a few tokens greedily and is right when the number appears in them.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from torch import nn

from .settings import AttentionSetting, achieved_density, apply_setting

INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
               "I will quiz you about the numbers afterwards.")
NEEDLE = "The special magic number for {key} is {value}."
QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
ANSWER_PREFIX = "The special magic number for {key} mentioned in the provided text is"
CONTEXT_MARK = "\u0000CONTEXT\u0000"
KEYS = ("amber-falcon", "quiet-harbor", "silver-meadow", "rapid-lantern", "hollow-cedar", "crimson-otter",
        "gentle-summit", "frozen-orchard", "velvet-comet", "distant-willow", "brave-pebble", "lunar-thistle",
        "copper-sparrow", "misty-canyon", "golden-anchor", "wild-juniper", "silent-glacier", "scarlet-maple",
        "hidden-beacon", "noble-heron", "sunny-quarry", "ancient-kettle", "bright-tundra", "swift-marble")
TASKS = ("niah_single", "niah_multikey")


@dataclass
class RetrievalPrompt:
    """One prompt: its token ids `[1, T]`, the number expected, where the asked needle went."""

    task: str
    length: int
    depth: float
    sample: int
    input_ids: torch.Tensor
    key: str
    answer: str


class PromptBuilder:
    """Builds prompts of an exact token budget from a tokenized haystack (tokenized once)."""

    def __init__(self, tokenizer, haystack_text: str, use_chat_template: bool | None = None):
        self.tokenizer = tokenizer
        self.use_chat_template = (getattr(tokenizer, "chat_template", None) is not None
                                  if use_chat_template is None else use_chat_template)
        self.haystack = tokenizer(haystack_text, add_special_tokens=False)["input_ids"]
        # Needles go right after a token that ends a sentence or a line, as RULER inserts at sentence breaks.
        vocabulary = sorted(set(self.haystack))
        pieces = tokenizer.batch_decode([[i] for i in vocabulary])
        self._ends_sentence = {i: any(mark in p for mark in ".!?\n") for i, p in zip(vocabulary, pieces)}

    def _frame(self, key: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the context (instruction; question and answer prefix)."""
        question = QUESTION.format(key=key)
        if self.use_chat_template:
            content = f"{INSTRUCTION}\n\n{CONTEXT_MARK}\n\n{question}"
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                      add_generation_prompt=True)
            before, after = text.split(CONTEXT_MARK)
            after += ANSWER_PREFIX.format(key=key)
            prefix = self.tokenizer(before, add_special_tokens=False)["input_ids"]
        else:
            before, after = f"{INSTRUCTION}\n\n", f"\n\n{question}\nAnswer: {ANSWER_PREFIX.format(key=key)}"
            prefix = self.tokenizer(before, add_special_tokens=False)["input_ids"]
            if self.tokenizer.bos_token_id is not None:
                prefix = [self.tokenizer.bos_token_id] + prefix
        return prefix, self.tokenizer(after, add_special_tokens=False)["input_ids"]

    def build(self, task: str, length: int, depth: float, sample: int, num_needles: int = 4,
              seed: int = 0) -> RetrievalPrompt:
        """A prompt of `length` tokens (to within a few tokens) with the asked needle at `depth`."""
        if task not in TASKS:
            raise ValueError(f"task: expected one of {list(TASKS)}, found {task!r}")
        rng = random.Random(f"{seed}-{task}-{length}-{depth}-{sample}")
        count = 1 if task == "niah_single" else num_needles
        keys = rng.sample(KEYS, count)
        values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in keys]
        needles = [self.tokenizer(" " + NEEDLE.format(key=k, value=v), add_special_tokens=False)["input_ids"]
                   for k, v in zip(keys, values)]
        prefix, suffix = self._frame(keys[0])
        budget = length - len(prefix) - len(suffix) - sum(len(n) for n in needles)
        if budget < 16:
            raise ValueError(f"length {length} leaves no room for a haystack (frame and needles take "
                             f"{length - budget} tokens)")
        haystack = self._haystack(budget)
        ends = [self._ends_sentence[i] for i in haystack]
        depths = [depth] + [rng.random() for _ in keys[1:]]
        places = [self._snap(round(d * budget), ends) for d in depths]
        # Insert from the back so earlier positions stay valid.
        for place, needle in sorted(zip(places, needles), key=lambda item: -item[0]):
            haystack[place:place] = needle
        ids = prefix + haystack + suffix
        return RetrievalPrompt(task, length, depth, sample, torch.tensor([ids]), keys[0], values[0])

    def _haystack(self, budget: int) -> list[int]:
        repeats = budget // max(len(self.haystack), 1) + 1
        return (self.haystack * repeats)[:budget]

    @staticmethod
    def _snap(position: int, ends: list[bool]) -> int:
        """The nearest position at most 256 tokens before `position` that follows a sentence end
        (`position` itself when there is none)."""
        position = min(position, len(ends))
        for back in range(position, max(position - 256, 0), -1):
            if ends[back - 1]:
                return back
        return position


@torch.inference_mode()
def greedy_answer(model: nn.Module, tokenizer, input_ids: torch.Tensor, max_new_tokens: int) -> str:
    """Greedy continuation of one prompt (prefill through SeerAttention, decoding dense)."""
    from transformers import GenerationConfig

    input_ids = input_ids.to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                              eos_token_id=tokenizer.eos_token_id)
    output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


def is_correct(answer: str, generated: str) -> bool:
    """RULER's string match: the expected number appears in the generated text (digits only, so
    "1 234 567" style spacing of per-digit tokenizers still counts)."""
    digits = "".join(ch if ch.isdigit() else " " for ch in generated).split()
    return answer in generated or answer in "".join(digits)


def evaluate_retrieval(model: nn.Module, tokenizer, prompts: list[RetrievalPrompt],
                       settings: list[AttentionSetting], max_new_tokens: int = 16, progress=None) -> list[dict]:
    """Accuracy per (task, setting, length, depth), with each sample's generated text."""
    import seerattn_hf as sa

    cells: dict[tuple, dict] = {}
    for setting in settings:
        apply_setting(model, setting)
        for prompt in prompts:
            sa.reset_sparsity_stats(model)
            start = time.perf_counter()
            generated = greedy_answer(model, tokenizer, prompt.input_ids, max_new_tokens)
            correct = is_correct(prompt.answer, generated)
            key = (prompt.task, setting.label, prompt.length, prompt.depth)
            cell = cells.setdefault(key, {"task": prompt.task, **setting.to_dict(), "length": prompt.length,
                                          "depth": prompt.depth, "samples": []})
            cell["samples"].append({"sample": prompt.sample, "key": prompt.key, "answer": prompt.answer,
                                    "generated": generated, "correct": correct,
                                    "prompt_tokens": int(prompt.input_ids.shape[1]),
                                    "density": achieved_density(model, setting),
                                    "seconds": round(time.perf_counter() - start, 3)})
            if progress is not None:
                progress.set_postfix_str(f"{setting.label} {prompt.length}")
                progress.update(1)
    results = []
    for cell in cells.values():
        samples = cell["samples"]
        densities = [s["density"] for s in samples if s["density"] is not None]
        results.append({**cell, "accuracy": sum(s["correct"] for s in samples) / len(samples),
                        "num_samples": len(samples),
                        "density": sum(densities) / len(densities) if densities else None})
    return results


def haystack_text(documents: list[dict]) -> str:
    return "\n\n".join(document["text"] for document in documents)
