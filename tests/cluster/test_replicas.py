"""Two Serve replicas of the ingress on random weights: two independent copies of the sharded model behind one
endpoint, each serving the one-process engine's tokens; losing one costs no stream on the other, and the requests
made while its replacement loads all go to the survivor."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import httpx
import pytest
import ray

from router.generation import generate
from router.sampling import SamplingParams
from shards.engine import LocalEngine
from shards.make_checkpoint import SMALL_SHAPE, make_random_checkpoint
from tests.cluster.serve_fixtures import running_server
from tests.conftest import random_prompts

MODEL = f"random-{SMALL_SHAPE}"
TOKENS = 24


@pytest.fixture(scope="module")
def server(tmp_path_factory, monkeypatch_module):
    home = tmp_path_factory.mktemp("home")
    monkeypatch_module.setenv("MISTRAL_CLUSTER_HOME", str(home))  # read by the replicas, which Ray starts after this
    with running_server(
        home / "unused",  # the placement's checkpoint; random_weights replaces it
        tmp_path_factory.mktemp("replicas"),
        model=None,
        random_weights=SMALL_SHAPE,
        deployment_options={"num_replicas": 2},
    ) as s:
        wait_for_ready_replicas(s.base, 2, 240)
        # /health answers from each replica at once, but Serve's router learns that a replica is ready from its
        # routing stats, sent every second (`request_routing_stats_period_s`): until then it sends every request to
        # the replica it already knew (the 8 streams all went to one replica, once in a fresh clone's CI run)
        time.sleep(2.5)
        yield s


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def expected(tmp_path_factory):
    """Greedy tokens of the one-process engine on a random checkpoint of the same shape made elsewhere: the same
    weights, as each tensor is drawn from the seed and its name."""
    engine = LocalEngine(make_random_checkpoint(tmp_path_factory.mktemp("reference"), SMALL_SHAPE), max_seqs=8)
    prompts = random_prompts([5, 9, 13, 7, 11, 6, 8, 10], seed=5)
    done = generate(engine, prompts, SamplingParams(max_tokens=TOKENS, ignore_eos=True))
    return [(p, d.token_ids) for p, d in zip(prompts, done, strict=True)]


def wait_for_ready_replicas(base: str, n: int, timeout_s: float) -> set[str]:
    """The replica ids that answered /health `ready`, once there are `n` (Serve sends /health to any replica)."""
    seen, deadline = set(), time.monotonic() + timeout_s
    while len(seen) < n and time.monotonic() < deadline:
        r = httpx.get(base + "/health", timeout=10)
        if r.status_code == 200:
            seen.add(r.json()["replica"])
        time.sleep(0.3)
    assert len(seen) >= n, f"only {sorted(seen)} ready after {timeout_s} s"
    return seen


async def stream(client: httpx.AsyncClient, server, prompt: list[int], progress: dict | None = None) -> dict:
    """One streamed completion of token ids: the replica that served it, its tokens, whether it ended with [DONE],
    and the transport error that ended it if one did."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0, "stream": True}
    body |= {"ignore_eos": True, "return_token_ids": True}
    out = {"replica": None, "tokens": [], "done": False, "error": None}
    if progress is not None:
        progress[id(out)] = out
    try:
        async with client.stream("POST", server.base + "/v1/completions", json=body, headers=server.auth()) as r:
            assert r.status_code == 200, await r.aread()
            out["replica"] = r.headers["x-mistral-cluster-replica"]
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    out["done"] = True
                elif line.startswith("data: "):
                    for choice in json.loads(line[6:])["choices"]:
                        out["tokens"] += choice["token_ids"]
    except httpx.TransportError as e:
        out["error"] = e
    return out


def test_the_model_is_listed_as_random_weights_not_as_a_checkpoint(server):
    (model,) = httpx.get(server.base + "/v1/models", headers=server.auth(), timeout=30).json()["data"]
    assert model["id"] == MODEL
    assert "random weights" in model["owned_by"] and "benchmark" in model["description"]


def test_both_replicas_serve_the_one_process_engines_tokens(server, expected):
    async def main():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(stream(client, server, p) for p, _ in expected))

    results = asyncio.run(main())
    split = Counter(r["replica"] for r in results)
    # the router joins the shortest queue: 8 streams sent at once split 4 / 4 (Serve's own choice gave 181 / 75)
    assert sorted(split.values()) == [4, 4], f"the 8 streams split {dict(split)} over the two replicas"
    for r, (_, tokens) in zip(results, expected, strict=True):
        assert r["done"] and r["tokens"] == tokens, r["replica"]


def test_losing_a_replica_fails_no_stream_of_the_other_and_new_requests_go_to_the_survivor(server, expected):
    async def main():
        progress: dict = {}
        async with httpx.AsyncClient(timeout=300) as client:
            tasks = [asyncio.create_task(stream(client, server, p, progress)) for p, _ in expected]
            deadline = time.monotonic() + 120
            while not (len(progress) == len(tasks) and all(len(r["tokens"]) >= 2 for r in progress.values())):
                assert time.monotonic() < deadline, "the streams did not start"
                await asyncio.sleep(0.05)
            replicas = {r["replica"] for r in progress.values()}
            assert len(replicas) == 2
            lost = sorted(replicas)[0]
            ray.kill(ray.get_actor(f"SERVE_REPLICA::mistral-cluster#OpenAIIngress#{lost}", namespace="serve"))
            results = await asyncio.gather(*tasks)
            after = await asyncio.gather(*(stream(client, server, p) for p, _ in expected[:4]))
            return lost, results, after

    lost, results, after = asyncio.run(main())
    for r, (_, tokens) in zip(results, expected, strict=True):
        if r["replica"] == lost:
            # Serve's proxy cuts the stream: the body ends without its last chunk, no [DONE]; what came was right.
            assert isinstance(r["error"], httpx.RemoteProtocolError) and not r["done"]
            assert r["tokens"] == tokens[: len(r["tokens"])]
        else:
            assert r["error"] is None and r["done"] and r["tokens"] == tokens
    assert any(r["replica"] == lost for r in results) and any(r["replica"] != lost for r in results)
    # The replacement starts at once but reports itself loading, so the router sends it nothing yet.
    for r, (_, tokens) in zip(after, expected[:4], strict=True):
        assert r["replica"] != lost and r["done"] and r["tokens"] == tokens

    survivor = next(r["replica"] for r in results if r["replica"] != lost)
    replacement = wait_for_ready_replicas(server.base, 2, 240) - {survivor}
    assert replacement and lost not in replacement
