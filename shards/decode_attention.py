"""Decode attention on a GPU: one query per sequence over its rolling buffer, read in place, split over the keys.

Why a kernel of our own (issue 18, `bench/decode_profile.py` on an H200, batch 1, Mixtral layers): cuDNN's SDPA
kernel, built for many queries, took 18.9 us a layer to read ~2 MB of keys and values, with ~8 more small kernels
around it for the mask and the gather; inductor's version of the same math (the compiled decode layers) took 111 us,
as it split the softmax's reduction into three passes. Here each program reads one KV head's keys for a run of rows
once, for all the query heads that share it, with an online softmax in float32 ("flash decoding"): a split kernel
over (sequence, KV head, run of rows), then a small kernel that merges the runs. The buffers are read through the
step's slot index, so nothing is gathered first, and nothing here waits for the host, so a CUDA graph holds it.

`decode_attention` computes the function of `shards.attention.decode_attention_math` (its float32 reference): the
same mask (each buffer's filled rows), scale and grouping. On the CPU it is that function; Triton's interpreter
(TRITON_INTERPRET=1) runs the kernels on the CPU in the tests.
"""

from __future__ import annotations

import os
import sys

import torch

from shards.attention import decode_attention_math
from shards.moe import triton_installed

# (keys a block, programs to split the rows until, warps), per kind of product. Swept on an H200 in CUDA graphs
# (`decode_profile-sweep-h200.json`, Mixtral heads, 576 rows, bf16, the kernel writing the step's keys): at one
# sequence, float32 products in blocks of 16 keys over 36 runs with 2 warps took 10.2 us (run + merge) where the
# earlier (32, 264 programs, 4 warps) took 13.2; at 32 sequences the tensor cores in one run (256 programs, no
# merge) took 25.7 against 34.9 for two runs; at 128 one run either way (89.7).
CUDA_CORE_SHAPE = (16, 320, 2)
DOT_SHAPE = (64, 256, 4)


def decode_attention_backend() -> str:
    """`triton` (the kernels here, where Triton runs on the device) or `sdpa` (torch's kernel and the math):
    MISTRAL_CLUSTER_DECODE_ATTENTION, for an A/B."""
    value = os.environ.get("MISTRAL_CLUSTER_DECODE_ATTENTION", "triton")
    if value not in ("triton", "sdpa"):
        raise ValueError(f"MISTRAL_CLUSTER_DECODE_ATTENTION={value!r}: expected 'triton' or 'sdpa'")
    return value


def triton_max_seqs() -> int:
    """Most sequences a decode step of the eager layers may have for the kernels; larger steps take torch's SDPA.
    No limit by default: measured on an H200 (Mixtral, 576 rows a buffer, `decode_profile-dot-h200.json`), the
    tensor-core variant takes 76.6 us at 32 sequences and 92.4 at 128 where SDPA with its gather takes 110.9 and
    279.8 (the float32-product kernel alone had cost a one-GPU step 8 % at 32 and 20 % at 128, hence the old limit
    of 4). MISTRAL_CLUSTER_DECODE_ATTENTION_MAX_SEQS overrides (0: never), for an A/B."""
    value = os.environ.get("MISTRAL_CLUSTER_DECODE_ATTENTION_MAX_SEQS", "")
    return int(value) if value else sys.maxsize


def triton_decode_supported(device: torch.device) -> bool:
    """Whether decode steps on `device` take the Triton kernels: CUDA (or Triton's interpreter), Triton installed."""
    if decode_attention_backend() != "triton":
        return False
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return triton_installed()


def decodes_in_place(seqs: int, device: torch.device) -> bool:
    """Whether `seqs` decode rows on `device` go through the decode kernel, which reads each row's buffer in place by
    its slot index (`triton_max_seqs`, `triton_decode_supported`); else torch's attention over gathered or viewed
    buffers."""
    return 0 < seqs <= triton_max_seqs() and triton_decode_supported(device)


CUDA_CORE_MAX_SEQS = 4  # up to this many sequences the products stay on the CUDA cores in float32


def tensor_cores(seqs: int) -> bool:
    """Whether a step of `seqs` sequences takes the kernel's tensor-core products (`tl.dot`, the query group padded
    to 16 rows, 64 keys a block). Measured on an H200 (`decode_profile-dot-h200.json`, bf16, 576 rows): float32
    products on the CUDA cores 157 us at 32 sequences and 584 at 128, the tensor cores 76.6 and 92.4; at one
    sequence the padding to 16 rows costs more than it saves (102.6 against 114.7 us, launch included), so the
    CUDA cores keep steps of up to CUDA_CORE_MAX_SEQS. MISTRAL_CLUSTER_DECODE_ATTENTION_DOT: `auto` (that rule),
    `1` (always) or `0` (never), for an A/B."""
    mode = os.environ.get("MISTRAL_CLUSTER_DECODE_ATTENTION_DOT", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"MISTRAL_CLUSTER_DECODE_ATTENTION_DOT={mode!r}: expected 'auto', '0' or '1'")
    return mode == "1" or (mode == "auto" and seqs > CUDA_CORE_MAX_SEQS)


def cut_rows(span: int, block: int, runs: int) -> tuple[int, int]:
    """(rows a program reads, runs): `span` rows cut into at most `runs` runs, each a multiple of `block`."""
    blocks = -(-span // block)
    rows = -(-blocks // runs) * block
    return rows, -(-span // rows)


def split_rows(seqs: int, n_kv: int, span: int, block: int, target_programs: int) -> tuple[int, int]:
    """(rows a program reads, programs a sequence's KV head gets): few sequences get their rows cut into runs so the
    GPU has about `target_programs` programs; a multiple of `block`, decided from shapes alone (a graph's shapes are
    fixed)."""
    blocks = -(-span // block)
    return cut_rows(span, block, max(1, min(blocks, -(-target_programs // (seqs * n_kv)))))


def launch_shape(seqs: int, n_kv: int, span: int, dot: bool) -> tuple[int, int, int]:
    """(keys a block, runs a sequence's KV head, warps) of a step of `seqs` sequences."""
    block, programs, warps = DOT_SHAPE if dot else CUDA_CORE_SHAPE
    return block, split_rows(seqs, n_kv, span, block, programs)[1], warps


def decode_attention(
    q: torch.Tensor,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    capacity: int,
    span: int,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    tuning: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """q: (seqs, n_heads, head_dim); k_rows, v_rows: a layer's cache, (slots * capacity, n_kv_heads, head_dim),
    slot-major; slots: (seqs,) each sequence's slot; positions: (seqs,) the position of each sequence's new token,
    so rows below min(position + 1, capacity) are filled; span: at most this many leading rows of each buffer are
    read (`kv_cache.decode_span`, or the capacity). k_new, v_new: (seqs, n_kv_heads, head_dim), the step's keys and
    values, written at row position % capacity of each buffer (by the kernel itself, which saves two copy kernels a
    layer); without them those rows already hold them. `tuning`: (keys a block, runs a sequence's KV head, warps)
    instead of the rule here (`bench/decode_profile.py`'s sweep). Returns (seqs, n_heads, head_dim) in q's dtype."""
    seqs, n_heads, head_dim = q.shape
    n_kv = k_rows.shape[1]
    write = k_new is not None
    if not triton_decode_supported(q.device):
        if write:
            rows = slots * capacity + positions % capacity
            k_rows.index_copy_(0, rows, k_new)
            v_rows.index_copy_(0, rows, v_new)
        buffers = (-1, capacity, n_kv, head_dim)
        keys = k_rows.view(buffers)[:, :span].index_select(0, slots)
        values = v_rows.view(buffers)[:, :span].index_select(0, slots)
        filled = (positions + 1).clamp(max=capacity)
        mask = torch.arange(span, device=q.device)[None, :] < filled[:, None]
        return decode_attention_math(q, keys, values, mask.view(seqs, 1, 1, span))
    import triton

    from shards.decode_attention_kernels import merge_runs, run_attention

    group = n_heads // n_kv
    dot = tensor_cores(seqs)
    group_pad = max(16, triton.next_power_of_2(group)) if dot else triton.next_power_of_2(group)
    block, runs, warps = tuning if tuning is not None else launch_shape(seqs, n_kv, span, dot)
    rows, runs = cut_rows(span, block, runs)
    q = q.contiguous()
    out = torch.empty_like(q)
    single = runs == 1
    acc = (
        q.new_empty((1,), dtype=torch.float32)
        if single
        else q.new_empty((seqs * n_kv, runs, group_pad, head_dim), dtype=torch.float32)
    )
    stats = (
        q.new_empty((1,), dtype=torch.float32)
        if single
        else q.new_empty((seqs * n_kv, runs, 2, group_pad), dtype=torch.float32)
    )
    new_k = k_new.contiguous() if write else q  # (unread without WRITE)
    new_v = v_new.contiguous() if write else q
    run_attention[(seqs * n_kv, runs)](
        q, k_rows, v_rows, new_k, new_v, slots, positions, out, acc, stats,
        span, rows, capacity, n_kv, head_dim**-0.5,
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK=block, SINGLE=single, DOT=dot,
        IEEE=q.dtype == torch.float32, WRITE=write,
        num_warps=warps,
    )  # fmt: skip
    if not single:
        merge_runs[(seqs * n_kv,)](
            acc, stats, out, runs, n_kv,
            GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, RUNS_PAD=triton.next_power_of_2(runs),
            num_warps=4,
        )  # fmt: skip
    return out
