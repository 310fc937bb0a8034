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

import ray
import torch
import torch.distributed as dist

HEADER_LEN = 4  # (layer or STOP, tokens, step, micro-batch)
STOP = -1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
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


def device_key(device: torch.device) -> str:
    """Which physical device this process computes on: GPU UUID, or 'cpu'. Ranks with equal keys share a GPU."""
    if device.type != "cuda":
        return "cpu"
    return str(torch.cuda.get_device_properties(device).uuid)


class Transport:
    """One rank of the shards' process group; every operation is bounded by the group's timeout.

    On GPUs the group has two backends: NCCL between ranks on different GPUs, gloo (through host memory) between
    ranks that share one GPU (fractional GPUs), because NCCL refuses two ranks on one device.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        device: torch.device,
        timeout_s: float = 60.0,
        same_device_peers: set[int] | frozenset[int] = frozenset(),
    ) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        self.backend = backend
        self.via_host = set(same_device_peers) if device.type == "cuda" else set()
        self.stats = TransportStats()

    def send(self, tensor: torch.Tensor, dst: int, kind: str = "activations") -> None:
        t0 = time.perf_counter()
        dist.send(self._outgoing(tensor, dst), dst=dst)
        self.stats.add(kind, time.perf_counter() - t0, tensor.nbytes)

    def isend(self, tensor: torch.Tensor, dst: int) -> dist.Work:
        return dist.isend(self._outgoing(tensor, dst), dst=dst)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, kind: str = "activations") -> torch.Tensor:
        t0 = time.perf_counter()
        staged = src in self.via_host
        out = torch.empty(shape, dtype=dtype, device="cpu" if staged else self.device)
        dist.recv(out, src=src)
        if staged:
            out = out.to(self.device)
        self.stats.add(kind, time.perf_counter() - t0, out.nbytes)
        return out

    def warm_up(self, peers: list[int]) -> None:
        """Exchange one small message with each peer now, so NCCL's per-pair setup (~0.5 s) is not in step 1.

        Pairs are visited in one global order (lowest rank first), which no two ranks can wait on in a cycle.
        """
        probe = torch.zeros(1, device=self.device)
        for peer in sorted(set(peers) - {self.rank}, key=lambda p: (min(p, self.rank), max(p, self.rank))):
            if self.rank < peer:
                self.send(probe, peer, kind="warm_up")
                self.recv((1,), probe.dtype, peer, kind="warm_up")
            else:
                self.recv((1,), probe.dtype, peer, kind="warm_up")
                self.send(probe, peer, kind="warm_up")
            if self.device.type == "cuda":
                torch.cuda.current_stream().synchronize()
        self.stats.take()

    def _outgoing(self, tensor: torch.Tensor, dst: int) -> torch.Tensor:
        return tensor.contiguous().cpu() if dst in self.via_host else tensor.contiguous()

    def send_header(self, values: list[int], dst: int) -> None:
        self.send(torch.tensor(values, dtype=torch.long, device=self.device), dst, kind="headers")

    def recv_header(self, src: int) -> list[int]:
        header = self.recv((HEADER_LEN,), torch.long, src, kind="headers")
        if header.is_cuda:
            # A header can be a long wait (the peer sends when it gets there). Wait on this thread's stream, which
            # releases the GIL, before reading it: `.tolist()` would block holding the GIL and starve the actor's
            # other serving threads, deadlocking the pipeline.
            torch.cuda.current_stream().synchronize()
        return header.tolist()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
