"""`mistral-cluster serve --direct-ingress`: the copy answers on its own port (--port + 1) with no proxy hop, with
the one-process engine's greedy tokens, streamed and not; --port still answers too, with the same tokens."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from cluster.cli.serve import wait_until_healthy
from router.generation import generate
from router.sampling import SamplingParams
from shards.engine import LocalEngine
from shards.make_checkpoint import SMALL_SHAPE, make_random_checkpoint
from tests.conftest import random_prompts
from tests.ports import free_port

TOKENS = 12


def free_pair() -> int:
    """A port whose successor is free too (the copy's own)."""
    for _ in range(50):
        port = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two free ports in a row")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    port = free_pair()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"MISTRAL_CLUSTER_HOME": str(home)}
    log_path = home / "serve.log"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "serve", "--config", f"{root}/deploy/examples/local.yaml"]
            + ["--random-weights", SMALL_SHAPE, "--port", str(port), "--grpc-port", "0", "--direct-ingress"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        direct = f"http://127.0.0.1:{port + 1}"
        assert wait_until_healthy(direct, 240), log_path.read_text()[-3000:]
        yield f"http://127.0.0.1:{port}", direct, log_path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def expected(tmp_path_factory):
    engine = LocalEngine(make_random_checkpoint(tmp_path_factory.mktemp("reference"), SMALL_SHAPE), max_seqs=4)
    prompts = random_prompts([7, 11], seed=11)
    done = generate(engine, prompts, SamplingParams(max_tokens=TOKENS, ignore_eos=True))
    return [(p, d.token_ids) for p, d in zip(prompts, done, strict=True)]


def body(prompt: list[int], stream: bool) -> dict:
    return {
        "model": f"random-{SMALL_SHAPE}",
        "prompt": prompt,
        "max_tokens": TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream": stream,
    }


def streamed_ids(base: str, prompt: list[int]) -> list[int]:
    ids, done = [], False
    with httpx.stream("POST", base + "/v1/completions", json=body(prompt, True), timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                ids += json.loads(line[6:])["choices"][0]["token_ids"]
    assert done
    return ids


def test_the_copys_own_port_streams_the_engines_tokens(server, expected):
    _, direct, log = server
    for prompt, tokens in expected:
        assert streamed_ids(direct, prompt) == tokens, log.read_text()[-2000:]


def test_the_copys_own_port_and_the_proxy_give_the_same_whole_responses(server, expected):
    proxy, direct, _ = server
    prompt, tokens = expected[0]
    answers = [httpx.post(base + "/v1/completions", json=body(prompt, False), timeout=120) for base in (direct, proxy)]
    assert [a.status_code for a in answers] == [200, 200]
    assert [a.json()["choices"][0]["token_ids"] for a in answers] == [tokens, tokens]
    assert answers[0].headers["x-mistral-cluster-replica"] == answers[1].headers["x-mistral-cluster-replica"]
