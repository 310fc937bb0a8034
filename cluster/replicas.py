"""The ingress's replicas: each is one copy of the model. Which replica answered (a response header), which one
Serve sends a request to (ready copies first), and the arguments of a copy on random weights.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Any

from ray import serve
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

REPLICA_HEADER = "x-mistral-cluster-replica"


def replica_name() -> str:
    """This Serve replica's id ("" outside a replica): which copy of the model answered."""
    try:
        return serve.get_replica_context().replica_tag
    except Exception:  # noqa: BLE001 - not in a replica (a unit test building the app)
        return ""


def random_model_name(shape: str) -> str:
    """The model id a random-weight server answers to: it never looks like a trained checkpoint's."""
    return f"random-{shape}"


class ReadyReplicasFirst(FIFOMixin, RequestRouter):
    """Serve's request router for the ingress: a replica whose copy of the model is still loading (just started by
    scaling up, or restarted after a loss) or is draining gets requests only when no replica is ready. Among the ready
    ones, the replica with the fewest of this router's requests still running (join the shortest queue).

    The count is the router's own: a request counts against the replica it was routed to from the moment it is
    chosen (a burst is routed before any of it is sent) until Serve reports it completed. Serve's own choice reads its
    queue-length cache, which lags a burst and forgets a count after 10 s without a probe: on the two-H200 host it
    sent 181 of 256 streams to one of two copies and 319 of 512 at the next level, so one copy queued requests beyond
    its batch while the other had free slots."""

    # A request routed but never sent (its caller went away while it waited) never completes: forgotten after this
    # long, so that it does not weigh on its replica for good. A stream that runs longer only stops being counted.
    forget_after_s = 3600.0

    @property
    def _routed(self) -> dict[str, tuple[Any, float]]:
        """internal request id -> (the replica id it was routed to, when), while it runs."""
        if "_routed_requests" not in self.__dict__:  # Serve builds the router itself; this is its state
            self._routed_requests: dict[str, tuple[Any, float]] = {}
        return self._routed_requests

    def running_on(self) -> Counter:
        """This router's requests still running, per replica id."""
        horizon = time.monotonic() - self.forget_after_s
        for request_id in [k for k, (_, t) in self._routed.items() if t < horizon]:
            del self._routed[request_id]
        return Counter(replica for replica, _ in self._routed.values())

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        self._routed.pop(internal_request_id, None)

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        for request_id in [k for k, (v, _) in self._routed.items() if v == replica_id]:
            del self._routed[request_id]

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        ready = [r for r in candidate_replicas if r.routing_stats.get("ready")]
        others = [r for r in candidate_replicas if not r.routing_stats.get("ready")]
        # One rank per ready replica, least loaded first (ties at random); Serve takes the first rank whose replica
        # has room under `max_ongoing_requests`, so the request is counted against the first.
        running = self.running_on()
        ready.sort(key=lambda r: (running[r.replica_id], random.random()))
        if ready and pending_request is not None:
            self._routed[pending_request.metadata.internal_request_id] = (ready[0].replica_id, time.monotonic())
        return [[r] for r in ready] + ([random.sample(others, min(2, len(others)))] if others else [])


class ReplicaHeader:
    """Adds `x-mistral-cluster-replica` to every HTTP response. Plain ASGI, not Starlette's BaseHTTPMiddleware, so a
    stream and a client's disconnect pass through untouched."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = (REPLICA_HEADER.encode(), replica_name().encode())

        async def send_named(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        await self.app(scope, receive, send_named)


def check_random_weights(args: dict[str, Any]) -> None:
    """`random_weights` names a shape; the checkpoint and the model's name follow from it and cannot be given.
    `max_model_len` goes with it (a real checkpoint's context is its own)."""
    from shards.make_checkpoint import random_shapes

    shape, length = args.get("random_weights"), args.get("max_model_len")
    if shape is None:
        raise ValueError("max_model_len goes with random_weights: a checkpoint's context is the one it was trained for")
    if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 2):
        raise ValueError(f"max_model_len: expected an integer of 2 or more, got {length!r}")
    if shape not in random_shapes():
        raise ValueError(f"random_weights: unknown shape {shape!r}; choose one of {', '.join(random_shapes())}")
    for key in ("checkpoint", "model_name"):
        if args.get(key) is not None:
            raise ValueError(
                f"{key} cannot be given with random_weights: the weights are drawn from a seed and the model is "
                f"served as {random_model_name(shape)!r}"
            )
