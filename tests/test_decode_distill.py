"""Decode distillation mode inside patched models: the gate scores training sees are the ones sparse
decoding uses, and the target is the decode oracle's of the same kind ("block_max": "oracle",
"block_mass": "oracle_mass"), for every supported architecture."""

import pytest
import torch
from model_factory import TINY_ARCHITECTURES, tiny_model

import seerattn_hf as sa
import seerattn_hf.decode_attention as decode_attention
from seerattn_hf.decode_distill import DecodeDistillSettings
from seerattn_hf.decode_gate import DecodeGateConfig
from seerattn_hf.decode_selection import candidate_mask


def _patched(model_type):
    torch.manual_seed(0)
    model = tiny_model(model_type)
    config = sa.SeerAttentionConfig(block_size=16, decode_gate=DecodeGateConfig(block_size=16, gate_hidden_size=16),
                                    min_sparse_length=2**62)
    sa.apply_seer_attention(model, config)
    with torch.no_grad():
        for parameter in sa.gate_parameters(model, ("decode",)):
            parameter.normal_()
    return model


def _decode_step_scores(model, ids, selector, monkeypatch):
    """The scores `[B, HKV, NB]` sparse decoding ranks for the last token of `ids`, per layer."""
    seen = []
    real = decode_attention.decode_block_lists

    def recording(scores, *args, **kwargs):
        seen.append(scores.clone())
        return real(scores, *args, **kwargs)

    monkeypatch.setattr(decode_attention, "decode_block_lists", recording)
    sa.set_attention_mode(model, "sparse")
    sa.update_sparsity_config(model, decode_selector=selector, decode_token_budget=10**6)  # dense outputs: later layers see dense inputs
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
        model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)
    monkeypatch.setattr(decode_attention, "decode_block_lists", real)
    return seen


@pytest.mark.parametrize("model_type", TINY_ARCHITECTURES)
@pytest.mark.parametrize("target, selector", [("block_max", "oracle"), ("block_mass", "oracle_mass")])
def test_training_sees_the_decoding_gate_and_the_oracle_target(model_type, target, selector, monkeypatch):
    model = _patched(model_type)
    ids = torch.randint(3, 96, (2, 83), generator=torch.Generator().manual_seed(2))
    gate_scores = _decode_step_scores(model, ids, "gate", monkeypatch)
    oracle = _decode_step_scores(model, ids, selector, monkeypatch)

    sa.set_attention_mode(model, "distill")
    sa.patching.set_distill_targets(model, ("decode",), DecodeDistillSettings(token_share=0.5, target=target))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    records = sa.patching.pop_decode_distill_records(model)
    assert [r.layer_idx for r in records] == [0, 1] and records[0].target.shape == (2, 2, 42, 6)
    candidates = candidate_mask(torch.full((2,), 82 // 16), 6)  # the last token's complete blocks
    for record, scores, true in zip(records, gate_scores, oracle):
        expected = scores.masked_fill(~candidates, float("-inf")).log_softmax(dim=-1)
        torch.testing.assert_close(record.gate_log_probs[:, :, -1], expected, rtol=1e-4, atol=1e-4)
        target = true * candidates
        torch.testing.assert_close(record.target[:, :, -1], target / target.sum(-1, keepdim=True),
                                   rtol=1e-4, atol=1e-6)
        assert record.rows.all() and float(record.kl) > 0


def test_distillation_output_is_the_dense_attention_and_prefill_gates_get_no_gradient():
    model = _patched("llama")
    ids = torch.randint(3, 96, (1, 70), generator=torch.Generator().manual_seed(3))
    sa.set_attention_mode(model, "dense")
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    sa.set_attention_mode(model, "distill")
    losses = []
    sa.patching.set_distill_targets(model, ("decode",), DecodeDistillSettings(0.5, lambda kl: (losses.append(kl),
                                                                                              kl.backward())))
    for parameter in sa.gate_parameters(model):
        parameter.requires_grad_(True)
    distilled = model(input_ids=ids).logits
    torch.testing.assert_close(distilled, dense, rtol=1e-5, atol=1e-5)
    assert len(losses) == 2 and sa.pop_distill_records(model) == []
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sa.gate_parameters(model, ("decode",)))
    assert all(p.grad is None for p in sa.gate_parameters(model, ("prefill",)))


def test_the_two_targets_differ_and_an_unknown_one_is_refused():
    model = _patched("llama")
    ids = torch.randint(3, 96, (1, 83), generator=torch.Generator().manual_seed(4))
    sa.set_attention_mode(model, "distill")
    found = {}
    for target in ("block_max", "block_mass"):
        sa.patching.set_distill_targets(model, ("decode",), DecodeDistillSettings(target=target))
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        found[target] = sa.patching.pop_decode_distill_records(model)
    for max_record, mass_record in zip(found["block_max"], found["block_mass"]):
        torch.testing.assert_close(max_record.gate_log_probs, mass_record.gate_log_probs)  # the same gate
        assert not torch.allclose(max_record.target, mass_record.target, atol=1e-3)
        assert float(max_record.kl) != float(mass_record.kl)
    with pytest.raises(ValueError, match=r"decode target: expected one of \['block_max', 'block_mass'\], "
                                         "found 'mass'"):
        DecodeDistillSettings(target="mass")


def test_decode_distillation_needs_decode_gates():
    model = tiny_model("llama")
    sa.apply_seer_attention(model, sa.SeerAttentionConfig(block_size=16))
    with pytest.raises(ValueError, match="decode distillation needs decode gates"):
        sa.patching.set_distill_targets(model, ("decode",))
    with pytest.raises(ValueError, match="expected a non-empty subset"):
        sa.patching.set_distill_targets(model, ("decoding",))


def test_gate_log_probs_stay_float32_under_autocast():
    from seerattn_hf.decode_distill import decode_gate_log_probs

    gate = sa.patching.patched_attention_modules(_patched("llama"))[0].seer_decode_gate
    query, key = torch.randn(1, 70, 4, 16), torch.randn(1, 70, 2, 16)
    expected, _ = decode_gate_log_probs(gate, query, key, None, 35)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        found, _ = decode_gate_log_probs(gate, query, key, None, 35)
    assert torch.equal(found, expected)
