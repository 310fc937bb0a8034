"""The per-step trace of a sharded run, as a table: where the time of a step goes."""

from __future__ import annotations

from router.step import ExpertTrace, StepTrace


def summarize(traces: list[StepTrace], expert_traces: list[ExpertTrace]) -> dict:
    """Seconds per component summed over the run, and per-step means (what `--profile` prints)."""
    steps = len(traces)
    out = {
        "steps": steps,
        "tokens": sum(t.tokens for t in traces),
        "step_seconds": sum(t.seconds for t in traces),
    }
    stage_rows: dict[int, dict] = {}
    for t in traces:
        for s in t.stages:
            row = stage_rows.setdefault(
                s.stage, {"busy": 0.0, "recv_wait": 0.0, "send_wait": 0.0, "experts": 0.0, "transport_bytes": 0}
            )
            row["busy"] += sum(sp.end - sp.start for sp in s.spans)
            row["recv_wait"] += sum(sp.recv_wait for sp in s.spans)
            row["send_wait"] += s.send_wait
            row["experts"] += s.expert_seconds
            row["transport_bytes"] += sum(s.transport.bytes.values())
    out["stages"] = stage_rows
    out["expert_workers"] = {  # by worker name: the expert groups a worker holds serve other stages together
        e.worker: {
            "compute": sum(r.seconds for r in e.received),
            "messages": len(e.received),
            "tokens": sum(r.tokens for r in e.received),
        }
        for e in expert_traces
        if e.received
    }
    busiest = max((r["busy"] + r["recv_wait"] for r in stage_rows.values()), default=0.0)
    out["router_and_control"] = max(0.0, out["step_seconds"] - busiest)
    return out


def profile_table(traces: list[StepTrace], expert_traces: list[ExpertTrace]) -> str:
    s = summarize(traces, expert_traces)
    n = max(s["steps"], 1)
    lines = [
        f"{s['steps']} steps, {s['tokens']} tokens, {1000 * s['step_seconds'] / n:.2f} ms per step",
        f"{'component':<32} {'ms/step':>9} {'share':>7}",
    ]

    def row(name: str, seconds: float) -> None:
        share = seconds / s["step_seconds"] if s["step_seconds"] else 0.0
        lines.append(f"{name:<32} {1000 * seconds / n:>9.2f} {100 * share:>6.1f}%")

    for stage, r in sorted(s["stages"].items()):
        row(f"stage{stage} layers", r["busy"] - r["experts"])
        row(f"stage{stage} expert dispatch", r["experts"])
        row(f"stage{stage} transport wait", r["recv_wait"] + r["send_wait"])
    for worker, r in sorted(s["expert_workers"].items()):
        row(f"{worker} expert compute", r["compute"])
    row("router + control", s["router_and_control"])
    return "\n".join(lines)


def decode_components(traces: list[StepTrace], batch: int) -> dict:
    """Mean per decode step of `batch` sequences, in ms: router wall time, each stage's compute span, time in expert
    dispatch, transport, and the router's share split into before, inside and after the stage calls."""
    steps = [t for t in traces if t.tokens == batch and t.sequences == batch]
    if not steps:
        return {}
    n = len(steps)
    step_ms = 1000 * sum(t.seconds for t in steps) / n
    stage_ms: dict[str, float] = {}
    expert_ms: dict[str, float] = {}
    transport_ms: dict[str, float] = {}
    outside_ms: dict[str, float] = {}
    device_ms: dict[str, list[float]] = {}
    gap_ms: dict[str, list[float]] = {}
    for t in steps:
        for s in t.stages:
            k = f"stage{s.stage}"
            span = sum(sp.end - sp.start for sp in s.spans)
            stage_ms[k] = stage_ms.get(k, 0.0) + 1000 * span / n
            expert_ms[k] = expert_ms.get(k, 0.0) + 1000 * s.expert_seconds / n
            transport_ms[k] = transport_ms.get(k, 0.0) + 1000 * sum(s.transport.seconds.values()) / n
            # inside the call but outside the layers' spans: embedding, counting expert choices, ...
            outside_ms[k] = outside_ms.get(k, 0.0) + 1000 * ((s.left - s.entered) - span) / n
            if s.device_seconds is not None:
                device_ms.setdefault(k, []).append(1000 * s.device_seconds)
            if s.device_gap_seconds is not None:
                gap_ms.setdefault(k, []).append(1000 * s.device_gap_seconds)
    # From the first stage's start to the last stage's end (one clock: the shards share the host); the rest of the
    # step is the router's: planning, the Ray calls, sampling.
    busy = (
        sum(
            max(sp.end for s in t.stages for sp in s.spans) - min(sp.start for s in t.stages for sp in s.spans)
            for t in steps
        )
        / n
    )
    return {
        "step_ms": round(step_ms, 3),
        "stage_compute_ms": _rounded(stage_ms),
        "expert_dispatch_ms": _rounded(expert_ms),
        "transport_ms": _rounded(transport_ms),
        "stages_busy_ms": round(1000 * busy, 3),
        "router_and_ray_ms": round(step_ms - 1000 * busy, 3),
        "router_to_stage_ms": round(1000 * sum(min(s.entered for s in t.stages) - t.called for t in steps) / n, 3),
        "in_call_outside_layers_ms": _rounded(outside_ms),
        "stage_to_router_ms": round(1000 * sum(t.returned - max(s.left for s in t.stages) for t in steps) / n, 3),
        # GPU stages: each step's kernels first to last (CUDA events on the stage's stream), and the device's idle
        # time before each step (the host late with it): what decode ahead is meant to keep near zero.
        "device_ms": {k: _spread(v) for k, v in device_ms.items()},
        "device_gap_ms": {k: _spread(v) for k, v in gap_ms.items()},
    }


def _spread(values: list[float]) -> dict[str, float]:
    """Mean, median and 90th percentile of a list of times in ms."""
    ordered = sorted(values)
    return {
        "mean": round(sum(ordered) / len(ordered), 3),
        "median": round(ordered[len(ordered) // 2], 3),
        "p90": round(ordered[min(len(ordered) - 1, (9 * len(ordered)) // 10)], 3),
    }


def _rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in d.items()}


def step_timeline(traces: list[StepTrace], size: int, steps: int = 8) -> list[dict]:
    """`steps` decode steps of `size` sequences from the middle of a run, in ms from the first one's sending: when
    the router sent and got back each, and when each stage entered, ran and left it. With steps in flight this shows
    whether the stages overlap (stage 0 on step n + 1 while stage 1 runs step n) or take turns."""
    decode = sorted((t for t in traces if t.tokens == t.sequences == size), key=lambda t: t.step)
    middle = decode[len(decode) // 2 : len(decode) // 2 + steps]
    if not middle:
        return []
    t0 = middle[0].called

    def ms(t: float) -> float:
        return round(1000 * (t - t0), 3)

    return [
        {
            "step": t.step,
            "sent": ms(t.called),
            "returned": ms(t.returned),
            "stages": [
                {
                    "stage": s.stage,
                    "entered": ms(s.entered),
                    "ran": [[ms(sp.start), ms(sp.end)] for sp in s.spans],
                    "left": ms(s.left),
                }
                for s in t.stages
            ],
        }
        for t in middle
    ]
