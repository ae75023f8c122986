"""The training loop on a tiny Llama (CPU): only gates learn, checkpoints resume exactly, outputs load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import tiny_run_args

import seerattn_hf as sa
from seerattn_hf.training import trainer as training_loop
from seerattn_hf.training.arguments import parse_arguments
from seerattn_hf.training.cli import main, run
from seerattn_hf.training.trainer import Trainer


def gate_file(folder):
    return load_file(str(folder / "seer_gates.safetensors"))


def run_preempted(arguments, monkeypatch, at_loss_call: int) -> None:
    """Run the trainer and kill it in its `at_loss_call`-th loss computation (one per micro-batch)."""
    real_loss, calls = training_loop.distillation_loss, {"n": 0}

    def failing_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_loss_call:
            raise RuntimeError("simulated preemption")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training_loop, "distillation_loss", failing_loss)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        run(arguments)
    monkeypatch.setattr(training_loop, "distillation_loss", real_loss)


def test_only_gates_train_and_base_weights_stay_bit_identical(tiny_checkpoint, jsonl_corpus, tmp_path):
    trainer = Trainer(parse_arguments(tiny_run_args(tiny_checkpoint, jsonl_corpus, tmp_path / "run",
                                                    max_steps=3, save_steps=0, eval_steps=0)))
    base_before = {k: v.clone() for k, v in trainer.base.state_dict().items() if "seer_gate" not in k}
    gates_before = [p.detach().clone() for p in sa.gate_parameters(trainer.base)]
    trainer.train()

    gate_ids = {id(p) for p in sa.gate_parameters(trainer.base)}
    held = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in held} == gate_ids and len(held) == len(gate_ids)
    assert {id(p) for p in trainer.optimizer.state} <= gate_ids
    for name, parameter in trainer.base.named_parameters():
        if "seer_gate" not in name:
            assert not parameter.requires_grad and parameter.grad is None, name
    base_after = {k: v for k, v in trainer.base.state_dict().items() if "seer_gate" not in k}
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_after[k], base_before[k]) for k in base_before)
    assert any(not torch.equal(a, b) for a, b in zip(gates_before, sa.gate_parameters(trainer.base)))


def test_killed_and_resumed_run_ends_with_the_same_gates(tiny_checkpoint, jsonl_corpus, tmp_path, monkeypatch):
    uninterrupted = tmp_path / "uninterrupted"
    run(tiny_run_args(tiny_checkpoint, jsonl_corpus, uninterrupted))

    # Kill the second run inside step 5 (2 micro-batches per step), after checkpoint-4 was written.
    interrupted = tmp_path / "interrupted"
    run_preempted(tiny_run_args(tiny_checkpoint, jsonl_corpus, interrupted), monkeypatch, at_loss_call=9)
    assert (interrupted / "checkpoints" / "latest").read_text().strip() == "checkpoint-4"
    assert not (interrupted / "seer_gates.safetensors").exists()

    summary = run(tiny_run_args(tiny_checkpoint, jsonl_corpus, interrupted, resume_from_checkpoint="latest"))
    assert summary["step"] == 6
    expected, resumed = gate_file(uninterrupted), gate_file(interrupted)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    losses = [json.loads(line) for line in (uninterrupted / "train_log.jsonl").read_text().splitlines()]
    resumed_losses = [json.loads(line) for line in (interrupted / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in losses if r.get("step") == 6 and "loss" in r] == \
           [r["loss"] for r in resumed_losses if r.get("step") == 6 and "loss" in r]


def test_resumed_run_logs_each_step_once(tiny_checkpoint, jsonl_corpus, tmp_path, monkeypatch):
    # Killed inside step 6 (2 micro-batches per step): step 5 is logged, checkpoint-4 is the latest.
    out = tmp_path / "run"
    run_preempted(tiny_run_args(tiny_checkpoint, jsonl_corpus, out), monkeypatch, at_loss_call=11)
    assert (out / "checkpoints" / "latest").read_text().strip() == "checkpoint-4"
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4, 5]

    run(tiny_run_args(tiny_checkpoint, jsonl_corpus, out, resume_from_checkpoint="latest"))
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "eval" in r] == [0, 3, 6]


def test_outputs_checkpoints_log_and_perplexity_report(tiny_checkpoint, jsonl_corpus, tmp_path, capsys):
    from training_helpers import tiny_model

    out = tmp_path / "run"
    summary = run(tiny_run_args(tiny_checkpoint, jsonl_corpus, out, max_steps=4, save_total_limit=1,
                                 eval_after_training="true", threshold=0.05))
    # (eval_thresholds defaults to [threshold])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4", "latest"]
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert {"lr", "tokens_per_s", "peak_memory_gib", "kl_per_layer"} <= set(train_records[0])
    assert len(train_records[0]["kl_per_layer"]) == 2
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == [0, 3, 4]
    assert {"kl", "recall@density=0.5", "recall@density=0.3", "recall@density=0.1", "recall@threshold=0.05",
            "density@threshold=0.05"} <= set(evals[-1]["eval"])

    rows = summary["perplexity"]
    assert [row["setting"] for row in rows] == ["dense", "gate d=0.5", "gate d=0.3", "gate d=0.1",
                                                "gate t=0.05"]
    assert rows[0]["density"] == 1.0 and 0 < rows[3]["density"] < rows[1]["density"] < 1
    assert "Held-out perplexity" in capsys.readouterr().out

    model = sa.from_pretrained(out, model=tiny_model("llama", vocab_size=128))
    trained = gate_file(out)
    for key, tensor in sa.adapter.gate_state_dict(model).items():
        assert torch.equal(tensor, trained[key])

    with pytest.raises(ValueError, match="other data settings"):
        Trainer(parse_arguments(tiny_run_args(tiny_checkpoint, jsonl_corpus, out, seq_len=64,
                                              resume_from_checkpoint="latest"))).train()


def test_console_script_entry_returns_none_for_exit_status_zero(tiny_checkpoint, jsonl_corpus, tmp_path):
    # The console script does `sys.exit(main())`: anything but None/0 would exit with status 1.
    assert main(tiny_run_args(tiny_checkpoint, jsonl_corpus, tmp_path / "run", max_steps=1, eval_steps=0,
                              save_steps=0)) is None
    assert (tmp_path / "run" / "seer_gates.safetensors").is_file()


def test_gates_train_on_a_base_model_carrying_a_peft_adapter(tiny_checkpoint, jsonl_corpus, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_checkpoint),
                          LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    trainer = Trainer(parse_arguments(tiny_run_args(tiny_checkpoint, jsonl_corpus, tmp_path / "run", max_steps=2,
                                                    save_steps=0, eval_steps=0, peft_adapter=tmp_path / "lora")))
    assert isinstance(trainer.base, PeftModel)
    lora_before = {k: v.clone() for k, v in trainer.base.state_dict().items() if "lora_" in k}
    assert lora_before and not any(p.requires_grad for n, p in trainer.base.named_parameters() if "lora_" in n)
    gates_before = [p.detach().clone() for p in sa.gate_parameters(trainer.base)]
    trainer.train()
    assert all(torch.equal(v, trainer.base.state_dict()[k]) for k, v in lora_before.items())
    assert not any(torch.equal(a, b) for a, b in zip(gates_before, sa.gate_parameters(trainer.base)))
    # The gates saw the adapted q and k: the LoRA changes the distillation target.
    sa.set_attention_mode(trainer.base, "distill")
    ids = torch.randint(3, 100, (1, 64))
    with torch.no_grad():
        trainer.base(input_ids=ids)
        adapted = sa.pop_distill_records(trainer.base)[0].target
        with trainer.base.disable_adapter():
            trainer.base(input_ids=ids)
        plain = sa.pop_distill_records(trainer.base)[0].target
    assert not torch.allclose(adapted, plain)


def test_model_and_data_errors_come_before_the_weights_load(tiny_checkpoint, jsonl_corpus, tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    class WeightsLoaded(Exception):
        pass

    def load_weights(*args, **kwargs):
        raise WeightsLoaded("the base weights were loaded")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", load_weights)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"supports model_type \['llama', 'qwen2', 'qwen3'\]; found 'gpt2'"):
        Trainer(parse_arguments(tiny_run_args(tmp_path / "gpt2", jsonl_corpus, tmp_path / "run")))
    with pytest.raises(FileNotFoundError, match="no file matches"):
        Trainer(parse_arguments(tiny_run_args(tiny_checkpoint, tmp_path / "missing.jsonl", tmp_path / "run")))
    with pytest.warns(UserWarning, match="longer than the model's context of 4096"):
        with pytest.raises(WeightsLoaded):  # a warning only: the run goes on to load the model
            Trainer(parse_arguments(tiny_run_args(tiny_checkpoint, jsonl_corpus, tmp_path / "run", seq_len=5000)))
