"""The two Triton kernels of the "triton" expert backend (see `beam_moe.experts.triton`).

Plain functions, jitted on first use by `beam_moe.experts.triton._kernels`, so that the
interpreter (TRITON_INTERPRET=1) can be chosen after import. Rows are padded positions of the
aligned layout: each BLOCK_M block belongs to one expert, and a row holds a flat pair index
(token * K + slot) or `num_pairs` for padding, which is masked out of every load and store.

IEEE asks for full float32 products (float32 weights; torch's own matmul default) instead of tf32.
UPCAST multiplies bf16/fp16 tiles as float32, which gives the same products (a bf16 x bf16 product
is exact in float32) and is needed by triton 3.9's interpreter, whose dot multiplies the raw
16-bit patterns of bf16 operands.

Only builtins of triton.language are called (tl.full, not tl.zeros; no tl.cdiv or tl.sigmoid):
those helpers are themselves jitted when triton is imported, so they would not run under an
interpreter switched on after that import.
"""

import triton.language as tl


def gate_up_kernel(
    x_ptr,
    w_ptr,
    h_ptr,
    sorted_pairs_ptr,
    block_expert_ptr,
    num_padded_ptr,
    num_pairs,
    hidden_size,
    intermediate_size,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wk,
    stride_wn,
    stride_hm,
    stride_hn,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pairs_ptr + rows)
    row_ok = pair < num_pairs
    token = (pair // TOP_K).to(tl.int64)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < intermediate_size
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + token[:, None] * stride_xm + ks[None, :] * stride_xk
    gate_ptrs = w_ptr + expert * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    up_ptrs = gate_ptrs + intermediate_size * stride_wn
    gate = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    up = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, (hidden_size + BLOCK_K - 1) // BLOCK_K):
        k_ok = ks < hidden_size - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_mask = k_ok[:, None] & col_ok[None, :]
        g = tl.load(gate_ptrs, mask=b_mask, other=0.0)
        u = tl.load(up_ptrs, mask=b_mask, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            g = g.to(tl.float32)
            u = u.to(tl.float32)
        if IEEE:
            gate = tl.dot(a, g, gate, input_precision="ieee")
            up = tl.dot(a, u, up, input_precision="ieee")
        else:
            gate = tl.dot(a, g, gate)
            up = tl.dot(a, u, up)
        a_ptrs += BLOCK_K * stride_xk
        gate_ptrs += BLOCK_K * stride_wk
        up_ptrs += BLOCK_K * stride_wk
    h = gate / (1.0 + tl.exp(-gate)) * up
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + cols[None, :] * stride_hn
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def down_kernel(
    h_ptr,
    w_ptr,
    slots_ptr,
    routing_ptr,
    sorted_pairs_ptr,
    block_expert_ptr,
    num_padded_ptr,
    num_pairs,
    hidden_size,
    intermediate_size,
    stride_hm,
    stride_hk,
    stride_we,
    stride_wk,
    stride_wn,
    stride_sm,
    stride_sn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pairs_ptr + rows)
    row_ok = pair < num_pairs
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden_size
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + ks[None, :] * stride_hk
    b_ptrs = w_ptr + expert * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, (intermediate_size + BLOCK_K - 1) // BLOCK_K):
        k_ok = ks < intermediate_size - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:  # noqa: SIM108 (a compile-time branch; triton needs a plain `if` here)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_hk
        b_ptrs += BLOCK_K * stride_wk
    routed = tl.load(routing_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * routed[:, None]
    slot_ptrs = slots_ptr + pair[:, None].to(tl.int64) * stride_sm + cols[None, :] * stride_sn
    tl.store(slot_ptrs, acc.to(slots_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
