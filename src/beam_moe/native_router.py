"""The router forward of the families whose router is softmax Top-K (`MoEFamily.router_kind`), on
the native op `beam_moe.native.softmax_topk` where the `native` expert backend runs.

Why: on a CPU the router's bf16 matmul is torch's, which without bf16 arithmetic (AVX2 only) is
compute-bound at about 9 GFLOP/s (a quarter of a 512-token layer), and at decode its five small
ops each start cold after the previous layer's experts. The op streams the weights like the
`native` experts and runs the router's own softmax and Top-K from C++, so it returns what the
module returns (logits equal up to the matmul's accumulation order: at most one bf16 step, seen at
prefill sizes). Used only where `native` computes the experts (so `backend="reference"` or
`"grouped"` keeps transformers' router), at inference, on bf16 routers, and, on CPUs with bf16
arithmetic (AVX512-BF16, AMX), for decode-sized calls only (`native_router_preferred`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from beam_moe import native
from beam_moe.experts.native import native_router_preferred

SOFTMAX_TOPK = "softmax_topk"
"""`MoEFamily.router_kind` of routers that compute softmax(x W^T) in float32, its Top-K, divide by
the Top-K's sum when `norm_topk_prob`, and return (logits, Top-K weights in the logits' dtype, ids)."""


def native_router_applies(router: nn.Module, hidden: Tensor) -> bool:
    weight = router.weight
    return (
        hidden.device.type == "cpu"
        and hidden.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and not (torch.is_grad_enabled() and (weight.requires_grad or hidden.requires_grad))
        and native_router_preferred(hidden.shape[0] * router.top_k, weight.shape[0])
        and native.available()
    )


def softmax_topk_route(router: nn.Module, hidden_states: Tensor, allow_native: bool) -> tuple:
    """`router`'s output (a softmax Top-K router): the native op where `allow_native` and
    `native_router_applies`, the module's own forward elsewhere."""
    hidden = hidden_states.reshape(-1, router.weight.shape[1])
    if allow_native and native_router_applies(router, hidden):
        return native.softmax_topk(hidden, router.weight, int(router.top_k), bool(router.norm_topk_prob))
    return type(router).forward(router, hidden_states)
