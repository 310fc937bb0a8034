"""The Triton kernels of `shards/moe_kernels.py` (imported only where they run: Triton is optional)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def silu_mul_kernel(src_ptr, out_ptr, scale_ptr, hidden, row_stride, SCALED: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < hidden
    gate = tl.load(src_ptr + row * row_stride + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(src_ptr + row * row_stride + hidden + cols, mask=ok, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # rounded as torch's silu rounds
    act = (silu * up).to(dtype)
    if SCALED:
        act = (act.to(tl.float32) * tl.load(scale_ptr + row).to(tl.float32)).to(dtype)
    tl.store(out_ptr + row * hidden + cols, act, mask=ok)


@triton.jit
def combine_kernel(
    ys_ptr, inverse_ptr, local_ptr, weight_ptr, out_ptr, dim, n_local, K: tl.constexpr, BLOCK: tl.constexpr
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < dim
    dtype = out_ptr.dtype.element_ty
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for choice in tl.static_range(K):
        pair = token * K + choice
        if tl.load(local_ptr + pair) < n_local:
            row = tl.load(inverse_ptr + pair).to(tl.int64)
            y = tl.load(ys_ptr + row * dim + cols, mask=ok, other=0.0).to(tl.float32)
            weighted = (y * tl.load(weight_ptr + pair).to(tl.float32)).to(dtype)  # rounded as torch's product
            total += weighted.to(tl.float32)
    tl.store(out_ptr + token * dim + cols, total.to(dtype), mask=ok)
