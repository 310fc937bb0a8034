"""Where a decode step's time goes inside one shard: a few real-shaped layers in this process, CUDA events around
attention and the feed-forward, the profiler's top kernels, and one prompt's first chunk against the FLOP floor.
`bench/gpu_scale.py` runs it once per model, before the placements."""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.ceilings import prefill_flops
from shards.config import ModelConfig
from shards.host_copy import to_device
from shards.random_source import write_random_checkpoint


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def own_stream(device: torch.device):
    """Run on a stream of its own, as a worker runs its steps: a CUDA graph cannot be captured on the default
    stream (the capture fails, `DecodeGraphs` keeps the shape eager, and a "graphed" profile times eager launches:
    one session's profiles did). Ordered after the work queued before it, and the work after it after it."""
    if device.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream(device).wait_stream(stream)


def timed(fn, device: torch.device, repeat: int, warmup: int = 2) -> float:
    """Seconds per call of `fn`, the device synchronised around `repeat` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeat


def profile_components(
    cfg: ModelConfig, device: torch.device, batches: list[int], layers: int, tmp: Path, seed: int, std: float
) -> dict:
    """A few real-shaped layers in this process: GPU time of attention and of the feed-forward (CUDA events around
    each module, idle gaps waiting for the host included, as in a real step), the whole step's wall time, and the
    profiler's top kernels for one decode step."""
    from router.step import StepPlan
    from shards.checkpoint import CheckpointReader, ShardSelection
    from shards.kv_cache import RollingKVCache, StepLayout, cache_capacity
    from shards.model import TransformerShard

    small = replace(cfg, n_layers=layers, max_seq_len=1024)
    ckpt = write_random_checkpoint(tmp / f"profile-{layers}", small, seed, std)
    selection = ShardSelection.whole(small)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shard = TransformerShard.from_checkpoint(CheckpointReader(ckpt), selection, dtype, device)
    capacity = cache_capacity(small.sliding_window, small.max_seq_len)
    out = {"layers": layers}
    events: dict[str, list] = {"attention": [], "ffn": []}
    hooks = []
    for layer in shard.layers.values():
        ffn = layer.block_sparse_moe.experts if small.is_moe else layer.mlp  # the MoE block's experts: what runs
        for kind, module in (("attention", layer.self_attn), ("ffn", ffn)):

            def pre(_m, _a, kind=kind):
                if device.type == "cuda":
                    e = torch.cuda.Event(enable_timing=True)
                    e.record()
                    events[kind].append([e, None])

            def post(_m, _a, _o, kind=kind):
                if device.type == "cuda":
                    e = torch.cuda.Event(enable_timing=True)
                    e.record()
                    events[kind][-1][1] = e

            hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    for b in batches:
        cache = RollingKVCache(list(range(layers)), b, capacity, small.n_kv_heads, small.head_dim, dtype, device)
        plen = min(512, capacity)
        prefill = StepPlan(list(range(b)), [0] * b, [plen] * b, torch.randint(3, small.vocab_size, (b * plen,)))
        decode = StepPlan(list(range(b)), [plen] * b, [1] * b, torch.randint(3, small.vocab_size, (b,)))

        def step(batch, cache=cache):
            layout = StepLayout.build(batch, capacity, small.sliding_window, small.head_dim, small.rope_theta, device)
            h = shard.embed(to_device(batch.token_ids, None, device))
            h = shard.run_layers(h, layout, cache)
            return shard.logits(h[-1:])

        with torch.inference_mode():
            step(prefill)
            for _ in range(3):
                step(decode)
            sync(device)
            for v in events.values():
                v.clear()
            t0 = time.perf_counter()
            for _ in range(5):
                step(decode)
            sync(device)
            wall = (time.perf_counter() - t0) / 5
            row = {"step_ms": round(1000 * wall, 3), "step_ms_per_layer": round(1000 * wall / layers, 3)}
            for kind, pairs in events.items():
                if pairs:
                    row[f"{kind}_ms_per_layer"] = round(sum(a.elapsed_time(z) for a, z in pairs) / len(pairs), 4)
            for v in events.values():
                v.clear()
            row["top_ops"], prof = top_ops(lambda d=decode: step(d), device)
            row["host_syncs"] = host_syncs(prof)
            for v in events.values():
                v.clear()
            row["graphed"] = profile_graphed_decode(shard, cache, decode, small, capacity, device)
            for v in events.values():
                v.clear()
        out[f"batch_{b}"] = row
        cache = None
    out["prefill_4096"] = profile_prefill(shard, small, device, dtype, 4096)
    out["prefill_4096_after_12288"] = profile_prefill(shard, small, device, dtype, 4096, cached=12288)
    for h in hooks:
        h.remove()
    cases = MIXED_CASES if device.type == "cuda" else [(6, 2, 8, 12)]
    out["mixed"] = [profile_mixed(shard, small, device, dtype, *case) for case in cases]
    shard = None
    return out


def profile_graphed_decode(shard, cache, decode, cfg: ModelConfig, capacity: int, device: torch.device) -> dict:
    """The decode step as the cluster runs it, replayed from a CUDA graph (`shards/decode_graphs.py`): the replay's
    time per layer, the kernels inside it (the profiler traces a graph's kernels), and how much of the replay no
    kernel ran. The eager figures above time the launches too; inside a graph what is left is kernels and the gaps
    between them, which is where a captured stage's time must be looked for (issue 18: the compiled layers cut 0.3
    ms of a 12 ms stage)."""
    from shards.compiled_decode import CompiledDecode, compile_requested
    from shards.decode_graphs import DecodeGraphs
    from shards.kv_cache import StepLayout

    compiled = None
    if compile_requested():  # MISTRAL_CLUSTER_COMPILE=1: the layers as the cluster then runs them
        compiled = CompiledDecode(shard, cache, (len(decode.slots),))
        compiled.warm_up()
    graphs = DecodeGraphs(shard, cache, replay="cuda" if device.type == "cuda" else "eager", compiled=compiled)
    layers = len(shard.layers)

    def step():
        layout = StepLayout.build(decode, capacity, cfg.sliding_window, cfg.head_dim, cfg.rope_theta, device)
        h = shard.embed(to_device(decode.token_ids, None, device))
        return graphs.run(h, layout, None)

    with torch.inference_mode(), own_stream(device):
        wall = timed(step, device, repeat=10, warmup=3)  # the first warm-up runs eagerly and is captured
        ops, prof = top_ops(step, device, n=16)
    out = {
        "compiled": compiled is not None,
        "captures": graphs.captures,  # 0: every step ran eagerly, and the figures below are not a replay's
        "replays": graphs.replays,
        "step_ms_per_layer": round(1000 * wall / layers, 4),
        "top_ops": ops,
    }
    if device.type == "cuda":
        kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.self_device_time_total for e in kernels)
        out["kernels"] = sum(e.count for e in kernels)
        out["kernel_us_per_layer"] = round(busy_us / layers, 2)
        out["idle_share"] = round(max(0.0, 1 - busy_us / (1e6 * wall)), 3) if wall > 0 else None
    return out


# (running sequences, new prompts, prompt tokens, running context): the steps of a served run at 128 and 32 streams
# when requests arrive, 64-token prompts (bench/NOTES.md, 2026-12-01: such steps took ten decode steps' time).
MIXED_CASES = [(112, 16, 64, 300), (22, 10, 64, 300)]


def profile_mixed(
    shard,
    cfg: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    running: int,
    prompts: int,
    plen: int,
    ctx: int,
    repeat: int = 3,
) -> dict:
    """A step that carries new prompts beside running sequences, as a served step does when requests arrive: its
    time against a decode-only step of the same running sequences plus a prefill-only step of the same prompts
    (the layers eager, as the cluster runs such steps), the host syncs in it, its top kernels, and how far the
    running rows' outputs are from the decode-only step's (the same function: only rounding may differ). Host-bound
    steps (few running rows) vary run to run: `repeat` times each step that many times."""
    from router.step import StepPlan
    from shards.kv_cache import RollingKVCache, StepLayout, cache_capacity

    capacity = cache_capacity(cfg.sliding_window, cfg.max_seq_len)
    slots = list(range(running + prompts))
    layers = [int(i) for i in shard.layers]
    cache = RollingKVCache(layers, len(slots), capacity, cfg.n_kv_heads, cfg.head_dim, dtype, device)
    gen = torch.Generator().manual_seed(running)

    def ids(n: int) -> torch.Tensor:
        return torch.randint(3, cfg.vocab_size, (n,), generator=gen)

    def run(plan: StepPlan) -> torch.Tensor:
        layout = StepLayout.build(plan, capacity, cfg.sliding_window, cfg.head_dim, cfg.rope_theta, device)
        return shard.run_layers(shard.embed(to_device(plan.token_ids, None, device)), layout, cache)

    decode = StepPlan(slots[:running], [ctx] * running, [1] * running, ids(running))
    prefill = StepPlan(slots[running:], [0] * prompts, [plen] * prompts, ids(prompts * plen))
    mixed = StepPlan(
        decode.slots + prefill.slots,
        decode.starts + prefill.starts,
        decode.lengths + prefill.lengths,
        torch.cat([torch.as_tensor(decode.token_ids), torch.as_tensor(prefill.token_ids)]),
    )
    with torch.inference_mode():
        chunk = min(ctx, capacity)
        for first in range(0, running, 16):  # the running sequences' contexts: 16 prompts a step, in chunks
            part = slots[first : first + 16]
            for start in range(0, ctx, chunk):
                n = min(chunk, ctx - start)
                run(StepPlan(part, [start] * len(part), [n] * len(part), ids(len(part) * n)))
        alone = run(decode)[:running].float()
        together = run(mixed)[:running].float()
        diff = float((together - alone).abs().max() / alone.abs().max().clamp(min=1e-30))
        # per row: in bf16 a near-tie between two experts may round the other way in one of the two steps, and
        # that token's row then differs wholly (measured on an H200: float32 agrees to 6e-6 on every path)
        by_row = (together - alone).abs().amax(dim=1) / alone.abs().amax(dim=1).clamp(min=1e-30)
        times = {name: timed(lambda p=plan: run(p), device, repeat=repeat, warmup=1) for name, plan in
                 (("mixed", mixed), ("decode", decode), ("prefill", prefill))}  # fmt: skip
        ops, prof = top_ops(lambda: run(mixed), device)
    per_layer = {f"{k}_ms_per_layer": round(1000 * v / len(layers), 3) for k, v in times.items()}
    return {
        "running": running,
        "prompts": prompts,
        "prompt_tokens": plen,
        "context": ctx,
        "repeat": repeat,
        **per_layer,
        "mixed_over_parts": round(times["mixed"] / (times["decode"] + times["prefill"]), 3),
        "running_rows_relative_diff": diff,
        "running_rows_median_diff": float(by_row.median()),
        "running_rows_over_5_percent": round(float((by_row > 0.05).float().mean()), 4),
        "host_syncs": host_syncs(prof),
        "top_ops": ops,
    }


def profile_prefill(
    shard, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, tokens: int, cached: int = 0
) -> dict:
    """One prompt's chunk of `tokens` after `cached` tokens of it (0: its first chunk) through the profile's layers:
    wall time against the FLOP floor, and the top kernels. A long prompt's later chunks attend the window's cached
    keys beside their own, which a first chunk never does."""
    from router.step import StepPlan
    from shards.kv_cache import RollingKVCache, StepLayout, cache_capacity

    if device.type != "cuda":  # tiny: a chunk of at most the window, after at most two more
        tokens = min(64, cfg.sliding_window or 64)
        cached = min(cached, 2 * tokens)
    layers = len(shard.layers)
    capacity = min(cache_capacity(cfg.sliding_window, cfg.max_seq_len), tokens + cached)
    cache = RollingKVCache([int(i) for i in shard.layers], 1, capacity, cfg.n_kv_heads, cfg.head_dim, dtype, device)

    def step(start: int, n: int):
        plan = StepPlan([0], [start], [n], torch.randint(3, cfg.vocab_size, (n,)))
        layout = StepLayout.build(plan, capacity, cfg.sliding_window, cfg.head_dim, cfg.rope_theta, device)
        return shard.run_layers(shard.embed(to_device(plan.token_ids, None, device)), layout, cache)

    with torch.inference_mode():
        for start in range(0, cached, tokens):  # the cached part, in chunks as the scheduler sends them
            step(start, min(tokens, cached - start))
        wall = timed(lambda: step(cached, tokens), device, repeat=3, warmup=1)
        ops, _ = top_ops(lambda: step(cached, tokens), device)
    whole = prefill_flops(replace(cfg, n_layers=1), cached + tokens) - prefill_flops(replace(cfg, n_layers=1), cached)
    return {
        "tokens": tokens,
        "cached": cached,
        "ms_per_layer": round(1000 * wall / layers, 3),
        "layer_flops": whole,
        "tflop_per_s": round(whole * layers / wall / 1e12, 1),
        "top_ops": ops,
    }


def host_syncs(prof: torch.profiler.profile) -> int:
    """Calls in a profile that made the host wait for the device."""
    waits = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::item", "aten::_local_scalar_dense")
    return sum(e.count for e in prof.key_averages() if e.key in waits)


def top_ops(run, device: torch.device, n: int = 12) -> tuple[list[dict], torch.profiler.profile]:
    """The profiler over one call of `run`: its `n` costliest ops (device time on GPU, host time on CPU)."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU]
        + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    ) as prof:
        run()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    return [
        {
            "name": e.key[:80],
            "calls": e.count,
            "us": round(getattr(e, key, 0), 1),
            "cpu_us": round(e.self_cpu_time_total, 1),
        }
        for e in averages[:n]
    ], prof
