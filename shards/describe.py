"""What a configuration costs, by arithmetic: parameters, weight and KV-cache bytes, receptive field, FLOPs.

Everything is derived from the tensor shapes a checkpoint of this config holds (`ShardSelection.tensor_shapes`),
so the counts are the ones the loader reads, and the KV sizes are the rows `RollingKVCache` allocates: with a
sliding window a sequence keeps min(context, window) rows per layer (Mistral's rolling buffer), without one it
keeps all `context` rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from shards.checkpoint import ShardSelection
from shards.config import ConfigError, ModelConfig
from shards.kv_cache import cache_capacity

PARTS = ("embedding", "attention", "ffn", "head")
PART_LABELS = {
    "embedding": "embedding",
    "attention": "attention + norms",
    "ffn": "feed-forward",
    "head": "output head",
}


def _part(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "head"
    if ".mlp." in name or ".block_sparse_moe." in name:
        return "ffn"
    return "attention"  # q/k/v/o projections and every RMSNorm, the final one included


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def parameter_counts(config: ModelConfig) -> dict[str, dict[str, int]]:
    """{"total"|"active": {part: parameters}}; active counts top-k of the experts a token is routed to."""
    total = dict.fromkeys(PARTS, 0)
    active = dict.fromkeys(PARTS, 0)
    for name, shape in ShardSelection.whole(config).tensor_shapes(config).items():
        part, n = _part(name), _numel(shape)
        total[part] += n
        if ".experts." in name:
            # Each token runs num_experts_per_tok of the layer's experts; all experts have the same shape.
            active[part] += n * config.num_experts_per_tok // config.num_experts
        else:
            active[part] += n
    total["total"] = sum(total[p] for p in PARTS)
    active["total"] = sum(active[p] for p in PARTS)
    return {"total": total, "active": active}


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype, layers: int | None = None) -> int:
    """Keys and values of one token, over `layers` layers (default: all), in the cache's dtype."""
    n_layers = config.n_layers if layers is None else layers
    return 2 * n_layers * config.n_kv_heads * config.head_dim * element_size(dtype)


def kv_rows(config: ModelConfig, context: int, window: bool = True) -> int:
    """Cache rows one sequence of `context` tokens holds per layer: the rolling buffer keeps at most the window."""
    return cache_capacity(config.sliding_window if window else None, context)


def _attention_keys_sum(context: int, window: int | None) -> int:
    """Sum over the positions 1..context of the keys each one attends to (causal, bounded by the window)."""
    if window is None or context <= window:
        return context * (context + 1) // 2
    return window * (window + 1) // 2 + (context - window) * window


def flops(config: ModelConfig, context: int) -> dict[str, int]:
    """Matmul FLOPs (2 per multiply-add): one decode token at `context`, and a prefill of `context` tokens.

    The embedding is a lookup and norms are elementwise, so neither counts; prefill computes logits for its last
    token only, as the engine does. Each key costs 4 * n_heads * head_dim per layer (QK^T and AV).
    """
    active = parameter_counts(config)["active"]
    norms = (2 * config.n_layers + 1) * config.dim
    per_token = 2 * (active["attention"] - norms + active["ffn"])  # everything but the head, once per token
    head = 2 * active["head"]
    per_key = 4 * config.n_heads * config.head_dim * config.n_layers
    window = config.sliding_window
    return {
        "decode_matmul": per_token + head,
        "decode_attention_window": per_key * kv_rows(config, context, window=True),
        "decode_attention_full": per_key * context,
        "decode_total_window": per_token + head + per_key * kv_rows(config, context, window=True),
        "decode_total_full": per_token + head + per_key * context,
        "prefill_matmul": per_token * context + head,
        "prefill_attention_window": per_key * _attention_keys_sum(context, window),
        "prefill_attention_full": per_key * _attention_keys_sum(context, None),
        "prefill_total_window": per_token * context + head + per_key * _attention_keys_sum(context, window),
        "prefill_total_full": per_token * context + head + per_key * _attention_keys_sum(context, None),
    }


def check_context(config: ModelConfig, context: int, batch: int = 1) -> None:
    if isinstance(context, bool) or not isinstance(context, int) or context <= 0:
        raise ConfigError(f"context must be a positive number of tokens, got {context!r}")
    if context > config.max_seq_len:
        raise ConfigError(f"context {context} exceeds the model's max_seq_len {config.max_seq_len}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
        raise ConfigError(f"batch must be a positive number of sequences, got {batch!r}")


def describe(
    config: ModelConfig,
    context: int | None = None,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    name: str | None = None,
) -> dict[str, Any]:
    """The whole description as plain data (what `describe --json` prints); context defaults to max_seq_len."""
    context = config.max_seq_len if context is None else context
    check_context(config, context, batch)
    params = parameter_counts(config)
    per_token = kv_bytes_per_token(config, dtype)
    window = config.sliding_window
    rolling, full = per_token * kv_rows(config, context), per_token * context
    weights = params["total"]["total"] * element_size(dtype)
    return {
        "name": name,
        "dimensions": {
            "dim": config.dim,
            "n_layers": config.n_layers,
            "n_heads": config.n_heads,
            "n_kv_heads": config.n_kv_heads,
            "head_dim": config.head_dim,
            "hidden_dim": config.hidden_dim,
            "vocab_size": config.vocab_size,
            "sliding_window": window,
            "max_seq_len": config.max_seq_len,
            "num_experts": config.num_experts,
            "num_experts_per_tok": config.num_experts_per_tok if config.is_moe else 0,
        },
        "parameters": params,
        "dtype": str(dtype).removeprefix("torch."),
        "weight_bytes": weights,
        "context": context,
        "batch": batch,
        "kv_cache": {
            "bytes_per_token": per_token,
            "rows_per_sequence_window": kv_rows(config, context),
            "bytes_per_sequence_window": rolling,
            "bytes_per_sequence_full": full,
            "bytes_batch_window": rolling * batch,
            "bytes_batch_full": full * batch,
            "mha_bytes_per_token": per_token * config.kv_group,  # the same model with one KV head per query head
        },
        "memory_total_window": weights + rolling * batch,
        "memory_total_full": weights + full * batch,
        "receptive_field_tokens": window * config.n_layers if window else None,
        "flops_per_token": flops(config, context),
    }


def shard_table(
    config: ModelConfig,
    shards: Sequence[tuple[str, ShardSelection, int | Sequence[int]]],
    context: int,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
) -> list[dict[str, Any]]:
    """Per shard: weight bytes of its selection and KV bytes of the layers whose cache it keeps (an int or ids)."""
    check_context(config, context, batch)
    rows = kv_rows(config, context)
    out = []
    for name, selection, kv_layers in shards:
        n_kv = kv_layers if isinstance(kv_layers, int) else len(kv_layers)
        weights = selection.nbytes(config, dtype)
        kv = kv_bytes_per_token(config, dtype, n_kv) * rows * batch
        out.append(
            {"shard": name, "weight_bytes": weights, "kv_layers": n_kv, "kv_bytes": kv, "total_bytes": weights + kv}
        )
    return out


# --- text ------------------------------------------------------------------------------------------------


def human_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def human_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def human_flops(n: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} FLOP"


def render(d: dict[str, Any], shards: list[dict[str, Any]] | None = None) -> str:
    """The description as an aligned text table."""
    dims, params, kv, fl = d["dimensions"], d["parameters"], d["kv_cache"], d["flops_per_token"]
    ctx, batch, window = d["context"], d["batch"], dims["sliding_window"]
    lines: list[str] = []

    def row(label: str, *cols: str) -> None:
        lines.append(f"  {label:<28}" + "".join(f"{c:>16}" for c in cols))

    lines.append(f"{d['name'] or 'model'}")
    lines.append("dimensions")
    row("dim / layers", f"{dims['dim']} / {dims['n_layers']}")
    row("heads / kv heads / head_dim", f"{dims['n_heads']} / {dims['n_kv_heads']} / {dims['head_dim']}")
    row("ffn hidden_dim", str(dims["hidden_dim"]))
    if dims["num_experts"]:
        row("experts (top-k)", f"{dims['num_experts']} (top-{dims['num_experts_per_tok']})")
    row("vocab", str(dims["vocab_size"]))
    row("sliding window", str(window) if window else "none (full)")
    row("max_seq_len", str(dims["max_seq_len"]))

    lines.append("parameters")
    row("", "total", "active/token")
    labels = dict(PART_LABELS, ffn="experts + gate" if dims["num_experts"] else "feed-forward (SwiGLU)")
    for part in (*PARTS, "total"):
        row(labels.get(part, part), human_count(params["total"][part]), human_count(params["active"][part]))
    row(f"weights at {d['dtype']}", human_bytes(d["weight_bytes"]))

    lines.append(f"KV cache at {d['dtype']}, context {ctx}, batch {batch}")
    row("", "rolling window", "full attention")
    row("per token", human_bytes(kv["bytes_per_token"]), human_bytes(kv["bytes_per_token"]))
    row("rows per sequence per layer", str(kv["rows_per_sequence_window"]), str(ctx))
    row("per sequence", human_bytes(kv["bytes_per_sequence_window"]), human_bytes(kv["bytes_per_sequence_full"]))
    row(f"batch of {batch}", human_bytes(kv["bytes_batch_window"]), human_bytes(kv["bytes_batch_full"]))
    row("weights + KV", human_bytes(d["memory_total_window"]), human_bytes(d["memory_total_full"]))
    row("multi-head (no GQA) per token", human_bytes(kv["mha_bytes_per_token"]))
    rf = d["receptive_field_tokens"]
    row("receptive field", f"{window} x {dims['n_layers']} = {rf}" if rf else f"{ctx} (context)")

    lines.append(f"FLOPs (decode: one token at context {ctx}; prefill: all {ctx} tokens)")
    row("", "rolling window", "full attention")
    row("decode: matmul", human_flops(fl["decode_matmul"]), human_flops(fl["decode_matmul"]))
    row("decode: attention", human_flops(fl["decode_attention_window"]), human_flops(fl["decode_attention_full"]))
    row("decode: total", human_flops(fl["decode_total_window"]), human_flops(fl["decode_total_full"]))
    row("prefill: attention", human_flops(fl["prefill_attention_window"]), human_flops(fl["prefill_attention_full"]))
    row("prefill: total", human_flops(fl["prefill_total_window"]), human_flops(fl["prefill_total_full"]))

    if shards:
        lines.append(f"shards (weights + rolling KV for batch {batch} at context {ctx})")
        row("", "weights", "KV", "total")
        for s in shards:
            row(
                f"{s['shard']} ({s['kv_layers']} KV layers)",
                human_bytes(s["weight_bytes"]),
                human_bytes(s["kv_bytes"]),
                human_bytes(s["total_bytes"]),
            )
    return "\n".join(lines)
