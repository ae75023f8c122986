import math

import pytest
import torch
import torch.nn.functional as F
from model_factory import tiny_model

import seerattn_hf as sa
from seerattn_hf.evaluation import perplexity
from seerattn_hf.evaluation.perplexity import batch_token_nll, evaluate_perplexity, summarize_nll, token_nll
from seerattn_hf.evaluation.settings import build_settings


def test_token_nll_matches_logits_of_the_unpatched_model():
    model = tiny_model()
    input_ids = torch.randint(0, 96, (1, 300))
    with torch.no_grad():
        reference = F.cross_entropy(model(input_ids).logits[0, :-1].float(), input_ids[0, 1:], reduction="none")
    torch.testing.assert_close(token_nll(model, input_ids), reference)
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=16))
    sa.set_attention_mode(model, "dense")
    torch.testing.assert_close(token_nll(model, input_ids), reference)


class WholeModelCall(torch.nn.Module):
    """Stands for an accelerate/FSDP wrapper: it can only be called as a whole (counted)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, **inputs):
        self.calls += 1
        return self.model(**inputs)


def test_wrapped_forward_and_chunked_lm_head_give_the_same_nll(monkeypatch):
    model = tiny_model()
    input_ids = torch.randint(0, 96, (3, 200))
    monkeypatch.setattr(perplexity, "LOGITS_CHUNK", 64)  # chunks that cross from one sequence to the next
    chunked = batch_token_nll(model, input_ids)
    wrapper = WholeModelCall(model)
    whole = batch_token_nll(model, input_ids, forward=wrapper)
    assert chunked.shape == (3, 199) and wrapper.calls == 1
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(token_nll(model, input_ids[1:2]), chunked[1])
    with pytest.raises(ValueError, match=r"expected one sequence \[1, T\], found shape \[3, 200\]"):
        token_nll(model, input_ids)


def test_second_half_covers_predictions_of_positions_from_half_the_window():
    nll = torch.arange(7, dtype=torch.float32)  # window of 8 tokens: predictions of positions 1..7
    summary = summarize_nll([nll])
    assert summary["num_tokens"] == 7
    assert summary["ppl_second_half"] == pytest.approx(math.exp(torch.tensor([3.0, 4, 5, 6]).mean().item()))


def test_full_density_equals_dense_and_density_orders_cost():
    model = sa.apply_seer_attention(tiny_model(), sa.SeerAttentionConfig(block_size=16))
    windows = [{"title": f"w{i}", "input_ids": torch.randint(0, 96, (1, 160))} for i in range(2)]
    settings = build_settings(["dense", "oracle", "streaming"], densities=[1.0, 0.5, 0.2])
    results = {r["label"]: r for r in evaluate_perplexity(model, windows, settings)}
    dense = results["dense"]
    assert dense["density"] == 1.0 and dense["num_tokens"] == 2 * 159
    for method in ("oracle", "streaming"):
        assert results[f"{method} d=1"]["density"] == pytest.approx(1.0)
        assert results[f"{method} d=1"]["ppl"] == pytest.approx(dense["ppl"], rel=1e-4)
        densities = [results[f"{method} d={d:g}"]["density"] for d in (1.0, 0.5, 0.2)]
        assert densities == sorted(densities, reverse=True) and densities[-1] < 0.5
    # The oracle keeps the heaviest blocks: never worse than keeping blocks by position alone.
    assert results["oracle d=0.2"]["ppl"] <= results["streaming d=0.2"]["ppl"] * 1.01
