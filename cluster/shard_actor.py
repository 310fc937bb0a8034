"""What every shard actor shares: where it runs, which device it uses, and its place in the transport group."""

from __future__ import annotations

import os
import threading

import torch

from cluster.transport import Transport, device_key, free_port, node_ip


class ShardActor:
    """Base of the stage and expert-group actors (plain classes; `cluster.sharded` wraps them with `ray.remote`)."""

    name: str

    def __init__(self, name: str, rank: int) -> None:
        import ray

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

    def location(self) -> dict:
        """Where Ray put this actor, from Ray's own runtime context (what placement tests assert on)."""
        import ray

        ctx = ray.get_runtime_context()
        return {
            "shard": self.name, "node_id": ctx.get_node_id(), "node_ip": node_ip(), "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "device": str(self.device),
            "placement_group": ctx.get_placement_group_id(), "device_key": f"{ctx.get_node_id()}/{device_key(self.device)}",
        }

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0 names the address every rank joins the transport group at."""
        return node_ip(), free_port()

    def join(
        self, master_addr: str, master_port: int, world_size: int, timeout_s: float, device_keys: list[str] | None = None
    ) -> str:
        """Join the shards' transport group; `device_keys[r]` says which device rank r uses (to find GPU sharers)."""
        mine = device_keys[self.rank] if device_keys else None
        sharing = {r for r, key in enumerate(device_keys or []) if key == mine and r != self.rank and "/cpu" not in key}
        self.transport = Transport(self.rank, world_size, master_addr, master_port, self.device, timeout_s, sharing)
        self.transport.warm_up(self.peers())
        return self.transport.backend

    def peers(self) -> list[int]:
        """Ranks this shard exchanges activations with."""
        return []

    def ping(self) -> str:
        return self.name
