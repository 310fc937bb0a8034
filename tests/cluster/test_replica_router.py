"""The ingress's request router on its own (no Serve): ready replicas first, the least loaded of them by the
router's own count of requests routed and not completed, a request that never completes forgotten in the end."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from cluster.replicas import ReadyReplicasFirst


def replica(name: str, ready: bool = True) -> SimpleNamespace:
    return SimpleNamespace(replica_id=name, routing_stats={"ready": ready})


def request(request_id: str) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(internal_request_id=request_id))


def route(router: ReadyReplicasFirst, replicas: list, request_id: str) -> str:
    ranks = asyncio.run(router.choose_replicas(replicas, request(request_id)))
    return ranks[0][0].replica_id  # Serve sends it to the first rank with room


def test_a_burst_is_split_evenly_and_completions_free_their_replica():
    router = object.__new__(ReadyReplicasFirst)  # Serve constructs it with its own arguments; its state is ours
    replicas = [replica("a"), replica("b"), replica("c")]
    chosen = [route(router, replicas, f"r{i}") for i in range(9)]
    assert sorted(chosen.count(name) for name in "abc") == [3, 3, 3]
    for i, name in enumerate(chosen):
        if name == "a":
            router.on_request_completed("a", f"r{i}")
    assert [route(router, replicas, f"s{i}") for i in range(3)] == ["a"] * 3  # the freed one fills up first


def test_a_loading_replica_gets_requests_only_when_none_is_ready():
    router = object.__new__(ReadyReplicasFirst)
    replicas = [replica("loading", ready=False), replica("ready")]
    assert {route(router, replicas, f"r{i}") for i in range(5)} == {"ready"}
    assert route(router, [replica("loading", ready=False)], "x") == "loading"


def test_a_request_that_never_completes_is_forgotten_after_an_hour(monkeypatch):
    router = object.__new__(ReadyReplicasFirst)
    replicas = [replica("a"), replica("b")]
    now = [1000.0]
    monkeypatch.setattr("cluster.replicas.time.monotonic", lambda: now[0])
    first = route(router, replicas, "lost")  # routed, then its caller went away before it was sent
    assert route(router, replicas, "next") != first
    now[0] += router.forget_after_s + 1
    assert router.running_on()[first] == 0 and router.running_on()["b" if first == "a" else "a"] == 0
