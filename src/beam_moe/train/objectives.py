"""What the masks are trained to preserve: the data (`lm`), the original model (`distill`), or both.

The `distill` teacher is the original model with the masks switched off (every Top-K expert kept),
run under no_grad in eval mode, whatever else trains (`Teacher`). Losses are returned as sums
over the loss tokens so that the loop can normalise by the global batch's token count, which makes
gradient accumulation and data parallelism exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from beam_moe.attach import disable_masks, get_attachment
from beam_moe.train.data import IGNORE
from beam_moe.train.trainable import router_parameters

# Block and router attributes of the families whose training-mode routing is random: the input
# jitter of Mixtral, MiniMax and MiniMax-M2 (`jitter_noise`) and Phi-MoE (`input_jitter_noise`).
_JITTER = ("jitter_noise", "input_jitter_noise")


def _shifted(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Logits at the positions that predict a labelled token, and those tokens."""
    targets = labels[:, 1:]
    where = targets != IGNORE
    return logits[:, :-1][where].float(), targets[where]


def lm_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy summed over the labelled tokens (next-token prediction)."""
    predicting, targets = _shifted(logits, labels)
    return F.cross_entropy(predicting, targets, reduction="sum")


def kl_sum(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """KL(teacher || student) over the vocabulary, summed over the labelled tokens."""
    student, _ = _shifted(student_logits, labels)
    teacher, _ = _shifted(teacher_logits, labels)
    return F.kl_div(
        F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), log_target=True, reduction="sum"
    )


@dataclass(frozen=True)
class Objective:
    """`lm`, `distill` or `lm+distill` (lm + distill_weight x KL)."""

    name: str
    distill_weight: float = 1.0

    @property
    def uses_lm(self) -> bool:
        return self.name in ("lm", "lm+distill")

    @property
    def uses_teacher(self) -> bool:
        return self.name in ("distill", "lm+distill")

    def student_routing(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """Where the student's forward and backward run: deterministic routing when distilling.

        The teacher routes deterministically (eval mode), so a student that jitters or samples its
        routing would pay KL for noise that no mask can remove.
        """
        return deterministic_routing(model) if self.uses_teacher else contextlib.nullcontext()

    def sums(self, logits: Tensor, teacher: Tensor | None, labels: Tensor) -> dict[str, Tensor]:
        """{"lm": CE sum, "kl": KL sum, "task": what the optimizer sees} over the labelled tokens."""
        zero = logits.new_zeros((), dtype=torch.float32)
        lm = lm_loss_sum(logits, labels)
        kl = kl_sum(logits, teacher, labels) if teacher is not None else zero
        if self.name == "lm":
            task = lm
        elif self.name == "distill":
            task = kl
        else:
            task = lm + self.distill_weight * kl
        return {"lm": lm, "kl": kl, "task": task}


@contextmanager
def deterministic_routing(model: nn.Module) -> Iterator[None]:
    """Training mode with the routers' eval-mode (noise-free) routing, for the duration of the block.

    Mixtral, MiniMax and Phi-MoE multiply the router's input by uniform noise in training mode, and
    Phi-MoE's SparseMixer samples its Top-K; here the noise is off and the routers run in eval
    mode, while everything else (BEAM's straight-through mask over all K experts, dropout) stays in
    training mode. The block must also cover the backward pass, where gradient checkpointing runs
    the forward again.
    """
    saved: list[tuple[nn.Module, str, Any]] = []
    routers = []
    for layer in get_attachment(model).layers:
        for module in (layer.block, layer.router):
            for attr in _JITTER:
                if getattr(module, attr, 0):
                    saved.append((module, attr, getattr(module, attr)))
                    setattr(module, attr, 0.0)
        if layer.router.training:
            routers.append(layer.router)
            layer.router.train(False)
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)
        for router in routers:
            router.train(True)


class Teacher:
    """The distillation teacher: the original model with every Top-K expert kept, whatever trains.

    It runs under no_grad in eval mode (no dropout, no router noise) with the masks off, and:
    - `--train mask`: the model itself (nothing it computes with trains but the heads);
    - `--train mask+router`: the routers' original weights, a frozen copy taken before the first
      step (they are small), are swapped in for the forward;
    - `--train lora`: LoRA is disabled for the forward (PEFT's `disable_adapter`);
    - `--train full`: `copy`, a frozen copy of the base model taken before attaching; without one
      the teacher is the current weights with the masks off.
    `model` is what runs the forward (possibly wrapped for data parallelism); `attached` is the
    model that carries the mask heads.
    """

    def __init__(
        self,
        model: nn.Module,
        attached: nn.Module,
        *,
        routers: list[tuple[nn.Parameter, Tensor]] | None = None,
        peft_model: Any = None,
        copy: nn.Module | None = None,
    ) -> None:
        self.model = model
        self.attached = attached
        self.routers = routers or []
        self.peft_model = peft_model
        self.copy = copy.eval().requires_grad_(False) if copy is not None else None

    @classmethod
    def original(
        cls,
        model: nn.Module,
        attached: nn.Module,
        mode: str,
        *,
        peft_model: Any = None,
        copy: nn.Module | None = None,
    ) -> Teacher:
        """The teacher for `--train mode`; call it before the first optimizer step."""
        routers = None
        if mode == "mask+router":
            routers = [(p, p.detach().clone()) for p in router_parameters(attached)]
        return cls(
            model,
            attached,
            routers=routers,
            peft_model=peft_model if mode == "lora" else None,
            copy=copy if mode == "full" else None,
        )

    @torch.no_grad()
    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        """The teacher's logits for `batch` (no gradient)."""
        ids, attention = batch["input_ids"], batch["attention_mask"]
        if self.copy is not None:
            return self.copy(input_ids=ids, attention_mask=attention, use_cache=False).logits
        # Each module's own mode comes back, so that this can run inside `deterministic_routing`.
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        try:
            with disable_masks(self.attached), self._original_routers(), self._lora_disabled():
                return self.model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        finally:
            for module, training in modes:
                module.training = training

    @contextmanager
    def _original_routers(self) -> Iterator[None]:
        trained = [p.detach().clone() for p, _ in self.routers]
        for p, original in self.routers:
            p.copy_(original)
        try:
            yield
        finally:
            for (p, _), value in zip(self.routers, trained, strict=True):
                p.copy_(value)

    def _lora_disabled(self) -> contextlib.AbstractContextManager[None]:
        return self.peft_model.disable_adapter() if self.peft_model is not None else contextlib.nullcontext()
