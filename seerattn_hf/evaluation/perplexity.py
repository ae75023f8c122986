"""Long-document perplexity in the PG19 manner: each document truncated to one window of L tokens
(BOS first), scored over all predicted tokens and over the second half of the window."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from .settings import AttentionSetting, achieved_density, apply_setting

LOGITS_CHUNK = 2048  # tokens per lm-head chunk: full logits at 128k tokens would take tens of GB


def document_windows(tokenizer, documents: list[dict], length: int, num_documents: int | None = None
                     ) -> tuple[list[dict], list[str]]:
    """The first `length` tokens of each document long enough to fill them, BOS first.

    Returns (windows as `{"title", "input_ids": [1, length]}`, titles of documents too short).
    """
    windows, too_short = [], []
    bos = tokenizer.bos_token_id
    for document in documents:
        if num_documents is not None and len(windows) >= num_documents:
            break
        # A token spans at least one character: 16 characters a token leaves a wide margin, and books
        # of hundreds of thousands of characters are not tokenized whole.
        ids = tokenizer(document["text"][:16 * length], add_special_tokens=False)["input_ids"]
        if bos is not None:
            ids = [bos] + ids
        if len(ids) < length:
            too_short.append(document["title"])
            continue
        windows.append({"title": document["title"], "input_ids": torch.tensor([ids[:length]])})
    return windows, too_short


@torch.no_grad()
def batch_token_nll(model: nn.Module, input_ids: torch.Tensor, forward: nn.Module | None = None) -> torch.Tensor:
    """Negative log-likelihood `[B, T - 1]` (float32) of tokens 1..T-1 of each sequence of `input_ids` `[B, T]`.

    forward None: the decoder of `model` runs once and the lm head and the loss run in chunks of
    LOGITS_CHUNK tokens, so the full logits `[B, T, vocab]` never exist.
    forward given: a wrapper of `model` (accelerate-prepared: DDP, FSDP) called as a whole, and its full
    logits are used. Its submodules cannot be called on their own: under FSDP2 the root module's forward
    unshards the parameters the root holds (embeddings, final norm, lm head), so a decoder or lm head
    called directly would compute with this process's shards only.
    (no_grad, not inference_mode: this also runs on the trainer's model, and tensors made in inference
    mode cannot be used by autograd later.)
    """
    input_ids = input_ids.long().to(next(model.parameters()).device)
    targets = input_ids[:, 1:].reshape(-1)
    # Rows to score in chunks: hidden states, projected by the lm head chunk by chunk, or logits already.
    if forward is None:
        hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
        rows, to_logits = hidden.reshape(-1, hidden.shape[-1]), model.get_output_embeddings()
    else:
        logits = forward(input_ids=input_ids, use_cache=False).logits[:, :-1]
        rows, to_logits = logits.reshape(-1, logits.shape[-1]), nn.Identity()
    losses = [F.cross_entropy(to_logits(rows[start:start + LOGITS_CHUNK]).float(),
                              targets[start:start + LOGITS_CHUNK], reduction="none")
              for start in range(0, rows.shape[0], LOGITS_CHUNK)]
    return torch.cat(losses).view(input_ids.shape[0], -1)


def token_nll(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood `[T - 1]` (float32) of tokens 1..T-1 of one sequence `[1, T]`
    (`batch_token_nll` of its one row)."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"token_nll: expected one sequence [1, T], found shape {list(input_ids.shape)}; "
                         "use batch_token_nll for several")
    return batch_token_nll(model, input_ids)[0]


def summarize_nll(nlls: list[torch.Tensor]) -> dict:
    """Token-weighted perplexity over all predicted tokens and over those in the window's second half
    (predicting positions L/2 .. L-1), pooled over documents."""
    total = torch.cat(nlls)
    second = torch.cat([nll[(nll.shape[0] + 1) // 2 - 1:] for nll in nlls])
    return {"ppl": math.exp(total.double().mean().item()),
            "ppl_second_half": math.exp(second.double().mean().item()),
            "num_tokens": int(total.numel())}


def evaluate_perplexity(model: nn.Module, windows: list[dict], settings: list[AttentionSetting],
                        progress=None) -> list[dict]:
    """One result per setting on the same windows: perplexities, the achieved block density and
    per-document perplexities. `progress` (a tqdm-like object) is advanced once per forward."""
    import seerattn_hf as sa

    results = []
    for setting in settings:
        apply_setting(model, setting)
        sa.reset_sparsity_stats(model)
        start = time.perf_counter()
        nlls = []
        for window in windows:
            nlls.append(token_nll(model, window["input_ids"]).cpu())
            if progress is not None:
                progress.set_postfix_str(setting.label)
                progress.update(1)
        seconds = time.perf_counter() - start
        per_document = [{"title": w["title"], "ppl": math.exp(n.double().mean().item())}
                        for w, n in zip(windows, nlls)]
        results.append({**setting.to_dict(), **summarize_nll(nlls),
                        "density": achieved_density(model, setting), "num_documents": len(windows),
                        "seconds": round(seconds, 3), "per_document": per_document})
    return results
