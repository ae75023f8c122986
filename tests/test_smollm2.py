"""The real SmolLM2-135M-Instruct (Llama architecture, GQA 9:3) on public-domain text."""

import copy
import math

import pytest
import torch

import seerattn_hf as sa
from seerattn_hf.data import load_default_corpus

pytestmark = pytest.mark.slow
LENGTH = 1024


def _perplexity(model, input_ids):
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], input_ids[0, 1:])
    return math.exp(loss.item())


def test_patched_smollm2_keeps_its_perplexity(smollm2):
    model, tokenizer = smollm2
    text = load_default_corpus("test")[0]["text"]
    input_ids = tokenizer(text, return_tensors="pt").input_ids[:, :LENGTH]
    assert input_ids.shape[1] == LENGTH
    dense = _perplexity(model, input_ids)
    assert 5 < dense < 60, f"an unpatched SmolLM2 should read Shakespeare sanely, found perplexity {dense}"

    sa.apply_seer_attention(model, sa.SeerAttentionConfig(sparsity_method="density", density=1.0))
    try:
        assert _perplexity(model, input_ids) == pytest.approx(dense, rel=1e-4)
        assert sa.get_sparsity_stats(model)["density"] == 1.0

        sa.update_sparsity_config(model, density=0.5)
        sa.reset_sparsity_stats(model)
        half = _perplexity(model, input_ids)
        stats = sa.get_sparsity_stats(model)
        assert len(stats["per_layer"]) == 30
        # 16 blocks of 64 tokens: each row keeps ceil(0.5 * causal blocks) -> 72 of 136 blocks.
        assert stats["density"] == pytest.approx(0.5, abs=0.04)
        assert math.isfinite(half) and half > dense * 0.99
    finally:
        sa.remove_seer_attention(model)
    assert _perplexity(model, input_ids) == dense


@pytest.mark.gpu
def test_triton_backend_gives_the_torch_backend_perplexity(smollm2):
    model, tokenizer = smollm2
    model = copy.deepcopy(model).to("cuda", torch.bfloat16)  # the session fixture stays float32 on the CPU
    text = load_default_corpus("test")[1]["text"]
    input_ids = tokenizer(text, return_tensors="pt").input_ids[:, :4000].cuda()  # a partial last block
    # Streaming masks depend on positions only, so both backends compute exactly the same blocks
    # (gate masks would flip on near-ties as bf16 rounding differs between the backends).
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(selector="streaming", sparsity_method="density",
                                                         density=0.3, backend="torch"))
    try:
        torch_ppl = _perplexity(model, input_ids)
        sa.update_sparsity_config(model, backend="triton")
        triton_ppl = _perplexity(model, input_ids)
        sa.set_attention_mode(model, "dense")
        dense_ppl = _perplexity(model, input_ids)
    finally:
        sa.remove_seer_attention(model)
    assert triton_ppl == pytest.approx(torch_ppl, rel=5e-3)
    assert triton_ppl > dense_ppl
