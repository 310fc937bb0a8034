"""The per-step trace of a sharded run, as a table: where the time of a step goes."""

from __future__ import annotations


def summarize(traces: list[dict], expert_traces: list[dict]) -> dict:
    """Seconds per component summed over the run, and per-step means (what `--profile` prints)."""
    steps = len(traces)
    out = {
        "steps": steps,
        "tokens": sum(t["tokens"] for t in traces),
        "step_seconds": sum(t["seconds"] for t in traces),
    }
    stage_rows: dict[int, dict] = {}
    for t in traces:
        for s in t["stages"]:
            row = stage_rows.setdefault(
                s["stage"], {"busy": 0.0, "recv_wait": 0.0, "send_wait": 0.0, "experts": 0.0, "transport_bytes": 0}
            )
            row["busy"] += sum(sp["end"] - sp["start"] for sp in s["spans"])
            row["recv_wait"] += sum(sp["recv_wait"] for sp in s["spans"])
            row["send_wait"] += s.get("send_wait", 0.0)
            row["experts"] += s.get("expert_seconds", 0.0)
            row["transport_bytes"] += sum(s.get("transport", {}).get("bytes", {}).values())
    out["stages"] = stage_rows
    out["expert_groups"] = {
        e["group"]: {
            "compute": sum(r["seconds"] for r in e["received"]),
            "messages": len(e["received"]),
            "tokens": sum(r["tokens"] for r in e["received"]),
        }
        for e in expert_traces
    }
    busiest = max((r["busy"] + r["recv_wait"] for r in stage_rows.values()), default=0.0)
    out["router_and_control"] = max(0.0, out["step_seconds"] - busiest)
    return out


def profile_table(traces: list[dict], expert_traces: list[dict]) -> str:
    s = summarize(traces, expert_traces)
    n = max(s["steps"], 1)
    lines = [
        f"{s['steps']} steps, {s['tokens']} tokens, {1000 * s['step_seconds'] / n:.2f} ms per step",
        f"{'component':<24} {'ms/step':>9} {'share':>7}",
    ]

    def row(name: str, seconds: float) -> None:
        share = seconds / s["step_seconds"] if s["step_seconds"] else 0.0
        lines.append(f"{name:<24} {1000 * seconds / n:>9.2f} {100 * share:>6.1f}%")

    for stage, r in sorted(s["stages"].items()):
        row(f"stage{stage} layers", r["busy"] - r["experts"])
        row(f"stage{stage} expert dispatch", r["experts"])
        row(f"stage{stage} transport wait", r["recv_wait"] + r["send_wait"])
    for group, r in sorted(s["expert_groups"].items()):
        row(f"experts{group} compute", r["compute"])
    row("router + control", s["router_and_control"])
    return "\n".join(lines)
