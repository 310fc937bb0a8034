"""Starting a sharded model on a Ray cluster from a placement plan, and stopping it.

Order matters and is the same every time: reserve the placement group (fails before any weight is read if the
cluster cannot hold the plan), start every shard actor in its bundle (each loads only its own tensors), form the
transport group among them, then start the router actor that drives the steps and watches the shards.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Self

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from cluster.placement import PlacementPlan
from cluster.placement_file import settle_placement
from cluster.reservation import Reservation, ray_session, reserve
from cluster.router_actor import RouterActor
from cluster.supervisor import ShardSupervisor
from router.generation import Completion
from router.sampling import SamplingParams
from router.step import ExpertTrace, RouterStats, ShardLocation, StepTrace
from shards.random_source import is_random_checkpoint, write_whole


class ShardedCluster:
    """A running sharded model: shard actors in their bundles, the transport group, the router actor."""

    def __init__(
        self,
        plan: PlacementPlan,
        config,
        reservation: Reservation,
        supervisor: ShardSupervisor,
        router_options: dict,
        exit_stack: contextlib.ExitStack,
    ) -> None:
        self.plan, self.config, self.reservation, self.supervisor = plan, config, reservation, supervisor
        self.checkpoint_dir = Path(plan.checkpoint)
        self._router_options = router_options
        self._exit = exit_stack
        self._router_lock = threading.Lock()
        self._routers_started = 0
        self.router = self._new_router(recover_on_start=False)

    @classmethod
    def start(
        cls,
        placement: str | Path | PlacementPlan,
        checkpoint: str | None = None,
        address: str | None = None,
        timeout_s: float = 300.0,
        attention_backend: str = "auto",
        max_queued_requests: int = 256,
        step_timeout_s: float = 120.0,
        on_shard_failure: str = "resume",
        monitor_interval_s: float = 1.0,
    ) -> ShardedCluster:
        plan, config = settle_placement(placement, checkpoint)
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(ray_session(plan, address))
            reservation = reserve(plan, config, timeout_s=timeout_s)
            stack.callback(reservation.release)
            if is_random_checkpoint(plan.checkpoint):
                copy_to_bundle_nodes(Path(plan.checkpoint), reservation)
            supervisor = ShardSupervisor(
                plan,
                plan.checkpoint,
                reservation.placement_group,
                attention_backend,
                load_timeout_s=timeout_s,
                transport_timeout_s=step_timeout_s,
            )
            stack.callback(supervisor.kill_all)
            supervisor.start_all()
            options = {
                "step_timeout_s": step_timeout_s,
                "max_queued_requests": max_queued_requests,
                "on_shard_failure": on_shard_failure,
                "monitor_interval_s": monitor_interval_s,
            }
            return cls(plan, config, reservation, supervisor, options, stack)
        except BaseException:
            stack.close()
            raise

    def _new_router(self, recover_on_start: bool):
        # Beside whoever runs the model (the ingress, the CLI): not on a shard node that may be lost. Not soft: Ray
        # places a soft-affine actor that asks for no resources on any node (about half the time, on Ray 2.60).
        near_me = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        # Named (a new name per restart: a dead actor's name is freed a moment after its death) so operators and the
        # fault tests find it among the shards in `ray list actors`.
        name = f"{self.supervisor.prefix}-router-{self._routers_started}"
        self._routers_started += 1
        router = (
            ray.remote(RouterActor)
            .options(name=name, num_cpus=0, max_concurrency=10_000, scheduling_strategy=near_me)
            .remote(self.supervisor, self.plan, self.config, recover_on_start=recover_on_start, **self._router_options)
        )
        ray.get(router.start.remote())
        return router

    def restart_router(self, dead_router) -> None:
        """The router died: start a new one (it finds the shards by name and re-forms their group). Callers that
        saw the same death at once get one new router between them."""
        with self._router_lock:
            if self.router is not dead_router:
                return
            with contextlib.suppress(Exception):
                ray.kill(dead_router, no_restart=True)
            self.router = self._new_router(recover_on_start=True)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        return ray.get(self.router.generate.remote(prompts, params))

    def shard_handles(self) -> dict[str, object]:
        """Each shard's worker actor, by shard name (shards on one device share one worker)."""
        handles = dict(zip(self.supervisor.names, self.supervisor.handles(), strict=True))
        return {shard: handles[w.name] for w in self.supervisor.workers for shard in w.shards}

    def locations(self) -> dict[str, ShardLocation]:
        """Where each shard runs, by shard name: its worker's location."""
        where = {loc.shard: loc for loc in ray.get([a.location.remote() for a in self.supervisor.handles()])}
        return {shard: where[w.name] for w in self.supervisor.workers for shard in w.shards}

    def health(self) -> RouterStats:
        return ray.get(self.router.stats.remote())

    def take_traces(self) -> list[StepTrace]:
        return ray.get(self.router.take_traces.remote())

    def expert_traces(self) -> list[ExpertTrace]:
        return ray.get(self.router.expert_traces.remote())

    def expert_load(self) -> list[list[int]]:
        return ray.get(self.router.get_expert_load.remote())

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            ray.kill(self.router, no_restart=True)
        self._exit.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def copy_to_bundle_nodes(root: Path, reservation: Reservation) -> None:
    """A random checkpoint is a few small files (config, seed, tokenizer) made where the model is started: every
    other node that holds a bundle gets a copy at the same path, so no shared file system is needed."""
    here = ray.get_runtime_context().get_node_id()
    bundle_on = {p.node_id: p.bundle_index for p in reservation.placements if p.node_id != here}
    if not bundle_on:
        return
    files = {f.name: f.read_bytes() for f in root.iterdir() if f.is_file() and not f.name.endswith(".part")}
    writes = [
        _write_files.options(
            num_cpus=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(reservation.placement_group, bundle),
        ).remote(str(root), files)
        for bundle in bundle_on.values()
    ]
    ray.get(writes)


@ray.remote
def _write_files(root: str, files: dict[str, bytes]) -> None:
    os.makedirs(root, exist_ok=True)
    for name, data in files.items():
        write_whole(Path(root) / name, data)
