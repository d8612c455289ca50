"""`TrainConfig`: everything that defines a training run, JSON-serialisable and checked up front."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from beam_moe.config import BeamConfig
from beam_moe.errors import BeamError
from beam_moe.train.budget import CONTROLLER_DEFAULTS

OBJECTIVES = ("lm", "distill", "lm+distill")
TRAIN_MODES = ("mask", "mask+router", "full", "lora")
DTYPES = ("fp32", "bf16")
# Learning rate of the model's own weights when --model-lr is not given, per --train mode.
DEFAULT_MODEL_LR = {"mask+router": 1e-4, "full": 1e-5, "lora": 2e-4}
# Fields that may differ between a run and its --resume without changing what is computed.
RESUME_FREE = (
    "resume",
    "overwrite",
    "progress",
    "tensorboard",
    "save_every",
    "keep_checkpoints",
    "eval_every",
    "threshold_curve",
    "curve_tokens",
)


def _option(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    """A field with the help (and choices) of its `beam-moe train` option, which cli/train.py
    generates from the field, so that its default is this one. A field that is on by default
    (or None) becomes a `--no-` option, and its help says what turning it off does."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    """One training run: a model folder (or Hub id), data files and an output folder, plus the recipe.

    Sparsity: give `beta` (the paper's L1 weight) or `target_avg_k` (a controller adjusts beta so
    that the measured Avg-K settles at the target: `controller_*`, `beta_init` (default: a guess
    from the target, train/budget.py `initial_beta`)).
    For the last `settle` fraction of the steps beta is frozen and the learning rates decay, so the
    heads settle; then, with `calibrate`, the serve-time threshold is set so that Avg-K on
    `calibration_tokens` tokens of validation text (else training text) equals the target.
    Last, with `threshold_curve`, the adapter's threshold -> Avg-K curve is measured on
    `curve_tokens` tokens of the same text and stored with it, so that it can serve budgets
    other than the target (`beam_budget`, vLLM's `beam_avg_k`).
    A router-aware head (the default) starts as threshold skipping calibrated to `start_avg_k`
    (default: the target; with a fixed beta, every expert kept, the weakest slot at the boundary).
    `lr` is the mask heads' learning rate (a router-aware head's two scalars per layer train at
    `router_term_lr_ratio` x `lr`: Adam moves every parameter by about lr per step, and a shared
    offset moves the whole layer's budget); `model_lr` that of the model's own weights that train
    (routers, LoRA, everything).
    `batch_size` is per process; one optimizer step sees batch_size x grad_accum x processes
    sequences of `max_length` tokens.
    """

    model: str
    data: list[str]
    output: str
    val_data: list[str] | None = None
    objective: str = _option(
        "lm",
        "lm: the paper's next-token loss; distill: KL from the model with the masks off; "
        "lm+distill: lm + --distill-weight x KL",
        choices=OBJECTIVES,
    )
    distill_weight: float = _option(1.0, "weight of the KL in lm+distill")
    beta: float | None = _option(None, "the paper's L1 weight on sigmoid(z) (fixed)")
    target_avg_k: float | None = _option(
        None, "kept experts per token to reach; beta is adjusted to get there"
    )
    controller_kp: float = _option(
        CONTROLLER_DEFAULTS["kp"],
        "budget controller, proportional gain on the relative Avg-K error, in log beta",
    )
    controller_ki: float = _option(CONTROLLER_DEFAULTS["ki"], "budget controller, integral gain")
    controller_smoothing: float = _option(
        CONTROLLER_DEFAULTS["smoothing"], "EMA factor of the training Avg-K the controller reads"
    )
    beta_init: float | None = _option(None, "the controller's first beta (default: K / (2 target^2))")
    router_term_lr_ratio: float = _option(
        0.1, "learning rate of a router-aware head's two scalars per layer, x --lr"
    )
    settle: float = _option(
        0.25, "last fraction of the steps with beta frozen and the learning rates decaying"
    )
    calibrate: bool = _option(
        True, "keep threshold 0.5 at the end instead of calibrating it so that Avg-K equals the target"
    )
    calibration_tokens: int = _option(
        16384, "validation (else training) tokens the start and end calibrations measure"
    )
    threshold_curve: bool = _option(
        True,
        "skip measuring the threshold -> Avg-K curve at the end (the adapter then serves only "
        "thresholds, not budgets in experts, until `beam-moe calibrate`)",
    )
    curve_tokens: int = _option(
        2048,
        "validation (else training) tokens the threshold -> Avg-K curve is measured on, once per "
        "threshold of its 33-point grid",
    )
    start_avg_k: float | None = _option(
        None, "where a router-aware head starts (default: the target; with --beta, every expert kept)"
    )
    train: str = _option(
        "mask",
        "mask: the mask heads only; mask+router: the routers too; full: every weight; "
        "lora: LoRA adapters too",
        choices=TRAIN_MODES,
    )
    lora_rank: int = _option(16, "LoRA rank (--train lora)")
    lora_alpha: float = _option(32.0, "LoRA alpha (--train lora)")
    balance_coef: float | None = _option(None, "balance-loss weight for mask+router (model's own)")
    dtype: str = _option(
        "fp32", "dtype the model loads in (the mask heads and LoRA stay fp32)", choices=DTYPES
    )
    lr: float = _option(1e-2, "mask heads' learning rate")
    model_lr: float | None = _option(None, "learning rate of routers / LoRA / full weights")
    weight_decay: float = _option(0.0, "AdamW weight decay (model weights)")
    warmup: float = _option(0.03, "warm-up: a fraction (<1) or steps (>=1)")
    min_lr_ratio: float = _option(0.1, "cosine decay ends at this x peak lr")
    max_grad_norm: float | None = _option(1.0, "gradient clipping (0: off)")
    batch_size: int = _option(8, "sequences per process per micro-batch")
    grad_accum: int = _option(1, "micro-batches per optimizer step")
    max_length: int = _option(512, "tokens per sequence")
    packing: bool = _option(True, "one padded sequence per document")
    val_fraction: float = _option(0.05, "share of sequences held out")
    max_steps: int | None = _option(None, "optimizer steps (overrides --epochs)")
    epochs: float = _option(1.0, "passes over the training data")
    seed: int = _option(0, "seed of the held-out split, the data order and the new weights")
    save_every: int = _option(100, "checkpoint every N steps (0: never)")
    keep_checkpoints: int = _option(2, "how many of the latest checkpoints are kept")
    eval_every: int = _option(0, "validate every N steps (0: at the end)")
    gradient_checkpointing: bool = _option(
        False, "recompute activations in the backward pass (less memory, more time)"
    )
    beam: dict[str, Any] = field(default_factory=dict)
    resume: bool = _option(False, "continue the run in --output from its checkpoint")
    overwrite: bool = False
    progress: bool = _option(True, "no progress bar")
    tensorboard: bool | None = _option(None, "no TensorBoard logs even when installed")

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, Path)):
            self.data = [str(self.data)]
        if isinstance(self.val_data, (str, Path)):
            self.val_data = [str(self.val_data)]
        self.data = [str(p) for p in self.data]
        self.val_data = [str(p) for p in self.val_data] if self.val_data else None
        self.model, self.output = str(self.model), str(self.output)
        self.validate()

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise BeamError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.train not in TRAIN_MODES:
            raise BeamError(f"train must be one of {', '.join(TRAIN_MODES)}, got {self.train!r}")
        if self.dtype not in DTYPES:
            raise BeamError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if (self.beta is None) == (self.target_avg_k is None):
            raise BeamError(
                "give exactly one of beta (the paper's L1 weight, e.g. 0.05) and target_avg_k "
                "(the Avg-K to reach, e.g. 2.0 for half of Top-4)"
            )
        if self.beta is not None and not (math.isfinite(self.beta) and self.beta >= 0):
            raise BeamError(f"beta must be a finite number >= 0, got {self.beta}")
        if self.target_avg_k is not None and not (math.isfinite(self.target_avg_k) and self.target_avg_k > 0):
            raise BeamError(
                f"target_avg_k must be > 0 (kept experts per token, at most the model's Top-K), "
                f"got {self.target_avg_k}"
            )
        if not self.data:
            raise BeamError("no training data given: pass one or more files or folders")
        if not 0.0 <= self.settle < 1.0:
            raise BeamError(f"settle must be a fraction of the run in [0, 1), got {self.settle}")
        if self.calibration_tokens < 1:
            raise BeamError(f"calibration_tokens must be >= 1, got {self.calibration_tokens}")
        if self.curve_tokens < 2:
            raise BeamError(f"curve_tokens must be >= 2, got {self.curve_tokens}")
        if self.start_avg_k is not None and not (math.isfinite(self.start_avg_k) and self.start_avg_k > 0):
            raise BeamError(f"start_avg_k must be > 0, got {self.start_avg_k}")
        if not (
            self.controller_kp >= 0
            and self.controller_ki >= 0
            and 0 <= self.controller_smoothing < 1
            and (self.beta_init is None or self.beta_init > 0)
            and self.router_term_lr_ratio > 0
        ):
            raise BeamError(
                "controller gains must be controller_kp >= 0, controller_ki >= 0, "
                "0 <= controller_smoothing < 1, beta_init > 0 (or unset) and router_term_lr_ratio > 0"
            )
        positive = {"lr": self.lr, "batch_size": self.batch_size, "grad_accum": self.grad_accum}
        positive |= {"max_length": self.max_length, "lora_rank": self.lora_rank, "epochs": self.epochs}
        for name, value in positive.items():
            if not value > 0:
                raise BeamError(f"{name} must be > 0, got {value}")
        if self.max_length < 2:
            raise BeamError(f"max_length must be at least 2 tokens, got {self.max_length}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise BeamError(f"max_steps must be > 0, got {self.max_steps}")
        if self.model_lr is not None and not self.model_lr > 0:
            raise BeamError(f"model_lr must be > 0, got {self.model_lr}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise BeamError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.warmup < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise BeamError("warmup must be >= 0 and min_lr_ratio in [0, 1]")
        if self.save_every < 0 or self.eval_every < 0 or self.keep_checkpoints < 1:
            raise BeamError("save_every and eval_every must be >= 0, keep_checkpoints >= 1")
        if self.resume and self.overwrite:
            raise BeamError("resume and overwrite contradict each other: pick one")
        self.beam_config()

    def beam_config(self) -> BeamConfig:
        return BeamConfig.from_dict(dict(self.beam))

    @property
    def effective_model_lr(self) -> float:
        return self.model_lr if self.model_lr is not None else DEFAULT_MODEL_LR.get(self.train, self.lr)

    def settle_start(self, total_steps: int) -> int:
        """The step from which beta is frozen and the learning rates decay."""
        return total_steps - round(self.settle * total_steps)

    def warmup_steps(self, total_steps: int) -> int:
        """`warmup` below 1 is a fraction of the run, from 1 on a number of steps."""
        return int(self.warmup * total_steps) if self.warmup < 1 else int(self.warmup)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BeamError(f"unknown training options {unknown}; valid ones are {sorted(known)}")
        return cls(**data)

    def resume_mismatch(self, saved: dict[str, Any]) -> list[str]:
        """The options that differ from the run being resumed (those that change what is computed)."""
        mine = self.to_dict()
        return [
            f"{key}: {saved.get(key)!r} -> {mine[key]!r}"
            for key in mine
            if key not in RESUME_FREE and saved.get(key) != mine[key]
        ]
