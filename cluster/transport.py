"""The data plane: activations move between shard actors on one torch.distributed process group.

Ray calls cost ~0.7-0.9 ms and a 1 MiB tensor through the object store ~5.7 ms; a torch.distributed message
between two GPUs costs ~25 us. So Ray only starts actors and carries one control call per step, and every
activation (stage to stage, stage to expert group and back) is a point-to-point message here: NCCL between GPUs,
gloo between CPU processes, the same code either way.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

HEADER_LEN = 4  # (layer or STOP, tokens, step, micro-batch)
STOP = -1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


@dataclass
class TransportStats:
    """Time spent waiting on messages and bytes moved, per kind of message; read by the per-step trace."""

    seconds: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, seconds: float, nbytes: int) -> None:
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
        self.bytes[kind] = self.bytes.get(kind, 0) + nbytes
        self.messages[kind] = self.messages.get(kind, 0) + 1

    def take(self) -> dict:
        out = {"seconds": self.seconds, "bytes": self.bytes, "messages": self.messages}
        self.seconds, self.bytes, self.messages = {}, {}, {}
        return out


class Transport:
    """One rank of the shards' process group; every operation is bounded by the group's timeout."""

    def __init__(
        self, rank: int, world_size: int, master_addr: str, master_port: int, device: torch.device,
        timeout_s: float = 60.0,
    ) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        self.backend = backend
        self.stats = TransportStats()

    def send(self, tensor: torch.Tensor, dst: int, kind: str = "activations") -> None:
        t0 = time.perf_counter()
        dist.send(tensor.contiguous(), dst=dst)
        self.stats.add(kind, time.perf_counter() - t0, tensor.nbytes)

    def isend(self, tensor: torch.Tensor, dst: int) -> dist.Work:
        return dist.isend(tensor.contiguous(), dst=dst)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, kind: str = "activations") -> torch.Tensor:
        t0 = time.perf_counter()
        out = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(out, src=src)
        self.stats.add(kind, time.perf_counter() - t0, out.nbytes)
        return out

    def send_header(self, values: list[int], dst: int) -> None:
        self.send(torch.tensor(values, dtype=torch.long, device=self.device), dst, kind="headers")

    def recv_header(self, src: int) -> list[int]:
        return self.recv((HEADER_LEN,), torch.long, src, kind="headers").tolist()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
