"""Mistral against the vanilla transformer, measured on one small model: what each architectural choice buys.

(a) sliding window with a rolling-buffer cache vs full attention (same weights, window switched off): KV memory
    and decode time per token as the sequence grows to many windows;
(b) sparse top-2 mixture of experts vs a dense SwiGLU with the same active parameters (hidden = 2 x expert's);
(c) grouped-query vs multi-head attention: KV cache size.

    python bench/architecture.py                 # CPU, about a minute on 2 cores
    python bench/architecture.py --device cuda   # the same on a GPU

Writes bench/results/architecture-<device>.json and architecture-<device>-{window,moe,gqa}.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from router.step import StepPlan
from shards.checkpoint import CheckpointReader, ShardSelection, parse_dtype, save_checkpoint
from shards.config import PRESETS, ModelConfig
from shards.describe import describe, kv_bytes_per_token
from shards.engine import LocalEngine
from shards.kv_cache import RollingKVCache
from shards.make_checkpoint import make_checkpoint, small_config

RESULTS = Path(__file__).parent / "results"


def machine(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class Timer:
    """Median wall time of a call; synchronises the GPU around it so kernels are counted, not just launched."""

    def __init__(self, device: torch.device, warmup: int, repeat: int) -> None:
        self.device, self.warmup, self.repeat = device, warmup, repeat

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def median_s(self, *fns: Callable[[], object]) -> list[float]:
        """One median per function; the calls alternate, so load from other work on the machine hits all alike."""
        for _ in range(self.warmup):
            for fn in fns:
                fn()
        times: list[list[float]] = [[] for _ in fns]
        for _ in range(self.repeat):
            for fn, ts in zip(fns, times, strict=True):
                self._sync()
                t0 = time.perf_counter()
                fn()
                self._sync()
                ts.append(time.perf_counter() - t0)
        return [statistics.median(ts) for ts in times]


class Sequences:
    """Sequences growing in an engine's cache: prefill in chunks, then one-token decode steps."""

    def __init__(self, engine: LocalEngine, n: int, seed: int) -> None:
        self.engine, self.pos = engine, [0] * n
        self.gen = torch.Generator().manual_seed(seed)

    def _ids(self, n: int) -> torch.Tensor:
        return torch.randint(3, self.engine.config.vocab_size, (n,), generator=self.gen)

    def prefill_to(self, length: int, chunk: int) -> None:
        """Fill every sequence's cache up to `length` tokens, without computing logits."""
        while self.pos[0] < length:
            n = min(chunk, length - self.pos[0])
            slots = list(range(len(self.pos)))
            batch = StepPlan(slots, list(self.pos), [n] * len(slots), self._ids(n * len(slots)), [False] * len(slots))
            self.engine.step(batch)
            self.pos = [p + n for p in self.pos]

    def decode(self) -> None:
        slots = list(range(len(self.pos)))
        self.engine.step(StepPlan(slots, list(self.pos), [1] * len(slots), self._ids(len(slots))))
        self.pos = [p + 1 for p in self.pos]


def same_weights_without_window(src: Path, out: Path) -> Path:
    """The vanilla-attention variant: identical tensors, config with sliding_window None."""
    reader = CheckpointReader(src)
    tensors = reader.load(ShardSelection.whole(reader.config), dtype=None)
    return save_checkpoint(out, dataclasses.replace(reader.config, sliding_window=None), tensors)


# --- (a) sliding window vs full attention -----------------------------------------------------------------


def bench_window(window_ckpt: Path, full_ckpt: Path, lengths: list[int], args, timer: Timer) -> dict:
    dtype, device = parse_dtype(args.dtype), args.device
    steps = timer.warmup + timer.repeat
    chunk = 256
    rolling = LocalEngine(window_ckpt, dtype=dtype, device=device, max_seqs=1)
    window = rolling.config.sliding_window
    row_bytes = rolling.cache.bytes_per_slot() // rolling.cache_capacity  # one token's keys and values, all layers
    rows = []
    for length in lengths:
        seq = Sequences(rolling, 1, seed=1)  # slot 0 starts over: the new owner writes from position 0
        seq.prefill_to(length, min(chunk, rolling.cache_capacity))
        # Full attention needs a row per token: a cache exactly as long as this sequence, so neither side pays
        # for rows it does not use.
        full = LocalEngine(full_ckpt, dtype=dtype, device=device, max_seqs=1, max_seq_len=length + steps)
        full_seq = Sequences(full, 1, seed=1)
        full_seq.prefill_to(length, chunk)
        t_window, t_full = timer.median_s(seq.decode, full_seq.decode)
        predicted = describe(rolling.config, context=length, dtype=dtype)["kv_cache"]
        rows.append(
            {
                "seq_len": length,
                "window_multiple": length / window,
                # rows a sequence of this length holds: min(length, window) in the rolling buffer, length without it
                "kv_bytes_window": min(length, window) * row_bytes,
                "kv_bytes_full": length * full.cache.bytes_per_slot() // full.cache_capacity,
                "kv_bytes_window_allocated": rolling.cache.bytes_per_slot(),
                "kv_bytes_full_allocated": full.cache.bytes_per_slot(),
                "kv_bytes_window_describe": predicted["bytes_per_sequence_window"],
                "kv_bytes_full_describe": predicted["bytes_per_sequence_full"],
                "decode_ms_window": 1e3 * t_window,
                "decode_ms_full": 1e3 * t_full,
            }
        )
        del full, full_seq
    return {"window": window, "rows": rows, "crossover": crossover(rows, window, args.margin)}


def crossover(rows: list[dict], window: int, margin: float) -> dict:
    """The first length from which the window decodes faster by more than `margin` at every longer length.

    The margin keeps timing noise on a shared machine from being read as a win below the window.
    """
    start = None
    for r in reversed(rows):
        if r["decode_ms_full"] > (1 + margin) * r["decode_ms_window"]:
            start = r
        else:
            break
    last = rows[-1]
    return {
        "margin": margin,
        "from_seq_len": start["seq_len"] if start else None,
        "from_window_multiple": start["seq_len"] / window if start else None,
        "speedup_at_crossover": start["decode_ms_full"] / start["decode_ms_window"] if start else None,
        "longest_seq_len": last["seq_len"],
        "speedup_at_longest": last["decode_ms_full"] / last["decode_ms_window"],
        "kv_ratio_at_longest": last["kv_bytes_full"] / last["kv_bytes_window"],
    }


# --- (b) top-2 MoE vs dense ---------------------------------------------------------------------------------


def bench_moe(moe_ckpt: Path, dense_ckpt: Path, batches: list[int], args, timer: Timer) -> dict:
    dtype, device = parse_dtype(args.dtype), args.device
    engines = {
        label: LocalEngine(ckpt, dtype=dtype, device=device, max_seqs=max(batches))
        for label, ckpt in (("moe_top2", moe_ckpt), ("dense", dense_ckpt))
    }
    rows = []
    for batch in batches:
        steps, ffns = [], []
        for engine in engines.values():
            seqs = Sequences(engine, batch, seed=2)
            seqs.prefill_to(32, 64)
            steps.append(seqs.decode)
            ffns.append(_feed_forward(engine, batch))
        t_steps = timer.median_s(*steps)
        with torch.inference_mode():
            t_ffns = timer.median_s(*ffns)
        for label, t_step, t_ffn in zip(engines, t_steps, t_ffns, strict=True):
            rows.append(
                {
                    "model": label,
                    "batch": batch,
                    "decode_ms_per_step": 1e3 * t_step,
                    "decode_ms_per_token": 1e3 * t_step / batch,
                    "ffn_us_per_token": 1e6 * t_ffn / batch,
                }
            )
    return {"rows": rows}


def _feed_forward(engine: LocalEngine, batch: int) -> Callable[[], torch.Tensor]:
    """Layer 0's feed-forward alone on `batch` tokens: the gate and its top-2 experts, or the dense SwiGLU."""
    layer = engine.model.layers["0"]
    x = torch.randn(batch, engine.config.dim, generator=torch.Generator().manual_seed(3)).to(engine.device)
    x = x.to(next(layer.parameters()).dtype)  # (batch, dim)
    if engine.config.is_moe:
        block = layer.block_sparse_moe
        return lambda: block.experts(x, *block.gate(x))
    return lambda: layer.mlp(x)


# --- (c) grouped-query vs multi-head attention -----------------------------------------------------------


def bench_gqa(config: ModelConfig, args) -> dict:
    """Allocate both caches for real beside `describe`'s arithmetic, then the same arithmetic for the presets."""
    dtype, rows = parse_dtype(args.dtype), []
    capacity = config.sliding_window
    for label, kv_heads in (("grouped-query", config.n_kv_heads), ("multi-head", config.n_heads)):
        cache = RollingKVCache(list(range(config.n_layers)), 1, capacity, kv_heads, config.head_dim, dtype, args.device)
        rows.append(
            {
                "model": f"bench model ({args.dtype})",
                "attention": label,
                "kv_heads": kv_heads,
                "kv_bytes_per_token": cache.bytes_per_slot() // capacity,
                "kv_bytes_per_token_describe": kv_bytes_per_token(
                    dataclasses.replace(config, n_kv_heads=kv_heads), dtype
                ),
            }
        )
        del cache
    for name, preset in PRESETS.items():
        for label, kv_heads in (("grouped-query", preset.n_kv_heads), ("multi-head", preset.n_heads)):
            per_token = kv_bytes_per_token(dataclasses.replace(preset, n_kv_heads=kv_heads), torch.bfloat16)
            rows.append(
                {
                    "model": f"{name} (bfloat16)",
                    "attention": label,
                    "kv_heads": kv_heads,
                    "kv_bytes_per_token": per_token,
                    # Without a window (Mixtral 8x22B) a sequence keeps every token: its whole context.
                    "kv_bytes_per_sequence_at_window": per_token * (preset.sliding_window or preset.max_seq_len),
                }
            )
    return {"rows": rows, "dtype_bench": args.dtype, "dtype_presets": "bfloat16"}


# --- output ---------------------------------------------------------------------------------------------------


def print_tables(result: dict) -> None:
    a, b, c = result["window"], result["moe"], result["gqa"]
    w = a["window"]
    print(
        f"\n(a) sliding window (rolling buffer, W={w}) vs full attention: decode batch 1, {result['dtype']}, "
        f"{result['machine']['device']}"
    )
    print(
        f"{'seq len':>8} {'x W':>5} {'KV window':>11} {'KV full':>11} {'ms/tok window':>14} {'ms/tok full':>12}"
        f" {'full/window':>12}"
    )
    for r in a["rows"]:
        print(
            f"{r['seq_len']:>8} {r['window_multiple']:>5g} {r['kv_bytes_window'] / 2**10:>8.0f} KiB"
            f" {r['kv_bytes_full'] / 2**10:>7.0f} KiB {r['decode_ms_window']:>14.3f} {r['decode_ms_full']:>12.3f}"
            f" {r['decode_ms_full'] / r['decode_ms_window']:>11.2f}x"
        )
    same = all(
        r["kv_bytes_window"] == r["kv_bytes_window_describe"] and r["kv_bytes_full"] == r["kv_bytes_full_describe"]
        for r in a["rows"]
    )
    print(f"KV columns measured on the engines' caches; equal to `describe`'s arithmetic: {'yes' if same else 'NO'}")
    x = a["crossover"]
    if x["from_seq_len"] is None:
        print(f"crossover: the window never decoded more than {x['margin']:.0%} faster in this run")
    else:
        print(
            f"crossover: from {x['from_seq_len']} tokens ({x['from_window_multiple']:g} x W) the window decodes more "
            f"than {x['margin']:.0%} faster at every longer length ({x['speedup_at_crossover']:.2f}x there); "
            f"at {x['longest_seq_len']} tokens "
            f"it is {x['speedup_at_longest']:.2f}x faster with {x['kv_ratio_at_longest']:.0f}x less KV memory"
        )
    print(
        f"\n(b) top-2 of {result['model']['moe']['num_experts']} experts vs dense SwiGLU with the same active "
        "parameters: decode"
    )
    print(f"{'model':>9} {'batch':>6} {'ms/step':>9} {'ms/token':>9} {'FFN us/token':>13}")
    for r in b["rows"]:
        print(
            f"{r['model']:>9} {r['batch']:>6} {r['decode_ms_per_step']:>9.3f} {r['decode_ms_per_token']:>9.3f}"
            f" {r['ffn_us_per_token']:>13.1f}"
        )
    print("\n(c) grouped-query vs multi-head attention: KV cache per token")
    print(f"{'model':>25} {'attention':>14} {'kv heads':>9} {'KV/token':>12}")
    for r in c["rows"]:
        print(f"{r['model']:>25} {r['attention']:>14} {r['kv_heads']:>9} {r['kv_bytes_per_token'] / 2**10:>8.1f} KiB")


def plot(result: dict, prefix: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    a = result["window"]
    rows, w = a["rows"], a["window"]
    seq = [r["seq_len"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(seq, [r["kv_bytes_window"] / 2**10 for r in rows], "o-", label=f"rolling buffer (window {w})")
    ax1.plot(seq, [r["kv_bytes_full"] / 2**10 for r in rows], "s-", label="full attention")
    ax1.set(
        xscale="log",
        yscale="log",
        xlabel="sequence length (tokens)",
        ylabel="KV cache per sequence (KiB)",
        title="KV cache memory",
    )
    ax2.plot(seq, [r["decode_ms_window"] for r in rows], "o-", label=f"rolling buffer (window {w})")
    ax2.plot(seq, [r["decode_ms_full"] for r in rows], "s-", label="full attention")
    ax2.set(
        xscale="log", xlabel="sequence length (tokens)", ylabel="decode time per token (ms)", title="decode, batch 1"
    )
    for ax in (ax1, ax2):
        ax.axvline(w, color="grey", ls=":", lw=1)
        ax.legend()
    if a["crossover"]["from_seq_len"]:
        ax2.axvline(a["crossover"]["from_seq_len"], color="tab:green", ls="--", lw=1, label="crossover")
        ax2.legend()
    fig.suptitle(f"Sliding window vs full attention ({result['machine']['device']}, {result['dtype']})")
    fig.tight_layout()
    files.append(_save(fig, prefix.with_name(prefix.name + "-window.png")))

    b = result["moe"]["rows"]
    batches = sorted({r["batch"] for r in b})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.38
    for i, model in enumerate(("moe_top2", "dense")):
        mine = {r["batch"]: r for r in b if r["model"] == model}
        xs = [j + (i - 0.5) * width for j in range(len(batches))]
        label = "top-2 MoE" if model == "moe_top2" else "dense, same active params"
        ax1.bar(xs, [mine[k]["decode_ms_per_token"] for k in batches], width, label=label)
        ax2.bar(xs, [mine[k]["ffn_us_per_token"] for k in batches], width, label=label)
    panels = ((ax1, "whole decode step", "ms per token"), (ax2, "feed-forward block only", "us per token"))
    for ax, title, unit in panels:
        ax.set_xticks(range(len(batches)), [f"batch {k}" for k in batches])
        ax.set(ylabel=unit, title=title)
        ax.legend()
    fig.suptitle(f"Sparse top-2 MoE vs dense SwiGLU ({result['machine']['device']}, {result['dtype']})")
    fig.tight_layout()
    files.append(_save(fig, prefix.with_name(prefix.name + "-moe.png")))

    c = result["gqa"]["rows"]
    models = list(dict.fromkeys(r["model"] for r in c))
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.5))
    for ax, model in zip(axes, models, strict=True):
        mine = [r for r in c if r["model"] == model]
        ax.bar(
            [f"{r['attention']}\n({r['kv_heads']} KV heads)" for r in mine],
            [r["kv_bytes_per_token"] / 2**10 for r in mine],
            color=["tab:blue", "tab:orange"],
        )
        ax.set(ylabel="KV cache per token (KiB)", title=model)
    fig.suptitle("Grouped-query vs multi-head attention: KV cache per token")
    fig.tight_layout()
    files.append(_save(fig, prefix.with_name(prefix.name + "-gqa.png")))
    return files


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--max-multiple", type=int, default=128, help="longest sequence in windows (the issue asks >= 16)")
    p.add_argument("--repeat", type=int, default=60, help="timed steps per point (median)")
    p.add_argument("--margin", type=float, default=0.05, help="a faster decode counts as a win above this fraction")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU here")
    t_start = time.perf_counter()
    timer = Timer(args.device, warmup=3, repeat=args.repeat)

    w = args.window
    longest = args.max_multiple * w
    lengths = [w // 4, w // 2, w]
    while lengths[-1] < longest:
        lengths.append(lengths[-1] * 2)
    # Mistral's shape ratios, scaled down: 4 query heads per KV head; Mixtral's 8 experts, top 2.
    dims = {"dim": 256, "layers": 4, "heads": 8, "kv_heads": 2, "window": w, "max_seq_len": longest + 64}
    moe_cfg = small_config("mixtral", experts=8, hidden=512, **dims)
    dense_cfg = small_config("mistral", hidden=2 * moe_cfg.hidden_dim, **dims)

    with tempfile.TemporaryDirectory(prefix="bench-arch-") as tmp:
        tmp = Path(tmp)
        dense = make_checkpoint(tmp / "dense-window", dense_cfg, seed=0, with_tokenizer=False)
        dense_full = same_weights_without_window(dense, tmp / "dense-full")
        moe = make_checkpoint(tmp / "moe", moe_cfg, seed=0, with_tokenizer=False)
        print(f"(a) window vs full attention up to {longest} tokens ...", file=sys.stderr)
        window = bench_window(dense, dense_full, lengths, args, timer)
        print("(b) MoE vs dense ...", file=sys.stderr)
        moe_result = bench_moe(moe, dense, [1, 32], args, timer)
    gqa = bench_gqa(dense_cfg, args)

    result = {
        "machine": machine(args.device),
        "dtype": args.dtype,
        "model": {"dense": dataclasses.asdict(dense_cfg), "moe": dataclasses.asdict(moe_cfg)},
        "timing": {"warmup": timer.warmup, "repeat": timer.repeat, "statistic": "median"},
        "window": window,
        "moe": moe_result,
        "gqa": gqa,
    }
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / f"architecture-{args.device.type}"
    result["plots"] = [os.path.relpath(f, args.out) for f in plot(result, prefix)]
    prefix.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)
    print(f"\nwrote {prefix.with_suffix('.json')} and {len(result['plots'])} plots in {result['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
