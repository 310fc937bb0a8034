"""The RayService's own `serveConfigV2`, deployed the way KubeRay deploys it (Serve's config API), on a local Ray
with the project's small checkpoint and a CPU placement substituted for the paths: it starts and completes, over
HTTP and through Serve's gRPC proxy, with the API key the Secret gives it."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import pytest
import ray
import yaml
from ray import serve
from ray.serve._private.api import serve_start
from ray.serve.schema import ServeDeploySchema

from cluster.cli.serve import wait_until_healthy
from cluster.proto.generation_pb2 import GenerateRequest
from cluster.proto.generation_pb2_grpc import GenerationStub
from tests.conftest import hf_greedy
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
KEY = "rayservice-test-key"


def rayservice_serve_config(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "kuberay" / name).read_text()) if d]
    service = next(d for d in docs if d.get("kind") == "RayService")
    return yaml.safe_load(service["spec"]["serveConfigV2"])


@pytest.fixture(scope="module")
def deployed(checkpoint_factory, tmp_path_factory):
    checkpoint = checkpoint_factory("mixtral", seed=81, window=16)
    config = rayservice_serve_config("rayservice.yaml")
    app = config["applications"][0]
    placement = yaml.safe_load((ROOT / "deploy" / "examples" / "local.yaml").read_text())
    placement.update({"checkpoint": str(checkpoint), "resources": {"CPU": 0.5}})
    path = tmp_path_factory.mktemp("kuberay") / "placement.yaml"
    path.write_text(yaml.safe_dump(placement))
    # Only what points outside this machine changes: the mounted paths and the ports.
    app["args"]["placement"] = str(path)
    app["args"]["checkpoint"] = str(checkpoint)
    env = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
    env["MISTRAL_CLUSTER_API_KEY"] = KEY  # what the pod's Secret sets
    http_port, grpc_port = free_port(), free_port()
    config["http_options"].update({"host": "127.0.0.1", "port": http_port})
    config["grpc_options"]["port"] = grpc_port
    schema = ServeDeploySchema.model_validate(config)
    ray.init(address="local", num_cpus=4, resources={"ingress_node": 1}, include_dashboard=False, log_to_driver=False)
    client = serve_start(http_options=config["http_options"], grpc_options=config["grpc_options"])
    client.deploy_apps(schema)
    base = f"http://127.0.0.1:{http_port}"
    if not wait_until_healthy(base, 240):
        pytest.fail("the RayService's Serve config did not become healthy in 240 s")
    yield {
        "base": base,
        "model": app["args"]["model_name"],
        "checkpoint": checkpoint,
        "grpc": f"127.0.0.1:{grpc_port}",
        "app": app["name"],
    }
    serve.shutdown()
    ray.shutdown()


def test_the_rayservice_serve_config_starts_and_answers_a_completion(deployed, hf_model):
    r = httpx.post(
        deployed["base"] + "/v1/completions",
        timeout=120,
        headers={"Authorization": f"Bearer {KEY}"},
        json={
            "model": deployed["model"],
            "prompt": [1, 415, 5565, 302, 4843, 349],
            "max_tokens": 8,
            "temperature": 0,
            "return_token_ids": True,
            "ignore_eos": True,
        },
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["token_ids"] == hf_greedy(hf_model(deployed["checkpoint"]), [1, 415, 5565, 302, 4843, 349], 8)


def test_the_ingress_runs_where_the_config_pins_it(deployed):
    status = serve.status().applications
    app = next(iter(status.values()))
    assert app.status == "RUNNING"
    assert ray.available_resources().get("ingress_node", 0) < 1  # the override's ingress_node: 0.01 is held


def test_grpc_through_serves_proxy_needs_the_key_and_answers_with_it(deployed):
    app = ("application", deployed["app"])
    with grpc.insecure_channel(deployed["grpc"]) as channel:
        stub = GenerationStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(GenerateRequest(prompt="hi", max_tokens=2), metadata=(app,), timeout=60)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.Generate(
            GenerateRequest(prompt="hi", max_tokens=2), metadata=(app, ("authorization", f"Bearer {KEY}")), timeout=60
        )
    assert len(reply.token_ids) == 2
