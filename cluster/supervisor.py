"""Worker lifecycle: start each worker actor in its own bundle, find the dead ones, restart them, re-form the data
plane.

Workers (`cluster.workers`: one per device, holding that device's shards) are named and detached from whoever
started them, so a restarted router finds them by name and a router crash does not take them down; they live as
long as the placement group (owned by the ingress or the CLI), and are killed with it. A restarted worker is a
fresh actor in the same bundle: it reloads only its own tensors. Live workers keep their weights and only rejoin
the new data plane.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import uuid

import ray
from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get, _internal_kv_put
from ray.util.placement_group import placement_group_table
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from cluster.reservation import BUILTIN_RESOURCES, lost_bundles
from cluster.transport import node_ip
from cluster.worker_actor import ShardWorker, proc_stat
from cluster.workers import group_workers

log = logging.getLogger("mistral_cluster.supervisor")
NAMESPACE = "mistral-cluster"  # where the workers' names live
# How long a live worker gets to leave the data plane before it counts as blocked and is restarted: its reset waits
# at most 3 s for its loops (the NCCL abort inside it at most 2 s of that), plus a margin for the Ray call itself.
# 1 s on GPU hosts, whose CPUs are not the bottleneck (at Mixtral's real shape a blocked worker then costs 4 s, and
# its standby 1.2 s more). 3 s for CPU workers: on the loaded 2-core test machine a 1 s margin restarted workers
# that were leaving normally, and a stopped worker's recovery took 15 s instead of 6.
RESET_WAIT_S = {"GPU": 4.0, "CPU": 6.0}
STANDBY_SHARE = 0.01  # of its bundle's CPUs and GPUs, a standby's; its worker takes the rest
STANDBY_PING_S = 1.0  # a standby that does not answer this fast is not used (still importing, or hung)


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
        probe_timeout_s: float = 2.0,
        prefix: str | None = None,
        wedge_after_s: float = 4.0,
    ) -> None:
        self.plan = plan
        self.checkpoint = checkpoint
        self.placement_group = placement_group
        self.attention_backend = attention_backend
        self.load_timeout_s = load_timeout_s
        self.transport_timeout_s = transport_timeout_s
        self.probe_timeout_s = probe_timeout_s
        self.wedge_after_s = wedge_after_s  # a loop this long in one step, not waiting on a peer, is stuck
        self.prefix = prefix or f"mistral-cluster-{uuid.uuid4().hex[:8]}"
        self.workers = group_workers(plan)
        self.names = [w.name for w in self.workers]  # in rank order, which is also bundle order
        self.bundle_of = {w.name: w.index for w in self.workers}
        self.bundles = [w.bundle for w in self.workers]
        # the worker holding the last stage: it sends each step's picked tokens to the router
        self.locations: dict = {}  # worker name -> its ShardLocation when the data plane last formed
        self.last_stage_worker = next(w.index for w in self.workers if len(plan.stages) - 1 in w.stages)

    # --- actors ----------------------------------------------------------------------------------------

    def actor_name(self, worker: str) -> str:
        return f"{self.prefix}-{worker}"

    def create(self, worker: str, standby: bool = False, name: str | None = None):
        """Start `worker` in its bundle (or a standby for it: `standby`, under `name`). Where the worker has a
        standby, the two share the bundle: the worker takes all but a sliver of its CPUs and GPUs, the standby the
        sliver and none of its custom resources (it computes nothing until promoted)."""
        index = self.bundle_of[worker]
        bundle = self.bundles[index]
        share = 1.0
        if self.plan.wants_standby(bundle):
            share = STANDBY_SHARE if standby else 1.0 - STANDBY_SHARE
        options = {
            "name": name or self.actor_name(worker),
            "lifetime": "detached",
            "namespace": NAMESPACE,  # a detached actor's own: found by name from any process, with no warning
            "max_concurrency": 4,
            "max_restarts": 0,
            "num_cpus": round(bundle.get("CPU", 0) * share, 4),
            "num_gpus": round(bundle.get("GPU", 0) * share, 4),
            "resources": {} if standby else {k: v for k, v in bundle.items() if k not in BUILTIN_RESOURCES},
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.placement_group, placement_group_bundle_index=index
            ),
        }
        deadline = time.monotonic() + 30
        while True:
            try:
                args = (self.checkpoint, self.plan, index, self.attention_backend, standby)
                return ray.remote(ShardWorker).options(**options).remote(*args)
            except ValueError as e:  # the name of a just-killed actor is freed a moment after its death
                if "already taken" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    # Which actor is each worker, and which its standby: names in Ray's key-value store (GCS), so that a restarted
    # router, which gets this object as it was when the model started, finds a promoted standby too.

    def _key(self, worker: str, role: str) -> str:
        return f"{self.prefix}/{worker}/{role}"

    def _name_of(self, worker: str, role: str) -> str | None:
        value = _internal_kv_get(self._key(worker, role), namespace=NAMESPACE)
        return value.decode() if value else None

    def _set_name(self, worker: str, role: str, name: str | None) -> None:
        if name is None:
            _internal_kv_del(self._key(worker, role), namespace=NAMESPACE)
        else:
            _internal_kv_put(self._key(worker, role), name, namespace=NAMESPACE)

    def _actor(self, name: str | None):
        if name is None:
            return None
        try:
            return ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:  # no live actor of that name
            return None

    def handles(self) -> list:
        """Current handles in rank order, found by name (from any process, e.g. a restarted router); None for a
        worker that is not there (dead, or not restarted yet): `recover` starts it."""
        return [self._actor(self._name_of(n, "worker") or self.actor_name(n)) for n in self.names]

    def start_all(self) -> list:
        """Start every worker and wait until each has loaded its tensors (the data plane is formed by the router);
        then start the standbys, which need not be up yet."""
        handles = [self.create(n) for n in self.names]
        self._wait_loaded(handles, self.names)
        self.refill_standbys()
        return handles

    def refill_standbys(self) -> list[str]:
        """Start a standby for every worker that should have one and has none (at the start, after a promotion).
        Not waited for: a standby that is not up when its worker dies is simply not used."""
        started = []
        for n in self.names:
            wanted = self.plan.wants_standby(self.bundles[self.bundle_of[n]])
            if wanted and self._actor(self._name_of(n, "standby")) is None:
                name = f"{self.actor_name(n)}-standby-{uuid.uuid4().hex[:6]}"
                try:
                    self.create(n, standby=True, name=name)
                except Exception as e:  # noqa: BLE001 - a standby is an optimisation: the restart path remains
                    log.warning("could not start a standby for %s: %s: %s", n, type(e).__name__, e)
                    continue
                self._set_name(n, "standby", name)
                started.append(n)
        return started

    def standbys(self) -> dict[str, object]:
        """Each worker's standby actor, None where it has none (or it is gone)."""
        return {n: self._actor(self._name_of(n, "standby")) for n in self.names}

    def standbys_up(self) -> dict[str, object]:
        """The standbys that answer a ping now, by worker (one still starting does not: it would not be used)."""
        up = {}
        for n, handle in self.standbys().items():
            with contextlib.suppress(Exception):  # gone, or still importing
                if handle is not None and ray.get(handle.ping.remote(), timeout=STANDBY_PING_S):
                    up[n] = handle
        return up

    def _take_standby(self, worker: str):
        """The worker's standby, if it is up (answers a ping at once), now no longer a standby: None otherwise."""
        name = self._name_of(worker, "standby")
        handle = self._actor(name)
        if handle is None:
            return None
        self._set_name(worker, "standby", None)
        try:
            ray.get(handle.ping.remote(), timeout=STANDBY_PING_S)
        except Exception:  # noqa: BLE001 - still starting, or gone: restart the worker the slow way
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)
            return None
        self._set_name(worker, "worker", name)
        return handle

    def _wait_loaded(self, handles: list, names: list[str], refs: list | None = None) -> list[dict]:
        """Every shard's location once it has loaded (`refs`: what says so for each, by default its `location`).
        A shard whose bundle lost its node, and that no alive node can take, fails at once; others get the load
        timeout. Shards not up are killed, so a retry can reuse the names."""
        refs = refs or [h.location.remote() for h in handles]
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

    def form_group(self, handles: list, router_link) -> None:
        """Every worker joins a fresh process group at a new rendezvous address and connects to `router_link`
        (a `cluster.step_link.RouterLink`), which accepts them meanwhile."""
        locations = ray.get([h.location.remote() for h in handles], timeout=self.load_timeout_s)
        self.locations = dict(zip(self.names, locations, strict=True))
        keys = [loc.device_key for loc in locations]
        addr, port = ray.get(handles[0].rendezvous.remote(), timeout=self.probe_timeout_s * 4)
        refs = [h.join.remote(addr, port, self.transport_timeout_s, keys, router_link.address) for h in handles]
        deadline = time.monotonic() + self.load_timeout_s
        while not router_link.accept(len(handles), timeout_s=0.5):
            # A join that failed (its worker died meanwhile, a peer never came) fails the formation now, naming
            # why: the recovery that called this tries again, instead of waiting out the accept's deadline.
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in done:
                ray.get(ref)
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers did not join the data plane in {self.load_timeout_s:g} s")
        ray.get(refs, timeout=self.load_timeout_s)

    # --- health and recovery ---------------------------------------------------------------------------

    def probe(self, handles: list) -> list[bool]:
        """Which workers answer a ping within the probe timeout (a dead or hung actor does not)."""
        return [state == "alive" for state in self.states(handles)]

    def states(self, handles: list) -> list[str]:
        """Each worker's state: `alive`, `dead` (gone: its ping fails, or there is no actor) or `hung` (alive, but
        no answer to a ping within the probe timeout: stopped, or stuck holding the GIL)."""
        refs = [None if h is None else h.ping.remote() for h in handles]
        sent = [r for r in refs if r is not None]
        ready, _ = ray.wait(sent, num_returns=len(sent), timeout=self.probe_timeout_s)
        states = []
        for ref in refs:
            if ref is None:
                states.append("dead")
            elif ref not in ready:
                states.append("hung")
            else:
                try:
                    ray.get(ref)
                    states.append("alive")
                except Exception:  # noqa: BLE001 - RayActorError and friends: that worker is gone
                    states.append("dead")
        return states

    def recover(self, handles: list, router_link, known: list[str] | None = None) -> tuple[list, dict]:
        """Restart dead workers in their bundles, reset the live ones, re-form the data plane with `router_link`.
        `known`: each worker's state from a probe just made (the monitor's), which spares probing again: a hung
        worker would cost the whole probe timeout a second time. Returns the new handles and a report (which
        workers were restarted, how long it took)."""
        t0 = time.monotonic()
        states = dict(zip(self.names, known or self.states(handles), strict=True))
        dead = {n for n, state in states.items() if state != "alive"}
        # A live worker whose own loop is stuck (not waiting on a peer) counts as hung: killed first, its peers'
        # waits on it end, and their resets succeed instead of failing after their own deadline.
        for n in self._wedged({n: h for n, h in zip(self.names, handles, strict=True) if states[n] == "alive"}):
            states[n] = "hung"
            dead.add(n)
        live = [(n, h) for n, h in zip(self.names, handles, strict=True) if states[n] == "alive"]
        # The dead and the hung first: once a hung worker's process is gone its sockets close, and the live
        # workers' loops waiting on it end at once, so their resets succeed instead of restarting them too.
        self._kill(dead, {n for n in dead if states[n] == "hung"}, handles)
        killed = time.time()
        resets = {n: h.reset_transport.remote() for n, h in live}  # all at once: each may wait on the others
        for n, ref in resets.items():
            on_gpu = self.bundles[self.bundle_of[n]].get("GPU", 0) > 0
            if not self._best_effort(ref, timeout=RESET_WAIT_S["GPU" if on_gpu else "CPU"]):
                dead.add(n)
        reset = time.time()
        blocked = {n for n in dead if n in resets}
        self._kill(blocked, blocked, handles)
        began = time.time()
        new, loaded, promoted = [], [], []
        for n, h in zip(self.names, handles, strict=True):
            standby = self._take_standby(n) if n in dead else None
            if standby is not None:  # warm: it loads the shards and joins, no process to start
                new.append(standby)
                loaded.append(standby.promote.remote())
                promoted.append(n)
            else:
                if n in dead:  # a fresh actor under the worker's own name: whatever was promoted before is gone
                    self._set_name(n, "worker", None)
                new.append(self.create(n) if n in dead else h)
                loaded.append(new[-1].location.remote())
        self._wait_loaded(new, self.names, loaded)
        self.form_group(new, router_link)
        if promoted:
            self.refill_standbys()
        return new, {
            "restarted": sorted(dead),
            "promoted": sorted(promoted),
            "seconds": time.monotonic() - t0,
            "phases": {
                # the recovery's own steps, in seconds before the restarts were asked for (negative)
                "(recovery)": {"dead_killed": round(killed - began, 3), "live_reset": round(reset - began, 3)},
                **self._phases({n: h for n, h in zip(self.names, new, strict=True) if n in dead}, began),
            },
        }

    def _phases(self, restarted: dict, since: float) -> dict[str, dict[str, float]]:
        """Each restarted worker's start, phase by phase, in seconds after its restart was asked for."""
        out = {}
        for n, h in restarted.items():
            with contextlib.suppress(Exception):  # statistics only
                phases = ray.get(h.start_phases.remote(), timeout=self.probe_timeout_s)
                out[n] = {k: round(v - since, 3) for k, v in phases.items()}
        return out

    def _wedged(self, live: dict) -> list[str]:
        """The live workers with a loop stuck by itself for over `wedge_after_s` (`ShardWorker.wedged`)."""
        refs = {n: h.wedged.remote(self.wedge_after_s) for n, h in live.items()}
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.probe_timeout_s)
        out = []
        for n, ref in refs.items():
            try:
                stuck = ray.get(ref, timeout=0)
            except Exception:  # noqa: BLE001 - no answer in time: the reset that follows finds out
                continue
            if stuck:
                log.warning("worker %s is stuck by itself: %s", n, "; ".join(stuck))
                out.append(n)
        return out

    def _kill(self, names: set[str], hung: set[str], handles: list) -> None:
        """Kill these workers. Ray's kill cannot reach a process that does not answer (stopped, stuck), though Ray
        counts the actor dead at once: the `hung` ones, alive a moment ago so their pids are still their own, are
        also SIGKILLed on their own node, and waited for, since only their death closes the sockets peers wait on."""
        for n, h in zip(self.names, handles, strict=True):
            if n in names and h is not None:
                with contextlib.suppress(Exception):  # gone already
                    ray.kill(h, no_restart=True)
        refs = []
        here = node_ip()
        for n in hung:
            where = self.locations.get(n)
            if where is None:
                continue
            if where.node_ip == here:  # on this host: no task to schedule (a new Ray worker process costs ~1 s)
                _sigkill_here(where.pid)
            else:
                on_node = NodeAffinitySchedulingStrategy(node_id=where.node_id, soft=False)
                refs.append(_sigkill.options(scheduling_strategy=on_node).remote(where.pid))
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=3 * self.probe_timeout_s)

    def _best_effort(self, ref, timeout: float | None = None) -> bool:
        try:
            ray.get(ref, timeout=timeout or self.probe_timeout_s)
            return True
        except Exception:  # noqa: BLE001 - a shard that cannot do it is treated as dead by the caller
            return False

    def kill_all(self) -> None:
        for n in self.names:
            names = {self.actor_name(n)}
            with contextlib.suppress(Exception):  # Ray already shut down: the kills below find nothing either
                names |= {self._name_of(n, "worker"), self._name_of(n, "standby")} - {None}
            for name in names:
                with contextlib.suppress(Exception):  # already gone
                    ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        with contextlib.suppress(Exception):
            _internal_kv_del(f"{self.prefix}/", del_by_prefix=True, namespace=NAMESPACE)


def _sigkill_here(pid: int) -> None:
    """Kill a worker's process on this node, whatever state it is in (stopped, hung in a kernel), and wait until it
    is gone: only then are its sockets closed, which is what its peers wait on."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    """Whether `pid` still runs: a killed process stays a zombie until its parent (the raylet) reaps it, and a
    zombie holds no socket any more."""
    try:
        return proc_stat(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


@ray.remote(num_cpus=0, max_retries=0)
def _sigkill(pid: int) -> None:
    """`_sigkill_here` on the worker's own node."""
    _sigkill_here(pid)
