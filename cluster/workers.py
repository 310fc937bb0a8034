"""Which shards share a process: one worker per GPU, holding every shard the placement puts on that GPU.

The placement YAML keeps its meaning: each shard names the resources it needs. Shards asking for a fraction of a
GPU are packed, in bundle order (stage i beside expert group i), into whole GPUs: a stage and an expert group
that share a GPU then live in one process, the local experts computed with no message at all, and messages
between GPUs travel on NCCL. Two processes on one GPU forced every message through host memory and time-sliced
the GPU between spinning NCCL kernels (bench/NOTES.md). Shards on the CPU, and shards asking for whole GPUs,
keep a process each. A worker reserves one Ray bundle: the sum of its shards' resources.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.placement import ExpertGroupSpec, PlacementPlan, StageSpec

_EPS = 1e-6
_BUILTIN = ("CPU", "GPU", "memory", "object_store_memory")


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process: the shards it holds and the Ray bundle it reserves."""

    index: int  # also its rank in the data plane's process group
    stages: tuple[int, ...]
    expert_groups: tuple[int, ...]
    resources: dict[str, float]

    @property
    def shards(self) -> tuple[str, ...]:
        return tuple(f"stage{i}" for i in self.stages) + tuple(f"experts{g}" for g in self.expert_groups)

    @property
    def name(self) -> str:
        """Its shards' names joined: `stage0+experts0`, or one shard's name when it holds one."""
        return "+".join(self.shards)

    @property
    def bundle(self) -> dict[str, float]:
        """The Ray bundle: amounts of 0 are left out, as Ray wants."""
        return {k: v for k, v in self.resources.items() if v > 0}


def group_workers(plan: PlacementPlan) -> tuple[WorkerSpec, ...]:
    """The plan's shards grouped into workers, in bundle order (the order of `PlacementPlan.shard_names`)."""
    groups: list[list[StageSpec | ExpertGroupSpec]] = []
    open_gpu = 0.0  # GPU fraction of the last group while it can still take fractional shards; 0 when closed
    for spec in plan._in_bundle_order():
        gpu = spec.resources.get("GPU", 0.0)
        fractional = 0 < gpu < 1
        if fractional and open_gpu and open_gpu + gpu <= 1 + _EPS and _custom(groups[-1][0]) == _custom(spec):
            groups[-1].append(spec)
            open_gpu += gpu
            continue
        groups.append([spec])
        open_gpu = gpu if fractional else 0.0
    workers = []
    for i, specs in enumerate(groups):
        resources: dict[str, float] = {}
        for spec in specs:
            for key, amount in spec.resources.items():
                resources[key] = resources.get(key, 0.0) + amount
        resources = {k: round(v, 4) for k, v in resources.items()}  # Ray keeps 1e-4: 0.2 + 0.8 stays 1 GPU
        stages = tuple(s.index for s in specs if isinstance(s, StageSpec))
        experts = tuple(s.index for s in specs if isinstance(s, ExpertGroupSpec))
        workers.append(WorkerSpec(i, stages, experts, resources))
    return tuple(workers)


def busy_workers(plan: PlacementPlan, workers: tuple[WorkerSpec, ...]) -> list[str]:
    """The workers that run more than one loop exchanging messages (a stage and an expert service, or services for
    several stages), each on its own communicator, named with what they run. Empty: every worker runs one loop.

    NCCL does not promise progress for operations of several communicators in flight on one GPU at once: a
    receive spinning in one blocks the device synchronisation another may need (its lazy connection setup, a
    memory allocation). Measured on 2 x H200: two stages whose workers also serve each other's expert groups hung
    in the first step. Such a data plane goes through host memory (gloo) until a schedule that orders every
    worker's messages on one communicator exists; MISTRAL_CLUSTER_CONCURRENT_NCCL=1 tries NCCL anyway (with
    NCCL_RUNTIME_CONNECT=0, every connection made when the group forms). `mistral-cluster plan` says so."""
    busy = []
    for w in workers:
        served = [
            s
            for s, stage in enumerate(plan.stages)
            if s not in w.stages and any(set(plan.expert_groups[g].layers) & set(stage.layers) for g in w.expert_groups)
        ]
        if len(w.stages) + len(served) > 1:
            loops = [f"stage{s}" for s in w.stages] + [f"experts for stage{s}" for s in served]
            busy.append(f"{w.name} ({', '.join(loops)})")
    return busy


def data_plane(plan: PlacementPlan) -> dict:
    """How this placement's workers will exchange activations, and why: what `mistral-cluster plan` prints."""
    on_gpus = any(spec.resources.get("GPU", 0) > 0 for spec in (*plan.stages, *plan.expert_groups))
    busy = busy_workers(plan, group_workers(plan))
    if not on_gpus:
        return {"transport": "gloo", "busy_workers": busy, "note": "CPU workers: gloo"}
    if not busy:
        return {"transport": "nccl", "busy_workers": [], "note": "NCCL between GPUs, decode steps as CUDA graphs"}
    return {
        "transport": "host",
        "busy_workers": busy,
        "note": f"through host memory (gloo), no CUDA graphs: {'; '.join(busy)} run several message loops on one GPU, "
        "and NCCL with several communicators in flight on one GPU hung on 2 H200s. Measured: the two-GPU mixed "
        "example decodes at 0.2x one GPU (bench/NOTES.md). Faster: a stage's experts beside it or on their own GPU "
        "(mixtral-2gpu-experts.yaml); MISTRAL_CLUSTER_CONCURRENT_NCCL=1 tries NCCL anyway.",
    }


def _custom(spec: StageSpec | ExpertGroupSpec) -> frozenset[str]:
    """The custom resources a shard asks for (what pins it to nodes): only shards pinned alike share a worker."""
    return frozenset(k for k in spec.resources if k not in _BUILTIN)


@dataclass(frozen=True)
class WorkerMap:
    """Where each shard lives, for the shards that route messages: which worker holds each stage and group."""

    workers: tuple[WorkerSpec, ...]

    def of_stage(self, stage: int) -> WorkerSpec:
        return next(w for w in self.workers if stage in w.stages)

    def of_group(self, group: int) -> WorkerSpec:
        return next(w for w in self.workers if group in w.expert_groups)

    def of_shard(self, shard: str) -> WorkerSpec:
        return next(w for w in self.workers if shard in w.shards)
