"""The Triton kernel against a float64 reference: natively on a GPU when there is one, otherwise in
triton's CPU interpreter (TRITON_INTERPRET=1). Fresh random inputs for every case."""

import pytest
import torch
from test_grouped import experts_of, float64_reference, masked_routing, relative_error

from beam_moe import BeamError
from beam_moe.experts import ExpertWeights, get_backend
from beam_moe.experts import triton as triton_backend
from beam_moe.experts.triton import align_kept_pairs, block_config, is_swiglu

pytest.importorskip("triton")

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), "interpreter"])
def device(request, monkeypatch):
    """The GPU (marker `gpu`), and the CPU under triton's interpreter (read when a kernel is built,
    and kernels are built per mode, so setting it here is enough)."""
    if request.param == "cuda":
        return torch.device("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return torch.device("cpu")


def on(device, *tensors):
    return [t.to(device) for t in tensors]


@pytest.fixture
def poisoned_intermediate(monkeypatch):
    """Fill the kernel's intermediate buffer with NaN: a row read before it is written shows up."""

    def nan_buffer(*shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_backend, "_intermediate_buffer", nan_buffer)


def small_experts(dtype, device="cpu"):
    # Sizes that are not multiples of the tiles, so the masked edges of every tile are exercised.
    experts = experts_of("qwen3_moe", dtype=dtype, hidden_size=80, moe_intermediate_size=40, num_experts=6)
    return experts.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
def test_kernel_matches_float64_reference(device, poisoned_intermediate, dtype, tokens):
    experts = small_experts(dtype)
    hidden, ids, weights, keep = masked_routing(
        experts, tokens, 3, seed=100 + tokens, dtype=dtype, kept_share=0.6
    )
    backend = get_backend("triton", device)
    with torch.no_grad():
        out, rows, ran = backend(ExpertWeights.of(experts.to(device)), *on(device, hidden, ids, weights))
    assert ran == "triton", "the kernel ran, not the grouped fallback"
    assert out.dtype == dtype and out.shape == hidden.shape and out.device.type == device.type
    assert int(rows) == int(keep.sum())
    out = out.cpu()
    assert torch.all(out[0] == 0), "a token with every expert masked gets exactly zero"
    if keep.any():
        assert torch.isfinite(out).all()
        expected = float64_reference(experts.cpu(), hidden, ids, weights)
        assert relative_error(out, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_expert_masked_computes_nothing(device, dtype):
    experts = small_experts(dtype, device)
    hidden, ids, weights, _ = masked_routing(experts, 7, 3, seed=7, dtype=dtype)
    sentinel = torch.full_like(ids, experts.num_experts)
    with torch.no_grad():
        out, rows, _ = get_backend("triton", device)(
            ExpertWeights.of(experts), *on(device, hidden, sentinel, weights)
        )
    assert int(rows) == 0
    assert torch.equal(out.cpu(), torch.zeros_like(hidden))


def test_alignment_drops_masked_pairs():
    generator = torch.Generator().manual_seed(0)
    num_experts, block_m = 5, 4
    ids = torch.randint(0, num_experts + 1, (23, 3), generator=generator)  # id 5 = masked
    aligned = align_kept_pairs(ids, num_experts, block_m)
    num_pairs = ids.numel()
    used = int(aligned.num_padded)
    assert used % block_m == 0
    rows = aligned.sorted_pairs[:used]
    real = rows[rows < num_pairs]
    kept = (ids.reshape(-1) < num_experts).nonzero().flatten()
    assert sorted(real.tolist()) == kept.tolist(), "every kept pair exactly once, no masked pair"
    assert int(aligned.num_kept) == kept.numel()
    assert torch.all(aligned.sorted_pairs[used:] == num_pairs)
    for b in range(used // block_m):
        block = rows[b * block_m : (b + 1) * block_m]
        members = block[block < num_pairs]
        assert members.numel() > 0, "no block is padding only"
        assert torch.all(ids.reshape(-1)[members.long()] == aligned.block_expert[b])
    assert torch.all(aligned.block_expert[used // block_m :] == -1)
    counts = torch.bincount(ids.reshape(-1), minlength=num_experts + 1)[:num_experts]
    assert used == int(((counts + block_m - 1) // block_m * block_m).sum())


def test_non_swiglu_experts_fall_back_to_grouped_and_say_so(device):
    experts = experts_of("gpt_oss")
    hidden, ids, weights, _ = masked_routing(experts, 5, 2, seed=9)
    with torch.no_grad():
        out, _, ran = get_backend("triton", device)(
            ExpertWeights.of(experts.to(device)), *on(device, hidden, ids, weights)
        )
    assert ran == "grouped"
    assert relative_error(out.cpu(), float64_reference(experts.cpu(), hidden, ids, weights)) < 1e-5


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3"])
def test_is_swiglu_accepts_transformers_silu_experts(family):
    assert is_swiglu(ExpertWeights.of(experts_of(family)))


def test_is_swiglu_accepts_vllm_silu_experts(device):
    """The view the vLLM plugin builds on vLLM's w13 [E, 2I, H] / w2 [E, H, I] (the layout vLLM
    loads, and transformers 5.x stores): declared SwiGLU, and the kernel computes transformers'
    experts on it."""
    experts = small_experts(torch.float32)
    weights = ExpertWeights.swiglu(experts.gate_up_proj, experts.down_proj)
    assert is_swiglu(weights)
    hidden, ids, routing, _ = masked_routing(experts, 9, 3, seed=5, kept_share=0.7)
    expected = float64_reference(experts, hidden, ids, routing)  # transformers' own gate, in float64
    on_device = ExpertWeights.swiglu(experts.gate_up_proj.to(device), experts.down_proj.to(device))
    with torch.no_grad():
        out, _, ran = get_backend("triton", device)(on_device, *on(device, hidden, ids, routing))
    assert ran == "triton"
    assert relative_error(out.cpu(), expected) < TOLERANCE[torch.float32]


def test_is_swiglu_refuses_other_gates():
    assert not is_swiglu(ExpertWeights.of(experts_of("gpt_oss"))), "clamped, interleaved, biased GLU"
    gelu = small_experts(torch.float32)
    gelu.act_fn = torch.nn.GELU()  # transformers' default gate, another activation
    assert not is_swiglu(ExpertWeights.of(gelu))
    silu = small_experts(torch.float32)
    biased = ExpertWeights.swiglu(
        silu.gate_up_proj, silu.down_proj, torch.zeros(silu.gate_up_proj.shape[:2]), None
    )
    assert not is_swiglu(biased), "the kernel has no bias terms"


def test_interpreter_is_what_ran_without_a_gpu(device):
    from triton.runtime.interpreter import InterpretedFunction

    interpreted = all(
        isinstance(k, InterpretedFunction) for k in triton_backend._kernels(device.type == "cpu")
    )
    assert interpreted == (device.type == "cpu")


def test_block_config_grows_with_the_batch():
    assert block_config(8, torch.bfloat16).block_m == 16
    assert block_config(4096, torch.bfloat16).block_m == 64


@pytest.mark.cpu_only
def test_unavailable_without_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BeamError, match="'triton' cannot run here"):
        get_backend("triton")


def test_no_tokens_at_all(device):
    experts = small_experts(torch.float32, device)
    hidden = torch.randn(0, 80, device=device)
    ids = torch.zeros(0, 3, dtype=torch.long, device=device)
    out, rows, _ = get_backend("triton", device)(
        ExpertWeights.of(experts), hidden, ids, torch.zeros(0, 3, device=device)
    )
    assert out.shape == (0, 80) and int(rows) == 0
