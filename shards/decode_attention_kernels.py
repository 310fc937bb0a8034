"""The Triton kernels of `shards/decode_attention.py` (imported only where they run: Triton is optional).

`run_attention`: one program per (sequence, KV head, run of `rows` buffer rows). Its products are float32 on the CUDA
cores (a (group, BLOCK, head_dim) tile, fine for a few programs), or with DOT on the tensor cores (the group padded to
16 query rows, the weights of the softmax rounded to the cache's dtype before the product with the values, as flash
attention does; IEEE keeps float32 caches in float32). It loads the group's query heads
once (scaled, float32), then walks its rows BLOCK at a time: scores for every query head of the group against the
block's keys (rows past the sequence's filled ones are neither read nor counted: a buffer fills from its first row,
and once it wraps every row is filled), an online softmax (running max and sum), values accumulated in float32. With one
run per sequence (SINGLE) it normalises and stores the output; otherwise it stores its partial sums and `merge_runs`
combines the runs of each (sequence, KV head) with the usual rescaling by exp(max_run - max_all).

With WRITE the step's new keys and values come in beside the cache: each sequence's row `position % capacity` takes
them in the products (whatever the cache held there before), and the one run that covers that row stores them into
the cache, so no separate copy kernel runs first; no other program reads that row.

A key past the end scores -inf; the running max starts at -1e30, not -inf, so a run with no filled row adds exactly
nothing and never makes exp(-inf + inf); run 0 always holds row 0, the merge's maximum is a real score.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def run_attention(
    q_ptr,
    k_ptr,
    v_ptr,
    knew_ptr,
    vnew_ptr,
    slot_ptr,
    pos_ptr,
    out_ptr,
    acc_ptr,
    stats_ptr,
    span,
    rows,
    capacity,
    n_kv,
    scale,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    SINGLE: tl.constexpr,
    DOT: tl.constexpr,
    IEEE: tl.constexpr,
    WRITE: tl.constexpr,
):
    pair = tl.program_id(0)  # sequence * n_kv + KV head
    run = tl.program_id(1)
    runs = tl.num_programs(1)
    seq = pair // n_kv
    head = pair % n_kv
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    g_ok = g < GROUP
    q_rows = (seq * n_kv * GROUP + head * GROUP + g).to(tl.int64) * HEAD_DIM
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32) * scale
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    filled = tl.minimum(tl.load(pos_ptr + seq).to(tl.int32) + 1, capacity)  # rows 0..filled-1 hold keys
    row_stride = n_kv * HEAD_DIM  # elements between one buffer row and the next
    base = slot * capacity * row_stride + head * HEAD_DIM
    m = tl.full((GROUP_PAD,), -1e30, tl.float32)
    total = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
    start = run * rows
    end = tl.minimum(tl.minimum(start + rows, span), filled)  # a run past the filled rows reads nothing
    if WRITE:  # the step's own key and value: used from here for its row, and stored there by the run that holds it
        new_row = tl.load(pos_ptr + seq).to(tl.int64) % capacity
        new_at = (seq * n_kv + head).to(tl.int64) * HEAD_DIM + d
        k_new = tl.load(knew_ptr + new_at)
        v_new = tl.load(vnew_ptr + new_at)
        # the run whose rows hold it, or the last run for a row past them all (past the span: stored, never read)
        mine = (new_row // rows == run) | ((run == runs - 1) & (new_row >= runs * rows))
        store = tl.zeros((HEAD_DIM,), tl.int32) + mine.to(tl.int32) > 0  # the scalar as a (HEAD_DIM,) mask
        tl.store(k_ptr + base + new_row * row_stride + d, k_new, mask=store)
        tl.store(v_ptr + base + new_row * row_stride + d, v_new, mask=store)
    for first in range(start, end, BLOCK):
        r = first + tl.arange(0, BLOCK)
        ok = r < end
        offsets = base + r[:, None].to(tl.int64) * row_stride + d[None, :]
        k = tl.load(k_ptr + offsets, mask=ok[:, None], other=0.0)
        if WRITE:
            k = tl.where((r == new_row)[:, None], k_new[None, :], k)
        if DOT:  # tensor cores: the group padded to 16 query rows, q in the cache's dtype
            if IEEE:
                scores = tl.dot(q.to(k.dtype), tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q.to(k.dtype), tl.trans(k))
        else:
            scores = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)  # (GROUP_PAD, BLOCK)
        scores = tl.where(ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        rescale = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        total = total * rescale + tl.sum(p, axis=1)
        v = tl.load(v_ptr + offsets, mask=ok[:, None], other=0.0)
        if WRITE:
            v = tl.where((r == new_row)[:, None], v_new[None, :], v)
        if DOT:
            if IEEE:
                acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
        else:
            acc = acc * rescale[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        m = m_new
    if SINGLE:
        out = acc / total[:, None]
        tl.store(out_ptr + q_rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
    else:
        part = pair * runs + run
        tl.store(acc_ptr + (part * GROUP_PAD + g)[:, None] * HEAD_DIM + d[None, :], acc)
        tl.store(stats_ptr + part * 2 * GROUP_PAD + g, m)
        tl.store(stats_ptr + part * 2 * GROUP_PAD + GROUP_PAD + g, total)


@triton.jit
def merge_runs(
    acc_ptr,
    stats_ptr,
    out_ptr,
    runs,
    n_kv,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    RUNS_PAD: tl.constexpr,
):
    pair = tl.program_id(0)
    seq = pair // n_kv
    head = pair % n_kv
    j = tl.arange(0, RUNS_PAD)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    j_ok = j < runs
    part = pair * runs + j  # (RUNS_PAD,)
    m = tl.load(stats_ptr + (part * 2 * GROUP_PAD)[:, None] + g[None, :], mask=j_ok[:, None], other=-1e30)
    total = tl.load(stats_ptr + (part * 2 * GROUP_PAD + GROUP_PAD)[:, None] + g[None, :], mask=j_ok[:, None], other=0.0)
    m_all = tl.max(m, axis=0)  # (GROUP_PAD,)
    w = tl.exp(m - m_all[None, :])  # (RUNS_PAD, GROUP_PAD)
    acc_offsets = ((part[:, None] * GROUP_PAD + g[None, :]) * HEAD_DIM)[:, :, None] + d[None, None, :]
    acc = tl.load(acc_ptr + acc_offsets, mask=j_ok[:, None, None], other=0.0)
    out = tl.sum(acc * w[:, :, None], axis=0) / tl.sum(total * w, axis=0)[:, None]  # (GROUP_PAD, HEAD_DIM)
    q_rows = (seq * n_kv * GROUP + head * GROUP + g).to(tl.int64) * HEAD_DIM
    tl.store(out_ptr + q_rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None])
