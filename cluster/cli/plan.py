"""`mistral-cluster plan`: check a placement file against the checkpoint and the cluster (and, with --gpu-memory,
each GPU's weights and KV cache against its memory), reserve it, show where each shard lands, and give the resources
back. No weights are loaded."""

from __future__ import annotations

import argparse
import json

from cluster.cli.usage import UsageError
from cluster.placement_file import settle_placement
from cluster.reservation import check_gpu_memory, placement_table, ray_session, reserve
from cluster.workers import data_plane, group_workers


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan", help="reserve a placement YAML on the Ray cluster and print where each shard lands (no weights loaded)"
    )
    p.add_argument("--config", required=True, help="placement YAML (see deploy/examples/PLACEMENT.md)")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the file's 'checkpoint')")
    p.add_argument("--address", default=None, help="join this Ray cluster (default: RAY_ADDRESS or a local one)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the placement group")
    p.add_argument(
        "--gpu-memory",
        metavar="GIB",
        help="memory of each GPU in GiB (e.g. 139 for an H200): refuse a worker whose weights and KV cache exceed it",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    plan, config = settle_placement(args.config, args.checkpoint)
    if args.gpu_memory is not None:
        check_gpu_memory(plan, config, _gib("--gpu-memory", args.gpu_memory) * 2**30)
    with ray_session(plan, args.address):
        reservation = reserve(plan, config, timeout_s=args.timeout)
        reservation.release()  # the plan command only shows where shards would land
    placements, group_id = reservation.placements, reservation.placement_group.id.hex()
    if args.json:
        print(
            json.dumps(
                {
                    "config": plan.source,
                    "checkpoint": plan.checkpoint,
                    "dtype": plan.dtype,
                    "strategy": plan.strategy,
                    "placement_group": group_id,
                    "shards": [p.to_dict() for p in placements],
                    "data_plane": data_plane(plan),
                    "standbys": standbys(plan),
                    "steps": steps(plan),
                },
                indent=2,
            )
        )
    else:
        print(
            f"{plan.source}: {len(plan.stages)} stage(s), {len(plan.expert_groups)} expert group(s), "
            f"{plan.dtype}, strategy {plan.strategy}, checkpoint {plan.checkpoint}"
        )
        print(placement_table(placements))
        print(f"data plane: {data_plane(plan)['note']}")
        with_standby = standbys(plan)
        print(
            f"standbys: {', '.join(with_standby)} (a warm process each, promoted when its worker dies)"
            if with_standby
            else "standbys: none (set `standby: true` for faster restarts)"
        )
        print(steps(plan)["note"])
    return 0


def steps(plan) -> dict:
    """How the router keeps the stages busy: steps in flight, the groups of sequences they carry, decode ahead."""
    from cluster.router_actor import step_groups, steps_in_flight  # the router's own rule, not a copy of it

    depth, groups, ahead = steps_in_flight(plan), step_groups(plan), plan.scheduling.decode_ahead
    if ahead:
        note = f"steps: {depth} in flight over every sequence (decode ahead: greedy tokens fed back on the stage)"
    elif depth > 1:
        note = f"steps: {depth} in flight, each with 1/{groups} of the running sequences (one per stage)"
    else:
        hint = " (decode ahead overlaps them; `decode_ahead: auto` turns it on where the stage holds a GPU)"
        note = "steps: one at a time" + ("" if len(plan.stages) > 1 else hint)
    return {"in_flight": depth, "groups": groups, "decode_ahead": ahead, "note": note}


def standbys(plan) -> list[str]:
    """The workers that get a standby process (`standby` in the placement file; by default the GPU workers)."""
    return [w.name for w in group_workers(plan) if plan.wants_standby(w.bundle)]


def _gib(flag: str, text: str) -> float:
    """Parsed here, not by argparse, so a bad value is a one-line error naming it instead of a usage dump."""
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{flag} must be a positive number of GiB, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise UsageError(f"{flag} must be a positive number of GiB, got {text}")
    return value
