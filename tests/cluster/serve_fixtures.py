"""A small Serve app on a local Ray cluster, for test modules that talk to the server over HTTP.

Each module starts its own (module-scoped fixture around `running_server`): Ray allows one driver
connection per process, and the modules want different app args.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
import yaml
from ray import serve

from cluster.cli.serve import start_serve, wait_until_healthy
from tests.ports import free_port


@dataclass(frozen=True)
class Server:
    base: str  # http://host:port
    port: int
    key: str
    model: str | None
    grpc_port: int = 0

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@contextlib.contextmanager
def running_server(
    checkpoint: Path,
    workdir: Path,
    host: str = "127.0.0.1",
    key: str = "test-key-0123456789",
    model: str | None = "small-test",
    grpc_port: int = 0,
    deployment_options: dict | None = None,
    **app_args,
) -> Iterator[Server]:
    """Two stages x two expert groups on half a CPU each, HTTP (and gRPC on `grpc_port` unless it is 0); gRPC, Serve
    and Ray are shut down on the way out. `model=None` leaves the name to the app (random weights name it);
    `deployment_options` go to the ingress deployment (`num_replicas`: each replica is a copy of those 4 shards, 2
    CPUs of the 4 Ray is told of)."""
    placement = {
        "checkpoint": str(checkpoint),
        "dtype": "float32",
        "stages": 2,
        "expert_groups": 2,
        "resources": {"CPU": 0.5},
        "micro_batch_size": 8,
        "token_budget": 256,
        "max_seqs": 8,
    }
    path = workdir / "placement.yaml"
    path.write_text(yaml.safe_dump(placement))
    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    grpc = None
    try:
        named = {"model_name": model} if model is not None else {}
        args = {"placement": str(path), "api_key": key, **named, **app_args}
        grpc = start_serve(args, host, port, grpc_port, deployment_options=deployment_options)
        base = f"http://127.0.0.1:{port}"
        if not wait_until_healthy(base, 180):
            pytest.fail("the server did not become ready in 180 s")
        yield Server(base, port, key, model, grpc_port)
    finally:
        with contextlib.suppress(Exception):  # Ray goes down next either way
            if grpc is not None:
                grpc.stop()
            serve.shutdown()
        ray.shutdown()
