"""Self-distillation of SeerAttention gates with Accelerate: the training loop.

The base model is frozen; in distillation mode each gated layer returns the dense attention output
and records its block-pooled attention map (the target, `distill_target`) next to the gate's
log-probabilities. The loss is `loss_scale * sum over layers` of KL(target || gate) or of the target
mass missed at budgets (`distill_loss`); only the gates of `gate_type` are trained. Decode gates
(`decode_distill.py`, target `decode_distill_target`) are trained layer by layer: each layer's loss is
back-propagated inside the forward, before the next layer's target exists (their targets are
`[B, HKV, T, NB]`), so those runs call the model unwrapped and average the gates' gradients over the
processes themselves.

Run folder (`output_dir`):
    seer_gates.safetensors, seer_config.json, README.md   the final gate adapter (`from_pretrained(output_dir)`)
    train_log.jsonl                                       one JSON object per logged step / evaluation
    checkpoints/                                          resumable state (checkpointing.py)
    perplexity.json                                       with `eval_after_training`
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from ..adapter import push_gates_to_hub, save_gates
from ..decode_distill import DecodeDistillSettings
from ..patching import (apply_seer_attention, gate_parameters, patched_attention_modules, pop_decode_distill_records,
                        pop_distill_records, set_attention_mode, set_distill_targets)
from ..utils import atomic_write_text
from .arguments import Arguments, gate_config
from .checkpointing import TrainerState, load_checkpoint, load_checkpoint_gates, resolve_checkpoint, save_checkpoint
from .data import PackedSequences, epoch_order, prepare_packed_data
from .evaluation import decode_gate_quality, format_perplexity_report, gate_quality, sparse_perplexity_report
from .metrics import distillation_loss
from .model_loading import check_before_loading, load_model_and_tokenizer
from .run_log import LOG_FILE, JsonLog, peak_memory_gib, tracker_config, tracker_names, tracker_scalars

logger = logging.getLogger(__name__)


def trained_kinds(arguments: Arguments) -> tuple[str, ...]:
    """The gate kinds a run trains ("prefill", "decode")."""
    return {"prefill": ("prefill",), "decode": ("decode",), "both": ("prefill", "decode")}[arguments.gate.gate_type]


def add_gates(model, arguments: Arguments) -> list[torch.nn.Parameter]:
    """Patch the model with freshly initialised gates (seed first for identical gates on every rank) in
    distillation mode of the trained kinds; returns their parameters, the only ones requiring grad
    (gates of another kind stay frozen as initialised)."""
    apply_seer_attention(model, gate_config(arguments))
    set_attention_mode(model, "distill")
    kinds = trained_kinds(arguments)
    set_distill_targets(model, kinds, DecodeDistillSettings(arguments.train.decode_token_share,
                                                            target=arguments.train.decode_distill_target),
                        arguments.train.distill_target)
    for parameter in gate_parameters(model):
        parameter.requires_grad_(False)
    gates = gate_parameters(model, kinds)
    for parameter in gates:
        parameter.requires_grad_(True)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if trainable != {id(p) for p in gates}:
        raise RuntimeError("only gate parameters may require grad; the base model has trainable weights")
    return gates


class Trainer:
    """One distillation run: `Trainer(arguments).train()`."""

    def __init__(self, arguments: Arguments):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.arguments = arguments
        train = arguments.train
        self.output_dir = Path(train.output_dir)
        self.accelerator = Accelerator(gradient_accumulation_steps=train.gradient_accumulation_steps,
                                       log_with=tracker_names(train.report_to) or None,
                                       project_dir=str(self.output_dir))
        accelerator = self.accelerator
        if accelerator.device.type == "cpu" and train.cpu_threads:
            torch.set_num_threads(train.cpu_threads)
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.resume_path = (resolve_checkpoint(train.resume_from_checkpoint, train.output_dir)
                            if train.resume_from_checkpoint else None)
        set_seed(train.seed)
        self.fsdp_version = accelerator.state.fsdp_plugin.fsdp_version if self._is_fsdp() else None
        if self.fsdp_version == 1:
            # FSDP1 starts its backward pass from hooks on the root module's outputs; the distillation
            # loss comes from the gates' records, not from the logits, so FSDP1 fails in backward
            # ("expected to be in states [FORWARD_BACKWARD] but current state is IDLE").
            raise ValueError("FSDP: expected fsdp_version 2 (fully_shard, configs/accelerate/fsdp.yaml), found "
                             "fsdp_version 1, which cannot train gates whose loss does not flow through the logits")
        check_before_loading(arguments)
        model, tokenizer = load_model_and_tokenizer(arguments, accelerator.mixed_precision, accelerator.device)
        add_gates(model, arguments)
        self.kinds = trained_kinds(arguments)
        self.layerwise = "decode" in self.kinds
        if self.resume_path is not None:
            load_checkpoint_gates(self.resume_path, model)

        self.global_batch = (train.per_device_train_batch_size * train.gradient_accumulation_steps
                             * accelerator.num_processes)
        num_sequences = train.max_steps * self.global_batch
        with accelerator.main_process_first():
            self.data = prepare_packed_data(arguments.data, tokenizer, num_sequences, train.seed)
        dataset = PackedSequences(self.data.train, epoch_order(len(self.data.train), num_sequences, train.seed))
        loader = torch.utils.data.DataLoader(dataset, batch_size=train.per_device_train_batch_size, shuffle=False)

        from transformers import get_cosine_schedule_with_warmup

        if self._is_fsdp():
            # The gates stay out of FSDP's sharding: replicated, float32, their gradients averaged by
            # `_average_gate_gradients`. Sharded with their decoder layer they would get no gradient:
            # their loss leaves the layer through the distillation records, not the layer's outputs,
            # so FSDP2's backward hooks (on module inputs and outputs) never reduce them.
            accelerator.state.fsdp_plugin.ignored_modules = [
                gate for attention in patched_attention_modules(model)
                for gate in (attention.seer_gate, getattr(attention, "seer_decode_gate", None)) if gate is not None]
        # Model and optimizer are prepared together: FSDP2 replaces the base parameters by sharded ones
        # (DTensors) and accelerate then points the optimizer at the parameters it holds.
        optimizer = torch.optim.AdamW(gate_parameters(model, self.kinds), lr=train.learning_rate, weight_decay=train.weight_decay,
                                      betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon)
        self.model, self.optimizer, self.loader = accelerator.prepare(model, optimizer, loader)
        self.base = accelerator.unwrap_model(self.model)
        # Stepped once per optimizer step by the loop itself (not prepared: accelerate would step it
        # once per process).
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, train.warmup_steps, train.max_steps)

        self.log = JsonLog(self.output_dir / LOG_FILE, accelerator.is_main_process)
        self.step = 0
        # Decode layers hand their losses to `_backward` during training forwards (not evaluations).
        self.decode_settings = {training: DecodeDistillSettings(train.decode_token_share,
                                                                self._backward_layer if training else None,
                                                                train.decode_distill_target)
                                for training in (True, False)}

    def save_checkpoint(self) -> Path:
        train = self.arguments.train
        state = TrainerState(step=self.step, global_batch=self.global_batch, seq_len=self.arguments.data.seq_len,
                             micro_batches_per_process=self.step * train.gradient_accumulation_steps,
                             num_processes=self.accelerator.num_processes)
        return save_checkpoint(self.accelerator, self.output_dir, state, self.model, self.optimizer.optimizer,
                               self.scheduler, train.save_total_limit)

    def load_checkpoint(self, path: Path) -> None:
        state = load_checkpoint(path, self.accelerator, self.model, self.optimizer.optimizer, self.scheduler,
                                self.global_batch, self.arguments.data.seq_len)
        self.step = state.step

    def evaluate(self) -> dict:
        arguments = self.arguments
        if not len(self.data.eval):
            return {}
        metrics = {}
        batch_size = arguments.train.per_device_eval_batch_size
        if "decode" in self.kinds:
            set_distill_targets(self.base, ("decode",), self.decode_settings[False])
            metrics.update(decode_gate_quality(self.base, self.data.eval, batch_size, forward=self.base))
        if "prefill" in self.kinds:
            set_distill_targets(self.base, ("prefill",), prefill_target=arguments.train.distill_target)
            metrics.update(gate_quality(self.base, self.data.eval, batch_size, arguments.gate.eval_densities,
                                        self._eval_thresholds(), forward=self.model))
        set_distill_targets(self.base, self.kinds, self.decode_settings[True], arguments.train.distill_target)
        self.log.write({"step": self.step, "eval": metrics})
        self.accelerator.log(tracker_scalars("eval/", metrics), step=self.step)
        if self.accelerator.is_main_process:
            recalls = ", ".join(f"{k[len('recall@'):]}: {v:.3f}" for k, v in metrics.items() if k.startswith("recall@"))
            densities = ", ".join(f"{k[len('density@'):]}: {v:.3f}" for k, v in metrics.items()
                                  if k.startswith("density@") and v is not None)
            if "kl" in metrics:
                logger.info("step %d eval: kl %.4f, recall %s; density %s", self.step, metrics["kl"], recalls,
                            densities)
            if "decode_kl" in metrics:
                decode = ", ".join(f"{k[len('decode_recall@'):]}: {v:.3f}" for k, v in metrics.items()
                                   if k.startswith("decode_recall@"))
                logger.info("step %d eval: decode kl %.4f, recall %s", self.step, metrics["decode_kl"], decode)
        return metrics

    def _eval_thresholds(self) -> list[float]:
        gate = self.arguments.gate
        return [gate.threshold] if gate.eval_thresholds is None else gate.eval_thresholds

    def train(self) -> dict:
        from tqdm.auto import tqdm

        accelerator, train = self.accelerator, self.arguments.train
        accelerator.init_trackers("seerattn", config=tracker_config(self.arguments))
        if self.resume_path is not None:
            self.load_checkpoint(self.resume_path)
            self.log.drop_records_after(self.step)  # the steps after the checkpoint are logged again
            loader = accelerator.skip_first_batches(self.loader, self.step * train.gradient_accumulation_steps)
        else:
            loader = self.loader
            if train.eval_steps:
                self.evaluate()
        progress = tqdm(total=train.max_steps, initial=self.step, desc="distill",
                        disable=not accelerator.is_local_main_process)
        seq_len = self.arguments.data.seq_len
        tokens_per_step = self.global_batch * seq_len
        window_start, window_steps = time.perf_counter(), 0
        layer_sum, micro_steps, grad_norm = None, 0, None
        final_eval: dict = {}
        set_distill_targets(self.base, self.kinds, self.decode_settings[True], train.distill_target)
        for batch in loader:
            with accelerator.accumulate(self.model):
                per_layer = self._layerwise_step(batch) if self.layerwise else self._step(batch)
                if accelerator.sync_gradients and (self._is_fsdp() or (self.layerwise and accelerator.num_processes > 1)):
                    self._average_gate_gradients()
                if accelerator.sync_gradients and train.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(gate_parameters(self.base, self.kinds), train.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            layer_sum = per_layer if layer_sum is None else layer_sum + per_layer
            micro_steps += 1
            if not accelerator.sync_gradients:
                continue
            step_lr = self.scheduler.get_last_lr()[0]  # the rate this step's update used
            self.scheduler.step()
            self.step += 1
            window_steps += 1
            per_layer_loss = accelerator.reduce(layer_sum / micro_steps, reduction="mean")
            layer_sum, micro_steps = None, 0
            step_loss = float(train.loss_scale * per_layer_loss.sum())
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
            if self.step % train.logging_steps == 0 or self.step == train.max_steps:
                # Per-layer values are named by the loss: "kl" or "missed_mass" (distill_loss "recall").
                name = "kl" if train.distill_loss == "kl" else "missed_mass"
                record = {"step": self.step, "loss": step_loss, name: float(per_layer_loss.mean()),
                          "lr": step_lr, "tokens_per_s": tokens_per_s,
                          "peak_memory_gib": peak_memory_gib(accelerator.device),
                          "grad_norm": None if grad_norm is None else float(grad_norm),
                          f"{name}_per_layer": [float(v) for v in per_layer_loss]}
                self.log.write(record)
                accelerator.log(tracker_scalars("train/", {k: v for k, v in record.items()
                                                           if not k.endswith("_per_layer")}), step=self.step)
                window_start, window_steps = time.perf_counter(), 0
            last = self.step >= train.max_steps
            pause = time.perf_counter()
            if len(self.data.eval) and (last or (train.eval_steps and self.step % train.eval_steps == 0)):
                final_eval = self.evaluate()
            if train.save_steps and self.step % train.save_steps == 0:
                self.save_checkpoint()
            window_start += time.perf_counter() - pause  # tokens/s counts training time only
            if last:
                break
        progress.close()
        return self._finish(final_eval)

    def _step(self, batch) -> torch.Tensor:
        """Forward and backward of prefill distillation; returns the per-layer losses `[L]` (detached)."""
        self.model(input_ids=batch["input_ids"], use_cache=False, logits_to_keep=1)
        loss, per_layer = self._prefill_loss()
        self.accelerator.backward(loss)
        return per_layer

    def _layerwise_step(self, batch) -> torch.Tensor:
        """Forward of a run that trains decode gates: each decode layer back-propagates its own loss
        as the forward reaches it (`_backward_layer`), prefill gates (gate_type "both") theirs after
        it. Called unwrapped: the gradients never pass through DDP's hooks (`_average_gate_gradients`
        reduces them). Returns the per-layer KLs, prefill layers first, `[L]` (detached)."""
        self.base(input_ids=batch["input_ids"], use_cache=False, logits_to_keep=1)
        per_layer = torch.stack([record.kl for record in pop_decode_distill_records(self.base)])
        if "prefill" in self.kinds:
            loss, prefill = self._prefill_loss()
            self._backward(loss)
            per_layer = torch.cat((prefill, per_layer))
        return per_layer

    def _prefill_loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        train = self.arguments.train
        return distillation_loss(pop_distill_records(self.base), train.loss_scale,
                                 train.skip_first_query_blocks_fraction, train.distill_loss,
                                 train.recall_loss_densities)

    def _backward_layer(self, kl: torch.Tensor) -> None:
        self._backward(self.arguments.train.loss_scale * kl)

    def _backward(self, loss: torch.Tensor) -> None:
        """What `accelerator.backward` does to a loss (accumulation average, fp16 loss scaling) without
        its DDP wrapper."""
        loss = loss / self.arguments.train.gradient_accumulation_steps
        if self.accelerator.scaler is not None:
            loss = self.accelerator.scaler.scale(loss)
        loss.backward()

    def _is_fsdp(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    def _average_gate_gradients(self) -> None:
        """Under FSDP the gates are replicated, outside FSDP (see __init__), and decode gates train
        outside DDP (`_layerwise_step`): average their gradients over the processes, as DDP would, in
        one all-reduce of a flat buffer."""
        import torch.distributed as dist

        gates = [p for p in gate_parameters(self.base) if p.grad is not None]
        if not gates:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in gates])
        dist.all_reduce(flat)
        flat /= self.accelerator.num_processes
        for p, grad in zip(gates, flat.split([p.numel() for p in gates])):
            p.grad.copy_(grad.view_as(p.grad))

    def _finish(self, final_eval: dict) -> dict:
        accelerator, arguments = self.accelerator, self.arguments
        accelerator.wait_for_everyone()
        summary = {"step": self.step, "eval": final_eval, "output_dir": str(self.output_dir)}
        if accelerator.is_main_process:  # gates are whole on every process, FSDP included
            save_gates(self.base, self.output_dir)
        if accelerator.is_main_process and arguments.train.push_to_hub:
            summary["hub_commit"] = push_gates_to_hub(self.base, arguments.train.push_to_hub)
        if arguments.train.eval_after_training and len(self.data.eval) and "prefill" in self.kinds:
            # Every rank runs it (FSDP forwards need all ranks); the main process reports.
            rows = sparse_perplexity_report(self.base, self.data.eval, arguments.gate.eval_densities,
                                            self._eval_thresholds(), arguments.train.per_device_eval_batch_size,
                                            forward=self.model)
            summary["perplexity"] = rows
            if accelerator.is_main_process:
                atomic_write_text(self.output_dir / "perplexity.json", json.dumps(rows, indent=2) + "\n")
                print(format_perplexity_report(rows, f"Held-out perplexity ({len(self.data.eval)} x "
                                                     f"{arguments.data.seq_len} tokens), trained gates:"), flush=True)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return summary


def train(arguments: Arguments) -> dict:
    """Train gates as `arguments` say; returns a summary (final step, last evaluation, perplexity rows)."""
    return Trainer(arguments).train()
