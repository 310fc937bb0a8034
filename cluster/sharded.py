"""Starting a sharded model on a Ray cluster from a placement plan, and stopping it.

Order matters and is the same every time: reserve the placement group (fails before any weight is read if the
cluster cannot hold the plan), start every shard actor in its bundle (each loads only its own tensors), form the
transport group among them, then start the router actor that drives the steps.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Self

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.expert_actor import ExpertGroupActor
from cluster.placement import PlacementPlan, load_placement, validate_against_model
from cluster.reservation import Reservation, ray_session, reserve
from cluster.router_actor import RouterActor
from cluster.stage_actor import StageActor
from router.generation import Completion
from router.sampling import SamplingParams
from shards.config import load_config

_BUILTIN = ("CPU", "GPU", "memory", "object_store_memory")


def actor_options(bundle: dict[str, float], reservation: Reservation, index: int) -> dict:
    """Ray options that put an actor in bundle `index` and ask for exactly that bundle's resources."""
    return {
        "num_cpus": bundle.get("CPU", 0),
        "num_gpus": bundle.get("GPU", 0),
        "resources": {k: v for k, v in bundle.items() if k not in _BUILTIN},
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=reservation.placement_group, placement_group_bundle_index=index
        ),
        "max_restarts": 0,
    }


class ShardedCluster:
    """A running sharded model: shard actors in their bundles, the transport group, the router actor."""

    def __init__(self, plan: PlacementPlan, config, reservation: Reservation, stages, experts, router, exit_stack) -> None:
        self.plan, self.config, self.reservation = plan, config, reservation
        self.stages, self.experts, self.router = stages, experts, router
        self._exit = exit_stack
        self.checkpoint_dir = Path(plan.checkpoint)

    @classmethod
    def start(
        cls, placement: str | Path | PlacementPlan, checkpoint: str | None = None, address: str | None = None,
        timeout_s: float = 300.0, attention_backend: str = "auto", max_queued_requests: int = 256,
        step_timeout_s: float = 120.0,
    ) -> ShardedCluster:
        plan = placement if isinstance(placement, PlacementPlan) else load_placement(placement, checkpoint)
        from cluster.cli import DEFAULT_CHECKPOINT, ensure_default_checkpoint

        if Path(plan.checkpoint) == DEFAULT_CHECKPOINT:
            ensure_default_checkpoint()
        config = load_config(plan.checkpoint)
        plan = validate_against_model(plan, config)
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(ray_session(plan, address))
            reservation = reserve(plan, config, timeout_s=timeout_s)
            stack.callback(reservation.release)
            bundles = plan.bundles()
            index_of = {name: i for i, name in enumerate(plan.shard_names())}
            stages = [
                ray.remote(StageActor).options(**actor_options(bundles[index_of[s.name]], reservation, index_of[s.name]))
                .remote(plan.checkpoint, plan, s.index, attention_backend)
                for s in plan.stages
            ]
            experts = [
                ray.remote(ExpertGroupActor).options(**actor_options(bundles[index_of[g.name]], reservation, index_of[g.name]))
                .remote(plan.checkpoint, plan, g.index)
                for g in plan.expert_groups
            ]
            shards = stages + experts
            stack.callback(lambda: [ray.kill(a) for a in shards])
            # every shard has loaded its tensors once it answers; ranks are stages first, then expert groups
            locations = ray.get([a.location.remote() for a in shards], timeout=timeout_s)
            device_keys = [loc["device_key"] for loc in locations]
            addr, port = ray.get(stages[0].rendezvous.remote(), timeout=timeout_s)
            ray.get([a.join.remote(addr, port, len(shards), timeout_s, device_keys) for a in shards], timeout=timeout_s)
            router = ray.remote(RouterActor).options(num_cpus=0, max_concurrency=10_000).remote(
                stages, experts, plan, config, step_timeout_s, max_queued_requests
            )
            stack.callback(lambda: ray.kill(router))
            return cls(plan, config, reservation, stages, experts, router, stack)
        except BaseException:
            stack.close()
            raise

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        return ray.get(self.router.generate.remote(prompts, params))

    def locations(self) -> dict[str, dict]:
        return {loc["shard"]: loc for loc in ray.get([a.location.remote() for a in self.stages + self.experts])}

    def take_traces(self) -> list[dict]:
        return ray.get(self.router.take_traces.remote())

    def expert_traces(self) -> list[dict]:
        return ray.get(self.router.expert_traces.remote())

    def expert_load(self) -> list[list[int]]:
        return ray.get(self.router.get_expert_load.remote())

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            ray.get([s.stop_experts.remote() for s in self.stages], timeout=10)
            time.sleep(0.1)
        self._exit.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
