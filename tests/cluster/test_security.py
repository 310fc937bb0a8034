"""What the server trusts and what it exposes: the API key on every route but health and metrics and on gRPC, HTTP
and gRPC on the loopback interface by default, checkpoints only as safetensors (never unpickled), tensors checked by
dtype and shape, and request bodies kept out of the logs."""

from __future__ import annotations

import ipaddress
import json
import pickle
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import grpc
import httpx
import pytest
import ray
import torch
from fastapi.routing import APIRoute
from safetensors.torch import load_file, save_file

from cluster.cli import build_parser
from cluster.proto.generation_pb2 import GenerateRequest
from cluster.proto.generation_pb2_grpc import GenerationStub
from cluster.serve import PUBLIC_ROUTES, api
from shards.checkpoint import CheckpointError, CheckpointReader, ShardSelection
from shards.config import load_config
from tests.cluster.serve_fixtures import running_server
from tests.ports import free_port


def cli_default_host() -> str:
    return build_parser().parse_args(["serve", "--config", "placement.yaml"]).host


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    return checkpoint_factory("mixtral", seed=61, window=16)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    with running_server(
        checkpoint,
        tmp_path_factory.mktemp("security"),
        host=cli_default_host(),
        grpc_port=free_port(),
        max_tokens_ceiling=4,
    ) as s:
        yield s


def http_routes(router, prefix: str = "") -> list[tuple[str, str]]:
    """(method, path) of every route of the app; FastAPI >= 0.137 nests included routers."""
    out = []
    for route in router.routes:
        if hasattr(route, "original_router"):
            out += http_routes(route.original_router, prefix + route.include_context.prefix)
        elif isinstance(route, APIRoute):
            out += [(method, prefix + route.path) for method in sorted(route.methods)]
    return out


# --- the API key -----------------------------------------------------------------------------------------


def test_every_route_but_health_and_metrics_answers_401_without_the_right_key(server):
    routes = http_routes(api)
    gated = [(m, p) for m, p in routes if p not in PUBLIC_ROUTES]
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/openapi.json"} <= {p for _, p in gated}
    same_length_wrong = {"Authorization": "Bearer " + "x" * len(server.key)}
    for headers in ({}, same_length_wrong, {"Authorization": server.key}, {"Authorization": f"Basic {server.key}"}):
        for method, path in gated:
            r = httpx.request(
                method,
                server.base + path,
                headers=headers,
                timeout=30,
                json={"model": server.model, "prompt": "hi", "max_tokens": 1},
            )
            assert r.status_code == 401, (method, path, headers, r.text)
            error = r.json()["error"]
            assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error", error
    for method, path in routes:
        if path in PUBLIC_ROUTES:
            assert httpx.request(method, server.base + path, timeout=30).status_code == 200, path


def test_the_openapi_document_is_served_with_the_key(server):
    r = httpx.get(server.base + "/openapi.json", headers=server.auth(), timeout=30)
    assert r.status_code == 200
    doc = r.json()
    assert doc["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "the server's --api-key",
    }
    assert doc["paths"]["/health"]["get"]["security"] == [] and doc["security"] == [{"apiKey": []}]
    for path in ("/docs", "/redoc"):
        assert httpx.get(server.base + path, timeout=30).status_code == 404


# --- where it listens ------------------------------------------------------------------------------------


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on `port`, read from the kernel's tables."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)  # each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(socket.inet_ntop(family, raw))
    return found


def loopback(address: str) -> bool:
    """127.0.0.0/8 or ::1, also as an IPv4-mapped IPv6 address (gRPC listens on ::ffff:127.0.0.1)."""
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def own_non_loopback_addresses() -> set[str]:
    """This machine's own IPv4 addresses other than 127.0.0.0/8."""
    addresses = set(socket.gethostbyname_ex(socket.gethostname())[2])
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, timeout=10, check=True).stdout
        addresses |= {line.split()[3].split("/")[0] for line in out.splitlines() if " inet " in line}
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return {a for a in addresses if not a.startswith("127.")}


def test_http_listens_on_the_loopback_interface_only_by_default(server):
    assert cli_default_host() == "127.0.0.1"
    if Path("/proc/net/tcp").is_file():
        bound = listening_addresses(server.port)
        assert bound and bound <= {"127.0.0.1", "::1"}, bound
    for address in own_non_loopback_addresses():
        with pytest.raises(OSError):  # refused: nothing listens there
            socket.create_connection((address, server.port), timeout=5).close()
    assert httpx.get(server.base + "/health", timeout=30).status_code == 200


def test_grpc_listens_on_the_same_loopback_interface_as_http_by_default(server):
    if Path("/proc/net/tcp").is_file():
        bound = listening_addresses(server.grpc_port)
        assert bound and all(loopback(a) for a in bound), bound
    for address in own_non_loopback_addresses():
        with pytest.raises(OSError):  # refused: nothing listens there
            socket.create_connection((address, server.grpc_port), timeout=5).close()
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        reply = GenerationStub(channel).Generate(
            GenerateRequest(prompt="hi", max_tokens=2),
            timeout=60,
            metadata=(("authorization", f"Bearer {server.key}"),),
        )
    assert len(reply.token_ids) == 2


def test_grpc_calls_without_the_right_key_are_refused(server):
    same_length_wrong = "Bearer " + "x" * len(server.key)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = GenerationStub(channel)
        for metadata in ((), (("authorization", same_length_wrong),), (("authorization", server.key),)):
            for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
                with pytest.raises(grpc.RpcError) as refused:
                    call(GenerateRequest(prompt="hi", max_tokens=2), timeout=60, metadata=metadata)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
                assert "API key" in refused.value.details()


# --- checkpoints -----------------------------------------------------------------------------------------


class _Tripwire:
    """Unpickling this touches a file: proof that a loader ran code from the checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def tripwire_pickle(marker: Path) -> bytes:
    """Pickled bytes that touch `marker` when loaded (checked once on a decoy, so the wire is known to work)."""
    decoy = marker.with_name(marker.name + "-decoy")
    pickle.loads(pickle.dumps(_Tripwire(decoy)))
    assert decoy.exists()
    return pickle.dumps({"model.embed_tokens.weight": _Tripwire(marker)})


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called on a checkpoint")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "load", refuse)


def config_only_copy(checkpoint: Path, to: Path) -> Path:
    to.mkdir()
    for name in ("config.json", "tokenizer.model"):
        shutil.copyfile(checkpoint / name, to / name)
    return to


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.pt"])
def test_a_pickle_checkpoint_is_refused_naming_the_missing_safetensors(checkpoint, tmp_path, no_unpickling, weights):
    copy = config_only_copy(checkpoint, tmp_path / "ck")
    marker = tmp_path / "unpickled"
    (copy / weights).write_bytes(tripwire_pickle(marker))
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files .*only safetensors checkpoints are read"):
        CheckpointReader(copy).load(ShardSelection.whole(load_config(copy)))
    assert not marker.exists()


def test_a_reference_checkpoint_with_only_a_pth_file_is_refused(checkpoint, tmp_path, no_unpickling):
    copy = tmp_path / "ck"
    copy.mkdir()
    (copy / "params.json").write_text(json.dumps(load_config(checkpoint).to_params_dict()))
    marker = tmp_path / "unpickled"
    (copy / "consolidated.00.pth").write_bytes(tripwire_pickle(marker))
    with pytest.raises(CheckpointError, match=r"no consolidated\*\.safetensors files"):
        CheckpointReader(copy)
    assert not marker.exists()


def test_a_safetensors_index_pointing_at_a_pickle_file_is_refused(checkpoint, tmp_path, no_unpickling):
    copy = config_only_copy(checkpoint, tmp_path / "ck")
    marker = tmp_path / "unpickled"
    (copy / "pytorch_model.bin").write_bytes(tripwire_pickle(marker))
    names = ShardSelection.whole(load_config(copy)).tensor_shapes(load_config(copy))
    (copy / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(names, "pytorch_model.bin")})
    )
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a readable safetensors file"):
        CheckpointReader(copy).load(ShardSelection.whole(load_config(copy)))
    assert not marker.exists()


def rewritten(checkpoint: Path, to: Path, name: str, tensor: torch.Tensor) -> Path:
    """A copy of the checkpoint with one tensor replaced."""
    shutil.copytree(checkpoint, to)
    tensors = load_file(to / "model.safetensors")
    tensors[name] = tensor
    save_file(tensors, to / "model.safetensors", metadata={"format": "pt"})
    return to


def test_a_tensor_of_an_integer_dtype_is_refused_naming_it(checkpoint, tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"
    original = load_file(checkpoint / "model.safetensors")[name]
    copy = rewritten(checkpoint, tmp_path / "ck", name, torch.ones_like(original, dtype=torch.int32))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has dtype torch.int32, expected a floating-point"):
        CheckpointReader(copy).load(ShardSelection.whole(load_config(copy)))


def test_a_tensor_of_the_wrong_shape_is_refused_naming_it(checkpoint, tmp_path):
    name = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
    original = load_file(checkpoint / "model.safetensors")[name]
    copy = rewritten(checkpoint, tmp_path / "ck", name, original.t().contiguous())
    rows, cols = original.shape
    with pytest.raises(
        CheckpointError,
        match=rf"tensor '{name}' has shape \[{cols}, {rows}\], the config asks for "
        rf"\[{rows}, {cols}\]",
    ):
        CheckpointReader(copy).load(ShardSelection.whole(load_config(copy)))


# --- logs ------------------------------------------------------------------------------------------------


def ray_logs_dir() -> Path:
    node = getattr(ray._private.worker, "_global_node", None)  # this session's own directory, not the latest one
    return Path(node.get_logs_dir_path()) if node is not None else Path("/tmp/ray/session_latest/logs")


def files_containing(directory: Path, needle: bytes) -> list[str]:
    return [str(p) for p in directory.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_request_bodies_do_not_appear_in_the_server_logs(server):
    marker = f"secret-prompt-{uuid.uuid4().hex}"
    base, auth = server.base, server.auth()
    requests = [
        ("/v1/completions", {"model": server.model, "prompt": f"{marker} once upon a time", "max_tokens": 2}),
        ("/v1/completions", {"model": server.model, "prompt": marker, "max_tokens": 2, "stream": True}),
        (
            "/v1/chat/completions",
            {"model": server.model, "messages": [{"role": "user", "content": marker}], "max_tokens": 2},
        ),
        ("/v1/completions", {"model": marker, "prompt": marker}),  # refused: 400 naming the model
        ("/v1/completions", {"prompt": marker, "temperature": marker}),  # refused: 400 naming temperature
    ]
    statuses = [httpx.post(base + route, json=body, headers=auth, timeout=60).status_code for route, body in requests]
    assert statuses == [200, 200, 200, 400, 400]
    time.sleep(2)  # log lines are written as they happen; give the file writers a moment
    logs = ray_logs_dir()
    assert files_containing(logs, b"/v1/chat/completions"), f"no access log of the requests under {logs}"
    assert files_containing(logs, marker.encode()) == []
