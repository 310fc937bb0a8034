"""Batch-1 decode, kernel by kernel: ours (the decode graph the cluster replays, eager layers and compiled ones)
beside gpt-fast's compiled step, on the same few real-shaped layers of the same random weights, in one process.

Why (issue 18): at batch 1 on one H200 our stage takes ~12 ms a token where gpt-fast's whole token takes ~10, and
fusing the small kernels with inductor saved 0.3 ms, not the 3 predicted. The eager profile in `shard_profile.py`
times launches too; this one profiles what the GPU runs inside the replays (CUPTI traces a graph's kernels), sums
the kernels by kind (expert GEMVs, other GEMMs, attention, fused Triton, elementwise) per layer, and the time no
kernel ran, for both implementations, so the gap is read kind by kind. The head and embedding are left out of both
(one-off per token, the same reads in both).

    python3 bench/decode_profile.py --layers 8 --gpt-fast .peers/gpt-fast --out $OUT/decode_profile-h200.json

`--trace-dir` also writes each profile as a Chrome trace. On CPU (`--cpu-dry-run`) it runs at tiny shapes, to check
the script; its figures mean nothing there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.shard_profile import own_stream, sync, timed
from shards.config import PRESETS, ModelConfig
from shards.random_source import write_random_checkpoint

SEED, STD = 0, 0.02
PROMPT_TOKENS = 512

# kernel name patterns, first match wins: what each kind of kernel is, in both implementations
KINDS = (
    ("expert_gemv", re.compile(r"expert|gemv_kernel|_moe_|^_gate_up_kernel|^_down_kernel", re.I)),
    ("attention", re.compile(r"flash|fmha|cudnn|sdpa|attention|softmax|^run_attention|^merge_runs", re.I)),
    ("gemm", re.compile(r"gemm|gemv|cutlass|nvjet|sm90_xmma|splitk|cublas|mm_", re.I)),
    ("triton_fused", re.compile(r"^triton_|triton", re.I)),
    ("copy", re.compile(r"copy|memcpy|memset|fill", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|reduce|index|gather|scatter|cat|where|topk|sort", re.I)),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def kernel_profile(fn, device: torch.device, layers: int, steps: int, trace: Path | None) -> dict:
    """`steps` calls of `fn` under the profiler: each kernel's time per layer and per step, summed by kind, and the
    share of the steps' wall time in which no kernel ran."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        wall = time.perf_counter() - t0
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    if device.type != "cuda":
        return {"wall_ms_per_step": round(1000 * wall / steps, 3), "kernels": []}
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    busy = sum(e.self_device_time_total for e in kernels)  # us over all steps
    by_kind: dict[str, float] = {}
    launches: dict[str, int] = {}
    for e in kernels:
        k = kind_of(e.key)
        by_kind[k] = by_kind.get(k, 0.0) + e.self_device_time_total
        launches[k] = launches.get(k, 0) + e.count
    per_layer = steps * layers
    return {
        "wall_ms_per_step": round(1000 * wall / steps, 3),
        "kernel_us_per_step": round(busy / steps, 1),
        "kernel_us_per_layer": round(busy / per_layer, 2),
        "kernels_per_layer": round(sum(e.count for e in kernels) / per_layer, 1),
        "idle_share": round(max(0.0, 1 - busy / (1e6 * wall)), 3),
        "by_kind_us_per_layer": {k: round(v / per_layer, 2) for k, v in sorted(by_kind.items(), key=lambda x: -x[1])},
        "launches_per_layer": {k: round(v / per_layer, 1) for k, v in launches.items()},
        "kernels": [
            {
                "name": e.key[:120],
                "kind": kind_of(e.key),
                "per_layer": round(e.count / per_layer, 2),
                "us_per_layer": round(e.self_device_time_total / per_layer, 2),
                "us_each": round(e.self_device_time_total / max(1, e.count), 2),
            }
            for e in kernels[:40]
        ],
    }


def ours(
    name: str, ckpt: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, compiled: bool, trace_dir
) -> dict:
    """Our decode graph over the shard's layers at batch 1, replayed as the stage replays it: the step's layout built
    on the host, the token embedded, the graph replayed."""
    from router.step import StepPlan
    from shards.checkpoint import CheckpointReader, ShardSelection
    from shards.compiled_decode import CompiledDecode
    from shards.decode_attention import decode_attention_backend
    from shards.decode_graphs import DecodeGraphs
    from shards.host_copy import to_device
    from shards.kv_cache import RollingKVCache, StepLayout, cache_capacity
    from shards.model import TransformerShard

    shard = TransformerShard.from_checkpoint(CheckpointReader(ckpt), ShardSelection.whole(cfg), dtype, device)
    layers = len(shard.layers)
    capacity = cache_capacity(cfg.sliding_window, cfg.max_seq_len)
    cache = RollingKVCache(list(range(layers)), 1, capacity, cfg.n_kv_heads, cfg.head_dim, dtype, device)
    plen = min(PROMPT_TOKENS, capacity // 2)
    prompt = StepPlan([0], [0], [plen], torch.randint(3, cfg.vocab_size, (plen,)))
    t_compile = 0.0
    fused = None
    if compiled:
        t0 = time.perf_counter()
        torch._dynamo.reset()  # compiled afresh: the settings read while tracing (MISTRAL_CLUSTER_COMPILE_CUBLAS) count
        fused = CompiledDecode(shard, cache, (1,))
        fused.warm_up()
        t_compile = time.perf_counter() - t0
    graphs = DecodeGraphs(shard, cache, replay="cuda" if device.type == "cuda" else "eager", compiled=fused)
    position = [plen]

    def layout_for(plan):
        return StepLayout.build(plan, capacity, cfg.sliding_window, cfg.head_dim, cfg.rope_theta, device)

    def step():
        # the position stays put: each step rewrites the same cache row and reads the same span (a fixed graph key)
        plan = StepPlan([0], position, [1], torch.randint(3, cfg.vocab_size, (1,)))
        h = shard.embed(to_device(plan.token_ids, None, device))
        return graphs.run(h, layout_for(plan), None)

    with torch.inference_mode(), own_stream(device):
        shard.run_layers(shard.embed(to_device(prompt.token_ids, None, device)), layout_for(prompt), cache)
        seconds = timed(step, device, repeat=20, warmup=3)
        trace = Path(trace_dir) / f"{name}.json" if trace_dir else None
        profile = kernel_profile(step, device, layers, 10, trace)
    out = {
        "attention": decode_attention_backend(),
        "implementation": "DecodeGraphs replay" + (" of CompiledDecode layers" if compiled else " of eager layers"),
        "captures": graphs.captures,
        "replays": graphs.replays,
        "compile_s": round(t_compile, 1) if compiled else None,
        "step_ms": round(1000 * seconds, 3),
        "us_per_layer": round(1e6 * seconds / layers, 1),
        "profile": profile,
    }
    return out


def kernel_check(cfg: ModelConfig, device: torch.device) -> list[dict]:
    """The decode attention kernel alone at the model's head shape, against the float32 math on the same buffers
    (relative error) and against torch's SDPA path (time a call, CUDA events over 50 calls), per batch and span."""
    cases = ((1, 576), (32, 576), (128, 576), (1, 4000), (128, 320))
    return [
        kernel_case(cfg, device, batch, filled, dtype)
        for batch, filled in cases
        for dtype in (torch.bfloat16, torch.float32)
    ]


def kernel_case(cfg: ModelConfig, device: torch.device, batch: int, filled: int, dtype: torch.dtype) -> dict:
    from shards.attention import AttentionPlan, _decode_attention, decode_attention_math
    from shards.decode_attention import decode_attention

    cap = max(1024, filled)
    gen = torch.Generator(device).manual_seed(batch)
    shape = (batch * cap, cfg.n_kv_heads, cfg.head_dim)
    k_rows = torch.randn(shape, generator=gen, device=device).to(dtype)
    v_rows = torch.randn(shape, generator=gen, device=device).to(dtype)
    q = torch.randn(batch, cfg.n_heads, cfg.head_dim, generator=gen, device=device).to(dtype)
    slots = torch.randperm(batch, device=device)
    positions = torch.full((batch,), filled - 1, device=device)
    span = min(cap, -(-filled // 64) * 64)
    view = (-1, cap, cfg.n_kv_heads, cfg.head_dim)
    keys, values = k_rows.view(view)[:, :span][slots], v_rows.view(view)[:, :span][slots]
    mask = (torch.arange(span, device=device) < filled).expand(batch, 1, 1, span)
    exact = decode_attention_math(q.double(), keys.double(), values.double(), mask)
    os.environ["MISTRAL_CLUSTER_DECODE_ATTENTION"] = "triton"

    def triton_path():  # the float32 products on the CUDA cores (MISTRAL_CLUSTER_DECODE_ATTENTION_DOT=0)
        os.environ["MISTRAL_CLUSTER_DECODE_ATTENTION_DOT"] = "0"
        try:
            return decode_attention(q, k_rows, v_rows, slots, positions, cap, span)
        finally:
            os.environ.pop("MISTRAL_CLUSTER_DECODE_ATTENTION_DOT")

    plan = AttentionPlan.for_decode([filled] * batch, cap, device)

    def sdpa_path():  # as the eager layers run it: the buffers gathered by slot, then torch's kernel
        ks = k_rows.view(view)[:, :span].index_select(0, slots)
        vs = v_rows.view(view)[:, :span].index_select(0, slots)
        return _decode_attention(q, ks, vs, plan)

    def error(out: torch.Tensor) -> float:
        return float((out.double() - exact).abs().max() / exact.abs().max())

    def dot_path():  # the tensor-core products (MISTRAL_CLUSTER_DECODE_ATTENTION_DOT=1)
        os.environ["MISTRAL_CLUSTER_DECODE_ATTENTION_DOT"] = "1"
        try:
            return decode_attention(q, k_rows, v_rows, slots, positions, cap, span)
        finally:
            os.environ.pop("MISTRAL_CLUSTER_DECODE_ATTENTION_DOT")

    row = {"batch": batch, "filled": filled, "span": span, "dtype": str(dtype), "relative_error": error(triton_path())}
    row["dot_relative_error"] = error(dot_path())
    if dtype == torch.bfloat16:
        row["sdpa_vs_exact"] = error(sdpa_path())  # slots in random order: the buffers gathered, as when serving
        for name, fn in (("triton_us", triton_path), ("triton_dot_us", dot_path), ("sdpa_us", sdpa_path)):
            for _ in range(3):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(50):
                fn()
            end.record()
            end.synchronize()
            row[name] = round(1000 * start.elapsed_time(end) / 50, 2)
    return row


def attention_sweep(cfg: ModelConfig, device: torch.device, filled: int = 576) -> list[dict]:
    """The decode attention kernel's launch shape, swept: (keys a block, runs a sequence's KV head, warps) at 1, 32
    and 128 sequences, bf16, the step's keys written by the kernel (as the layers call it). Each case is 20 calls
    captured in one CUDA graph and replayed, so the time is the kernels' (run + merge) and the gaps between them, not
    the host's launches; `default` marks the shape the rule in `shards.decode_attention` picks."""
    from bench.expert_kernels import graph_time_us
    from shards.decode_attention import decode_attention, launch_shape, tensor_cores

    dtype, cap, calls = torch.bfloat16, max(1024, filled), 20
    span = min(cap, -(-filled // 64) * 64)
    rows_out = []
    for batch in (1, 32, 128):
        gen = torch.Generator(device).manual_seed(batch)
        shape = (batch * cap, cfg.n_kv_heads, cfg.head_dim)
        k_rows = torch.randn(shape, generator=gen, device=device).to(dtype)
        v_rows = torch.randn(shape, generator=gen, device=device).to(dtype)
        q = torch.randn(batch, cfg.n_heads, cfg.head_dim, generator=gen, device=device).to(dtype)
        k_new = torch.randn(batch, cfg.n_kv_heads, cfg.head_dim, generator=gen, device=device).to(dtype)
        v_new = torch.randn_like(k_new)
        slots = torch.arange(batch, device=device)
        positions = torch.full((batch,), filled - 1, device=device)
        dot = tensor_cores(batch)
        default = launch_shape(batch, cfg.n_kv_heads, span, dot)
        runs0 = default[1]
        blocks = (32, 64, 128) if dot else (16, 32, 64)
        runs_options = sorted({1, 2, 4, 9, 18, 36, runs0}) if batch == 1 else sorted({1, 2, 3, 5, runs0})
        cases = [(b, r, w) for b in blocks for r in runs_options for w in ((1, 2, 4) if not dot else (4, 8))]
        reference = decode_attention(q, k_rows, v_rows, slots, positions, cap, span, k_new, v_new, default).float()
        for case in cases:
            if case[1] * case[0] > span * 2 and case[1] > 1:
                continue  # runs so short most of each block is past the span
            row = {"batch": batch, "block": case[0], "runs": case[1], "warps": case[2], "default": case == default}
            try:
                args = (q, k_rows, v_rows, slots, positions, cap, span, k_new, v_new, case)
                row["max_difference"] = float((decode_attention(*args).float() - reference).abs().max())

                def calls_of(args=args):
                    for _ in range(calls):
                        decode_attention(*args)

                row["us"] = round(graph_time_us(calls_of, device, repeat=5) / calls, 2)
            except Exception as e:  # noqa: BLE001 - a shape the kernel cannot take: recorded, the sweep goes on
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows_out.append(row)
            print(row, flush=True)
    return rows_out


def gpt_fast(root: Path, ckpt: Path, cfg: ModelConfig, device: torch.device, dtype, trace_dir) -> dict:
    """gpt-fast's compiled decode step on the same layers (`bench/peer_gpt_fast.py`): its whole step (embedding,
    layers, head, argmax) per token; its kernels, the head's GEMV among them."""
    from bench.peer_gpt_fast import INDUCTOR_FLAGS, GptFast

    compile_ = device.type == "cuda"
    peer = GptFast.build(root, ckpt, dtype, device, cfg.max_seq_len, compile=compile_)
    prompt = torch.randint(3, cfg.vocab_size, (min(PROMPT_TOKENS, cfg.max_seq_len // 2),)).tolist()
    t0 = time.perf_counter()
    peer.generate(prompt[:16], 10)  # compiles and records its graph
    first_s = time.perf_counter() - t0
    peer.prefill(prompt)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    token = torch.tensor([[5]], dtype=torch.int, device=device)
    pos = torch.tensor([len(prompt)], dtype=torch.int, device=device)

    def step():
        return peer.decode(peer.model, token, pos)

    with torch.no_grad(), torch._inductor.config.patch(INDUCTOR_FLAGS), sdpa_kernel(SDPBackend.MATH):
        seconds = timed(step, device, repeat=20, warmup=3)
        trace = Path(trace_dir) / "gpt-fast.json" if trace_dir else None
        profile = kernel_profile(step, device, cfg.n_layers, 10, trace)
    return {
        "implementation": "gpt-fast decode_one_token, torch.compile reduce-overhead fullgraph",
        "commit": peer.commit,
        "first_call_s": round(first_s, 1),
        "step_ms": round(1000 * seconds, 3),
        "us_per_layer_incl_head": round(1e6 * seconds / cfg.n_layers, 1),
        "profile": profile,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mixtral-8x7b", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--gpt-fast", type=Path, default=None, help="a pytorch-labs/gpt-fast checkout (the peer)")
    parser.add_argument("--no-compiled", action="store_true", help="skip our compiled layers")
    parser.add_argument("--trace-dir", default=None)
    parser.add_argument("--out", default="bench/results/decode_profile.json")
    parser.add_argument("--cpu-dry-run", action="store_true")
    parser.add_argument(
        "--runs",
        nargs="*",
        default=None,
        help="only these of ours, ours_sdpa, ours_compiled, ours_compiled_inductor_gemv",
    )
    parser.add_argument("--no-kernel-check", action="store_true", help="skip the attention kernel against SDPA")
    parser.add_argument(
        "--attention-sweep", action="store_true", help="the attention kernel's launch shapes at 1, 32, 128 sequences"
    )
    args = parser.parse_args()
    dry = args.cpu_dry_run or not torch.cuda.is_available()
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    cfg = replace(PRESETS[args.model], n_layers=args.layers, max_seq_len=1024)
    if dry:
        from bench.gpu_scale import dry_config

        cfg = replace(dry_config(cfg), n_layers=args.layers, max_seq_len=64)
    torch.manual_seed(SEED)
    result: dict = {
        "model": args.model,
        "layers": args.layers,
        "batch": 1,
        "prompt_tokens": PROMPT_TOKENS,
        "device": torch.cuda.get_device_name() if not dry else "cpu",
        "torch": torch.__version__,
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_random_checkpoint(Path(tmp) / "ckpt", cfg, SEED, STD)
        # (name, compiled layers, MISTRAL_CLUSTER_DECODE_ATTENTION, MISTRAL_CLUSTER_COMPILE_CUBLAS)
        runs = [("ours", False, "triton", "1"), ("ours_sdpa", False, "sdpa", "1")]
        if not args.no_compiled:  # the output projection and gate through cuBLAS, and through inductor's reductions
            runs += [("ours_compiled", True, "triton", "1"), ("ours_compiled_inductor_gemv", True, "triton", "0")]
        runs = [r for r in runs if args.runs is None or r[0] in args.runs]
        for name, compiled, attention, cublas in runs:
            os.environ["MISTRAL_CLUSTER_DECODE_ATTENTION"] = attention
            os.environ["MISTRAL_CLUSTER_COMPILE_CUBLAS"] = cublas
            try:
                result["runs"][name] = ours(name, ckpt, cfg, device, dtype, compiled, args.trace_dir)
            except Exception as e:  # noqa: BLE001 - record it, go on with the others
                result["runs"][name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print(name, json.dumps(result["runs"][name])[:1500], flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if device.type == "cuda" and args.attention_sweep:
            os.environ["MISTRAL_CLUSTER_DECODE_ATTENTION"] = "triton"
            try:
                result["attention_sweep"] = attention_sweep(cfg, device)
            except Exception as e:  # noqa: BLE001
                result["attention_sweep"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        if device.type == "cuda" and not args.no_kernel_check:
            try:
                result["kernel_check"] = kernel_check(cfg, device)
            except Exception as e:  # noqa: BLE001
                result["kernel_check"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print("kernel_check", json.dumps(result["kernel_check"]), flush=True)
            os.environ["MISTRAL_CLUSTER_DECODE_ATTENTION"] = "triton"
        if args.gpt_fast:
            try:
                result["runs"]["gpt_fast"] = gpt_fast(args.gpt_fast, ckpt, cfg, device, dtype, args.trace_dir)
            except Exception as e:  # noqa: BLE001
                result["runs"]["gpt_fast"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print("gpt_fast", json.dumps(result["runs"]["gpt_fast"])[:1500], flush=True)
    result["commit"] = os.popen("git rev-parse HEAD 2>/dev/null").read().strip() or None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))


def summary(result: dict) -> str:
    """Per layer, side by side: each kind's kernel time and the step's time."""
    runs = {k: v for k, v in result["runs"].items() if "profile" in v}
    kinds = sorted({k for v in runs.values() for k in v["profile"].get("by_kind_us_per_layer", {})})
    lines = ["us per layer      " + "".join(f"{k:>16}" for k in runs)]
    for kind in kinds:
        cells = (v["profile"]["by_kind_us_per_layer"].get(kind, 0) for v in runs.values())
        lines.append(f"{kind:<18}" + "".join(f"{c:>16}" for c in cells))
    for field in ("kernel_us_per_layer", "kernels_per_layer", "idle_share", "wall_ms_per_step"):
        lines.append(f"{field:<18}" + "".join(f"{v['profile'].get(field, '-'):>16}" for v in runs.values()))
    lines.append(f"{'step_ms':<18}" + "".join(f"{v['step_ms']:>16}" for v in runs.values()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
