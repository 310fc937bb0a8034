"""The Triton kernels of `shards/layer_kernels.py` (imported only where they run: Triton is optional)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, out_ptr, dim, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < dim
    x_raw = tl.load(x_ptr + row * dim + cols, mask=ok, other=0.0)
    x = x_raw.to(tl.float32)
    mean_square = tl.sum(x * x, axis=0) / dim
    normed = (x * tl.rsqrt(mean_square + eps)).to(x_raw.dtype).to(tl.float32)  # rounded as `x32.to(x.dtype)`
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * dim + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, token_stride, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, HEADS)
    d = tl.arange(0, HEAD_DIM)
    half = HEAD_DIM // 2
    partner = tl.where(d < half, d + half, d - half)  # rotate-half: (-x[d + half], x[d - half])
    ok = (h < heads)[:, None]
    row = x_ptr + token * token_stride + h[:, None] * HEAD_DIM
    x = tl.load(row + d[None, :], mask=ok, other=0.0)
    other = tl.load(row + partner[None, :], mask=ok, other=0.0).to(tl.float32)
    rotated = tl.where((d < half)[None, :], -other, other)
    dtype = x.dtype
    cos = tl.load(cos_ptr + token * HEAD_DIM + d).to(dtype).to(tl.float32)[None, :]  # rounded as `cos.to(x.dtype)`
    sin = tl.load(sin_ptr + token * HEAD_DIM + d).to(dtype).to(tl.float32)[None, :]
    a = (x.to(tl.float32) * cos).to(dtype).to(tl.float32)  # each product rounded, then the sum: as torch's three ops
    b = (rotated * sin).to(dtype).to(tl.float32)
    out = out_ptr + token * heads * HEAD_DIM + h[:, None] * HEAD_DIM + d[None, :]
    tl.store(out, (a + b).to(dtype), mask=ok)


@triton.jit
def band_merge_kernel(
    own_ptr, own_lse_ptr, rev_ptr, rev_lse_ptr, whole_ptr, whole_lse_ptr, out_ptr,
    tokens, seen, heads, own_sh, own_st, rev_sh, rev_st, whole_sh, whole_st,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_WHOLE: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, HEADS)
    d = tl.arange(0, HEAD_DIM)
    ok_h = h < heads
    own = tl.load(own_ptr + h[:, None] * own_sh + i * own_st + d[None, :], mask=ok_h[:, None], other=0.0)
    own_lse = tl.load(own_lse_ptr + h * tokens + i, mask=ok_h, other=0.0)
    cached = ok_h & (h * 0 + i < seen)  # the first `seen` queries also saw cached keys, in the pieces' reversed rows
    r = tl.maximum(seen - 1 - i, 0)
    rev = tl.load(rev_ptr + h[:, None] * rev_sh + r * rev_st + d[None, :], mask=cached[:, None], other=0.0)
    rev_lse = tl.load(rev_lse_ptr + h * seen + r, mask=cached, other=float("-inf"))
    whole_lse = tl.full([HEADS], float("-inf"), tl.float32)
    if HAS_WHOLE:
        whole_lse = tl.load(whole_lse_ptr + h * seen + r, mask=cached, other=float("-inf"))
    top = tl.maximum(tl.maximum(own_lse, rev_lse), whole_lse)
    w_own, w_rev, w_whole = tl.exp(own_lse - top), tl.exp(rev_lse - top), tl.exp(whole_lse - top)
    acc = own.to(tl.float32) * w_own[:, None] + rev.to(tl.float32) * w_rev[:, None]
    if HAS_WHOLE:
        whole = tl.load(whole_ptr + h[:, None] * whole_sh + r * whole_st + d[None, :], mask=cached[:, None], other=0.0)
        acc += whole.to(tl.float32) * w_whole[:, None]
    out = acc / (w_own + w_rev + w_whole)[:, None]
    tl.store(out_ptr + i * heads * HEAD_DIM + h[:, None] * HEAD_DIM + d[None, :], out.to(own.dtype), mask=ok_h[:, None])
