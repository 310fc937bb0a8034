"""The data plane: the workers on one torch.distributed process group, with one channel (a process group of two
ranks) per kind of traffic between two workers.

Ray calls cost ~0.7-0.9 ms and a 1 MiB tensor through the object store ~5.7 ms; a torch.distributed message
between two GPUs costs ~25 us. So Ray only starts, watches and restarts the actors; the activations (stage to
stage, stage to expert groups and back) are messages here: NCCL between GPUs, gloo between CPU processes, the same
code either way. Plans and picked tokens travel between the router and the workers on `cluster.step_link`.

Why channels: a worker runs several loops at once (its stage, and the expert service it gives other stages), and
NCCL needs the operations on one communicator issued in the same order on both sides. Each channel is used by
exactly one thread at each end, so every channel's order is fixed by construction.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import ray
import torch
import torch.distributed as dist

from router.step import TransportTally

RENDEZVOUS_TIMEOUT_S = 10.0

_WAITING: dict[int, float] = {}  # thread id -> since when it has been blocked on a peer (or the device)


@contextmanager
def waiting_on_peer() -> Iterator[None]:
    """Mark this thread as blocked on another worker (a message, or a device sync that may wait for one), so a
    recovery can tell a loop stuck waiting on a peer from a loop that is itself stuck (`threads_waiting`)."""
    tid = threading.get_ident()
    _WAITING[tid] = time.monotonic()
    try:
        yield
    finally:
        _WAITING.pop(tid, None)


def threads_waiting() -> set[int]:
    return set(_WAITING)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    return ray.util.get_node_ip_address()


def device_key(device: torch.device) -> str:
    """Which physical device this process computes on: GPU UUID, or 'cpu'. Ranks with equal keys share a GPU."""
    if device.type != "cuda":
        return "cpu"
    return str(torch.cuda.get_device_properties(device).uuid)


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

    def take(self) -> TransportTally:
        out = TransportTally(self.seconds, self.bytes, self.messages)
        self.seconds, self.bytes, self.messages = {}, {}, {}
        return out


@dataclass(frozen=True)
class ChannelKey:
    """A kind of traffic between two workers (ranks): `pipe` (a stage's activations to the next stage) or `experts`
    (a stage's tokens to a worker holding expert groups of its layers, and their results back)."""

    kind: str
    a: int  # the rank that starts each exchange: the sending stage
    b: int
    tag: int  # the stage: one channel per stage and peer


class Channel:
    """Two ranks' private process group; `send`/`recv` stage through host memory where the peer shares the GPU."""

    def __init__(self, key: ChannelKey, group, rank: int, device: torch.device, via_host: bool) -> None:
        self.key, self.group = key, group
        self.peer = key.b if rank == key.a else key.a
        self.device, self.via_host = device, via_host
        self.stats = TransportStats()

    def isend(self, tensor: torch.Tensor, kind: str) -> dist.Work:
        """Sent in the background: keep `tensor` alive until the returned work is waited on."""
        self.stats.add(kind, 0.0, tensor.nbytes)
        out = tensor.contiguous()
        return dist.isend(out.cpu() if self.via_host else out, dst=self.peer, group=self.group)

    def send(self, tensor: torch.Tensor, kind: str) -> None:
        t0 = time.perf_counter()
        out = tensor.contiguous()
        with waiting_on_peer():
            dist.send(out.cpu() if self.via_host else out, dst=self.peer, group=self.group)
        self.stats.add(kind, time.perf_counter() - t0, tensor.nbytes)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, kind: str) -> torch.Tensor:
        t0 = time.perf_counter()
        out = torch.empty(shape, dtype=dtype, device="cpu" if self.via_host else self.device)
        with waiting_on_peer():
            dist.recv(out, src=self.peer, group=self.group)
        if self.via_host and self.device.type != "cpu":
            out = out.to(self.device)
        self.stats.add(kind, time.perf_counter() - t0, out.nbytes)
        return out

    def recv_into(self, out: torch.Tensor, kind: str) -> torch.Tensor:
        """Receive into a buffer that already exists (a captured graph's static input, a reused plan buffer)."""
        if self.via_host and out.device.type != "cpu":
            out.copy_(self.recv(tuple(out.shape), out.dtype, kind))
            return out
        t0 = time.perf_counter()
        with waiting_on_peer():
            dist.recv(out, src=self.peer, group=self.group)
        self.stats.add(kind, time.perf_counter() - t0, out.nbytes)
        return out


class _Done:
    """A send that completed at once."""

    def wait(self) -> bool:
        return True


class LocalPipe:
    """Two adjacent stages in one worker: activations handed over in memory, with no message. On a GPU the
    receiving loop's stream waits for the sending loop's (they run on streams of their own)."""

    via_host = False

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self.stats = TransportStats()

    def isend(self, tensor: torch.Tensor, kind: str) -> _Done:
        ready = None
        if tensor.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        self._queue.put((tensor, ready))
        return _Done()

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, kind: str) -> torch.Tensor:
        with waiting_on_peer():
            tensor, ready = self._queue.get()
        if ready is not None:
            torch.cuda.current_stream().wait_event(ready)
        return tensor


class Transport:
    """One rank of the process group and the channels it takes part in; every wait is bounded by the group's
    timeout. On GPUs the group has two backends: NCCL for CUDA tensors, gloo for host tensors (peers that share a
    GPU: NCCL refuses two ranks on one device)."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        device: torch.device,
        timeout_s: float,
        device_keys: list[str],
        channels: list[ChannelKey],
        all_via_host: bool = False,
    ) -> None:
        """`all_via_host`: every message through host memory (gloo), as for peers that share a GPU."""
        self.rank, self.world_size, self.device = rank, world_size, device
        self.backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        # The rendezvous has a deadline of its own, shorter than the operations': a worker that died while the group
        # formed fails the others' joins in seconds, and recovery tries again.
        store = dist.TCPStore(
            master_addr,
            master_port,
            world_size,
            is_master=rank == 0,
            timeout=timedelta(seconds=min(timeout_s, RENDEZVOUS_TIMEOUT_S)),
        )
        dist.init_process_group(
            backend=self.backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
        self.channels: dict[ChannelKey, Channel] = {}
        for key in channels:  # every rank creates every channel, in one order: new_group is collective
            group = dist.new_group([key.a, key.b])
            if rank in (key.a, key.b):
                peer = key.b if rank == key.a else key.a
                shared = device_keys[rank] == device_keys[peer] and device_keys[rank] != "cpu"
                via_host = device.type == "cuda" and (shared or all_via_host)
                self.channels[key] = Channel(key, group, rank, device, via_host=via_host)

    def channel(self, kind: str, a: int, b: int, tag: int) -> Channel:
        return self.channels[ChannelKey(kind, a, b, tag)]

    @property
    def any_via_host(self) -> bool:
        return any(ch.via_host for ch in self.channels.values())

    def abort(self, timeout_s: float = 2.0) -> str:
        """Abort every communicator (NCCL): operations waiting on a peer that is gone end with an error, so the
        loops waiting on them can stop. A no-op for gloo, whose waits end when the peer releases its group.

        The aborts run on a thread of their own, waited for at most `timeout_s`: an abort that never returns (NCCL
        can block in one while a kernel waits on a dead peer) must not hold up the reset that called it. Returns
        what happened, for the reset's message and the worker's log."""
        outcome: list[str] = []

        def run() -> None:
            for key, ch in self.channels.items():
                t0 = time.perf_counter()
                try:
                    dist.distributed_c10d._abort_process_group(ch.group)
                    outcome.append(f"{key.kind}{key.a}-{key.b} aborted in {time.perf_counter() - t0:.2f} s")
                except Exception as e:  # noqa: BLE001 - not supported by this backend, or already gone
                    outcome.append(f"{key.kind}{key.a}-{key.b}: {type(e).__name__}: {e}")

        t = threading.Thread(target=run, name="abort", daemon=True)
        t.start()
        t.join(timeout_s)
        if t.is_alive():
            outcome.append(f"an abort did not return within {timeout_s:g} s")
        return "; ".join(outcome) or "no channel"

    def close(self) -> None:
        self.channels = {}
        if dist.is_initialized():
            dist.destroy_process_group()


def tally(channels: list[Channel]) -> TransportTally:
    """These channels' waits and bytes since the last call, summed by kind of message (one thread's channels)."""
    seconds: dict[str, float] = {}
    nbytes: dict[str, int] = {}
    messages: dict[str, int] = {}
    for ch in channels:
        t = ch.stats.take()
        for kind in t.seconds:
            seconds[kind] = seconds.get(kind, 0.0) + t.seconds[kind]
            nbytes[kind] = nbytes.get(kind, 0) + t.bytes[kind]
            messages[kind] = messages.get(kind, 0) + t.messages[kind]
    return TransportTally(seconds, nbytes, messages)
