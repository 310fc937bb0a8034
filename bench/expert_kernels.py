"""Kernel choices for one Mixtral layer at its real shapes, timed on one GPU as CUDA graphs (as a decode step runs).

Experts: the grouped GEMMs over (token, choice) pairs sorted by expert, against every held expert on every token
as plain GEMMs (`ExpertGroup.forward_dense`) and the Triton GEMV that reads only the chosen experts
(`shards/expert_gemv.py`, for 1-3 tokens), by tokens per step; the bandwidth column divides the bytes of the
experts the step actually selects by the time. `--gemv-sweep` times the GEMV's tile shapes at one token.
Prefill attention of a 4,096-token first chunk: the masked path against the plain causal one. Prints a table,
writes a JSON result.

    python bench/expert_kernels.py --out bench/results/expert_kernels-h200.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from shards.attention import AttentionPlan, _torch_attention, prefill_bias
from shards.moe import ExpertGroup

try:
    from shards.expert_gemv import expert_gemv
except ImportError:  # no Triton here
    expert_gemv = None

DIM, HIDDEN, EXPERTS, TOP_K = 4096, 14336, 8, 2


def graph_time_us(fn, device: torch.device, repeat: int = 20) -> float:
    """Mean time of `fn` replayed as a CUDA graph (launch cost out, as in a captured decode step); eager on CPU."""
    fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        return (time.perf_counter() - t0) / 3 * 1e6
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat * 1000


def expert_group(device: torch.device, dtype: torch.dtype, dim: int, hidden: int) -> ExpertGroup:
    with torch.device("meta"):
        group = ExpertGroup(dim, hidden, list(range(EXPERTS)), EXPERTS)
    gen = torch.Generator(device=device).manual_seed(0)
    group.w13 = torch.nn.Parameter(
        torch.randn(EXPERTS, 2 * hidden, dim, device=device, dtype=dtype, generator=gen) * 0.02, requires_grad=False
    )
    group.w2 = torch.nn.Parameter(
        torch.randn(EXPERTS, dim, hidden, device=device, dtype=dtype, generator=gen) * 0.02, requires_grad=False
    )
    return group


def gemv_sweep(group: ExpertGroup, device: torch.device, dtype: torch.dtype, dim: int, expert_bytes: int) -> list:
    """The GEMV at one token with each kernel's tile varied in turn (the other at its default)."""
    from triton.runtime.errors import OutOfResources

    from shards.expert_gemv import DOWN_TILE, GATE_UP_TILE

    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(1, dim, generator=gen) * 0.5).to(device, dtype)
    ids = torch.rand(1, EXPERTS, generator=gen).topk(TOP_K, dim=-1).indices.to(device)
    weights = torch.softmax(torch.randn(1, TOP_K, generator=gen), dim=-1).to(device, dtype)
    table = group._local_index(device)
    slots = table[ids]
    rows = []
    tiles = [
        (r, c, w)
        for r, c in (
            (8, 256),
            (16, 128),
            (16, 256),
            (32, 128),
            (64, 128),
            (2, 512),
            (4, 512),
            (8, 512),
            (16, 512),
            (2, 1024),
            (4, 1024),
            (8, 1024),
        )
        for w in (4, 8)
    ]
    joint_tiles = [(r, c, w) for r, c in ((2, 512), (4, 256), (4, 512), (8, 256), (2, 1024), (8, 512)) for w in (4, 8)]
    cases = [("gate_up", t) for t in tiles] + [("down", t) for t in tiles] + [("down_joint", t) for t in joint_tiles]
    # each kernel's default again at the end: the spread between the first and the last is the sweep's noise
    cases += [("gate_up", GATE_UP_TILE), ("down", DOWN_TILE)]
    for kernel, tile in cases:
        kwargs = {
            "gate_up_tile": tile if kernel == "gate_up" else GATE_UP_TILE,
            "down_tile": tile if kernel.startswith("down") else DOWN_TILE,
            "down_joint": kernel == "down_joint",
        }
        try:
            us = graph_time_us(
                lambda kw=kwargs: expert_gemv(x, slots, weights, group.w13, group.w2, **kw), device, repeat=50
            )
        except OutOfResources as error:  # a tile too large for the registers or shared memory
            print(f"{kernel} {tile}: {type(error).__name__}", flush=True)
            continue
        rows.append(
            {
                "kernel": kernel,
                "tile": list(tile),
                "us": round(us, 1),
                "tb_per_s": round(TOP_K * expert_bytes / us / 1e6, 2),
            }
        )
        print(f"{kernel} rows {tile[0]} cols {tile[1]} warps {tile[2]}: {us:.1f} us", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/expert_kernels.json")
    parser.add_argument("--tokens", nargs="*", type=int, default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--cpu-dry-run", action="store_true")
    parser.add_argument("--gemv-sweep", action="store_true", help="time the GEMV's tile shapes at one token")
    args = parser.parse_args()
    dry = args.cpu_dry_run
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    dim, hidden = (64, 128) if dry else (DIM, HIDDEN)
    result: dict = {
        "machine": torch.cuda.get_device_name(0) if not dry else "cpu dry run",
        "torch": torch.__version__,
        "experts": [],
        "gemv_sweep": [],
        "prefill_attention": None,
    }
    group = expert_group(device, dtype, dim, hidden)
    reference = copy.deepcopy(group).float() if expert_gemv is not None else None
    expert_bytes = 3 * dim * hidden * torch.finfo(dtype).bits // 8
    gen = torch.Generator().manual_seed(1)
    print(f"{'tokens':>6} {'distinct':>8} {'grouped us':>10} {'dense us':>9} {'grouped TB/s':>12} {'dense TB/s':>10}")
    with torch.inference_mode():
        for t in args.tokens:
            x = (torch.randn(t, dim, generator=gen) * 0.5).to(device, dtype)
            ids = torch.rand(t, EXPERTS, generator=gen).topk(TOP_K, dim=-1).indices.to(device)
            weights = torch.softmax(torch.randn(t, TOP_K, generator=gen), dim=-1).to(device, dtype)
            distinct = int(ids.unique().numel())
            inputs = (x, ids, weights)
            grouped = graph_time_us(lambda a=inputs: group.forward_grouped(*a), device)
            dense = graph_time_us(lambda a=inputs: group.forward_dense(*a), device)
            diff = (group.forward_grouped(*inputs).float() - group.forward_dense(*inputs).float()).abs()
            row = {
                "tokens": t,
                "distinct_experts": distinct,
                "grouped_us": round(grouped, 1),
                "dense_us": round(dense, 1),
                "grouped_tb_per_s": round(distinct * expert_bytes / grouped / 1e6, 2),
                "dense_tb_per_s": round(distinct * expert_bytes / dense / 1e6, 2),
                "max_abs_difference": float(diff.max()),
            }
            if expert_gemv is not None and t <= 3:
                slots = group._local_index(device)[ids]
                gemv = graph_time_us(lambda a=(x, slots, weights): expert_gemv(*a, group.w13, group.w2), device)
                # The reference path on float32 copies of the same bf16 values: what each kernel's rounding is
                # measured against.
                exact = reference.forward_loop(x.float(), ids, weights.float())
                error = {
                    name: float((out.float() - exact).norm() / exact.norm())
                    for name, out in (
                        ("gemv", expert_gemv(x, slots, weights, group.w13, group.w2)),
                        ("grouped", group.forward_grouped(*inputs)),
                    )
                }
                row.update(
                    gemv_us=round(gemv, 1),
                    gemv_tb_per_s=round(t * TOP_K * expert_bytes / gemv / 1e6, 2),
                    gemv_relative_error=error["gemv"],
                    grouped_relative_error=error["grouped"],
                )
            result["experts"].append(row)
            print(
                f"{t:>6} {distinct:>8} {grouped:>10.1f} {dense:>9.1f} {row['grouped_tb_per_s']:>12.2f} "
                f"{row['dense_tb_per_s']:>10.2f}"
                + (
                    f"  gemv {row['gemv_us']} us {row['gemv_tb_per_s']} TB/s, "
                    f"error {row['gemv_relative_error']:.1e} (grouped {row['grouped_relative_error']:.1e})"
                    if "gemv_us" in row
                    else ""
                ),
                flush=True,
            )
        if args.gemv_sweep and expert_gemv is not None:
            result["gemv_sweep"] = gemv_sweep(group, device, dtype, dim, expert_bytes)
        group = reference = None
        n = 256 if dry else 4096
        heads, kv_heads, head_dim = (8, 2, 16) if dry else (32, 8, 128)
        q = torch.randn(n, heads, head_dim, device=device, dtype=dtype)
        k = torch.randn(n, kv_heads, head_dim, device=device, dtype=dtype)
        v = torch.randn(n, kv_heads, head_dim, device=device, dtype=dtype)
        plan = AttentionPlan.build(prefill_bias([n], [n], n), device)
        masked_plan = AttentionPlan(plan.groups, plan.out_rows)
        causal = graph_time_us(lambda: _torch_attention(q, k, v, plan), device)
        masked = graph_time_us(lambda: _torch_attention(q, k, v, masked_plan), device)
        flops = 4 * (n * (n + 1) // 2) * heads * head_dim
        diff = (_torch_attention(q, k, v, plan).float() - _torch_attention(q, k, v, masked_plan).float()).abs().max()
        result["prefill_attention"] = {
            "tokens": n,
            "causal_us": round(causal, 1),
            "masked_us": round(masked, 1),
            "causal_tflop_per_s": round(flops / causal / 1e6, 1),
            "masked_tflop_per_s": round(flops / masked / 1e6, 1),
            "max_abs_difference": float(diff),
        }
        print("prefill attention:", result["prefill_attention"], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
