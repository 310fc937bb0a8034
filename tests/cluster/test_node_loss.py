"""A whole node lost, and no other node has the custom resource its expert group asks for: readiness goes false
within seconds with the shard and the missing resource named (not at the 300 s load timeout), the router keeps
retrying, and a node that joins with the resource brings the model back, with a request made meanwhile answered
token-exact."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import ray
import yaml
from ray import serve
from ray.cluster_utils import Cluster

from cluster.cli.serve import wait_until_healthy
from cluster.serve import OpenAIIngress
from tests.conftest import hf_greedy, random_prompts
from tests.ports import free_port

LONE = "expert_node_0"  # only the node of expert group 0 has it
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def nodes():
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"ingress_node": 1, "shard_node": 3}, "include_dashboard": False},
    )
    lone = cluster.add_node(num_cpus=1, resources={LONE: 1})
    ray.init(address=cluster.address, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    yield {"cluster": cluster, "lone": lone, "base": f"http://127.0.0.1:{port}"}
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def server(nodes, checkpoint_factory, tmp_path_factory):
    checkpoint = checkpoint_factory("mixtral", seed=61, window=16)  # the one test_serve also reads with transformers
    placement = {
        "checkpoint": str(checkpoint),
        "dtype": "float32",
        "strategy": "pack",
        "stages": [
            {"layers": [0, 1], "resources": {"CPU": 0.25, "shard_node": 1}},
            {"layers": [2, 3], "resources": {"CPU": 0.25, "shard_node": 1}},
        ],
        "expert_groups": [
            {"experts": [0, 1], "resources": {"CPU": 0.25, LONE: 1}},
            {"experts": [2, 3], "resources": {"CPU": 0.25, "shard_node": 1}},
        ],
        "micro_batch_size": 4,
        "token_budget": 256,
        "max_seqs": 4,
    }
    path = tmp_path_factory.mktemp("node-loss") / "placement.yaml"
    path.write_text(yaml.safe_dump(placement))
    ingress = OpenAIIngress.options(ray_actor_options={"num_cpus": 0, "resources": {"ingress_node": 0.01}})
    serve.run(
        ingress.bind(placement=str(path), step_timeout_s=20.0, request_timeout_s=120.0),
        name="node-loss",
        route_prefix="/",
        blocking=False,
    )
    assert wait_until_healthy(nodes["base"], 120), "server did not become ready"
    return checkpoint


def complete(base: str, prompt: list[int]) -> list[int]:
    r = httpx.post(
        base + "/v1/completions",
        timeout=120,
        json={
            "prompt": prompt,
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def health_once(base: str, predicate, timeout_s: float) -> dict | None:
    """The first /health body (with its status code) that satisfies `predicate` within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = httpx.get(base + "/health", timeout=5)
        body = {"code": r.status_code, **r.json()}
        if predicate(body):
            return body
        time.sleep(0.2)
    return None


def node_of(class_name: str, name_suffix: str = "") -> str:
    return next(
        a["Address"]["NodeID"]
        for a in ray._private.state.actors().values()
        if a["State"] == "ALIVE"
        and a["ActorClassName"].endswith(class_name)
        and a.get("Name", "").endswith(name_suffix)
    )


def test_a_lost_node_whose_resource_no_node_has_is_named_until_a_node_with_it_joins(nodes, server, hf_model):
    base, cluster = nodes["base"], nodes["cluster"]
    prompt = random_prompts([9], seed=94)[0]
    expected = hf_greedy(hf_model(server), prompt, NEW_TOKENS)
    assert node_of("RouterActor") == cluster.head_node.node_id  # beside the ingress, so it outlives a shard node

    removed = time.monotonic()
    cluster.remove_node(nodes["lone"])
    health = health_once(base, lambda h: LONE in (h.get("reason") or ""), 5)
    assert health is not None, f"/health did not name {LONE} within 5 s of the node's loss"
    print(f"lost node named after {time.monotonic() - removed:.2f} s")
    assert health["code"] == 503 and health["status"] == "recovering"
    assert (
        f"experts0 cannot be placed until a node with its resources joins: {LONE}: 1 (no alive node has {LONE})"
        in health["reason"]
    )

    answered: list[list[int]] = []  # accepted while no node can hold experts0: queued, not refused
    waiting = threading.Thread(target=lambda: answered.append(complete(base, prompt)))
    waiting.start()
    time.sleep(2)  # the router retries recovery meanwhile; still not ready, for the same reason
    health = health_once(base, lambda h: True, 5)
    assert health["code"] == 503 and LONE in health["reason"] and not answered

    joined = cluster.add_node(num_cpus=1, resources={LONE: 1})
    assert wait_until_healthy(base, 60), "readiness did not come back after a node with the resource joined"
    waiting.join(60)
    assert answered == [expected]
    assert node_of("ShardWorker", "-experts0") == joined.node_id
    assert complete(base, prompt) == expected
