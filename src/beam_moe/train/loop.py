"""The training loop: `train(TrainConfig(...))` turns a stock MoE checkpoint into a BEAM model.

One optimizer step:
    for each micro-batch of this process's share of the global batch:
        teacher = the original model with masks off, no_grad     (distill objectives only)
        loss    = task_sum x processes / global_loss_tokens      (exact under accumulation and DDP)
                + (beta x L_reg + alpha x L_balance) / grad_accum
        backward
    clip; all-reduce the step's statistics (named device sums, train/metrics.py) and read them
    and the gradient norm on the host in one copy; stop on a non-finite loss or gradient norm
    AdamW step, warm-up + cosine schedule (train/schedule.py), beta controller update, log, checkpoint

It runs unchanged under `accelerate launch` (one process, DDP, FSDP2): the model and optimizer go
through `Accelerator.prepare`, and every process sees the same global batch order.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from beam_moe import threads
from beam_moe.adapter import write_threshold_curve
from beam_moe.attach import attach, get_attachment, mask_regularizer
from beam_moe.base_models import context_length, load_base_model, load_model_config, load_tokenizer
from beam_moe.errors import BeamError, BeamWarning, require
from beam_moe.threshold_curve import ThresholdCurve
from beam_moe.train.budget import (
    BudgetController,
    FixedBeta,
    calibrate_router_heads,
    calibrate_threshold,
    check_target,
    measure_avg_k,
    target_outcome,
)
from beam_moe.train.checkpointing import (
    Checkpointer,
    ModelState,
    OptimizerState,
    RNGState,
    Stateful,
    TrainState,
    trainable_state,
)
from beam_moe.train.config import TrainConfig
from beam_moe.train.data import IGNORE, BatchSchedule, Blocks, load_training_data
from beam_moe.train.metrics import DeviceSums, MetricsLog, Progress
from beam_moe.train.objectives import Objective, Teacher
from beam_moe.train.output import check_output, start_output, write_result
from beam_moe.train.schedule import WarmupCosine
from beam_moe.train.trainable import select_trainable


@dataclass
class TrainResult:
    """What a finished run produced: the output folder (a BEAM adapter) and the final metrics."""

    output: Path
    steps: int
    tokens: int
    metrics: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    main_process: bool = True


def masked_kept(model: nn.Module, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Kept experts per MoE layer summed over the real (unpadded) tokens of the last forward, and that token count.

    Padding is masked away (`keep` is bool[T, K]) rather than indexed out: a boolean index needs
    the host to learn the result's size, a synchronisation per micro-batch on an accelerator.
    """
    real = attention_mask.reshape(-1).bool()
    kept = torch.stack([(layer.last_keep & real[:, None]).sum() for layer in get_attachment(model).layers])
    return kept.float(), real.sum().float()


def trained_dtypes(model: nn.Module) -> dict[str, str]:
    """The dtypes the run trained in, read off the model: the experts' weights and the mask heads."""
    layer = get_attachment(model).layers[0]
    return {
        "experts": str(next(layer.experts.parameters()).dtype).removeprefix("torch."),
        "mask_heads": str(layer.head.weight.dtype).removeprefix("torch."),
    }


def check_max_length(max_length: int, model_config: Any) -> None:
    """Refuse training sequences longer than the model's context (`max_position_embeddings`).

    Training refuses where evaluation only warns: the masks would learn from positions the model
    was never trained on (rotary embeddings past their range, or an index error for learned
    positions), and a long run spent on that is lost, while a shorter --max-length costs nothing.
    """
    limit = context_length(model_config)
    if limit is not None and max_length > limit:
        raise BeamError(
            f"--max-length {max_length} is longer than the model's context ({limit} tokens: "
            f"max_position_embeddings in its config.json); pass --max-length {limit} or less"
        )


class Trainer:
    """One training run, set up from a TrainConfig; `run()` trains and writes the output folder."""

    def __init__(self, config: TrainConfig, on_step: Callable[[dict[str, Any]], None] | None = None) -> None:
        accelerate = require("accelerate", "train", "training")
        if config.train == "lora":
            require("peft", "train", "--train lora")  # before the model loads, not after
        if config.tensorboard:
            require("tensorboard", "train", "tensorboard=True")

        self.config = config
        self.on_step = on_step
        self.output = check_output(config)
        model_config = load_model_config(config.model)  # checked before any weight loads
        check_max_length(config.max_length, model_config)
        # Several processes on a machine without CUDA (`accelerate launch --multi_gpu` or torchrun
        # on CPUs): accelerate runs multi-CPU DDP over gloo only when asked for the CPU.
        multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        self.accelerator = accelerate.Accelerator(cpu=multi_cpu)
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        torch.manual_seed(config.seed)

        self.tokenizer = load_tokenizer(config.model)
        self.data = load_training_data(
            config.data,
            config.val_data,
            self.tokenizer,
            config.max_length,
            config.packing,
            config.val_fraction,
            config.seed,
        )
        self.schedule = BatchSchedule(
            len(self.data.train), config.batch_size, config.grad_accum, self.world, config.seed
        )
        self.total_steps = config.max_steps or max(
            1, math.ceil(config.epochs * self.schedule.steps_per_epoch)
        )

        self.model = load_base_model(
            config.model, "bfloat16" if config.dtype == "bf16" else "float32", config=model_config
        )
        # --train full changes every weight: the distillation teacher is a frozen copy of the base.
        distilling = Objective(config.objective).uses_teacher
        teacher_copy = copy.deepcopy(self.model) if config.train == "full" and distilling else None
        attach(self.model, config.beam_config())
        self.top_k = max(layer.top_k for layer in get_attachment(self.model).layers)
        if config.target_avg_k is not None:
            check_target(config.target_avg_k, self.top_k)
            self.budget: BudgetController | FixedBeta = BudgetController(
                config.target_avg_k,
                self.top_k,
                kp=config.controller_kp,
                ki=config.controller_ki,
                smoothing=config.controller_smoothing,
                beta_init=config.beta_init,
            )
        else:
            self.budget = FixedBeta(config.beta or 0.0)
        self.objective = Objective(config.objective, config.distill_weight)
        self.balance = config.train == "mask+router"
        self.balance_coef = (
            config.balance_coef
            if config.balance_coef is not None
            else float(getattr(self.model.config, "router_aux_loss_coef", 0.0) or 0.0)
        )
        if config.gradient_checkpointing:
            # Non-reentrant: the reentrant variant runs the first forward under no_grad, so the
            # mask probabilities stored for the regulariser would carry no gradient.
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.trainable = select_trainable(self.model, config.train, config.lora_rank, config.lora_alpha)
        optimizer = torch.optim.AdamW(
            self.trainable.param_groups(
                config.lr, config.effective_model_lr, config.weight_decay, config.router_term_lr_ratio
            )
        )
        self.model.train()
        self.run_model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        self.settle_start = config.settle_start(self.total_steps)
        self.teacher = Teacher.original(
            self.run_model,
            self.model,
            config.train,
            peft_model=self.trainable.peft_model,
            copy=teacher_copy.to(self.accelerator.device) if teacher_copy is not None else None,
        )
        # The heads keep their full learning rate while the budget controller still moves beta,
        # and anneal once beta is frozen (the settle phase).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self._torch_optimizer,
            WarmupCosine(
                self.total_steps,
                config.warmup_steps(self.total_steps),
                config.min_lr_ratio,
                decay_start=self.settle_start,
                warmup_reaches_peak=False,
            ),
        )
        self.checkpointer = Checkpointer(self.output, self.is_main, config.keep_checkpoints)

    @property
    def _torch_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)

    # One step ----------------------------------------------------------------------------------

    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def train_step(self, step: int, clip: bool = False) -> dict[str, Any]:
        """Forward and backward over this process's micro-batches, then (with `clip`) gradient
        clipping at `max_grad_norm`; returns the step's global statistics.

        The statistics stay on the device until the end of the step, where they (and the gradient
        norm) come to the host in one copy.
        """
        beta = self.budget.beta
        micro_batches = self.schedule.micro_batches(step, self.rank)
        global_batch = self.data.train.select(self.schedule.global_indices(step))
        global_loss_tokens = max(1, global_batch.loss_tokens)
        layers = len(get_attachment(self.model).layers)
        sums = DeviceSums(
            self.accelerator.device,
            lm=None,
            kl=None,
            reg=None,
            aux=None,
            tokens=None,
            non_finite=None,
            kept=layers,
        )
        for i, index in enumerate(micro_batches):
            batch = self._to_device(self.data.train.batch(index))
            last = i == len(micro_batches) - 1
            with (
                contextlib.nullcontext() if last else self.accelerator.no_sync(self.run_model),
                self.objective.student_routing(self.model),
            ):
                teacher = self.teacher.logits(batch) if self.objective.uses_teacher else None
                extra = {"use_cache": False, **({"output_router_logits": True} if self.balance else {})}
                out = self.run_model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra
                )
                losses = self.objective.sums(out.logits, teacher, batch["labels"])
                reg = mask_regularizer(self.model, batch["attention_mask"])
                aux = out.aux_loss if self.balance and getattr(out, "aux_loss", None) is not None else None
                aux = aux if aux is not None else reg.new_zeros(())
                kept, tokens = masked_kept(self.model, batch["attention_mask"])
                loss = losses["task"] * self.world / global_loss_tokens
                loss = loss + (beta * reg + self.balance_coef * aux.float()) / len(micro_batches)
                self.accelerator.backward(loss)
            sums.add(
                lm=losses["lm"],
                kl=losses["kl"],
                reg=reg.detach() / len(micro_batches),
                aux=aux.detach().float() / len(micro_batches),
                tokens=tokens,
                non_finite=~torch.isfinite(loss.detach()),
                kept=kept,
            )
        after = {}
        if clip and self.config.max_grad_norm:
            norm = self.accelerator.clip_grad_norm_(self.run_model.parameters(), self.config.max_grad_norm)
            # Under FSDP2 the norm is a DTensor; the host copy wants a plain tensor.
            after["grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        totals = sums.totals(lambda flat: self.accelerator.reduce(flat, "sum"), **after)
        lm, kl, reg, aux, tokens = (totals[k] for k in ("lm", "kl", "reg", "aux", "tokens"))
        # float32, as the sums were: the host copy is exact, so this is the device's arithmetic.
        avg_k = float(torch.tensor(totals["kept"]).mean() / max(tokens, 1.0))
        task = {"lm": lm, "distill": kl, "lm+distill": lm + self.config.distill_weight * kl}[
            self.config.objective
        ]
        reg, aux = reg / self.world, aux / self.world
        loss = task / global_loss_tokens + beta * reg + self.balance_coef * aux
        return {
            "loss": loss,
            "lm_loss": lm / global_loss_tokens,
            "kl": kl / global_loss_tokens,
            "reg": reg,
            "aux": aux,
            "avg_k": avg_k,
            "beta": beta,
            "tokens": int(tokens),
            "finite": totals["non_finite"] == 0 and math.isfinite(loss),
            "grad_norm": totals.get("grad_norm", math.nan),
        }

    # Validation --------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, blocks: Blocks) -> dict[str, Any]:
        """Validation loss, KL to the teacher and Avg-K, in eval mode (masked experts skipped).

        The batches are dealt round-robin to the processes; a process with no batch left runs a
        dummy one that counts for nothing, so that all processes run the same number of forwards.
        """
        size = self.config.batch_size
        batches = [list(range(i, min(i + size, len(blocks)))) for i in range(0, len(blocks), size)]
        rounds = math.ceil(len(batches) / self.world)
        layers = len(get_attachment(self.model).layers)
        sums = DeviceSums(
            self.accelerator.device, lm=None, kl=None, loss_tokens=None, tokens=None, kept=layers
        )
        self.run_model.eval()
        try:
            for r in range(rounds):
                b = r * self.world + self.rank
                weight = 1.0 if b < len(batches) else 0.0
                batch = self._to_device(blocks.batch(batches[min(b, len(batches) - 1)]))
                teacher = self.teacher.logits(batch)
                logits = self.run_model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
                ).logits
                kept, tokens = masked_kept(self.model, batch["attention_mask"])
                losses = Objective("distill").sums(logits, teacher, batch["labels"])
                loss_tokens = (batch["labels"][:, 1:] != IGNORE).sum()
                sums.add(
                    weight,
                    lm=losses["lm"],
                    kl=losses["kl"],
                    loss_tokens=loss_tokens,
                    tokens=tokens,
                    kept=kept,
                )
        finally:
            self.run_model.train()
        totals = sums.totals(lambda flat: self.accelerator.reduce(flat, "sum"))
        lm, kl, loss_tokens, tokens = (totals[k] for k in ("lm", "kl", "loss_tokens", "tokens"))
        per_layer = (torch.tensor(totals["kept"]) / max(tokens, 1.0)).tolist()
        names = [layer.name for layer in get_attachment(self.model).layers]
        return {
            "val_loss": lm / max(loss_tokens, 1.0),
            "val_kl": kl / max(loss_tokens, 1.0),
            "val_avg_k": sum(per_layer) / len(per_layer),
            "val_avg_k_per_layer": dict(zip(names, per_layer, strict=True)),
            "val_tokens": int(tokens),
        }

    # The budget at the start and at the end -----------------------------------------------------

    def _calibration_batches(
        self, limit: int | None = None, size: int | None = None
    ) -> list[dict[str, Tensor]]:
        """The text calibration measures Avg-K on: the validation blocks, else the first training
        blocks (in the run's fixed order), up to `limit` (default `calibration_tokens`) real
        tokens, in batches of `size` blocks (default `batch_size`)."""
        limit = self.config.calibration_tokens if limit is None else limit
        blocks = self.data.val if self.data.val is not None else self.data.train
        order = list(range(len(blocks)))
        if blocks is self.data.train:
            order = [int(i) for i in self.schedule.global_indices(0)] + order
        picked: list[int] = []
        tokens = 0
        for i in dict.fromkeys(order):
            picked.append(i)
            tokens += int(blocks.attention_mask[i].sum())
            if tokens >= limit:
                break
        size = size or self.config.batch_size
        return [self._to_device(blocks.batch(picked[i : i + size])) for i in range(0, len(picked), size)]

    def _start_router_heads(self) -> dict[str, float]:
        """A router-aware head starts as threshold skipping at the start budget (train/budget.py):
        the target's, or with a fixed beta every expert (the boundary at the weakest slot seen)."""
        if get_attachment(self.model).config.head != "router":
            return {}
        start = self.config.start_avg_k or self.config.target_avg_k or float(self.top_k)
        check_target(start, self.top_k)
        threshold = calibrate_router_heads(self.model, self._calibration_batches(), start)
        return {"start_avg_k": start, "start_router_threshold": threshold}

    def _land_on_target(self) -> dict[str, Any]:
        """With a target: the serve-time threshold that puts Avg-K on it (when `calibrate` is on)."""
        config = self.config
        if config.target_avg_k is None or not config.calibrate:
            return {}
        batches = self._calibration_batches()
        before = measure_avg_k(self.model, batches)
        threshold = calibrate_threshold(self.model, batches, config.target_avg_k)
        return {
            "calibration_avg_k_before": before,
            "calibration_avg_k": measure_avg_k(self.model, batches),
            "threshold": threshold,
        }

    def _threshold_curve(self) -> ThresholdCurve | None:
        """The finished heads' threshold -> Avg-K curve on `curve_tokens` tokens of the calibration
        text (when `threshold_curve` is on), for budgets other than the target.

        Measured after the adapter is saved, so that a failure here (e.g. out of memory) loses
        nothing: it warns, and `beam-moe calibrate` can measure the curve later. The forward
        passes hold at least 2048 tokens (no gradient, so no more memory than a training step at
        these sizes): a short `max_length` would otherwise make 33 x many tiny passes.
        """
        config = self.config
        if not config.threshold_curve:
            return None
        from beam_moe.eval.curve import curve_on_batches

        if self.data.val is None:
            text = "the first training blocks of the run"
        elif config.val_data:
            text = "the run's validation data (" + ", ".join(Path(p).name for p in config.val_data) + ")"
        else:
            text = f"the run's held-out share ({config.val_fraction:g}) of the training data"
        rows = max(config.batch_size, math.ceil(2048 / config.max_length))
        batches = self._calibration_batches(config.curve_tokens, rows)
        try:
            return curve_on_batches(self.model, batches, measured_on={"text": text})
        except RuntimeError as e:
            if self.is_main:
                warnings.warn(
                    f"the adapter is saved, but its threshold -> Avg-K curve could not be measured "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); measure it with "
                    f"`beam-moe calibrate {self.output} --data FILE` to serve budgets in experts",
                    BeamWarning,
                    stacklevel=2,
                )
            return None

    # The run -----------------------------------------------------------------------------------

    def _states(self, position: TrainState) -> dict[str, Stateful]:
        """Everything a checkpoint holds, by name (train/checkpointing.py)."""
        from accelerate.utils import gather_object

        return {
            "model": ModelState(self.run_model),
            "optimizer": OptimizerState(self.run_model, self._torch_optimizer),
            "train": position,
            "scheduler": self.scheduler,
            "budget": self.budget,
            "rng": RNGState(self.rank, self.world, gather_object),
        }

    def _resume(self, metrics: MetricsLog) -> tuple[int, int]:
        path = self.checkpointer.latest()
        assert path is not None
        position = TrainState()
        self.checkpointer.load(path, self._states(position))
        metrics.truncate_after(position.step)
        return position.step, position.tokens

    def _save_checkpoint(self, step: int, tokens: int) -> Path:
        return self.checkpointer.save(step, self._states(TrainState(step, tokens)))

    def _diverged(self, step: int, what: str) -> BeamError:
        last = self.checkpointer.latest()
        keep = (
            f"the last good checkpoint is {last} (continue from it with --resume, e.g. after lowering --lr)"
            if last is not None
            else "no checkpoint was written before it (lower --lr or check the data and the model)"
        )
        return BeamError(f"training stopped at step {step}: {what} is not finite; {keep}")

    def run(self) -> TrainResult:
        config = self.config
        if self.is_main:
            start_output(config, self.output)
        self.accelerator.wait_for_everyone()
        metrics = MetricsLog(self.output, self.is_main, config.tensorboard)
        step, tokens = self._resume(metrics) if config.resume else (0, 0)
        start = self._start_router_heads() if step == 0 else {}
        progress = Progress(self.total_steps, step, config.progress and self.is_main)
        started = time.perf_counter()
        record: dict[str, Any] = {}
        try:
            while step < self.total_steps:
                threads.tick()
                t0 = time.perf_counter()
                stats = self.train_step(step, clip=True)
                grad_norm = stats.pop("grad_norm")
                if not stats.pop("finite"):
                    raise self._diverged(step + 1, "the loss")
                if config.max_grad_norm and not math.isfinite(grad_norm):
                    raise self._diverged(step + 1, "the gradient norm")
                lrs = [group["lr"] for group in self._torch_optimizer.param_groups]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.budget.update(stats["avg_k"])
                step += 1
                if step >= self.settle_start:
                    self.budget.freeze()
                tokens += stats["tokens"]
                record = {
                    "step": step,
                    "epoch": self.schedule.epoch_of(step - 1),
                    **stats,
                    "lr": lrs[0],
                    "grad_norm": grad_norm,
                    "tokens_seen": tokens,
                    "tokens_per_s": stats["tokens"] / max(time.perf_counter() - t0, 1e-9),
                }
                metrics.log(record)
                progress.update(record)
                if self.on_step is not None:
                    self.on_step({**record, "model": self.model})
                # The last step's validation is the final one below, after the threshold calibration.
                if (
                    self.data.val is not None
                    and config.eval_every
                    and step % config.eval_every == 0
                    and step < self.total_steps
                ):
                    metrics.log({"step": step, "split": "val", **self.evaluate(self.data.val)})
                if config.save_every and step % config.save_every == 0 and step < self.total_steps:
                    self._save_checkpoint(step, tokens)
            final = {k: record.get(k) for k in ("loss", "lm_loss", "kl", "avg_k", "beta")}
            final.update(start)
            final.update(self._land_on_target())
            val = self.evaluate(self.data.val) if self.data.val is not None else {}
            final.update(val)
            outcome = (
                target_outcome(final, config.target_avg_k, warn=self.is_main)
                if config.target_avg_k is not None
                else {}
            )
            final.update(outcome)
            if val:
                metrics.log({"step": step, "split": "val", **val, **outcome})
            self._write_output(final, step, tokens)
            curve = self._threshold_curve()
            if curve is not None:
                final["curve_avg_k_range"] = list(curve.avg_k_range)
                if self.is_main:
                    write_threshold_curve(self.output, curve)
        finally:
            progress.close()
            metrics.close()
        return TrainResult(self.output, step, tokens, final, time.perf_counter() - started, self.is_main)

    def _write_output(self, final: dict[str, Any], steps: int, tokens: int) -> None:
        config = self.config
        trained = trainable_state(self.run_model)
        full_state = None
        if config.train == "full":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full_state = get_model_state_dict(self.run_model, options=options)
        if self.is_main:
            extra = {
                "trained_by": "beam-moe train",
                "base_model": config.model,
                "train": config.train,
                "objective": config.objective,
                "beta": config.beta,
                "target_avg_k": config.target_avg_k,
                "steps": steps,
                "tokens": tokens,
                "dtypes": trained_dtypes(self.model),
                "final": {k: v for k, v in final.items() if not isinstance(v, dict)},
            }
            write_result(
                self.output,
                self.model,
                config,
                trained,
                full_state,
                self.tokenizer,
                self.trainable.peft_model,
                extra,
            )
        self.accelerator.wait_for_everyone()


def train(
    config: TrainConfig | None = None,
    *,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> TrainResult:
    """Train BEAM mask heads (and optionally more) and write the output folder; returns the result.

    `train(TrainConfig(model=..., data=[...], output=..., target_avg_k=2.0))`, or the same options
    as keywords: `train(model=..., data=[...], output=..., beta=0.05, progress=False)`.
    `on_step(record)` is called after every optimizer step with the logged metrics (and the model).
    """
    if config is None:
        config = TrainConfig(**options)
    elif options:
        raise BeamError("pass either a TrainConfig or keyword options, not both")
    return Trainer(config, on_step).run()
