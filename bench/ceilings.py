"""What a decode step can cost at best under a placement, and decode figures measured so that they cannot beat it.

The ceiling of a placement: per decode step, each GPU must read what it holds that the step uses (its stages'
attention, norm and gate weights, the embedding rows of the batch on the first stage and the final norm and head on
the last, the KV cache of its layers at the batch's context, and the experts of its layers or groups that the
batch chooses: a GPU holding some of a layer's experts reads only its share), and it cannot read faster than its
measured bandwidth. Expert choices enter as the mean number of distinct experts per layer (measured from a
model's gates, or `uniform_distinct_experts`); expected bytes make the ceiling, if anything, too high (the step
waits for the slowest GPU, and the mean of a maximum is at least the maximum of the means), never too low.

Decode figures come from the router's traces of the decode steps themselves (`decode_rate`), never from the
difference of two wall-clock runs, and a figure above its ceiling is refused (`refused`): it names a fault in the
measurement or in the ceiling, not a result.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass

from cluster.placement import PlacementPlan
from cluster.workers import group_workers
from router.step import StepTrace
from shards.config import ModelConfig

# --- bytes per decode step -------------------------------------------------------------------------------------------


def uniform_distinct_experts(cfg: ModelConfig, batch: int) -> float:
    """Expected distinct experts a layer's gate picks for `batch` tokens when each token's top-k is uniform."""
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    return e * (1 - (1 - k / e) ** batch)


def attention_bytes(cfg: ModelConfig, dtype_bytes: int) -> int:
    """One layer's weights besides its experts: q, k, v and o projections, both RMSNorms, the MoE gate."""
    d, hd = cfg.dim, cfg.head_dim
    gate = cfg.num_experts * d if cfg.is_moe else 0
    return (cfg.n_heads * hd * d * 2 + cfg.n_kv_heads * hd * d * 2 + 2 * d + gate) * dtype_bytes


def expert_bytes(cfg: ModelConfig, dtype_bytes: int) -> int:
    """One expert's SwiGLU weights (w1, w3, w2), or the dense model's feed-forward."""
    return 3 * cfg.dim * cfg.hidden_dim * dtype_bytes


def kv_bytes(cfg: ModelConfig, batch: int, context: float, dtype_bytes: int) -> float:
    """One layer's KV cache read by a decode step: keys and values of every sequence over its window."""
    window = min(context, cfg.sliding_window or context)
    return 2 * cfg.n_kv_heads * cfg.head_dim * window * batch * dtype_bytes


def head_bytes(cfg: ModelConfig, dtype_bytes: int) -> int:
    """The final norm and the output head (the whole vocabulary is scored for every sequence)."""
    return (cfg.vocab_size * cfg.dim + cfg.dim) * dtype_bytes


def embedding_bytes(cfg: ModelConfig, batch: int, dtype_bytes: int) -> int:
    """The embedding rows of the step's tokens (at most one per token)."""
    return min(batch, cfg.vocab_size) * cfg.dim * dtype_bytes


@dataclass(frozen=True)
class DeviceReads:
    """Bytes one worker (one GPU) reads while one stage runs a decode step."""

    worker: str
    weights: float  # attention, norms, gates; embedding rows, final norm and head on the end stages
    experts: float  # the chosen experts it holds (a dense model: its feed-forward)
    kv: float

    @property
    def total(self) -> float:
        return self.weights + self.experts + self.kv


def step_reads(
    plan: PlacementPlan, cfg: ModelConfig, batch: int, context: float, distinct: float | None, dtype_bytes: int
) -> list[list[DeviceReads]]:
    """[stage][worker]: what each worker of the settled `plan` reads while each stage runs one decode step of
    `batch` sequences at `context` tokens; `distinct` is the mean distinct experts per layer (MoE only)."""
    if not plan.settled:
        raise ValueError(f"{plan.source}: settle the plan first (cluster.placement.validate_against_model)")
    workers = group_workers(plan)
    ffn = expert_bytes(cfg, dtype_bytes)
    per_expert_share = ffn * distinct / cfg.num_experts if cfg.is_moe else 0.0  # one held expert, in expectation
    out = []
    for s, stage in enumerate(plan.stages):
        layers = set(stage.layers)
        row = []
        for w in workers:
            weights = experts = kv = 0.0
            if s in w.stages:
                weights = len(layers) * attention_bytes(cfg, dtype_bytes)
                weights += embedding_bytes(cfg, batch, dtype_bytes) if s == 0 else 0
                weights += head_bytes(cfg, dtype_bytes) if s == len(plan.stages) - 1 else 0
                kv = len(layers) * kv_bytes(cfg, batch, context, dtype_bytes)
                if not plan.expert_groups:  # the stage holds its layers' experts (or dense feed-forward)
                    experts = len(layers) * (per_expert_share * cfg.num_experts if cfg.is_moe else ffn)
            for g in w.expert_groups:
                group = plan.expert_groups[g]
                start, stop = group.rows(cfg.hidden_dim)
                part = (stop - start) / cfg.hidden_dim  # a part of each expert's rows: that share
                experts += len(layers & set(group.layers)) * len(group.experts) * per_expert_share * part
            row.append(DeviceReads(w.name, weights, experts, kv))
        out.append(row)
    return out


def ceiling(
    plan: PlacementPlan,
    cfg: ModelConfig,
    batch: int,
    context: float,
    distinct: float | None,
    bandwidth: float,
    dtype_bytes: int,
    groups: int = 1,
) -> dict:
    """The best decode rate `plan` allows for `batch` sequences: the time of one cycle (every sequence one token),
    tokens/s, and each worker's bytes.

    The sequences go as `groups` steps in flight (the router keeps one per stage), each of batch / groups
    sequences, one micro-batch each (how gpu_scale runs). A group's step crosses the stages one after the other,
    each stage taking the time of its SLOWEST worker (the largest bytes / bandwidth: workers holding experts of
    its layers read them in parallel with it); so a cycle is at least the SUM over stages. And each worker reads
    what it holds once per group, so a cycle is at least the busiest worker's bytes x groups / bandwidth. One
    group is the first bound alone; one placement on one GPU is the one-stage, one-worker case.
    """
    if cfg.is_moe and distinct is None:
        raise ValueError("a mixture-of-experts model needs the distinct experts per layer")
    group_batch = max(1, -(-batch // groups))
    if groups > 1 and cfg.is_moe:  # a group's step chooses among fewer tokens: the expectation for its size
        distinct = uniform_distinct_experts(cfg, group_batch)
    reads = step_reads(plan, cfg, group_batch, context, distinct, dtype_bytes)
    stage_s = [max(r.total for r in row) / bandwidth for row in reads]
    busiest: dict[str, float] = {}
    for row in reads:
        for r in row:
            busiest[r.worker] = busiest.get(r.worker, 0.0) + r.total
    step_s = max(sum(stage_s), groups * max(busiest.values()) / bandwidth)
    per_worker: dict[str, float] = {}
    for row in reads:
        for r in row:
            per_worker[r.worker] = per_worker.get(r.worker, 0.0) + r.total
    return {
        "ceiling_tokens_per_s": batch / step_s,
        "step_ms": 1000 * step_s,  # one cycle: every sequence one token
        "stage_ms": [round(1000 * t, 4) for t in stage_s],
        "bytes_per_worker": {k: round(v) for k, v in per_worker.items()},
        "slowest_worker_per_stage": [max(row, key=lambda r: r.total).worker for row in reads],
        "context": context,
        "distinct_experts_per_layer": distinct,
        "bandwidth_bytes_per_s": bandwidth,
        "groups": groups,
        "rule": "max(sum over stages of the slowest worker's bytes, groups x the busiest worker's bytes) / bandwidth"
        " per cycle of `groups` steps in flight, one micro-batch each",
    }


# --- the roofline of a whole model on one device, and prefill ---------------------------------------------------------


def weight_bytes(cfg: ModelConfig, experts_per_layer: float, dtype_bytes: int = 2) -> dict:
    """Bytes of weights one decode step must read: every layer's attention, norms and gate, the experts the batch
    selects (`experts_per_layer` distinct ones on average, measured) or the dense FFN, the final norm and head."""
    attention = attention_bytes(cfg, dtype_bytes)
    ffn = experts_per_layer * expert_bytes(cfg, dtype_bytes) if cfg.is_moe else expert_bytes(cfg, dtype_bytes)
    head = head_bytes(cfg, dtype_bytes)
    return {
        "attention_per_layer": attention,
        "ffn_per_layer": ffn,
        "head": head,
        "total": cfg.n_layers * (attention + ffn) + head,
    }


def prefill_flops(cfg: ModelConfig, tokens: int) -> float:
    """Matmul FLOPs of one prompt: 2 x active weights per token, plus attention over the window (causal)."""
    d, hd = cfg.dim, cfg.head_dim
    per_token = cfg.n_heads * hd * d * 2 + cfg.n_kv_heads * hd * d * 2
    per_token += (cfg.num_experts_per_tok if cfg.is_moe else 1) * 3 * d * cfg.hidden_dim
    window = cfg.sliding_window or tokens
    pairs = sum(min(i + 1, window) for i in range(tokens))  # query-key pairs, causal within the window
    attention = 4 * pairs * cfg.n_heads * hd  # QK^T and PV
    return cfg.n_layers * (2 * per_token * tokens + attention) + 2 * cfg.vocab_size * d  # head: last token only


# --- decode figures from the steps themselves ----------------------------------------------------------------------


def decode_steps(traces: list[StepTrace], batch: int, groups: int = 1) -> list[StepTrace]:
    """The pure decode steps of `batch` sequences sent as `groups` steps in flight: one new token each, nothing
    prefilling beside them, batch / groups sequences a step."""
    size = -(-batch // groups)
    return [t for t in traces if t.tokens == t.sequences == size]


def decode_rate(runs: list[list[StepTrace]], batch: int, groups: int = 1, in_flight: int | None = None) -> dict:
    """Decode tokens/s of repeated runs (each run: the traces of one generate call), from their decode steps.

    Per run: batch x steps / the steps' summed seconds (the router's wall time of each step), and the cadence
    (batch / mean time from one decode step's start to the next's, the router's work between steps included).
    With several steps in flight their seconds overlap, and the first decode step of a group is sent while the
    other groups' prompts still prefill ahead of it on the stages (2026-11-30: counting from its sending put a
    prefill of 32k tokens into the span and read two stages at 2310 tokens/s where the wall clock said 3107): the
    steady rate instead, the tokens of the steps after the first `groups` over the time from the return of the
    `groups`-th to the return of the last. Over runs: the median of the per-run means and their spread.
    `steady_tokens_per_s` is that steady rate for every placement (with one step at a time it counts the router's
    work between steps, which the summed step seconds leave out): compare placements with and without steps in
    flight by it. `in_flight` (default `groups`): steps in flight, which exceeds `groups` with decode ahead (two
    steps of one group: each step's seconds include waiting behind the other, so only the steady rate is right)."""
    depth = max(groups, in_flight or groups)
    per_run = []
    for traces in runs:
        steps = sorted(decode_steps(traces, batch, groups), key=lambda t: t.step)
        if not steps:
            continue
        tokens = sum(t.tokens for t in steps)
        if depth > 1 and len(steps) <= depth:
            continue
        # tokens returned per second once every step in flight is out: the router's work between steps counted
        span = steps[-1].returned - steps[depth - 1].returned if len(steps) > depth else 0.0
        steady = sum(t.tokens for t in steps[depth:]) / span if span > 0 else None
        rate = steady if depth > 1 else tokens / sum(t.seconds for t in steps)
        row = {
            "steps": len(steps),
            "step_ms": 1000 * sum(t.seconds for t in steps) / len(steps),
            "tokens_per_s": rate,
            "steady_tokens_per_s": steady,
        }
        gaps = [b.called - a.called for a, b in zip(steps, steps[1:], strict=False) if b.step == a.step + 1]
        size = steps[0].sequences
        row["cadence_tokens_per_s"] = size * len(gaps) / sum(gaps) if gaps and sum(gaps) > 0 else None
        per_run.append(row)
    if not per_run:
        size = -(-batch // groups)
        return {"tokens_per_s": None, "runs": [], "error": f"no pure decode step of {size} sequences was traced"}
    means = [r["tokens_per_s"] for r in per_run if r["tokens_per_s"] is not None]
    if not means:
        return {"tokens_per_s": None, "runs": per_run, "error": "the decode steps took no measurable time"}
    cadence = [r["cadence_tokens_per_s"] for r in per_run if r["cadence_tokens_per_s"] is not None]
    steady = [r["steady_tokens_per_s"] for r in per_run if r["steady_tokens_per_s"] is not None]
    return {
        "tokens_per_s": statistics.median(means),
        # One method for every placement (one step at a time or several in flight): compare placements with it.
        "steady_tokens_per_s": statistics.median(steady) if steady else None,
        "tokens_per_s_min": min(means),
        "tokens_per_s_max": max(means),
        "cadence_tokens_per_s": statistics.median(cadence) if cadence else None,
        "runs": per_run,
    }


def refused(figures: dict[str, float | None], ceiling_tokens_per_s: float) -> list[str]:
    """One message per figure above the ceiling: such a figure is a fault in the measurement (or the ceiling)."""
    return [
        f"{name} = {value:.1f} tokens/s is above the ceiling of {ceiling_tokens_per_s:.1f} "
        f"({value / ceiling_tokens_per_s:.2f}x): refused"
        for name, value in figures.items()
        if value is not None and value > ceiling_tokens_per_s
    ]


def traces_from_clock(batch: int, times: list[float]) -> list[StepTrace]:
    """Decode steps of `batch` sequences timed from outside (transformers: a clock read after each step's token),
    as traces `decode_rate` reads: step i runs from times[i] to times[i + 1]."""
    return [
        StepTrace(i, batch, batch, 1, b - a, a, b, ()) for i, (a, b) in enumerate(zip(times, times[1:], strict=False))
    ]


def checked_decode_figures(
    what: str,
    batch: int,
    runs: list[list[StepTrace]],
    walls: list[float],
    t1: float,
    n: int,
    limit: dict,
    groups: int = 1,
    in_flight: int | None = None,
) -> dict:
    """One batch's decode figures: from the traced steps of each run (`decode_rate`), the wall-clock cross-check
    (b x (n - 1) / (median time of n tokens - time of 1)), and the ceiling. A figure above the ceiling becomes an
    error, printed loudly: the traced figures are refused together (one method), the wall-clock one on its own."""
    out = decode_rate(runs, batch, groups, in_flight)
    errors = [out.pop("error")] if "error" in out else []
    tn = statistics.median(walls)
    out["wall_tokens_per_s"] = batch * (n - 1) / (tn - t1) if tn > t1 else None
    top = limit["ceiling_tokens_per_s"]
    out.update(wall_s=walls, prefill_s=t1, ceiling_tokens_per_s=top, ceiling=limit)
    traced = {
        k: out.get(k)
        for k in ("tokens_per_s", "tokens_per_s_min", "tokens_per_s_max", "cadence_tokens_per_s", "steady_tokens_per_s")
    }
    traced.update({f"run {i} tokens_per_s": r["tokens_per_s"] for i, r in enumerate(out["runs"])})
    traced_errors = refused(traced, top)
    if traced_errors:
        out.update(
            tokens_per_s=None,
            tokens_per_s_min=None,
            tokens_per_s_max=None,
            cadence_tokens_per_s=None,
            steady_tokens_per_s=None,
        )
        out["refused_runs"] = out.pop("runs")
    wall_errors = refused({"wall_tokens_per_s": out["wall_tokens_per_s"]}, top)
    if wall_errors:
        out["wall_tokens_per_s"] = None
    errors += traced_errors + wall_errors
    if errors:
        out["error"] = "; ".join(errors)
        banner = f"!!! {what} decode: no figure recorded: {out['error']}"
        print(banner, flush=True)
        print(banner, file=sys.stderr, flush=True)
    if out["tokens_per_s"] is not None:
        out["ours_over_ceiling"] = out["tokens_per_s"] / top
    return out
