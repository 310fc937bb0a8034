"""Reserving a plan on a Ray cluster: one placement-group bundle per worker (`cluster.workers`: the shards of one
device), checked against the nodes first.

A plan the cluster can never hold fails in `check_against_cluster` with the shard and the resource named, instead of
a placement group that stays pending forever; one that cannot be placed in time is removed, not left queued.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group

from cluster.placement import PlacementError, PlacementPlan, format_ids
from cluster.workers import group_workers
from shards.config import ModelConfig
from shards.describe import kv_bytes_per_token, kv_rows

RAY_STRATEGIES = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD", "strict_pack": "STRICT_PACK"}
BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
_EPS = 1e-6  # Ray keeps resource amounts to 1e-4; sums of fractions must not fail on rounding


@dataclass(frozen=True)
class ShardPlacement:
    """Where one shard landed: a row of the placement table."""

    shard: str
    kind: str
    layers: tuple[int, ...]
    experts: dict[int, tuple[int, ...]]  # layer -> expert ids held by this shard
    bundle_index: int
    node_id: str
    node_ip: str
    gpus: float
    weight_bytes: int
    kv_bytes: int  # the KV cache a stage allocates when it starts (0 for an expert group)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["experts"] = {str(layer): list(ids) for layer, ids in self.experts.items()}
        out["layers"] = list(self.layers)
        return out


@dataclass
class Reservation:
    """A created placement group and where each shard's bundle is; release it when the shards are gone."""

    plan: PlacementPlan
    placement_group: PlacementGroup
    placements: list[ShardPlacement] = field(default_factory=list)

    def release(self) -> None:
        remove_placement_group(self.placement_group)


def check_against_cluster(plan: PlacementPlan, nodes: list[dict[str, Any]]) -> None:
    """Fail before reserving when no placement could hold the plan; `nodes` is what `ray.nodes()` returns."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    workers = group_workers(plan)
    names, bundles = [w.name for w in workers], [w.bundle for w in workers]
    src = plan.source

    totals: dict[str, float] = {}
    for node in alive:
        for key, amount in node.items():
            totals[key] = totals.get(key, 0.0) + amount
    asked: dict[str, dict[str, float]] = {}
    for name, bundle in zip(names, bundles, strict=True):
        for key, amount in bundle.items():
            asked.setdefault(key, {})[name] = amount
    for key, by_shard in asked.items():
        have = totals.get(key, 0.0)
        if have == 0:
            name, amount = next(iter(by_shard.items()))
            raise PlacementError(
                f"{src}: shard {name} asks for {key}: {amount:g}, but no node of the cluster has {key}"
            )
        need = sum(by_shard.values())
        if need > have + _EPS:
            each = ", ".join(f"{n}: {a:g}" for n, a in by_shard.items())
            raise PlacementError(
                f"{src}: the shards ask for {need:g} {key} in all ({each}), but the cluster has {have:g}"
            )

    for name, bundle in zip(names, bundles, strict=True):
        if not any(_fits(bundle, node) for node in alive):
            short = [k for k, a in bundle.items() if a > max(node.get(k, 0.0) for node in alive) + _EPS]
            if short:
                key = short[0]
                largest = max(node.get(key, 0.0) for node in alive)
                raise PlacementError(
                    f"{src}: shard {name} asks for {key}: {bundle[key]:g}, "
                    f"more than any single node has (at most {largest:g})"
                )
            raise PlacementError(f"{src}: shard {name} asks for {_fmt(bundle)}, which no single node has all together")

    if plan.strategy == "strict_pack":
        together = {k: sum(b.get(k, 0.0) for b in bundles) for k in asked}
        if not any(_fits(together, node) for node in alive):
            raise PlacementError(
                f"{src}: strategy strict_pack puts every shard on one node, but no node has "
                f"{_fmt(together)} ({', '.join(names)} together)"
            )
    if plan.strategy == "strict_spread" and len(bundles) > len(alive):
        raise PlacementError(
            f"{src}: strategy strict_spread puts each of the {len(bundles)} shards on its own node, "
            f"but the cluster has {len(alive)} nodes"
        )


def kv_cache_bytes(plan: PlacementPlan, config: ModelConfig, layers: int) -> int:
    """What a stage of `layers` layers allocates for its cache: `max_seqs` slots of the rows a sequence can keep
    (the window, or the whole context without one), in the plan's dtype."""
    rows = kv_rows(config, config.max_seq_len)
    return plan.max_seqs * rows * kv_bytes_per_token(config, plan.torch_dtype, layers)


def check_gpu_memory(plan: PlacementPlan, config: ModelConfig, gpu_bytes: float) -> None:
    """Fail when a worker's weights and KV cache exceed its GPUs' memory (`gpu_bytes` per GPU; a worker asking for a
    fraction of a GPU gets that fraction of it). Ray does not know GPU memory, so the caller gives it."""
    for w in group_workers(plan):
        gpus = w.resources.get("GPU", 0.0)
        if not gpus:
            continue
        weights = kv = 0
        for s in w.stages:
            weights += plan.stage_selection(s, config).nbytes(config, plan.torch_dtype)
            kv += kv_cache_bytes(plan, config, len(plan.stages[s].layers))
        for g in w.expert_groups:
            weights += plan.expert_selection(g, config).nbytes(config, plan.torch_dtype)
        room = gpus * gpu_bytes
        if weights + kv > room + _EPS:
            cache = f" + {_bytes(kv)} of KV cache (max_seqs {plan.max_seqs})" if kv else ""
            raise PlacementError(
                f"{plan.source}: {w.name} holds {_bytes(weights)} of {plan.dtype} weights{cache}, more than the "
                f"{_bytes(room)} of its {gpus:g} GPU at {_bytes(gpu_bytes)} a GPU; spread the model over more GPUs"
            )


def reserve(plan: PlacementPlan, config: ModelConfig, timeout_s: float = 60.0) -> Reservation:
    """Create the plan's placement group and wait for it; on timeout remove it and name the shards left over."""
    shards = plan.shards(config)  # an unsettled plan fails here, before anything is reserved
    nodes = ray.nodes()
    check_against_cluster(plan, nodes)
    workers = group_workers(plan)
    bundles = [w.bundle for w in workers]
    pg = placement_group(bundles, strategy=RAY_STRATEGIES[plan.strategy])
    try:
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        table = placement_group_table(pg)
        if not ready:
            raise PlacementError(_not_placed(plan, nodes, table, timeout_s))
    except BaseException:
        remove_placement_group(pg)
        raise

    ip_of = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    placements = []
    bundle_of = {shard: w.index for w in workers for shard in w.shards}
    for shard in shards:
        i = bundle_of[shard.name]
        node, sel = table["bundles_to_node_id"][i], shard.selection
        placements.append(
            ShardPlacement(
                shard=shard.name,
                kind=shard.kind,
                layers=sel.layers if shard.kind == "stage" else tuple(sorted(sel.experts)),
                experts=dict(sel.experts),
                bundle_index=i,
                node_id=node,
                node_ip=ip_of.get(node, "?"),
                gpus=shard.resources.get("GPU", 0.0),
                weight_bytes=sel.nbytes(config, plan.torch_dtype),
                kv_bytes=kv_cache_bytes(plan, config, len(sel.layers)) if shard.kind == "stage" else 0,
            )
        )
    return Reservation(plan, pg, placements)


def _not_placed(plan: PlacementPlan, nodes: list[dict[str, Any]], table: dict[str, Any], timeout_s: float) -> str:
    """Name the bundles still waiting, and which of their resources the cluster has too little of free right now."""
    known = {n["NodeID"] for n in nodes}
    placed = {i for i, node in table.get("bundles_to_node_id", {}).items() if node in known}
    free = ray.available_resources()
    waiting = []
    for w in group_workers(plan):
        i, name, bundle = w.index, w.name, w.bundle
        if i in placed:
            continue
        short = [
            f"{k}: {a:g} asked, {free.get(k, 0.0):g} free" for k, a in bundle.items() if a > free.get(k, 0.0) + _EPS
        ]
        waiting.append(f"{name} {_fmt(bundle)}" + (f" ({'; '.join(short)})" if short else ""))
    return (
        f"{plan.source}: the placement group was not ready after {timeout_s:g} s; shards not placed: "
        f"{', '.join(waiting)}; other placement groups or actors may hold those resources"
    )


def lost_bundles(table: dict[str, Any], bundles: list[dict[str, float]], nodes: list[dict[str, Any]]) -> dict[int, str]:
    """Bundles that lost their node and that no alive node can take: index -> the resource missing, e.g.
    `expert_node: 1 (no alive node has expert_node)`. `table` is `placement_group_table(pg)`, `nodes` `ray.nodes()`.

    Room that the group's placed bundles hold on a node is not free for the lost ones; other actors' use counts as
    free (it may end), so a bundle named here waits for a node to join, not for work to finish. Strict strategies'
    one-node rules are not checked: such a bundle is not named, and waits for the load timeout.
    """
    alive = {n["NodeID"]: n.get("Resources", {}) for n in nodes if n.get("Alive", True)}
    where = table.get("bundles_to_node_id", {})
    room = {node: dict(resources) for node, resources in alive.items()}
    for i, node in where.items():
        if node in room:
            for key, amount in bundles[i].items():
                room[node][key] = room[node].get(key, 0.0) - amount
    lost = {}
    for i, bundle in enumerate(bundles):
        if where.get(i) in alive or any(_fits(bundle, free) for free in room.values()):
            continue
        absent = [k for k in bundle if not any(resources.get(k, 0.0) > 0 for resources in alive.values())]
        most = {k: max([0.0] + [free.get(k, 0.0) for free in room.values()]) for k in bundle}
        short = [k for k, amount in bundle.items() if amount > most[k] + _EPS]
        if absent:
            lost[i] = ", ".join(f"{k}: {bundle[k]:g}" for k in absent) + f" (no alive node has {' or '.join(absent)})"
        elif short:
            lost[i] = (
                ", ".join(f"{k}: {bundle[k]:g}" for k in short)
                + " (alive nodes have at most "
                + ", ".join(f"{most[k]:g} {k}" for k in short)
                + " beside this model's other shards)"
            )
        else:
            lost[i] = f"{_fmt(bundle)} (no alive node has all of it)"
    return lost


@contextmanager
def ray_session(plan: PlacementPlan, address: str | None = None, copies: int = 1) -> Iterator[None]:
    """Join `address` (or RAY_ADDRESS), or start a local Ray with the CPUs and custom resources the plan asks for,
    `copies` times over (Serve replicas, each a whole copy of the model).

    A local Ray gets only the GPUs it finds, so a GPU plan on a machine without GPUs fails in
    `check_against_cluster`. A connection made by the caller before is reused and left open.
    """
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        join(address)
    else:
        need: dict[str, float] = {}
        for bundle in plan.bundles():
            for key, amount in bundle.items():
                need[key] = need.get(key, 0.0) + amount * copies
        custom = {
            k: v
            for k, v in need.items()
            if k not in BUILTIN_RESOURCES and not k.startswith(("node:", "accelerator_type:"))
        }
        cpus = max(os.cpu_count() or 1, math.ceil(need.get("CPU", 0.0)))
        ray.init(address="local", num_cpus=cpus, resources=custom, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def join(address: str, connect_timeout_s: float = 5.0) -> None:
    """Join the Ray cluster at `address`; a mistake is one line naming the address (ray.init would hang for minutes on
    a wrong one, or print a long traceback when the cluster wants an auth token this machine lacks)."""
    if address not in ("auto", "local") and not address.startswith("ray://"):
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=connect_timeout_s).close()
        except (OSError, ValueError) as e:
            raise PlacementError(f"--address {address}: no Ray cluster answers there ({e})") from None
        _check_token(address, connect_timeout_s)
    try:
        ray.init(address=address, log_to_driver=False)
    except Exception as e:  # noqa: BLE001 - whatever ray.init says, as one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ""
        if "auth" in str(e).lower() or "token" in str(e).lower():
            hint = f"; {AUTH_HINT}"
        raise PlacementError(f"--address {address}: could not join the Ray cluster: {first}{hint}") from None


AUTH_HINT = (
    "this cluster uses Ray's token authentication: give this machine the head's token (RAY_AUTH_TOKEN, or "
    "~/.ray/auth_token), see deploy/README.md"
)


def _check_token(address: str, timeout_s: float) -> None:
    """Ask the cluster's GCS for its id once, with this machine's Ray token if it has one: a cluster that refuses
    the token is one line now. (ray.init would retry for 20 s, print a warning a second, and end with a message
    that does not say why.) Any other outcome is left to ray.init."""
    try:
        import grpc
        from ray._private.authentication.grpc_authentication_client_interceptor import (
            SyncAuthenticationMetadataClientInterceptor,
        )
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:  # another Ray: its private modules moved; ray.init says what it says
        return
    channel = grpc.intercept_channel(grpc.insecure_channel(address), SyncAuthenticationMetadataClientInterceptor())
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNAUTHENTICATED:
            refused = f"--address {address}: the cluster refused this machine's token"
            raise PlacementError(f"{refused}; {AUTH_HINT}") from None
    except Exception:  # noqa: BLE001 - the probe is a shortcut only
        return
    finally:
        channel.close()


def placement_table(placements: list[ShardPlacement]) -> str:
    """The rows as an aligned text table, one line per shard."""
    header = ("shard", "layers", "experts", "node", "ip", "GPU", "weights", "KV")
    rows = [header] + [
        (
            p.shard,
            format_ids(p.layers),
            _experts(p.experts),
            p.node_id[:12],
            p.node_ip,
            f"{p.gpus:g}",
            _bytes(p.weight_bytes),
            _bytes(p.kv_bytes) if p.kind == "stage" else "-",
        )
        for p in placements
    ]
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(amount <= node.get(key, 0.0) + _EPS for key, amount in bundle.items())


def _fmt(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items()) + "}"


def _experts(experts: dict[int, tuple[int, ...]]) -> str:
    """The same experts in every layer print once; otherwise per layer."""
    if not experts:
        return "-"
    distinct = set(experts.values())
    if len(distinct) == 1:
        return format_ids(next(iter(distinct)))
    return " ".join(f"L{layer}:{format_ids(ids)}" for layer, ids in sorted(experts.items()))


def _bytes(n: int) -> str:
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            break
        size /= 1024
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
