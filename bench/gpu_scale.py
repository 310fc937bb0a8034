"""Real scale on GPUs: Mixtral 8x7B, Mistral 7B and Mixtral 8x22B shapes, ours against transformers and against
the hardware.

One script, one run (under 10 minutes on two H200s; placements needing more GPUs than the host has are skipped;
Mixtral 8x22B, 262 GiB of weights, runs only its four-GPU placements):

1. The hardware's limits, measured here: HBM bandwidth of every GPU (a large device-to-device copy, bytes read +
   written, and a sum, bytes read) and the bf16 matmul rate (8192^3).
2. For each model, Hugging Face transformers (bf16, sdpa attention, its default experts, layers split evenly in
   order over `--hf-gpus` GPUs by its own device map; 4 for Mixtral 8x22B) on random weights drawn by tensor name
   (`shards/random_source.py`), so it holds exactly the weights our shards make on their own GPUs: decode
   throughput at batch 1/8/32/128 with 512-token prompts, time to first token for 4k and 16k prompts, and which
   experts its gates pick.
3. Ours, for each placement YAML in deploy/examples/ (checkpoint swapped for the random one): the same numbers,
   peak memory per GPU, KV bytes per sequence at 16k tokens, expert load, time per component. Decode tokens/s is
   read from the traced decode steps of `--repeats` generate calls (median and spread of the per-call means),
   the wall-clock difference of a 64-token and a 1-token call kept beside it as a cross-check.
4. Each placement's ceiling (`bench/ceilings.py`): the bytes each GPU must read per decode step under that
   placement over the measured bandwidth; a figure above it is refused (an error in the row, not a result).
   Ours is reported over the ceiling and over the one-GPU placement at the same batch. Prefill: FLOPs / matmul
   rate.

    PYTHONPATH=. python bench/gpu_scale.py --out bench/results/gpu_scale-2xh200.json   # --cpu-dry-run checks it

`--cpu-dry-run` runs the same placements at tiny shapes of the same structure on CPU, on a local Ray that claims
four GPUs: the workers are grouped exactly as on the GPU host, and each computes on the CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from bench.ceilings import (
    ceiling,
    checked_decode_figures,
    prefill_flops,
    traces_from_clock,
    uniform_distinct_experts,
    weight_bytes,
)
from bench.shard_profile import profile_components, sync, timed
from shards.config import PRESETS, ModelConfig, load_config
from shards.kv_cache import cache_capacity
from shards.random_source import random_tensor, write_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "deploy" / "examples"
PLACEMENTS = {  # name -> (example YAML, GPUs it needs, models it applies to)
    "one_gpu": ("mistral-7b-1gpu.yaml", 1, ("mistral", "mixtral")),
    "two_stages": ("mixtral-2gpu-stages.yaml", 2, ("mistral", "mixtral")),
    "two_stages_ahead": ("mixtral-2gpu-stages-ahead.yaml", 2, ("mistral", "mixtral")),  # the last stage feeds the first
    "two_expert_groups": ("mixtral-2gpu-experts.yaml", 2, ("mixtral",)),
    "two_expert_halves": ("mixtral-2gpu-expert-halves.yaml", 2, ("mixtral",)),
    "two_expert_parts": ("mixtral-2gpu-expert-parts.yaml", 2, ("mixtral",)),  # uneven: 56 % on the stage's GPU
    "two_expert_halves_overlap": ("mixtral-2gpu-expert-halves-overlap.yaml", 2, ("mixtral",)),  # two-batch overlap
    "mixed": ("mixtral-2gpu-mixed.yaml", 2, ("mixtral",)),
    # Mixtral 8x22B does not fit one or two H200s: its placements are for four, their layer ranges its 56 layers.
    "four_stages": ("mixtral-8x22b-4gpu-stages.yaml", 4, ("mixtral-8x22b",)),
    "four_expert_groups": ("mixtral-8x22b-4gpu-experts.yaml", 4, ("mixtral-8x22b",)),
    "two_by_two": ("mixtral-8x22b-4gpu-mixed.yaml", 4, ("mixtral-8x22b",)),
}
MODELS = {"mixtral": "mixtral-8x7b", "mistral": "mistral-7b", "mixtral-8x22b": "mixtral-8x22b"}
# Each model's figures are also reported over one placement's at the same batch: one GPU where the model fits one.
BASELINE = {"mixtral": "one_gpu", "mistral": "one_gpu", "mixtral-8x22b": "four_stages"}
DRY_GPUS = 4  # the logical GPUs of the dry run's Ray: enough for every placement
SEED, STD = 0, 0.02


class Deadline:
    """The run must end under the device's 10-minute limit with its JSON written: later phases are skipped."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# --- the hardware's limits ---------------------------------------------------------------------------------------


def measure_hardware(devices: list[torch.device], dry: bool) -> dict:
    """Every device's bandwidth (a copy: read + written; a sum: read only) and the first one's bf16 matmul rate."""
    n = (64 << 20) if dry else (4 << 30)  # bytes copied
    per_device = []
    for device in devices:
        src = torch.empty(n // 2, dtype=torch.bfloat16, device=device).normal_()
        dst = torch.empty_like(src)
        copy_s = timed(lambda s=src, d=dst: d.copy_(s), device, repeat=10)
        read_s = timed(lambda s=src: s.sum(dtype=torch.float32), device, repeat=10)
        per_device.append({"device": str(device), "copy_bytes_per_s": 2 * n / copy_s, "read_bytes_per_s": n / read_s})
        src = dst = None  # free before the next device and the matmul
    size = 1024 if dry else 8192
    a = torch.randn(size, size, dtype=torch.bfloat16, device=devices[0])
    b = torch.randn(size, size, dtype=torch.bfloat16, device=devices[0])
    mm_s = timed(lambda: a @ b, devices[0], repeat=10, warmup=3)
    a = b = None
    return {
        "copy_bytes": n,
        "hbm_bytes_per_s": per_device[0]["copy_bytes_per_s"],
        "hbm_note": "device-to-device copy, read + written, first device",
        "bandwidth_per_device": per_device,
        "ceiling_bytes_per_s": max(max(d["copy_bytes_per_s"], d["read_bytes_per_s"]) for d in per_device),
        "ceiling_bandwidth_note": "the fastest of copy and sum on any device: what the placement ceilings divide by",
        "matmul_size": size,
        "bf16_flop_per_s": 2 * size**3 / mm_s,
    }


# --- GPU memory, watched from outside the shards ---------------------------------------------------------------------


class MemoryWatch:
    """Peak memory in use on each GPU (every process on it), sampled every 20 ms by NVML or torch."""

    def __init__(self, n_gpus: int) -> None:
        self.n = n_gpus
        self.peak = [0] * n_gpus
        self._stop = threading.Event()
        self.read = self._reader()
        self._thread = threading.Thread(target=self._run, daemon=True)
        # memory in use when the watch started: the level `wait_until_gpus_free` waits for
        self.idle = [self.read(i) for i in range(n_gpus)]
        if n_gpus:
            self._thread.start()

    def _reader(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(self.n)]
            return lambda i: pynvml.nvmlDeviceGetMemoryInfo(handles[i]).used
        except Exception:  # noqa: BLE001 - no NVML: torch's view (same numbers, a CUDA context per GPU)

            def used(i: int) -> int:
                free, total = torch.cuda.mem_get_info(i)
                return total - free

            return used

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for i in range(self.n):
                self.peak[i] = max(self.peak[i], self.read(i))

    def take(self) -> list[float]:
        """Peak GiB per GPU since the last call."""
        out = [round(p / 2**30, 2) for p in self.peak]
        self.peak = [self.read(i) for i in range(self.n)] if self.n else []
        return out

    def stop(self) -> None:
        self._stop.set()


# --- transformers on the same weights ------------------------------------------------------------------------------


def hf_tensor_for(name: str, shape: tuple[int, ...], cfg: ModelConfig, device, dtype) -> torch.Tensor:
    """A transformers parameter, made from our tensors by name (its stacked experts = our per-expert tensors)."""

    def ours(n, s):
        return random_tensor(n, s, SEED, STD, dtype, device)

    d, h = cfg.dim, cfg.hidden_dim
    if name.endswith("mlp.experts.gate_up_proj"):
        p = name.removesuffix("mlp.experts.gate_up_proj") + "block_sparse_moe.experts."
        return torch.stack(
            [
                torch.cat([ours(f"{p}{e}.w1.weight", (h, d)), ours(f"{p}{e}.w3.weight", (h, d))])
                for e in range(cfg.num_experts)
            ]
        )
    if name.endswith("mlp.experts.down_proj"):
        p = name.removesuffix("mlp.experts.down_proj") + "block_sparse_moe.experts."
        return torch.stack([ours(f"{p}{e}.w2.weight", (d, h)) for e in range(cfg.num_experts)])
    if cfg.is_moe and name.endswith("mlp.gate.weight"):
        return ours(name.replace("mlp.gate.weight", "block_sparse_moe.gate.weight"), shape)
    return ours(name, shape)


def build_hf(ckpt: Path, cfg: ModelConfig, devices: list[torch.device], dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.from_pretrained(ckpt)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype)
    n = len(devices)

    def device_of(param: str) -> torch.device:
        if param.startswith("model.layers."):
            return devices[int(param.split(".")[2]) * n // cfg.n_layers]
        return devices[0] if param.startswith("model.embed_tokens") else devices[-1]

    for name, p in list(model.named_parameters()):
        module_name, leaf = name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        t = hf_tensor_for(name, tuple(p.shape), cfg, device_of(name), dtype)
        module._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
    rotary = model.model.rotary_emb
    with devices[0]:  # its tables are computed at construction; the meta copies hold nothing
        model.model.rotary_emb = type(rotary)(config=hf_cfg)
    device_map = {
        "model.embed_tokens": devices[0].index or 0,
        "model.rotary_emb": devices[0].index or 0,
        "model.norm": devices[-1].index or 0,
        "lm_head": devices[-1].index or 0,
    }
    device_map.update({f"model.layers.{i}": device_of(f"model.layers.{i}.x").index or 0 for i in range(cfg.n_layers)})
    if n > 1:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map=device_map)
    return model.eval(), {
        "attn_implementation": model.config._attn_implementation,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "device_map": f"layers split evenly in order over {n} devices" if n > 1 else "one device",
    }


def hf_generate(model, prompts: torch.Tensor, n: int, stopping_criteria=None) -> None:
    with torch.inference_mode():
        model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            stopping_criteria=stopping_criteria,
        )


def hf_clocked(model, prompts: torch.Tensor, n: int, devices: list[torch.device]) -> list[float]:
    """Generate `n` tokens, reading the clock after each one (a stopping criterion that never stops): n - 1 decode
    steps between n readings. It waits for the GPUs, as generate's own end-of-sequence check already does."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    times: list[float] = []

    class Clock(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
            for d in devices:
                sync(d)
            times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    hf_generate(model, prompts, n, StoppingCriteriaList([Clock()]))
    return times


def hf_routing(model, cfg: ModelConfig, prompts: torch.Tensor) -> dict:
    """Distinct experts per layer per decode step, and tokens per expert, from its gates (an untimed pass)."""
    counts = torch.zeros(cfg.n_layers, cfg.num_experts, dtype=torch.long)
    distinct: list[int] = []
    batch = prompts.shape[0]
    hooks = []
    for i, layer in enumerate(model.model.layers):

        def hook(_module, _inputs, out, i=i):
            ids = out[2].reshape(-1).cpu()
            counts[i] += torch.bincount(ids, minlength=cfg.num_experts)
            if ids.numel() == batch * cfg.num_experts_per_tok:  # a decode step
                distinct.append(int(ids.unique().numel()))

        hooks.append(layer.mlp.gate.register_forward_hook(hook))
    try:
        hf_generate(model, prompts, 4)
    finally:
        for h in hooks:
            h.remove()
    return {"distinct_experts_per_layer": sum(distinct) / max(1, len(distinct)), "tokens_per_expert": counts.tolist()}


def one_stage(name: str, ckpt: Path, cfg: ModelConfig):
    """A placement of every layer in one stage on one GPU: the ceiling of a model whose layers run in order."""
    from cluster.placement import PlacementPlan, StageSpec, validate_against_model

    return validate_against_model(
        PlacementPlan(name, str(ckpt), "bfloat16", "pack", (StageSpec(0, None, {"GPU": 1.0}),)), cfg
    )


def run_hf(ckpt: Path, cfg: ModelConfig, devices, args, prompts_for, deadline: Deadline, hw: dict) -> dict:
    out: dict = {"decode": {}, "ttft_s": {}, "routing": {}}
    model, out["setup"] = build_hf(ckpt, cfg, devices, torch.bfloat16 if not args.cpu_dry_run else torch.float32)
    # Its layers run one after the other, on one GPU or split over several: the ceiling of one stage on one GPU.
    whole = one_stage("transformers", ckpt, cfg)
    first, dry = devices[0], args.cpu_dry_run
    try:
        hf_generate(model, prompts_for(1, 16).to(first), 2)  # warm-up
        last = None  # (batch, seconds) of the previous batch: predicts this one's time
        for b in args.batches:
            guess = 0.0 if last is None else last[1] * b / last[0]  # eager: it does scale
            if deadline.left() < 60 + guess:
                out["decode"][str(b)] = {"skipped": f"time budget (expected {guess:.0f} s)"}
                continue
            prompts = prompts_for(b, args.prompt_tokens).to(first)
            try:
                t1 = _wall(lambda p=prompts: hf_generate(model, p, 1), first)
                runs, walls = [], []
                for _ in range(args.hf_repeats):
                    sync(first)
                    t = time.perf_counter()
                    runs.append(traces_from_clock(b, hf_clocked(model, prompts, args.new_tokens, devices)))
                    walls.append(time.perf_counter() - t)
                last = (b, t1 + sum(walls))
                if cfg.is_moe:
                    out["routing"][str(b)] = hf_routing(model, cfg, prompts)
                context = args.prompt_tokens + args.new_tokens / 2
                limit = ceiling(
                    whole, cfg, b, context, distinct_experts(cfg, out, b), hw["ceiling_bytes_per_s"], 4 if dry else 2
                )
                out["decode"][str(b)] = checked_decode_figures(
                    f"transformers b={b}", b, runs, walls, t1, args.new_tokens, limit
                )
            except torch.OutOfMemoryError as e:  # Mixtral's batch-128 prefill beside its weights on one GPU
                out["decode"][str(b)] = {"error": f"OutOfMemoryError: {str(e)[:300]}"}
            free_cuda_memory(devices)
        for n in args.ttft_tokens:
            if deadline.left() < 60:
                out["ttft_s"][str(n)] = None
                continue
            prompt = prompts_for(1, n).to(first)
            try:
                out["ttft_s"][str(n)] = min(_wall(lambda p=prompt: hf_generate(model, p, 1), first) for _ in range(2))
            except torch.OutOfMemoryError as e:  # a long prompt beside the weights on one GPU: record it
                out["ttft_s"][str(n)] = None
                out.setdefault("errors", {})[f"ttft {n}"] = f"OutOfMemoryError: {str(e)[:300]}"
            free_cuda_memory(devices)
    finally:
        model = None  # free its memory before ours start, also after a failure (the traceback holds the frames)
        free_cuda_memory(devices)
    return out


def run_gpt_fast(ckpt: Path, cfg: ModelConfig, device: torch.device, args, prompts_for, hw: dict, hf: dict) -> dict:
    """gpt-fast's model on the same weights, batch-1 decode timed as ours (`bench/peer_gpt_fast.py`)."""
    from bench.peer_gpt_fast import GptFast, measure

    dtype = torch.float32 if args.cpu_dry_run else torch.bfloat16
    limit = ceiling(
        one_stage("gpt-fast", ckpt, cfg),
        cfg,
        1,
        args.prompt_tokens + args.new_tokens / 2,
        distinct_experts(cfg, hf, 1),
        hw["ceiling_bytes_per_s"],
        dtype.itemsize,
    )
    peer = None
    try:
        t0 = time.perf_counter()
        context = args.prompt_tokens + args.new_tokens
        peer = GptFast.build(Path(args.gpt_fast), ckpt, dtype, device, context, args.gpt_fast_compile == "on")
        load_s = time.perf_counter() - t0
        out = measure(peer, prompts_for, args.prompt_tokens, args.new_tokens, args.repeats, limit)
        out["load_s"] = round(load_s, 1)
        return out
    finally:
        peer = None  # its weights and its CUDA graphs' pool go before ours load
        torch._dynamo.reset()
        free_cuda_memory([device])


def free_cuda_memory(devices) -> None:
    """Collect what the last phase left (a failed phase's traceback cycle holds tensors) and give its cached blocks
    back to the driver: the shard processes started next need that memory."""
    gc.collect()
    for d in devices:
        if d.type == "cuda":
            with torch.cuda.device(d):
                torch.cuda.empty_cache()


def _wall(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# --- ours ------------------------------------------------------------------------------------------------------------


def placement_yaml(
    name: str, ckpt: Path, batch_cap: int, chunk: int, max_seqs: int, token_budget: int, dry: bool, tmp: Path
) -> Path:
    """The example YAML with the checkpoint swapped for the random one and the batch knobs set for this run."""
    spec = yaml.safe_load((EXAMPLES / PLACEMENTS[name][0]).read_text())
    spec.update(
        checkpoint=str(ckpt),
        max_seqs=max_seqs,
        micro_batch_size=batch_cap,
        chunk_size=chunk,
        token_budget=max(chunk, token_budget),
        dtype="float32" if dry else "bfloat16",
    )
    if dry:
        dry_cfg = load_config(ckpt)
        dry_placement(spec, dry_cfg.n_layers, dry_cfg.hidden_dim)
    path = tmp / f"{name}-{ckpt.name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def dry_placement(spec: dict, n_layers: int, hidden_dim: int) -> None:
    """The example for the dry run's tiny model, in place: the same shards and GPU fractions (so the same workers),
    a quarter CPU each (every shard fits two cores), layer ranges scaled from the example's layers to `n_layers`
    and expert row ranges (`hidden: start:stop`) from the example's rows to `hidden_dim`."""
    stages = spec["stages"] if isinstance(spec["stages"], list) else []
    groups = spec["expert_groups"] if isinstance(spec.get("expert_groups"), list) else []
    cuts = [(g, *(int(v) for v in str(g["hidden"]).split(":"))) for g in groups if ":" in str(g.get("hidden", ""))]
    rows = max((stop for _, _, stop in cuts), default=0)  # the cuts tile every row of the example's experts
    for g, start, stop in cuts:
        g["hidden"] = f"{start * hidden_dim // rows}:{stop * hidden_dim // rows}"
    for mapping in [spec, *stages, *groups]:
        if mapping is spec or "resources" in mapping:
            mapping["resources"] = {**mapping.get("resources", {"CPU": 1}), "CPU": 0.25}
    if not stages:
        return
    real = 1 + max(_layer_range(s["layers"])[1] for s in stages)  # stages cover every layer of the example's model

    def scaled(layers) -> str:
        a, b = _layer_range(layers)
        return f"{a * n_layers // real}-{(b + 1) * n_layers // real - 1}"

    for shard in stages + [g for g in groups if g.get("layers", "all") != "all"]:
        shard["layers"] = scaled(shard["layers"])


def _layer_range(layers) -> tuple[int, int]:
    """First and last layer of a contiguous run written as in a placement file: "a-b", one int, or a list."""
    if isinstance(layers, int):
        return layers, layers
    if isinstance(layers, list):
        return min(layers), max(layers)
    a, _, b = str(layers).partition("-")
    return int(a), int(b or a)


def run_ours(
    name: str,
    throughput_ckpt: Path,
    long_ckpt: Path,
    cfg: ModelConfig,
    args,
    prompts_for,
    memory,
    deadline: Deadline,
    tmp: Path,
    hw: dict,
    hf: dict,
) -> dict:
    import ray

    from cluster.profile import decode_components, step_timeline
    from cluster.router_actor import step_groups, steps_in_flight
    from cluster.sharded import ShardedCluster
    from router.sampling import SamplingParams

    row: dict = {"placement": name, "yaml": f"deploy/examples/{PLACEMENTS[name][0]}", "decode": {}, "ttft_s": {}}
    memory.take()
    batches = batches_of(name, args)
    cap = max(batches)
    budget = cap * (args.prompt_tokens + 1)  # every prompt prefills in the first step: later steps are pure decode
    chunk = min(args.chunk, cache_capacity(cfg.sliding_window, cfg.max_seq_len))  # the scheduler refuses more
    path = placement_yaml(name, throughput_ckpt, cap, chunk, cap, budget, args.cpu_dry_run, tmp)
    row["overrides"] = {
        "micro_batch_size": cap,
        "max_seqs": cap,
        "chunk_size": chunk,
        "token_budget": budget,
        "why": "one micro-batch per step: decode is bandwidth-bound and each micro-batch re-reads "
        "the weights; the step loop waits for all micro-batches, so more gain no overlap",
    }
    print(f"[{stamp()}] {name}: starting, batches {batches}", flush=True)
    t0 = time.perf_counter()
    with ShardedCluster.start(path, step_timeout_s=300.0) as cluster:
        plan = cluster.plan  # settled against the checkpoint: what each worker holds
        row["start_s"] = round(time.perf_counter() - t0, 1)
        row["shards"] = {k: list(v.gpu_ids) for k, v in cluster.locations().items()}
        workers = {id(h): h for k, h in cluster.shard_handles().items() if k.startswith("stage")}
        row["decode_paths"] = {k: v for h in workers.values() for k, v in ray.get(h.decode_paths.remote()).items()}

        def params(n: int) -> SamplingParams:
            return SamplingParams(max_tokens=n, ignore_eos=True)

        cluster.generate(prompts_for(1, 16).tolist(), params(2))  # warm-up
        last = None  # (batch, seconds) of the previous batch: predicts this one's time
        for b in batches:
            # A decode step's time grows far slower than its batch (bandwidth-bound): measured 3.0 / 8.6 / 18.6 s for
            # batches 1 / 32 / 128 on one H200; linear scaling guessed 97 s for 32 and skipped it.
            guess = 0.0 if last is None else last[1] * math.sqrt(b / last[0])
            if deadline.left() < 45 + guess:
                row["decode"][str(b)] = {
                    "skipped": f"time budget (expected {guess:.0f} s, {deadline.left():.0f} s left)"
                }
                continue
            print(f"[{stamp()}] {name}: batch {b}", flush=True)
            prompts = prompts_for(b, args.prompt_tokens).tolist()
            # Same batch size and slots as the timed runs: the decode step's CUDA graph is captured here, not there.
            # Full-length prompts: the first 512-token prefill of a batch was slow once (0.92 s against 0.13), and the
            # one-token run below is the wall-clock cross-check's t_1.
            cluster.generate(prompts_for(b, args.prompt_tokens).tolist(), params(3))
            cluster.take_traces()
            t = time.perf_counter()
            cluster.generate(prompts, params(1))
            t1 = time.perf_counter() - t
            cluster.take_traces()
            runs, walls = [], []
            for _ in range(args.repeats):
                t = time.perf_counter()
                cluster.generate(prompts, params(args.new_tokens))
                walls.append(time.perf_counter() - t)
                runs.append(cluster.take_traces())
            last = (b, t1 + sum(walls))
            context = args.prompt_tokens + args.new_tokens / 2  # the decode steps' mean context
            groups = step_groups(plan)  # the router splits the batch into this many steps in flight
            limit = ceiling(
                plan,
                cfg,
                b,
                context,
                distinct_experts(cfg, hf, b),
                hw["ceiling_bytes_per_s"],
                plan.torch_dtype.itemsize,
                groups,
            )
            row["decode"][str(b)] = checked_decode_figures(
                f"{name} b={b}", b, runs, walls, t1, args.new_tokens, limit, groups, steps_in_flight(plan)
            )
            size = -(-b // groups)  # sequences a step carries: with steps in flight, one group's
            row["decode"][str(b)]["components"] = decode_components([t for run in runs for t in run], size)
            if groups > 1:  # do the stages overlap? (the components' router share means little then)
                row["decode"][str(b)]["timeline"] = step_timeline(runs[-1], size)
        row["expert_load"] = cluster.expert_load() if cfg.is_moe else None
        # read again after the runs: the counts (replays, tokens fed back) say which path the timed steps took
        row["decode_paths"] = {k: v for h in workers.values() for k, v in ray.get(h.decode_paths.remote()).items()}
    wait_until_gpus_free(memory)
    row["peak_gib_per_gpu_throughput"] = memory.take()  # the reset reads memory after the shards are gone
    if not args.ttft_tokens:
        return row
    if deadline.left() < 60:
        row["ttft_s"] = {"skipped": "time budget"}
        return row
    chunk = ttft_chunk(name, args)
    row["ttft_chunk"] = chunk
    print(f"[{stamp()}] {name}: first token, chunks of {chunk}", flush=True)
    path = placement_yaml(name, long_ckpt, 1, chunk, 1, chunk, args.cpu_dry_run, tmp)
    with ShardedCluster.start(path, step_timeout_s=300.0) as cluster:
        cluster.generate(prompts_for(1, 16).tolist(), SamplingParams(max_tokens=2, ignore_eos=True))
        for n in args.ttft_tokens:
            prompt = prompts_for(1, n).tolist()
            times, parts = [], []
            for _ in range(2):
                cluster.take_traces()
                t = time.perf_counter()
                cluster.generate(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
                times.append(time.perf_counter() - t)
                parts.append(ttft_parts(cluster.take_traces(), times[-1]))
            row["ttft_s"][str(n)] = min(times)
            row.setdefault("ttft_parts", {})[str(n)] = parts[times.index(min(times))]
        # one worker per device: a worker holding two shards appears once
        workers = {id(h): h for k, h in cluster.shard_handles().items() if k.startswith("stage")}
        cache = sum(ray.get([h.cache_bytes.remote() for h in workers.values()]))
        row["kv_bytes_per_sequence"] = cache  # max_seqs is 1: the whole cache is one sequence's
        row["kv_bytes_if_unbounded_at_16k"] = (
            2 * cfg.n_layers * max(args.ttft_tokens) * cfg.n_kv_heads * cfg.head_dim * (4 if args.cpu_dry_run else 2)
        )
    row["peak_gib_per_gpu_long"] = memory.take()
    return row


def ttft_parts(traces, wall: float) -> dict:
    """Where a first token's time went: its steps (one a chunk; the router sends a prompt's next chunk before the
    last one is back, so they overlap) from the first one's call to the last one's return, the stages' device time
    in them (CUDA events; None on a CPU), and the rest of the call (the Ray call, scheduling, the reply)."""
    device = [r.device_seconds for t in traces for r in t.stages]
    span = max(t.returned for t in traces) - min(t.called for t in traces) if traces else 0.0
    return {
        "steps": len(traces),
        "steps_span_s": round(span, 5),
        "device_s": round(sum(device), 5) if device and None not in device else None,
        "outside_steps_s": round(wall - span, 5),
    }


def ttft_chunk(name: str, args) -> int:
    """The prefill chunk of a placement's first-token phase: --chunk for one stage (one step is fastest), the smaller
    --pipeline-chunk where several stages keep steps in flight, so a long prompt's chunks flow through them (stage 0
    on chunk k + 1 while stage 1 runs chunk k)."""
    spec = yaml.safe_load((EXAMPLES / PLACEMENTS[name][0]).read_text())
    stages = len(spec["stages"]) if isinstance(spec.get("stages"), list) else 1
    if stages == 1 or not args.pipeline_chunk:
        return args.chunk
    return min(args.chunk, args.pipeline_chunk // (8 if args.cpu_dry_run else 1))


def batches_of(name: str, args) -> list[int]:
    """The batches a placement runs: --batches and its own --placement-batches (e.g. two stages at 256, which one
    GPU cannot hold: two step groups of 128 in flight)."""
    extra = [
        int(b)
        for spec in args.placement_batches
        for p, _, bs in [spec.partition("=")]
        if p == name
        for b in bs.split(",")
    ]
    if args.cpu_dry_run:
        extra = [min(b, 8) for b in extra]
    return sorted(set(args.batches) | set(extra))


def distinct_experts(cfg: ModelConfig, hf: dict, b: int) -> float | None:
    """Distinct experts per layer a decode step of `b` sequences reaches: measured from transformers' gates on the
    same weights, else the uniform-routing expectation; None for a dense model."""
    if not cfg.is_moe:
        return None
    measured = hf.get("routing", {}).get(str(b), {}).get("distinct_experts_per_layer")
    return measured if measured is not None else uniform_distinct_experts(cfg, b)


# --- the table, the plot -------------------------------------------------------------------------------------------


def summarise(
    model: str, cfg: ModelConfig, hw: dict, hf: dict, ours: list[dict], args, peers: dict | None = None
) -> dict:
    table = []
    peers = peers or {}
    baseline = next((r for r in ours if r["placement"] == BASELINE[model]), {})
    base_batches = sorted(int(k) for k, v in baseline.get("decode", {}).items() if v.get("tokens_per_s"))
    for b in sorted({b for r in ours for b in batches_of(r["placement"], args)}):
        # Beyond the baseline's largest batch (one GPU cannot hold 256), compare with that largest batch: issue 17's
        # two stages at 256 (two groups of 128) against one GPU at 128.
        base_b = b if b in base_batches else max([x for x in base_batches if x < b], default=None)
        distinct = distinct_experts(cfg, hf, b)
        wb = weight_bytes(cfg, distinct or 0)
        limit = b / (wb["total"] / hw["hbm_bytes_per_s"])
        theirs = hf.get("decode", {}).get(str(b), {}).get("tokens_per_s")
        gpt_fast = peers.get("gpt_fast", {}).get("decode", {}).get(str(b), {}).get("tokens_per_s")
        base = baseline.get("decode", {}).get(str(base_b), {}).get("tokens_per_s")
        base_steady = baseline.get("decode", {}).get(str(base_b), {}).get("steady_tokens_per_s")
        for r in ours:
            d = r.get("decode", {}).get(str(b), {})
            if not d:
                continue
            mine, ceil = d.get("tokens_per_s"), d.get("ceiling_tokens_per_s")
            # time per output token of one sequence: every sequence gets one token per cycle of b / throughput
            tpot, base_tpot = (1e3 * b / mine if mine else None), (1e3 * base_b / base if base else None)
            table.append(
                {
                    "what": f"decode b={b}",
                    "placement": r["placement"],
                    "ours": mine,
                    "ours_min_max": [d.get("tokens_per_s_min"), d.get("tokens_per_s_max")],
                    "wall_clock": d.get("wall_tokens_per_s"),
                    "transformers": theirs,
                    "ceiling": ceil,
                    "ours_over_ceiling": mine / ceil if mine and ceil else None,
                    "ours_over_baseline": mine / base if mine and base else None,
                    "baseline_batch": base_b,
                    "steady": d.get("steady_tokens_per_s"),
                    "steady_over_baseline": d["steady_tokens_per_s"] / base_steady
                    if d.get("steady_tokens_per_s") and base_steady
                    else None,
                    "tpot_ms": tpot,
                    "tpot_over_baseline": tpot / base_tpot if tpot and base_tpot else None,
                    "limit": limit,
                    "ours_vs_limit": mine / limit if mine else None,
                    "ours_vs_transformers": mine / theirs if mine and theirs else None,
                    "gpt_fast": gpt_fast,
                    "ours_vs_gpt_fast": mine / gpt_fast if mine and gpt_fast else None,
                    "error": d.get("error") or d.get("skipped"),
                    "unit": "tokens/s",
                    "bytes_per_step": wb["total"],
                    "distinct_experts": distinct,
                }
            )
    for n in args.ttft_tokens:
        floor = prefill_flops(cfg, n) / hw["bf16_flop_per_s"]
        theirs = hf.get("ttft_s", {}).get(str(n))
        base_ttft = baseline.get("ttft_s", {}).get(str(n)) if isinstance(baseline.get("ttft_s"), dict) else None
        for r in ours:
            mine = r.get("ttft_s", {}).get(str(n)) if isinstance(r.get("ttft_s"), dict) else None
            table.append(
                {
                    "what": f"ttft {n}",
                    "placement": r["placement"],
                    "ours": mine,
                    "transformers": theirs,
                    "limit": floor,
                    "ours_vs_limit": mine / floor if mine else None,
                    "ours_vs_transformers": theirs / mine if mine and theirs else None,
                    "ours_over_baseline": mine / base_ttft if mine and base_ttft else None,
                    "chunk": r.get("ttft_chunk"),
                    "unit": "s",
                }
            )
    return {
        "model": model,
        "config": cfg.to_hf_dict(),
        "baseline": BASELINE[model],
        "transformers": hf,
        "peers": peers,
        "ours": ours,
        "table": table,
    }


def print_table(result: dict) -> None:
    def f(v: float | None, p: int = 1) -> str:
        return "-" if v is None else f"{v:.{p}f}"

    print(
        f"\n== {result['model']}: decode tokens/s: traced steps, median of runs and min-max; bytes/bandwidth ceiling; "
        f"base: {result['baseline']}"
    )
    print(
        f"{'what':<14}{'placement':<19}{'ours':>9}{'min-max':>17}{'wall':>9}{'ceiling':>10}{'ours/ceil':>10}"
        f"{'ours/base':>10}{'transf.':>9}{'vs transf.':>11}{'steady':>9}{'/base':>8}"
    )
    for t in result["table"]:
        if not t["what"].startswith("decode"):
            continue
        lo, hi = t["ours_min_max"]
        print(
            f"{t['what']:<14}{t['placement']:<19}{f(t['ours']):>9}{f(lo) + '-' + f(hi):>17}{f(t['wall_clock']):>9}"
            f"{f(t['ceiling']):>10}{f(t['ours_over_ceiling'], 3):>10}{f(t['ours_over_baseline'], 2):>10}"
            f"{f(t['transformers']):>9}{f(t['ours_vs_transformers'], 2):>11}"
            f"{f(t.get('steady')):>9}{f(t.get('steady_over_baseline'), 2):>8}"
            + (
                f"  (base at b={t['baseline_batch']}, tpot/base {f(t['tpot_over_baseline'], 2)})"
                if t.get("baseline_batch") not in (None, int(t["what"].split("=")[1]))
                else ""
            )
            + (f"  !!! {t['error']}" if t["error"] else "")
        )
    peer = result.get("peers", {}).get("gpt_fast")
    if peer:
        theirs = peer.get("decode", {}).get("1", {})
        print(
            f"gpt-fast ({peer.get('setup', {}).get('config')}), batch 1: {f(theirs.get('tokens_per_s'))} tok/s traced, "
            f"{f(theirs.get('loop_tokens_per_s'))} in its own loop"
            + (f"  !!! {peer.get('error') or theirs.get('error')}" if peer.get("error") or theirs.get("error") else "")
        )
        for t in result["table"]:
            if t.get("ours_vs_gpt_fast"):
                print(f"  ours / gpt-fast, {t['placement']} {t['what']}: {t['ours_vs_gpt_fast']:.2f}")
    print(f"\n== {result['model']}: first token, seconds (floor: FLOPs / matmul rate) ==")
    print(
        f"{'what':<14}{'placement':<19}{'ours':>9}{'transf.':>9}{'floor':>9}{'ours/floor':>11}{'ours/base':>10}  chunk"
    )
    for t in result["table"]:
        if t["what"].startswith("ttft"):
            print(
                f"{t['what']:<14}{t['placement']:<19}{f(t['ours'], 3):>9}{f(t['transformers'], 3):>9}"
                f"{f(t['limit'], 3):>9}{f(t['ours_vs_limit'], 2):>11}{f(t['ours_over_baseline'], 2):>10}  {t['chunk']}"
            )


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 4.5), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        rows = [t for t in res["table"] if t["what"].startswith("decode")]
        if not rows:  # every placement of this model failed or was skipped: its JSON says why
            ax.set_title(f"{res['model']}: no decode results")
            continue
        batches = sorted({int(t["what"].split("=")[1]) for t in rows})

        def series(key: str, placement: str | None, rows=rows, batches=batches) -> list[float]:
            ys = [
                next(
                    (t[key] for t in rows if placement in (None, t["placement"]) and t["what"] == f"decode b={b}"),
                    None,
                )
                for b in batches
            ]
            return [y or math.nan for y in ys]

        for placement in dict.fromkeys(t["placement"] for t in rows):
            (line,) = ax.plot(batches, series("ours", placement), marker="o", label=f"ours: {placement}")
            ax.plot(batches, series("ceiling", placement), ":", color=line.get_color(), label=f"ceiling: {placement}")
        ax.plot(batches, series("transformers", None), "k--", marker="x", label="transformers")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch (sequences decoding together)")
        ax.set_ylabel("output tokens / s")
        ax.set_title(f"{res['model']}: decode throughput, 512-token prompts")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- the load path ---------------------------------------------------------------------------------------------------


def time_load_path(device: torch.device, tmp: Path, dry: bool) -> dict:
    """Write a real safetensors checkpoint of a smaller real-shaped model (4 Mixtral layers) and load it back."""
    from shards.checkpoint import CheckpointReader, ShardSelection, save_checkpoint
    from shards.model import TransformerShard

    cfg = replace(PRESETS["mixtral-8x7b"], n_layers=2)
    if dry:
        cfg = replace(cfg, dim=256, hidden_dim=512, n_heads=8, n_kv_heads=2, head_dim=32, vocab_size=1000)
    selection = ShardSelection.whole(cfg)
    tensors = {
        n: random_tensor(n, s, SEED, STD, torch.bfloat16, device).cpu() for n, s in selection.tensor_shapes(cfg).items()
    }
    t0 = time.perf_counter()
    save_checkpoint(tmp / "load-path", cfg, tensors, max_shard_bytes=4 << 30)
    write_s = time.perf_counter() - t0
    nbytes = sum(t.nbytes for t in tensors.values())
    del tensors
    t0 = time.perf_counter()
    shard = TransformerShard.from_checkpoint(CheckpointReader(tmp / "load-path"), selection, torch.bfloat16, device)
    sync(device)
    load_s = time.perf_counter() - t0
    del shard
    return {
        "layers": cfg.n_layers,
        "bytes": nbytes,
        "write_s": round(write_s, 2),
        "load_s": round(load_s, 2),
        "load_gb_per_s": round(nbytes / load_s / 1e9, 2),
    }


# --- main ------------------------------------------------------------------------------------------------------------


def model_config(model: str, dry: bool, max_seq_len: int) -> ModelConfig:
    return replace(dry_config(PRESETS[MODELS[model]]) if dry else PRESETS[MODELS[model]], max_seq_len=max_seq_len)


def dry_config(cfg: ModelConfig) -> ModelConfig:
    """The same structure at tiny sizes: its experts and top-k, its query heads per KV head (8x22B's 48/8 as 6/1),
    a window only if it has one, its vocabulary; 4 layers of head_dim 16, 256 hidden."""
    group = cfg.n_heads // cfg.n_kv_heads
    kv_heads = max(1, 8 // group)
    return replace(
        cfg,
        dim=kv_heads * group * 16,
        n_layers=4,
        n_heads=kv_heads * group,
        n_kv_heads=kv_heads,
        head_dim=16,
        hidden_dim=256,
        sliding_window=64 if cfg.sliding_window else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/gpu_scale.json")
    parser.add_argument("--models", nargs="*", default=["mixtral", "mistral"], choices=list(MODELS))
    parser.add_argument("--placements", nargs="*", default=list(PLACEMENTS), choices=list(PLACEMENTS))
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8, 32, 128])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="the decode runs' context length, i.e. each sequence's KV capacity (default: prompt + new + 16); "
        "set it to a served run's --max-model-len to compare with that run",
    )
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=64,
        help="tokens per timed decode; 16 left batch-1 figures ±30 %% noisy (bench/NOTES.md)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="generate calls timed per batch: median and spread of their means"
    )
    parser.add_argument(
        "--hf-repeats", type=int, default=1, help="the same for transformers (its batch-128 call takes ~2 minutes)"
    )
    parser.add_argument(
        "--ttft-tokens", nargs="*", type=int, default=[4096, 16384], help="none: no first-token phase (no restart)"
    )
    parser.add_argument("--chunk", type=int, default=4096, help="prefill chunk (at most the window)")
    parser.add_argument(
        "--pipeline-chunk",
        type=int,
        default=1024,
        help="prefill chunk of the first-token phase on placements of several stages (0: --chunk)",
    )
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument(
        "--gpt-fast",
        metavar="DIR",
        help="a pytorch-labs/gpt-fast checkout (never committed; e.g. .peers/gpt-fast): its batch-1 decode beside ours",
    )
    parser.add_argument(
        "--gpt-fast-compile", choices=["on", "off"], default="on", help="off: its decode step eager (CPU dry runs)"
    )
    parser.add_argument(
        "--hf-gpus", type=int, default=2, help="GPUs transformers splits its layers over (Mixtral 8x22B needs 3+)"
    )
    parser.add_argument("--profile-layers", type=int, default=4, help="layers in the one-process profile (0: none)")
    parser.add_argument("--load-path", action="store_true", help="also write and load a real safetensors checkpoint")
    parser.add_argument(
        "--placement-batches",
        nargs="*",
        default=[],
        metavar="NAME=B[,B]",
        help="extra batches for one placement, e.g. two_stages=256 (one GPU cannot hold 256: its 128 is the base)",
    )
    parser.add_argument("--budget-s", type=float, default=560.0)
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on CPU: checks the script runs")
    args = parser.parse_args()
    if args.max_seq_len is not None and args.max_seq_len < args.prompt_tokens + args.new_tokens + 1:
        parser.error(
            f"--max-seq-len {args.max_seq_len} is shorter than a prompt plus its new tokens "
            f"({args.prompt_tokens} + {args.new_tokens} + 1)"
        )
    deadline = Deadline(args.budget_s)
    dry = args.cpu_dry_run
    if dry:
        args.batches = sorted({min(b, 8) for b in args.batches})
        args.prompt_tokens, args.new_tokens, args.chunk = 32, 4, 64
        args.ttft_tokens = [128, 256] if args.ttft_tokens else []
    n_gpus = 0 if dry else torch.cuda.device_count()
    devices = [torch.device("cpu")] if dry else [torch.device("cuda", i) for i in range(n_gpus)]
    HOST["at_start"] = host_state()
    hw = measure_hardware(devices, dry)
    # Its 8 GiB of copy buffers per GPU stayed in the driver's cache and every wait for free GPUs below ran out its
    # 60 s (2 minutes a placement in the 2026-11-30 run): give them back, then take what is left as the idle level.
    free_cuda_memory(devices)
    print(
        f"hardware: {hw['hbm_bytes_per_s'] / 1e12:.2f} TB/s copy, {hw['ceiling_bytes_per_s'] / 1e12:.2f} TB/s for "
        f"the ceilings, {hw['bf16_flop_per_s'] / 1e12:.0f} TFLOP/s bf16",
        flush=True,
    )
    memory = MemoryWatch(n_gpus)
    import ray

    # One Ray for every placement (each cluster reuses it): a fresh local Ray per placement cost seconds each.
    # The dry run's Ray claims GPUs it has not: the placements' workers are grouped as on the GPU host.
    ray.init(address="local", num_gpus=DRY_GPUS if dry else None, include_dashboard=False, log_to_driver=False)
    results: list[dict] = []
    gen = torch.Generator().manual_seed(1)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        load_path = time_load_path(devices[0], tmp, dry) if args.load_path else None

        def prompts_for(b: int, n: int) -> torch.Tensor:
            return torch.cat(
                [
                    torch.ones(b, 1, dtype=torch.long),
                    torch.randint(3, 32000 if not dry else 512, (b, n - 1), generator=gen),
                ],
                dim=1,
            )

        # Each model's placements in the order given, its baseline first (every other figure is read against it): a
        # run the budget cuts short keeps what came first. (The expert placements used to go last, when they ran on
        # the host path and were slowest; the last two-GPU run then never reached them.)
        phases = [(m, sorted(args.placements, key=lambda p, m=m: p != BASELINE[m])) for m in args.models]
        state: dict[str, dict] = {}
        for model, placements in phases:
            placements = [p for p in placements if model in PLACEMENTS[p][2]]
            st = state[model] = first_visit(model, args, dry, tmp, devices, memory, prompts_for, deadline, hw)
            for name in placements:
                if not dry and PLACEMENTS[name][1] > n_gpus:
                    st["ours"].append(
                        {"placement": name, "skipped": f"needs {PLACEMENTS[name][1]} GPUs, host has {n_gpus}"}
                    )
                    continue
                if deadline.left() < 120:  # a placement: ~20 s to start, a minute or two of batches
                    why = f"time budget ({deadline.left():.0f} s left of --budget-s, a placement needs ~120 s)"
                    st["ours"].append({"placement": name, "skipped": why})
                    print(f"!!! {model} {name}: skipped, {why}", flush=True)  # a missing row must not go unseen
                    continue
                try:
                    row = run_ours(
                        name,
                        st["tput_ckpt"],
                        st["long_ckpt"],
                        st["tput_cfg"],
                        args,
                        prompts_for,
                        memory,
                        deadline,
                        tmp,
                        hw,
                        st["hf"],
                    )
                except Exception as e:  # noqa: BLE001 - record it and go on with the next placement
                    row = {"placement": name, "error": f"{type(e).__name__}: {e}"[:2000]}
                wait_until_gpus_free(memory)
                st["ours"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("expert_load",)})[:3000], flush=True)
                results = summarise_all(state, hw, args)
                write_result(
                    args, hw, n_gpus, load_path, results, deadline
                )  # after every placement: a cut-off run keeps it
            results = summarise_all(state, hw, args)
            write_result(args, hw, n_gpus, load_path, results, deadline)
        for res in results:
            print_table(res)
    memory.stop()
    plot(results, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')} in {round(args.budget_s - deadline.left(), 1)} s")


def summarise_all(state: dict[str, dict], hw: dict, args) -> list[dict]:
    results = []
    for m, st in state.items():
        res = summarise(m, st["long_cfg"], hw, st["hf"], [r for r in st["ours"] if "decode" in r], args, st["peers"])
        gpt_fast = res["peers"].get("gpt_fast")
        if gpt_fast and "decode" in gpt_fast:  # ours / gpt-fast per placement at each batch it ran, in its entry too
            gpt_fast["ours_over_gpt_fast"] = {
                f"{t['placement']} b={t['what'].split('=')[1]}": t["ours_vs_gpt_fast"]
                for t in res["table"]
                if t.get("ours_vs_gpt_fast")
            }
        res["skipped_or_failed"] = [r for r in st["ours"] if "decode" not in r]
        res["component_profile"] = st["profile"]
        results.append(res)
    return results


def write_result(args, hw: dict, n_gpus: int, load_path: dict | None, results: list[dict], deadline: Deadline) -> None:
    import transformers

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": {
            "gpus": [torch.cuda.get_device_name(i) for i in range(n_gpus)] or ["cpu dry run"],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "host_cpus": os.cpu_count(),
            # was anything else running? (a run beside another GPU job's compile measured 84 tok/s for 112)
            "host": {**HOST, "at_end": host_state()},
        },
        "hardware": hw,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("MISTRAL_CLUSTER_", "TORCH"))},
        "roofline_definition": "limit (decode): batch / (weight bytes one step reads, each counted once: attention, "
        "norms, gates, the distinct experts the batch selects (measured from transformers' gates on the same weights), "
        "head) / measured copy bandwidth of one GPU. prefill: matmul FLOPs / measured bf16 matmul rate of one GPU.",
        "ceiling_definition": "ceiling (decode, per placement, bench/ceilings.py): batch / the sum over stages of the "
        "slowest GPU's bytes while that stage runs (its stages' attention, norms, gates, embedding rows and head, its "
        "layers' KV cache at the mean decode context, the distinct experts the batch selects among those it holds) "
        "/ ceiling_bytes_per_s; a figure above it is refused (an error in its row). tokens_per_s: median over "
        "--repeats generate calls of batch x decode steps / their traced seconds; wall_tokens_per_s: the old "
        "b x (n - 1) / (t_n - t_1), a cross-check.",
        "load_path": load_path,
        "models": results,
        "seconds": round(args.budget_s - deadline.left(), 1),
    }
    out.write_text(json.dumps(result, indent=2) + "\n")


def first_visit(model, args, dry, tmp, devices, memory, prompts_for, deadline, hw: dict) -> dict:
    """A model's checkpoints, its one-process profile and the transformers run: once, before its first placement."""
    st: dict = {"ours": [], "profile": None, "hf": {}, "peers": {}}
    # the decode runs' context: just what they need, or a server's --max-model-len (its KV capacity)
    st["tput_cfg"] = model_config(model, dry, args.max_seq_len or args.prompt_tokens + args.new_tokens + 16)
    st["long_cfg"] = model_config(model, dry, max(args.ttft_tokens or [args.prompt_tokens]) + 16)
    st["tput_ckpt"] = write_random_checkpoint(tmp / f"{model}-throughput", st["tput_cfg"], SEED, STD)
    st["long_ckpt"] = write_random_checkpoint(tmp / f"{model}-long", st["long_cfg"], SEED, STD)
    if args.profile_layers and deadline.left() > 120:
        try:
            st["profile"] = profile_components(
                st["long_cfg"], devices[0], [1, 32] if not dry else [1, 4], args.profile_layers, tmp, SEED, STD
            )
        except Exception as e:  # noqa: BLE001
            st["profile"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        print("profile:", json.dumps(st["profile"])[:3000], flush=True)
        free_cuda_memory(devices[:1])
    if not args.no_transformers and deadline.left() > 120:
        wait_until_gpus_free(memory)
        memory.take()  # the peak below is transformers' alone, not what the last placement left behind
        try:
            st["hf"] = run_hf(st["long_ckpt"], st["long_cfg"], devices[: args.hf_gpus], args, prompts_for, deadline, hw)
            st["hf"]["peak_gib_per_gpu"] = memory.take()
        except Exception as e:  # noqa: BLE001 - record it and go on with ours
            st["hf"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        free_cuda_memory(devices)
        print("transformers:", json.dumps(st["hf"])[:1500], flush=True)
    if args.gpt_fast and deadline.left() > 120:
        wait_until_gpus_free(memory)
        memory.take()
        try:
            st["peers"]["gpt_fast"] = run_gpt_fast(
                st["tput_ckpt"], st["tput_cfg"], devices[0], args, prompts_for, hw, st["hf"]
            )
            st["peers"]["gpt_fast"]["peak_gib_per_gpu"] = memory.take()
        except Exception as e:  # noqa: BLE001 - record it and go on with ours
            st["peers"]["gpt_fast"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        print("gpt-fast:", json.dumps(st["peers"]["gpt_fast"])[:1500], flush=True)
    return st


def wait_until_gpus_free(memory: MemoryWatch, timeout_s: float = 60.0) -> None:
    """Killed shard processes free their GPU memory a moment after the call returns; the next placement needs it.
    Free: within 2 GiB of what the GPU held when the watch started (the driver's own context and cache)."""
    end = time.monotonic() + timeout_s
    while memory.n and time.monotonic() < end:
        if all(memory.read(i) < memory.idle[i] + 2 * 2**30 for i in range(memory.n)):
            return
        time.sleep(0.5)
    if memory.n:
        print(
            f"[{stamp()}] GPUs still hold {[round(memory.read(i) / 2**30, 1) for i in range(memory.n)]} GiB", flush=True
        )


_T0 = time.monotonic()
HOST: dict = {}


def host_state() -> dict:
    """The host's 1-minute load average and the GPU processes other than this one (nvidia-smi, where it exists):
    a figure measured beside another job is not a figure. Printed loudly when either says the host is shared."""
    load = os.getloadavg()[0]
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        others = [line.strip() for line in out.splitlines() if line.strip() and not line.startswith(f"{os.getpid()},")]
    except (OSError, subprocess.SubprocessError):
        others = None
    state = {"load_1min": round(load, 2), "other_gpu_processes": others}
    if load > (os.cpu_count() or 1) / 2 or others:
        print(f"!!! the host is shared: load {load:.1f} on {os.cpu_count()} cores, GPU processes {others}", flush=True)
    return state


def stamp() -> str:
    """Seconds since the script started: the log says where a device call's minutes went."""
    return f"{time.monotonic() - _T0:6.1f} s"


if __name__ == "__main__":
    main()
