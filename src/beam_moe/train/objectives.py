"""What the masks are trained to preserve: the data (`lm`), the unmasked model (`distill`), or both.

`distill` is the KL divergence from the same model with the masks switched off (every Top-K expert
kept), computed under no_grad with the same weights: no second copy of the model. Losses are
returned as sums over the loss tokens so that the loop can normalise by the global batch's token
count, which makes gradient accumulation and data parallelism exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from beam_moe.attach import set_routing_policy
from beam_moe.train.data import IGNORE


def keep_all(hidden: Tensor, router_logits: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
    """A routing policy that keeps every Top-K expert: the base model's computation."""
    return torch.ones_like(ids, dtype=torch.bool)


@contextmanager
def masks_off(model: nn.Module) -> Iterator[None]:
    """Run `model` as the base model (every Top-K expert kept) for the duration of the block."""
    set_routing_policy(model, keep_all)
    try:
        yield
    finally:
        set_routing_policy(model, None)


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

    def teacher_logits(
        self, model: nn.Module, attached: nn.Module, batch: dict[str, Tensor]
    ) -> Tensor | None:
        """The unmasked model's logits for `batch` (no gradient), or None when not distilling.

        `model` is what runs the forward (possibly wrapped for data parallelism); `attached` is
        the model that carries the mask heads. Eval mode, so dropout and router jitter are off.
        """
        if not self.uses_teacher:
            return None
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), masks_off(attached):
                ids, attention = batch["input_ids"], batch["attention_mask"]
                return model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        finally:
            model.train(was_training)

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
