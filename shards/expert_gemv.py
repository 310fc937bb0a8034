"""Experts for a decode step of 1-3 tokens: a GEMV that reads only the chosen experts' weights.

At batch 1 a Mixtral layer reads two experts (2 x 352 MB at the real shape) for one token, so the step is bound by
memory bandwidth. `torch._grouped_mm` reads them at about 2 TB/s of the H200's 4.3 there (bench/NOTES.md): its
tiles are built for many rows. These two Triton kernels stream each chosen expert's rows once, in long
coalesced loads, with the expert index read on the device (no host sync, so a CUDA graph can hold them):

- `_gate_up_kernel`: one program per (token, choice) pair and block of hidden rows computes
  silu(x . w1) * (x . w3) in float32 and stores it in the weights' dtype;
- `_down_kernel`: one program per token and block of output rows sums weight * (w2 . act) over the token's k
  choices in a fixed order (no atomics: the same bits every run). With JOINT it loads the k choices' tiles in
  the same iteration, a (k, rows, cols) tile, so twice the bytes are in flight per load (the down GEMV ran at 3.8
  TB/s where the gate/up one, loading two matrices at once, reached 4.3: `decode_profile-dot-h200.json`).

Choices of experts this group does not hold contribute nothing, as in the other paths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (rows, cols, warps) per program, chosen on an H200 with bench/expert_kernels.py (bench/NOTES.md has the sweep).
GATE_UP_TILE = (16, 128, 8)
DOWN_TILE = (4, 256, 8)
DOWN_JOINT = True  # every choice in one load: 172.7 us against 180.5 (both GEMVs, expert_kernels-joint-h200.json)


@triton.jit
def _gate_up_kernel(
    x_ptr, w13_ptr, slot_ptr, act_ptr, dim, hidden, n_local, K: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr
):
    pair = tl.program_id(0)
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < hidden
    slot = tl.load(slot_ptr + pair)
    gate = tl.zeros((ROWS, COLS), dtype=tl.float32)
    up = tl.zeros((ROWS, COLS), dtype=tl.float32)
    if slot < n_local:
        token = pair // K
        w_gate = w13_ptr + slot.to(tl.int64) * 2 * hidden * dim + rows[:, None].to(tl.int64) * dim
        w_up = w_gate + hidden * dim
        for start in range(0, dim, COLS):
            cols = start + tl.arange(0, COLS)
            ok = row_ok[:, None] & (cols < dim)[None, :]
            xv = tl.load(x_ptr + token * dim + cols, mask=cols < dim, other=0.0).to(tl.float32)[None, :]
            gate += tl.load(w_gate + cols[None, :], mask=ok, other=0.0).to(tl.float32) * xv
            up += tl.load(w_up + cols[None, :], mask=ok, other=0.0).to(tl.float32) * xv
    g = tl.sum(gate, axis=1)
    act = g * tl.sigmoid(g) * tl.sum(up, axis=1)
    tl.store(act_ptr + pair * hidden + rows, act.to(act_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _down_kernel(
    act_ptr,
    w2_ptr,
    slot_ptr,
    weight_ptr,
    out_ptr,
    dim,
    hidden,
    n_local,
    K: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    JOINT: tl.constexpr,
    K_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < dim
    if JOINT:  # every choice's tile in one (K_PAD, ROWS, COLS) load
        c = tl.arange(0, K_PAD)
        pairs = token * K + c
        slots = tl.load(slot_ptr + pairs, mask=c < K, other=n_local)
        held = slots < n_local  # (K_PAD,)
        tiles = w2_ptr + slots.to(tl.int64)[:, None, None] * dim * hidden + rows.to(tl.int64)[None, :, None] * hidden
        tile_ok = held[:, None, None] & row_ok[None, :, None]
        acc3 = tl.zeros((K_PAD, ROWS, COLS), dtype=tl.float32)
        for start in range(0, hidden, COLS):
            cols = start + tl.arange(0, COLS)
            col_ok = cols < hidden
            a = tl.load(act_ptr + pairs[:, None] * hidden + cols[None, :], mask=held[:, None] & col_ok[None, :])
            w3 = tl.load(tiles + cols[None, None, :], mask=tile_ok & col_ok[None, None, :], other=0.0)
            acc3 += w3.to(tl.float32) * a.to(tl.float32)[:, None, :]
        weight = tl.load(weight_ptr + pairs, mask=held, other=0.0).to(tl.float32)
        total = tl.sum(tl.sum(acc3, axis=2) * weight[:, None], axis=0)
    else:
        total = tl.zeros((ROWS,), dtype=tl.float32)
        for choice in range(K):
            pair = token * K + choice
            slot = tl.load(slot_ptr + pair)
            if slot < n_local:
                acc = tl.zeros((ROWS, COLS), dtype=tl.float32)
                w = w2_ptr + slot.to(tl.int64) * dim * hidden + rows[:, None].to(tl.int64) * hidden
                for start in range(0, hidden, COLS):
                    cols = start + tl.arange(0, COLS)
                    ok = row_ok[:, None] & (cols < hidden)[None, :]
                    a = tl.load(act_ptr + pair * hidden + cols, mask=cols < hidden, other=0.0).to(tl.float32)
                    acc += tl.load(w + cols[None, :], mask=ok, other=0.0).to(tl.float32) * a[None, :]
                total += tl.sum(acc, axis=1) * tl.load(weight_ptr + pair).to(tl.float32)
    tl.store(out_ptr + token * dim + rows, total.to(out_ptr.dtype.element_ty), mask=row_ok)


def expert_gemv(
    x: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    gate_up_tile: tuple[int, int, int] = GATE_UP_TILE,
    down_tile: tuple[int, int, int] = DOWN_TILE,
    down_joint: bool = DOWN_JOINT,
) -> torch.Tensor:
    """x: (tokens, dim); slots: (tokens, k) local expert index, len(w13) where not held; weights: (tokens, k);
    w13: (n, 2 * hidden, dim); w2: (n, dim, hidden). Returns (tokens, dim) in x's dtype. `down_joint`: the down
    kernel loads every choice's tile at once (JOINT)."""
    tokens, k = slots.shape
    n_local, dim, hidden = w2.shape[0], w2.shape[1], w2.shape[2]
    x, slots, weights = x.contiguous(), slots.contiguous(), weights.contiguous()
    act = torch.empty(tokens * k, hidden, dtype=w13.dtype, device=x.device)
    out = torch.empty(tokens, dim, dtype=x.dtype, device=x.device)
    rows, cols, warps = gate_up_tile
    _gate_up_kernel[(tokens * k, triton.cdiv(hidden, rows))](
        x, w13, slots, act, dim, hidden, n_local, K=k, ROWS=rows, COLS=cols, num_warps=warps
    )
    rows, cols, warps = down_tile
    _down_kernel[(tokens, triton.cdiv(dim, rows))](
        act, w2, slots, weights, out, dim, hidden, n_local,
        K=k, ROWS=rows, COLS=cols, JOINT=down_joint, K_PAD=triton.next_power_of_2(k), num_warps=warps,
    )  # fmt: skip
    return out
