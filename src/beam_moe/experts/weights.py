"""A zero-copy view of a transformers experts module in the layout every backend uses, and what a
backend returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor, nn
from torch.nn import functional as F

from beam_moe.errors import BeamError


@dataclass(frozen=True)
class ExpertWeights:
    """Expert weights as `[E, in, out]` views, so that a row x maps to `x @ up[e]`.

    up:         [E, H, N] with N = 2I for gated experts (SwiGLU and friends), else I.
    up_bias:    [E, N] or None.
    down:       [E, I, H].
    down_bias:  [E, H] or None.
    activation: [S, N] -> [S, I], the family's own gate (e.g. silu(gate) * up, gpt-oss's clamped GLU).
    gated_silu: a declaration, by whoever built the view, that `activation` is exactly
                silu(gate) * up on the [gate | up] halves of N. Kernels that hard-code SwiGLU (the
                `triton` backend) run only on such weights; a function's identity cannot say it,
                since transformers and vLLM each have their own.

    transformers 5.x stores `gate_up_proj` as [E, 2I, H] and `down_proj` as [E, H, I] (gpt-oss:
    transposed); both become views here, never copies.
    """

    up: Tensor
    up_bias: Tensor | None
    down: Tensor
    down_bias: Tensor | None
    activation: Callable[[Tensor], Tensor]
    gated_silu: bool = False

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
            gated_silu=has_gate and _has_default_silu_gate(experts),
        )

    @classmethod
    def swiglu(
        cls, w13: Tensor, w2: Tensor, w13_bias: Tensor | None = None, w2_bias: Tensor | None = None
    ) -> ExpertWeights:
        """SwiGLU experts stored as vLLM loads them (and transformers 5.x stores them): w13
        [E, 2I, H] with the gate rows first, w2 [E, H, I]; views, declared `gated_silu`."""
        return cls(
            up=w13.transpose(1, 2),
            up_bias=w13_bias,
            down=w2.transpose(1, 2),
            down_bias=w2_bias,
            activation=silu_and_mul,
            gated_silu=True,
        )


def silu_and_mul(h: Tensor) -> Tensor:
    """silu(gate) * up for h = [gate | up]."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def _has_default_silu_gate(experts: nn.Module) -> bool:
    """transformers' own gate (`act_fn(gate) * up` on the two halves) with a SiLU `act_fn`; a family
    that overrides `_apply_gate` (gpt-oss: clamped, interleaved) or uses another activation is not."""
    from transformers.activations import SiLUActivation
    from transformers.integrations.moe import _default_apply_gate

    gate = getattr(experts, "_apply_gate", None)
    act_fn = getattr(experts, "act_fn", None)
    return getattr(gate, "__func__", None) is _default_apply_gate and (
        act_fn is F.silu or isinstance(act_fn, (SiLUActivation, nn.SiLU))
    )


class ExpertsOutput(NamedTuple):
    """What an expert backend returns.

    output:  [T, H] in the hidden states' dtype.
    rows:    (token, expert) rows that entered an expert GEMM (masked pairs never do), a host int
             where the backend knows it without a device op, else a device tensor.
    backend: the backend that really computed them; one that hands a call on (e.g. `triton` to
             `grouped` for gates it cannot fuse) names the one that ran, so stats can show it.
    """

    output: Tensor
    rows: Tensor | int
    backend: str
