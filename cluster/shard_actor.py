"""What every shard actor shares: where it runs, which device it uses, and its place in the transport group."""

from __future__ import annotations

import faulthandler
import os
import sys
import threading

import ray
import torch

from cluster.transport import Transport, device_key, free_port, node_ip


class ShardActor:
    """Base of the stage and expert-group actors (plain classes; `cluster.sharded` wraps them with `ray.remote`)."""

    name: str

    def __init__(self, name: str, rank: int) -> None:
        self.name = name
        self.rank = rank
        gpu_ids = ray.get_gpu_ids()
        self.device = torch.device("cuda", 0) if gpu_ids and torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(max(1, int(os.environ.get("MISTRAL_CLUSTER_THREADS", "1"))))
        self.transport: Transport | None = None
        self._lock = threading.Lock()
        dump_every = os.environ.get("MISTRAL_CLUSTER_STACK_DUMP_S")
        if dump_every:  # diagnosing a stall: every thread's Python stack to this worker's stderr, periodically
            faulthandler.dump_traceback_later(float(dump_every), repeat=True, file=sys.stderr)

    def location(self) -> dict:
        """Where Ray put this actor, from Ray's own runtime context (what placement tests assert on)."""
        ctx = ray.get_runtime_context()
        return {
            "shard": self.name,
            "node_id": ctx.get_node_id(),
            "node_ip": node_ip(),
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "device": str(self.device),
            "placement_group": ctx.get_placement_group_id(),
            "device_key": f"{ctx.get_node_id()}/{device_key(self.device)}",
        }

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0 names the address every rank joins the transport group at."""
        return node_ip(), free_port()

    def join(
        self,
        master_addr: str,
        master_port: int,
        world_size: int,
        timeout_s: float,
        device_keys: list[str] | None = None,
    ) -> str:
        """Join the shards' transport group; `device_keys[r]` says which device rank r uses (to find GPU sharers)."""
        keys = device_keys or []
        gpu_keys = [k for k in keys if not k.endswith("/cpu")]
        if len(gpu_keys) != len(set(gpu_keys)):
            # Two shard processes on one GPU: an NCCL receive spinning in one starves the other's kernels (the GPU
            # is time-sliced between processes), which deadlocked a 2-stage x 2-group pipeline on 2 H200s. So when
            # any GPU is shared, every message goes through host memory; NCCL only when each shard owns its GPU.
            via_host = set(range(world_size)) - {self.rank}
        else:
            via_host = set()
        self.transport = Transport(self.rank, world_size, master_addr, master_port, self.device, timeout_s, via_host)
        self.transport.warm_up(self.peers())
        return self.transport.backend

    def reset_transport(self) -> None:
        """Leave the transport group (a peer died): the supervisor forms a new one with the live and new shards."""
        if self.transport is not None:
            try:
                self.transport.close()
            finally:
                self.transport = None

    def peers(self) -> list[int]:
        """Ranks this shard exchanges activations with."""
        return []

    def ping(self) -> str:
        return self.name
