"""Decode-gate distillation (`--gate_type decode` / `both`) on a tiny Llama (CPU): the loss falls,
only decode gates learn, each layer's loss is back-propagated before the next layer runs, a killed
run resumes to the same gates, and the adapter loads back and decodes sparsely."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import tiny_run_args

import seerattn_hf as sa
import seerattn_hf.decode_distill as decode_distill
from seerattn_hf.training.arguments import parse_arguments
from seerattn_hf.training.cli import run
from seerattn_hf.training.trainer import Trainer


def decode_args(checkpoint, corpus, output_dir, **overrides):
    values = {"gate_type": "decode", "eval_steps": 0, "save_steps": 2}
    values.update(overrides)
    return tiny_run_args(checkpoint, corpus, output_dir, **values)


def losses(folder):
    return [r["loss"] for r in map(json.loads, (folder / "train_log.jsonl").read_text().splitlines()) if "loss" in r]


def test_decode_run_learns_only_decode_gates_and_lowers_the_loss(tiny_checkpoint, jsonl_corpus, tmp_path):
    trainer = Trainer(parse_arguments(decode_args(tiny_checkpoint, jsonl_corpus, tmp_path / "run", max_steps=12,
                                                  learning_rate=3e-2, save_steps=0, warmup_steps=1)))
    base_before = {k: v.clone() for k, v in trainer.base.state_dict().items() if "seer_" not in k}
    prefill_before = [p.detach().clone() for p in sa.gate_parameters(trainer.base, ("prefill",))]
    decode_before = [p.detach().clone() for p in sa.gate_parameters(trainer.base, ("decode",))]
    held = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in held} == {id(p) for p in sa.gate_parameters(trainer.base, ("decode",))}
    summary = trainer.train()

    assert all(torch.equal(a, b) for a, b in zip(prefill_before, sa.gate_parameters(trainer.base, ("prefill",))))
    assert all(not torch.equal(a, b) for a, b in zip(decode_before, sa.gate_parameters(trainer.base, ("decode",))))
    base_after = {k: v for k, v in trainer.base.state_dict().items() if "seer_" not in k}
    assert all(torch.equal(base_after[k], base_before[k]) for k in base_before)
    curve = losses(tmp_path / "run")
    assert len(curve) == 12 and sum(curve[-3:]) < 0.8 * sum(curve[:3]), curve
    assert 0.0 < summary["eval"]["decode_recall@share=0.25"] <= 1.0
    # The adapter's prefill gates are the untouched initial ones, its prefill runs dense.
    saved = load_file(str(tmp_path / "run" / "seer_gates.safetensors"))
    for attention in sa.patching.patched_attention_modules(trainer.base):
        for key, tensor in sa.adapter.gate_tensors(attention).items():
            assert torch.equal(saved[key], tensor), key  # the prefill gates as initialised, decode as trained
    config = json.loads((tmp_path / "run" / "seer_config.json").read_text())
    assert config["decode_gate"]["block_size"] == 16 and config["sparsity_policy"]["decode_selector"] == "gate"


def test_each_layer_backpropagates_before_the_next_layer_runs(tiny_checkpoint, jsonl_corpus, tmp_path, monkeypatch):
    trainer = Trainer(parse_arguments(decode_args(tiny_checkpoint, jsonl_corpus, tmp_path / "run", max_steps=1,
                                                  gradient_accumulation_steps=1, save_steps=0)))
    events = []
    real_attention = decode_distill.decode_distill_attention

    def tracing(module, layer_idx, *args, **kwargs):
        events.append(("forward", layer_idx))
        return real_attention(module, layer_idx, *args, **kwargs)

    monkeypatch.setattr("seerattn_hf.attention.decode_distill_attention", tracing)
    for layer, gate in enumerate(sa.gate_parameters(trainer.base, ("decode",))[::4]):
        gate.register_post_accumulate_grad_hook(lambda _p, layer=layer: events.append(("grad", layer)))
    trainer.train()
    assert events[:4] == [("forward", 0), ("grad", 0), ("forward", 1), ("grad", 1)]
    assert ("grad", 0) not in events[4:]  # the evaluation after the step back-propagates nothing


def test_killed_decode_run_resumes_to_the_same_gates(tiny_checkpoint, jsonl_corpus, tmp_path, monkeypatch):
    uninterrupted = tmp_path / "uninterrupted"
    run(decode_args(tiny_checkpoint, jsonl_corpus, uninterrupted))

    # 2 layers x 2 micro-batches per step: call 17 is the first layer of step 5, after checkpoint-4.
    interrupted = tmp_path / "interrupted"
    real_kl, calls = decode_distill.decode_layer_kl, {"n": 0}

    def failing_kl(*args):
        calls["n"] += 1
        if calls["n"] == 17:
            raise RuntimeError("simulated preemption")
        return real_kl(*args)

    monkeypatch.setattr(decode_distill, "decode_layer_kl", failing_kl)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        run(decode_args(tiny_checkpoint, jsonl_corpus, interrupted))
    monkeypatch.setattr(decode_distill, "decode_layer_kl", real_kl)
    assert (interrupted / "checkpoints" / "latest").read_text().strip() == "checkpoint-4"

    summary = run(decode_args(tiny_checkpoint, jsonl_corpus, interrupted, resume_from_checkpoint="latest"))
    assert summary["step"] == 6
    expected = load_file(str(uninterrupted / "seer_gates.safetensors"))
    resumed = load_file(str(interrupted / "seer_gates.safetensors"))
    assert expected.keys() == resumed.keys() and any(".decode." in key for key in expected)
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    assert losses(uninterrupted)[-1] == losses(interrupted)[-1]


def test_decode_adapter_loads_back_and_decodes_sparsely(tiny_checkpoint, jsonl_corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "run"
    run(decode_args(tiny_checkpoint, jsonl_corpus, folder, max_steps=2, save_steps=0))
    model = sa.from_pretrained(folder, AutoModelForCausalLM.from_pretrained(tiny_checkpoint))
    trained = load_file(str(folder / "seer_gates.safetensors"))
    for attention in sa.patching.patched_attention_modules(model):
        for name, tensor in attention.seer_decode_gate.state_dict().items():
            assert torch.equal(tensor, trained[f"layers.{attention.seer_state.layer_idx}.decode.{name}"])
    assert model.seer_config.policy.decode_selector == "gate"
    sa.update_sparsity_config(model, decode_token_budget=32)
    prompt = torch.randint(3, 100, (1, 96))
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, min_new_tokens=8,
                       do_sample=False)
    stats = sa.get_sparsity_stats(model)
    assert stats["density"] is None  # prefill ran dense: its gates were not trained
    assert stats["decode_density"] is not None and stats["decode_density"] < 1.0


def test_both_kinds_train_in_one_run(tiny_checkpoint, jsonl_corpus, tmp_path):
    trainer = Trainer(parse_arguments(decode_args(tiny_checkpoint, jsonl_corpus, tmp_path / "run", gate_type="both",
                                                  max_steps=2, save_steps=0)))
    before = [p.detach().clone() for p in sa.gate_parameters(trainer.base)]
    summary = trainer.train()
    assert all(not torch.equal(a, b) for a, b in zip(before, sa.gate_parameters(trainer.base)))
    record = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
              if "loss" in line][-1]
    assert len(record["kl_per_layer"]) == 4  # two prefill layers, then two decode layers
    assert "kl" in summary["eval"] and "decode_kl" in summary["eval"]


def test_the_decode_target_option_reaches_the_target_kernel(tiny_checkpoint, jsonl_corpus, tmp_path, monkeypatch):
    """--decode_distill_target is the target every decode layer computes, in training forwards and in
    the evaluation, and it changes the loss (same seed, data and initial gates)."""
    seen = []
    real = decode_distill.naive_decode_pooled_attention  # the CPU path of decode_pooled_attention

    def recording(*args, target, **kwargs):
        seen.append(target)
        return real(*args, target=target, **kwargs)

    monkeypatch.setattr(decode_distill, "naive_decode_pooled_attention", recording)
    first_loss = {}
    for target in ("block_max", "block_mass"):
        seen.clear()
        folder = tmp_path / target
        summary = run(decode_args(tiny_checkpoint, jsonl_corpus, folder, max_steps=1, save_steps=0,
                                  decode_distill_target=target))
        # 2 layers x (2 micro-batches of training + the 2 evaluation sequences, one per forward)
        assert seen == [target] * 8, seen
        assert "decode_kl" in summary["eval"]
        first_loss[target] = losses(folder)[0]
    assert first_loss["block_max"] != first_loss["block_mass"]


def test_both_kinds_take_their_own_target(tiny_checkpoint, jsonl_corpus, tmp_path):
    trainer = Trainer(parse_arguments(decode_args(tiny_checkpoint, jsonl_corpus, tmp_path / "run", gate_type="both",
                                                  max_steps=1, save_steps=0, distill_target="block_mass",
                                                  decode_distill_target="block_max")))
    for attention in sa.patching.patched_attention_modules(trainer.base):
        state = attention.seer_state
        assert (state.distill_target, state.decode_distill.target) == ("block_mass", "block_max")
    assert (trainer.decode_settings[True].target, trainer.decode_settings[False].target) == ("block_max",) * 2


def test_decode_quality_evaluation_of_trained_gates(tiny_checkpoint, jsonl_corpus, tmp_path):
    from seerattn_hf.evaluation.decoding import quality_main

    folder = tmp_path / "run"
    run(decode_args(tiny_checkpoint, jsonl_corpus, folder, max_steps=2, save_steps=0))
    output = tmp_path / "eval"
    summary = quality_main(["--model", str(tiny_checkpoint), "--gates", str(folder), "--device", "cpu",
                            "--selectors", "gate", "oracle", "oracle_mass", "streaming", "--budgets",
                            "--budget_fractions", "0.25",
                            "--prompt_length", "160", "--continuation", "32", "--greedy_tokens", "6",
                            "--retrieval_lengths", "512", "--retrieval_samples", "1", "--output", str(output)])
    rows = {r["label"]: r for r in summary["results"]}
    assert list(rows) == ["dense", "gate budget=1/4", "oracle budget=1/4", "oracle_mass budget=1/4",
                          "streaming budget=1/4"]
    # 192 tokens, 16-token blocks: a quarter is 3 blocks, of the 12 a token reads at most.
    assert all(r["token_budget"] == 48 for label, r in rows.items() if label != "dense")
    assert all(0.0 < rows[label]["decode_density"] < 0.5 for label in rows if label != "dense")
    retrieval = {r["label"]: r for r in summary["retrieval"]}
    assert list(retrieval) == ["dense", "gate budget=1/4", "oracle budget=1/4", "oracle_mass budget=1/4",
                               "streaming budget=1/4"]
    assert retrieval["gate budget=1/4"]["decode_density"] < 0.6
    assert json.loads((output / "results.json").read_text())["gates"] == str(folder)
    text = (output / "results.md").read_text()
    assert "| gate budget=1/4 | 48 |" in text and "Retrieval answered by sparse decoding" in text


def test_gate_selector_needs_an_adapter(tmp_path):
    from seerattn_hf.evaluation.decoding import quality_main

    with pytest.raises(SystemExit):
        quality_main(["--selectors", "gate", "--output", str(tmp_path)])
