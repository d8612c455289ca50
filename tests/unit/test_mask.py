import math

import pytest
import torch

from beam_moe import MaskHead, apply_mask
from beam_moe.mask import l1_regularizer, straight_through_mask


def test_zero_init_keeps_every_expert():
    head = MaskHead(16, 8)
    assert torch.equal(head.weight, torch.zeros(8, 16))
    assert head.bias is None
    z = head(torch.randn(5, 16))
    keep, hard = straight_through_mask(torch.sigmoid(z), 0.5)
    assert keep.all()
    assert torch.equal(hard, torch.ones_like(hard))


def test_head_is_float32_and_accepts_bf16_input():
    head = MaskHead(16, 8, init="normal", init_std=0.5)
    z = head(torch.randn(2, 3, 16, dtype=torch.bfloat16))
    assert z.dtype == torch.float32
    assert z.shape == (6, 8)


def test_forward_is_exactly_hard_and_backward_is_sigmoid_gradient():
    z = torch.tensor([-2.0, -0.1, 0.0, 0.3, 4.0], requires_grad=True)
    soft = torch.sigmoid(z)
    keep, hard = straight_through_mask(soft, 0.5)
    assert keep.tolist() == [False, False, True, True, True]
    assert hard.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    hard.sum().backward()
    s = torch.sigmoid(z.detach())
    torch.testing.assert_close(z.grad, s * (1 - s), rtol=0, atol=1e-7)


def test_hand_computed_gradient_reaches_mask_weights():
    """One token, H=2, E=3, K=2: out = Σ_k g_k keep_k y_k, loss = <c, out>."""
    x = torch.tensor([[1.0, 2.0]])
    head = MaskHead(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.1, -0.2], [0.3, 0.1], [-0.5, 0.2]]))
    ids = torch.tensor([[1, 2]])
    g = torch.tensor([[0.7, 0.3]])
    y = torch.tensor([[[1.0, -1.0, 2.0], [0.5, 0.5, -3.0]]])  # expert outputs per slot
    c = torch.tensor([2.0, 1.0, -1.0])

    routing = apply_mask(g, ids, head(x), 0.5)
    out = (routing.weights.unsqueeze(-1) * y).sum(dim=1)
    loss = (out * c).sum()
    loss.backward()

    # By hand: z = x W^T = [-0.3, 0.5, -0.1]; slots take experts 1 and 2: z_k = [0.5, -0.1].
    assert routing.keep.tolist() == [[True, False]]
    assert torch.allclose(routing.weights, torch.tensor([[0.7, 0.0]]))
    sig = [1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(0.1))]
    cy = [2.0 * 1.0 + 1.0 * -1.0 + -1.0 * 2.0, 2.0 * 0.5 + 1.0 * 0.5 + -1.0 * -3.0]  # <c, y_k> = [-1, 4.5]
    dz = [0.7 * cy[0] * sig[0] * (1 - sig[0]), 0.3 * cy[1] * sig[1] * (1 - sig[1])]
    expected = torch.tensor([[0.0, 0.0], [dz[0] * 1.0, dz[0] * 2.0], [dz[1] * 1.0, dz[1] * 2.0]])
    torch.testing.assert_close(head.weight.grad, expected, rtol=0, atol=1e-6)
    assert expected[2].abs().sum() > 0, "the masked slot still gets a gradient (straight-through)"


def test_l1_regularizer_is_mean_of_sigmoid_over_topk_slots():
    z = torch.tensor([[0.0, 1.0], [-1.0, 2.0]], requires_grad=True)
    soft = torch.sigmoid(z)
    reg = l1_regularizer(soft)
    torch.testing.assert_close(reg, soft.mean())
    reg.backward()
    s = torch.sigmoid(z.detach())
    torch.testing.assert_close(z.grad, s * (1 - s) / 4)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_slot_logits_equal_the_full_logits_at_the_ids(bias, id_dtype):
    """Few tokens read only the rows of W_m they need (one token: one matrix-vector product); many
    tokens use the full product. vLLM's routers give int32 ids, transformers' int64."""
    head = MaskHead(16, 8, bias=bias, init="normal", init_std=0.5)
    if bias:
        with torch.no_grad():
            head.bias.normal_()
    generator = torch.Generator().manual_seed(0)
    for tokens in (1, 3, 12):  # 2 and 6 pairs read rows (1 token by one mv), 24 uses the full product
        x = torch.randn(tokens, 16, generator=generator, dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(8, generator=generator)[:2] for _ in range(tokens)])
        expected = head(x).gather(1, ids)
        z = head.slot_logits(x, ids.to(id_dtype))
        assert z.dtype == torch.float32 and z.shape == ids.shape
        torch.testing.assert_close(z, expected, rtol=1e-6, atol=1e-6)
