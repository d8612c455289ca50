"""A zero-copy view of a transformers experts module in the layout every backend uses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from beam_moe.errors import BeamError


@dataclass(frozen=True)
class ExpertWeights:
    """Expert weights as `[E, in, out]` views, so that a row x maps to `x @ up[e]`.

    up:         [E, H, N] with N = 2I for gated experts (SwiGLU and friends), else I.
    up_bias:    [E, N] or None.
    down:       [E, I, H].
    down_bias:  [E, H] or None.
    activation: [S, N] -> [S, I], the family's own gate (e.g. silu(gate) * up, gpt-oss's clamped GLU).

    transformers 5.x stores `gate_up_proj` as [E, 2I, H] and `down_proj` as [E, H, I] (gpt-oss:
    transposed); both become views here, never copies.
    """

    up: Tensor
    up_bias: Tensor | None
    down: Tensor
    down_bias: Tensor | None
    activation: Callable[[Tensor], Tensor]

    @property
    def num_experts(self) -> int:
        return self.up.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.up.shape[1]

    @classmethod
    def of(cls, experts: nn.Module) -> ExpertWeights:
        has_gate = getattr(experts, "has_gate", True)
        has_bias = getattr(experts, "has_bias", False)
        transposed = getattr(experts, "is_transposed", False)
        up_name = "gate_up_proj" if has_gate else "up_proj"
        if not hasattr(experts, up_name) or not hasattr(experts, "down_proj"):
            raise BeamError(
                f"{type(experts).__name__} does not store its experts as 3D tensors ({up_name}, down_proj); "
                "beam-moe needs transformers 5.x experts modules"
            )
        up, down = getattr(experts, up_name), experts.down_proj
        if not transposed:
            up, down = up.transpose(-2, -1), down.transpose(-2, -1)
        activation = experts._apply_gate if has_gate else experts.act_fn
        return cls(
            up=up,
            up_bias=getattr(experts, f"{up_name}_bias") if has_bias else None,
            down=down,
            down_bias=experts.down_proj_bias if has_bias else None,
            activation=activation,
        )
