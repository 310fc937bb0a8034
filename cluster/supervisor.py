"""Shard lifecycle: start each shard actor in its own bundle, find the dead ones, restart them, re-form the group.

Shard actors are named and detached from whoever started them, so a restarted router finds them by name and a
router crash does not take them down; they live as long as the placement group (owned by the ingress or the
CLI), and are killed with it. A restarted shard is a fresh actor in the same bundle: it reloads only its own
tensors. Live shards keep their weights and only rejoin the new transport group.
"""

from __future__ import annotations

import contextlib
import time
import uuid

import ray
from ray.util.placement_group import placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.expert_actor import ExpertGroupActor
from cluster.reservation import BUILTIN_RESOURCES, lost_bundles
from cluster.stage_actor import StageActor


class ShardsUnavailable(RuntimeError):
    """A shard could not be (re)started: no alive node can take its bundle (the message names the resource missing),
    or it was not up in time (the message names the resources its bundle asks for)."""


class ShardSupervisor:
    def __init__(
        self,
        plan,
        checkpoint: str,
        placement_group,
        attention_backend: str = "auto",
        load_timeout_s: float = 300.0,
        transport_timeout_s: float = 60.0,
        probe_timeout_s: float = 5.0,
        prefix: str | None = None,
    ) -> None:
        self.plan = plan
        self.checkpoint = checkpoint
        self.placement_group = placement_group
        self.attention_backend = attention_backend
        self.load_timeout_s = load_timeout_s
        self.transport_timeout_s = transport_timeout_s
        self.probe_timeout_s = probe_timeout_s
        self.prefix = prefix or f"mistral-cluster-{uuid.uuid4().hex[:8]}"
        self.bundle_of = {name: i for i, name in enumerate(plan.shard_names())}
        self.bundles = plan.bundles()
        # transport ranks: stages first, then expert groups
        self.names = [s.name for s in plan.stages] + [g.name for g in plan.expert_groups]

    # --- actors ----------------------------------------------------------------------------------------

    def actor_name(self, shard: str) -> str:
        return f"{self.prefix}-{shard}"

    def create(self, shard: str):
        index = self.bundle_of[shard]
        bundle = self.bundles[index]
        options = {
            "name": self.actor_name(shard),
            "lifetime": "detached",
            "max_concurrency": 4,
            "max_restarts": 0,
            "num_cpus": bundle.get("CPU", 0),
            "num_gpus": bundle.get("GPU", 0),
            "resources": {k: v for k, v in bundle.items() if k not in BUILTIN_RESOURCES},
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.placement_group, placement_group_bundle_index=index
            ),
        }
        deadline = time.monotonic() + 30
        while True:
            try:
                if shard.startswith("stage"):
                    cls, args = StageActor, (self.checkpoint, self.plan, int(shard[5:]), self.attention_backend)
                else:
                    cls, args = ExpertGroupActor, (self.checkpoint, self.plan, int(shard[7:]))
                return ray.remote(cls).options(**options).remote(*args)
            except ValueError as e:  # the name of a just-killed actor is freed a moment after its death
                if "already taken" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def handles(self) -> list:
        """Current handles in rank order, found by name (works from any process, e.g. a restarted router)."""
        return [ray.get_actor(self.actor_name(n)) for n in self.names]

    def start_all(self) -> list:
        handles = [self.create(n) for n in self.names]
        self._wait_loaded(handles, self.names)
        self.form_group(handles)
        return handles

    def _wait_loaded(self, handles: list, names: list[str]) -> list[dict]:
        """Every shard's location once it has loaded. A shard whose bundle lost its node, and that no alive node can
        take, fails at once; others get the load timeout. Shards not up are killed, so a retry can reuse the names."""
        refs = [h.location.remote() for h in handles]
        deadline = time.monotonic() + self.load_timeout_s
        while True:
            step = min(1.0, max(0.0, deadline - time.monotonic()))
            _, waiting = ray.wait(refs, num_returns=len(refs), timeout=step)
            if not waiting:
                return ray.get(refs)
            missing = [names[refs.index(r)] for r in waiting]
            lost = lost_bundles(placement_group_table(self.placement_group), self.bundles, ray.nodes())
            unplaceable = [n for n in missing if self.bundle_of[n] in lost]
            if unplaceable or time.monotonic() >= deadline:
                break
        for r in waiting:
            with contextlib.suppress(Exception):  # gone already
                ray.kill(handles[refs.index(r)], no_restart=True)
        if unplaceable:
            raise ShardsUnavailable(
                "; ".join(
                    f"{n} cannot be placed until a node with its resources joins: {lost[self.bundle_of[n]]}"
                    for n in unplaceable
                )
            )
        asks = "; ".join(f"{n} needs {self.bundles[self.bundle_of[n]]}" for n in missing)
        raise ShardsUnavailable(
            f"shards not up after {self.load_timeout_s:g} s: {asks} (is a node with those resources alive?)"
        )

    def form_group(self, handles: list) -> None:
        """Every shard joins a fresh transport group at a new rendezvous address."""
        locations = ray.get([h.location.remote() for h in handles], timeout=self.load_timeout_s)
        keys = [loc["device_key"] for loc in locations]
        addr, port = ray.get(handles[0].rendezvous.remote(), timeout=self.probe_timeout_s * 4)
        ray.get(
            [h.join.remote(addr, port, len(handles), self.transport_timeout_s, keys) for h in handles],
            timeout=self.load_timeout_s,
        )

    # --- health and recovery ---------------------------------------------------------------------------

    def probe(self, handles: list) -> list[bool]:
        """Which shards answer a ping within the probe timeout (a dead or hung actor does not)."""
        refs = [h.ping.remote() for h in handles]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.probe_timeout_s)
        alive = []
        for ref in refs:
            if ref not in ready:
                alive.append(False)
                continue
            try:
                ray.get(ref)
                alive.append(True)
            except Exception:  # noqa: BLE001 - RayActorError and friends: that shard is gone
                alive.append(False)
        return alive

    def recover(self, handles: list) -> tuple[list, dict]:
        """Restart dead shards in their bundles, reset the live ones, re-form the group. Returns the new handles
        and a report (which shards were restarted, how long it took)."""
        t0 = time.monotonic()
        alive = self.probe(handles)
        dead = {n for n, ok in zip(self.names, alive, strict=True) if not ok}
        live = [(n, h) for n, h, ok in zip(self.names, handles, alive, strict=True) if ok]
        for n, h in live:  # stages first (rank order): they release the experts' serving threads
            if n.startswith("stage"):
                self._best_effort(h.stop_experts.remote())
        for n, h in live:
            if not self._best_effort(h.reset_transport.remote(), timeout=self.probe_timeout_s * 2):
                dead.add(n)
        for n, h in zip(self.names, handles, strict=True):
            if n in dead:
                ray.kill(h, no_restart=True)
        new = [self.create(n) if n in dead else h for n, h in zip(self.names, handles, strict=True)]
        self._wait_loaded(new, self.names)
        self.form_group(new)
        return new, {"restarted": sorted(dead), "seconds": time.monotonic() - t0}

    def _best_effort(self, ref, timeout: float | None = None) -> bool:
        try:
            ray.get(ref, timeout=timeout or self.probe_timeout_s)
            return True
        except Exception:  # noqa: BLE001 - a shard that cannot do it is treated as dead by the caller
            return False

    def kill_all(self) -> None:
        for n in self.names:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(ray.get_actor(self.actor_name(n)), no_restart=True)
