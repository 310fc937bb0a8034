"""Fault injection on a multi-node Ray cluster, through the Serve endpoint: while 8 greedy streams run, an expert
actor, a stage actor (SIGKILL of its process), the router and a whole node die in turn. Readiness goes false then
true, and every stream ends with exactly the tokens it would have got without the crash (`resume`), or with a
clear error event then [DONE] (`fail`). A router that dies while idle is restarted by the next health check or
request, which is then served as if nothing happened. Recovery times go to bench/results/faults-*.json when
MISTRAL_CLUSTER_FAULTS_OUT names a file (bench/faults.py)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from ray import serve
from ray.cluster_utils import Cluster

from cluster.cli.serve import wait_until_healthy
from cluster.serve import OpenAIIngress
from cluster.sharded import ShardedCluster
from cluster.supervisor import NAMESPACE
from router.generation import generate
from router.sampling import SamplingParams
from shards.engine import LocalEngine
from tests.conftest import hf_greedy, random_prompts
from tests.ports import free_port

WINDOW = 16
NEW_TOKENS = 24
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def nodes():
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"ingress_node": 1}, "include_dashboard": False},
    )
    stage_node = cluster.add_node(num_cpus=2, resources={"stage_node": 2})
    expert_node = cluster.add_node(num_cpus=2, resources={"expert_node": 2})
    spare_expert_node = cluster.add_node(num_cpus=2, resources={"expert_node": 2})
    ray.init(address=cluster.address)
    port = free_port()  # Serve's HTTP proxy starts once; every app of this module is served on this port
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    yield {"cluster": cluster, "stage": stage_node, "expert": expert_node, "spare": spare_expert_node, "port": port}
    serve.shutdown()
    out = os.environ.get("MISTRAL_CLUSTER_FAULTS_OUT")
    if out and RESULTS:
        import platform
        import subprocess

        def git(*args: str) -> str:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=False).stdout.strip()

        commit = git("rev-parse", "--short", "HEAD") + (
            "-dirty" if git("status", "--porcelain", "--untracked-files=no") else ""
        )
        Path(out).write_text(
            json.dumps(
                {
                    "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "ray": ray.__version__},
                    "commit": commit,
                    "load_average_at_end": list(os.getloadavg()),
                    "faults": RESULTS,
                },
                indent=2,
            )
            + "\n"
        )
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    return checkpoint_factory("mixtral", seed=91, window=WINDOW)


def sampling(i: int) -> dict:
    """Even requests greedy, odd ones seeded sampling: both must continue exactly after a crash."""
    return {"temperature": 0} if i % 2 == 0 else {"temperature": 0.8, "top_p": 0.95, "seed": 1000 + i}


@pytest.fixture(scope="module")
def prompts_and_expected(checkpoint):
    prompts = random_prompts([5, 9, WINDOW, 20, 3 * WINDOW, 7, 2 * WINDOW + 3, 12], seed=92)
    params = [SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, **sampling(i)) for i in range(len(prompts))]
    expected = generate(LocalEngine(checkpoint, max_seqs=8), prompts, params)
    return prompts, [e.token_ids for e in expected]


def placement_of(checkpoint, **settings) -> dict:
    """The module's placement: two stages on the stage node, two expert groups on an expert node each."""
    return {
        "checkpoint": str(checkpoint),
        "dtype": "float32",
        "strategy": "spread",
        "stages": [
            {"layers": [0, 1], "resources": {"CPU": 0.25, "stage_node": 0.5}},
            {"layers": [2, 3], "resources": {"CPU": 0.25, "stage_node": 0.5}},
        ],
        "expert_groups": [
            {"experts": [0, 1], "resources": {"CPU": 0.25, "expert_node": 1}},
            {"experts": [2, 3], "resources": {"CPU": 0.25, "expert_node": 1}},
        ],
        "micro_batch_size": 4,
        "token_budget": 256,
        "max_seqs": 8,
        **settings,
    }


def start_server(nodes, checkpoint, tmp_path: Path, on_shard_failure: str, name: str) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(placement_of(checkpoint)))
    port = nodes["port"]
    ingress = OpenAIIngress.options(ray_actor_options={"num_cpus": 0, "resources": {"ingress_node": 0.01}})
    serve.run(
        ingress.bind(
            placement=str(path), on_shard_failure=on_shard_failure, step_timeout_s=20.0, request_timeout_s=120.0
        ),
        name=name,
        route_prefix="/",
        blocking=False,
    )
    base = f"http://127.0.0.1:{port}"
    assert wait_until_healthy(base, 240), "server did not become ready"
    return base


def stream_tokens(
    base: str, prompt: list[int], first_token: threading.Event, i: int, max_tokens: int = NEW_TOKENS
) -> dict:
    """One streaming request; returns its token ids, error events and whether [DONE] came."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "return_token_ids": True,
        **sampling(i),
    }
    out = {"tokens": [], "errors": [], "done": False}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=180) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line == "data: [DONE]":
                out["done"] = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out["errors"].append(chunk["error"])
                for c in chunk.get("choices", []):
                    out["tokens"].extend(c.get("token_ids", []))
                    first_token.set()
    return out


class HealthWatch:
    """Polls /health in the background: did readiness go false, when did it come back."""

    def __init__(self, base: str) -> None:
        self.base, self.samples, self.reasons, self._stop = base, [], [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            reason = None
            try:
                r = httpx.get(self.base + "/health", timeout=5)
                code = r.status_code
                with contextlib.suppress(ValueError, AttributeError):
                    reason = r.json().get("reason")
            except httpx.HTTPError:
                code = 0
            self.samples.append((time.monotonic(), code))
            if reason:
                self.reasons.append((time.monotonic(), reason))
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()

    def went_unready_then_ready(self, since: float) -> float | None:
        """Seconds from `since` to readiness again, if readiness was lost after `since`."""
        after = [(t, c) for t, c in self.samples if t >= since]
        lost = next((t for t, c in after if c != 200), None)
        if lost is None:
            return None
        back = next((t for t, c in after if t > lost and c == 200), None)
        return None if back is None else back - since


def run_with_fault(base: str, prompts, inject, max_tokens: int = NEW_TOKENS) -> tuple[list[dict], float | None]:
    watch = HealthWatch(base)
    started = [threading.Event() for _ in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [
            pool.submit(stream_tokens, base, p, e, i, max_tokens)
            for i, (p, e) in enumerate(zip(prompts, started, strict=True))
        ]
        for e in started:
            assert e.wait(120), "a stream produced no token before the fault"
        t_fault = time.monotonic()
        inject()
        results = [f.result(timeout=240) for f in futures]
    deadline = time.monotonic() + 60
    while watch.went_unready_then_ready(t_fault) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    watch.stop()
    run_with_fault.last_reasons = [(t - t_fault, reason) for t, reason in watch.reasons if t >= t_fault]
    return results, watch.went_unready_then_ready(t_fault)


@pytest.fixture(scope="module")
def resume_server(nodes, checkpoint, tmp_path_factory):
    base = start_server(nodes, checkpoint, tmp_path_factory.mktemp("faults"), "resume", "faults-resume")
    yield base
    serve.delete("faults-resume")


def shard_actor(name: str):
    prefix = next(
        a["Name"]
        for a in ray._private.state.actors().values()
        if a["State"] == "ALIVE" and a.get("Name", "").endswith("-" + name)
    )
    return ray.get_actor(prefix, namespace=NAMESPACE), prefix


def shard_pid(name: str) -> int:
    return next(
        a["Pid"]
        for a in ray._private.state.actors().values()
        if a["State"] == "ALIVE" and a.get("Name", "").endswith("-" + name)
    )


def router_actor():
    return next(
        a
        for a in ray._private.state.actors().values()
        if a["State"] == "ALIVE" and a["ActorClassName"].endswith("RouterActor")
    )


def kill_router_while_idle() -> str:
    """ray.kill the router with no request in flight (so no stream sees it die); returns its id once it is dead."""
    info = router_actor()
    ray.kill(ray.get_actor(info["Name"]), no_restart=True)
    deadline = time.monotonic() + 30
    while ray._private.state.actors(info["ActorID"])["State"] != "DEAD":
        assert time.monotonic() < deadline, "the killed router is still alive after 30 s"
        time.sleep(0.1)
    return info["ActorID"]


def live_routers() -> list[str]:
    return [
        a["ActorID"]
        for a in ray._private.state.actors().values()
        if a["State"] == "ALIVE" and a["ActorClassName"].endswith("RouterActor")
    ]


def check_resumed(name: str, results, expected, recovery: float | None) -> None:
    RESULTS[name] = {
        "recovery_seconds": None if recovery is None else round(recovery, 2),
        "requests": len(results),
        "identical": [r["tokens"] == e for r, e in zip(results, expected, strict=True)],
    }
    for r, e in zip(results, expected, strict=True):
        assert r["done"] and not r["errors"], r["errors"]
        assert r["tokens"] == e
    assert recovery is not None, "readiness never went false and back to true"


def next_requests_are_exact(base: str, prompts, expected) -> None:
    for i, (p, e) in list(enumerate(zip(prompts, expected, strict=True)))[:2]:
        r = httpx.post(
            base + "/v1/completions",
            timeout=120,
            json={"prompt": p, "max_tokens": NEW_TOKENS, "ignore_eos": True, "return_token_ids": True, **sampling(i)},
        )
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == e


@pytest.mark.parametrize(
    "shard,how", [("experts0", "ray.kill"), ("experts1", "SIGKILL"), ("stage1", "SIGKILL"), ("stage0", "ray.kill")]
)
def test_killing_a_shard_loses_no_request(resume_server, prompts_and_expected, shard, how):
    prompts, expected = prompts_and_expected
    if how == "ray.kill":
        actor, _ = shard_actor(shard)
        inject = functools.partial(ray.kill, actor, no_restart=True)
    else:
        pid = shard_pid(shard)
        inject = functools.partial(os.kill, pid, signal.SIGKILL)
    results, recovery = run_with_fault(resume_server, prompts, inject)
    check_resumed(f"{how} {shard}", results, expected, recovery)
    next_requests_are_exact(resume_server, prompts, expected)


def test_killing_the_router_loses_no_request(resume_server, prompts_and_expected):
    prompts, expected = prompts_and_expected
    router = ray.get_actor(router_actor()["Name"]) if router_actor().get("Name") else None
    pid = router_actor()["Pid"]
    results, recovery = run_with_fault(
        resume_server,
        prompts,
        (lambda: ray.kill(router, no_restart=True)) if router else (lambda: os.kill(pid, signal.SIGKILL)),
    )
    check_resumed("router killed", results, expected, recovery)
    next_requests_are_exact(resume_server, prompts, expected)


def test_health_restarts_a_router_that_died_while_idle(resume_server):
    dead = kill_router_while_idle()
    seen, deadline = [], time.monotonic() + 30
    while not seen or seen[-1][0] != 200:
        assert time.monotonic() < deadline, f"/health not ready 30 s after the router died: {seen[-3:]}"
        r = httpx.get(resume_server + "/health", timeout=10)
        seen.append((r.status_code, r.json()["status"]))
        time.sleep(0.2)
    assert seen[0] == (503, "recovering")
    assert len(live_routers()) == 1 and live_routers()[0] != dead  # one restart, however many polls saw the death


def test_requests_after_the_router_died_while_idle_restart_it_and_get_transformers_tokens(
    resume_server, checkpoint, hf_model
):
    prompt = random_prompts([WINDOW + 5], seed=93)[0]
    expected = hf_greedy(hf_model(checkpoint), prompt, NEW_TOKENS)
    dead = kill_router_while_idle()
    body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    with ThreadPoolExecutor(2) as pool:  # both find the router dead: one restart serves both
        whole = pool.submit(httpx.post, resume_server + "/v1/completions", json=body, timeout=120)
        streamed = pool.submit(stream_tokens, resume_server, prompt, threading.Event(), 0)
        whole, streamed = whole.result(), streamed.result()
    assert whole.status_code == 200, whole.text
    assert whole.json()["choices"][0]["token_ids"] == expected
    assert streamed["done"] and not streamed["errors"] and streamed["tokens"] == expected
    assert len(live_routers()) == 1 and live_routers()[0] != dead


def kill_process(name: str) -> None:
    """SIGKILL the process of a worker (`stage0`, `experts1`, ...) or of the router (`router`), if it is alive."""
    try:
        pid = router_actor()["Pid"] if name == "router" else shard_pid(name)
    except StopIteration:
        return  # not there right now (being restarted): nothing to kill
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def test_overlapping_kills_of_a_stage_an_expert_group_and_the_router_converge(resume_server, prompts_and_expected):
    """The cascade that once left the service down for good: a stage, 1.5 s later an expert group (while the first
    recovery runs), 1.5 s later the router (whose replacement finds a worker missing and must start it)."""
    prompts, expected = prompts_and_expected

    def cascade() -> None:
        kill_process("stage0")
        time.sleep(1.5)
        kill_process("experts1")
        time.sleep(1.5)
        kill_process("router")

    results, recovery = run_with_fault(resume_server, prompts, cascade)
    check_resumed("cascade: stage0, experts1, router", results, expected, recovery)
    next_requests_are_exact(resume_server, prompts, expected)


def record_recovery(name: str, recovery: float | None):
    """Keep a recovery's figures (and the restarted workers' start phases) for the results file; the router's health."""
    health = ray.get(ray.get_actor(router_actor()["Name"]).stats.remote()).health
    RESULTS[name] = {
        "recovery_seconds": None if recovery is None else round(recovery, 2),
        "restarted": list(health.restarted[-1]) if health.restarted else [],
        "last_recovery_seconds": health.last_recovery_seconds,
        "restart_phases_s": {w: dict(p) for w, p in health.last_restart_phases},
    }
    return health


@pytest.mark.parametrize("name", ["experts0", "stage1", "router"])
def test_a_hung_process_is_found_and_replaced_within_seconds(resume_server, prompts_and_expected, name):
    """SIGSTOP: alive, not answering. The monitor's ping (workers) or the ingress's silence watchdog (router) finds
    it; it is killed and replaced like a dead one, and the streams go on with exactly their tokens."""
    prompts, expected = prompts_and_expected
    pid = router_actor()["Pid"] if name == "router" else shard_pid(name)
    stalls: list[float] = []

    def hang() -> None:
        os.kill(pid, signal.SIGSTOP)
        stalls.append(time.monotonic())

    try:
        results, recovery = run_with_fault(resume_server, prompts, hang)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # recovery killed it; if not, let it go so the cluster can shut down
    record_recovery(f"SIGSTOP {name}", recovery)
    for r, e in zip(results, expected, strict=True):
        assert r["done"] and not r["errors"], r["errors"]
        assert r["tokens"] == e
    if name != "router":  # a hung router is replaced by the ingress; the workers' health is not touched
        assert recovery is not None and recovery < 12, recovery  # measured 5.7-5.8 s on 2 cores (target 8 s)
    next_requests_are_exact(resume_server, prompts, expected)


def test_a_wedged_stage_that_still_answers_pings_is_found_by_the_step_deadline(resume_server, prompts_and_expected):
    """A stage whose loop is stuck (as in a collective that never returns) while its worker answers every ping:
    the monitor sees nothing; the step deadline, derived from recent step times, fails the step; recovery finds
    the worker unable to leave the data plane, kills and restarts it; the streams go on with exactly their tokens."""
    prompts, expected = prompts_and_expected
    # The deadline tightens only after steps have been timed since the last (re)start: run some first, or the wedge
    # may land in the warm-up, where the deadline is the whole 20 s step timeout (it did, run alone).
    next_requests_are_exact(resume_server, prompts, expected)
    worker, _ = shard_actor("stage1")
    results, recovery = run_with_fault(resume_server, prompts, lambda: ray.get(worker.inject_stall.remote(600)))
    health = record_recovery("wedged stage1 (answers pings)", recovery)
    for r, e in zip(results, expected, strict=True):
        assert r["done"] and not r["errors"], r["errors"]
        assert r["tokens"] == e
    assert recovery is not None, "readiness never went false and back to true"
    found = [(t, r) for t, r in run_with_fault.last_reasons if "within its deadline of" in r]
    assert found, run_with_fault.last_reasons
    deadline = float(re.search(r"deadline of ([0-9.]+) s", found[0][1]).group(1))
    RESULTS["wedged stage1 (answers pings)"]["deadline_s"] = deadline
    assert deadline < 20, found  # derived from the steps' times, not the 20 s step timeout (nor 120 s)
    # Unready as soon as the wedged step's deadline ran out: not after the step in flight behind it waited out its
    # own deadline too (it did, at deadline + 5.2 s, until a closed step link failed waits at once).
    assert found[0][0] < deadline + 3, found
    assert health.restarted and health.restarted[-1] == ("stage1",), health  # only the wedged one was replaced
    next_requests_are_exact(resume_server, prompts, expected)


def test_a_seeded_random_sequence_of_kills_loses_no_token(resume_server, checkpoint):
    """Six kills of every role at seeded random moments, some during a recovery, while 8 long streams run."""
    rng = random.Random(2026)
    prompts = random_prompts([5, 9, WINDOW, 20, 3 * WINDOW, 7, 2 * WINDOW + 3, 12], seed=94)
    long = 4 * NEW_TOKENS
    params = [SamplingParams(max_tokens=long, ignore_eos=True, **sampling(i)) for i in range(len(prompts))]
    expected = [e.token_ids for e in generate(LocalEngine(checkpoint, max_seqs=8), prompts, params)]
    kills = [
        (rng.choice(["stage0", "stage1", "experts0", "experts1", "router"]), rng.uniform(0.3, 3.0)) for _ in range(6)
    ]

    def sequence() -> None:
        for name, pause in kills:
            kill_process(name)
            time.sleep(pause)

    results, recovery = run_with_fault(resume_server, prompts, sequence, max_tokens=long)
    RESULTS["six seeded kills"] = {
        "kills": [[n, round(p, 2)] for n, p in kills],
        "recovery_seconds": None if recovery is None else round(recovery, 2),
        "identical": [r["tokens"] == e for r, e in zip(results, expected, strict=True)],
    }
    for r, e in zip(results, expected, strict=True):
        assert r["done"] and not r["errors"], r["errors"]
        assert r["tokens"] == e
    # seeded per (request, token index): a shorter request is the longer one's first tokens
    next_requests_are_exact(resume_server, prompts, [e[:NEW_TOKENS] for e in expected])


def test_losing_the_expert_node_moves_its_shards_to_a_node_with_the_resource(
    resume_server, nodes, prompts_and_expected
):
    prompts, expected = prompts_and_expected
    results, recovery = run_with_fault(resume_server, prompts, lambda: nodes["cluster"].remove_node(nodes["expert"]))
    check_resumed("expert node removed", results, expected, recovery)
    spare = nodes["spare"].node_id
    for name in ("experts0", "experts1"):
        actor_node = next(
            a["Address"]["NodeID"]
            for a in ray._private.state.actors().values()
            if a["State"] == "ALIVE" and a.get("Name", "").endswith("-" + name)
        )
        assert actor_node == spare
    next_requests_are_exact(resume_server, prompts, expected)


def test_fail_mode_ends_in_flight_streams_with_an_error_then_done(
    nodes, checkpoint, prompts_and_expected, tmp_path_factory, resume_server
):
    serve.delete("faults-resume")  # one model at a time on these 2-core machines
    base = start_server(nodes, checkpoint, tmp_path_factory.mktemp("fail"), "fail", "faults-fail")
    prompts, expected = prompts_and_expected
    actor, _ = shard_actor("experts1")
    t0 = time.monotonic()
    results, recovery = run_with_fault(base, prompts, lambda: ray.kill(actor, no_restart=True))
    RESULTS["fail mode: ray.kill expert group"] = {
        "recovery_seconds": None if recovery is None else round(recovery, 2),
        "errored": sum(bool(r["errors"]) for r in results),
        "requests": len(results),
    }
    assert all(r["done"] for r in results)  # every stream ends with [DONE] ...
    for r, e in zip(results, expected, strict=True):  # ... either complete and exact, or with a clear error event
        assert r["tokens"] == e or (r["errors"] and r["errors"][0]["code"] == "engine_failure")
    assert any(r["errors"] for r in results)
    assert time.monotonic() - t0 < 150
    next_requests_are_exact(base, prompts, expected)
    serve.delete("faults-fail")


def test_a_killed_worker_is_replaced_by_its_warm_standby_and_a_new_standby_follows(nodes, checkpoint, tmp_path):
    """`standby: true`: every worker has a standby process in its bundle, its imports done. A killed worker's
    standby loads the worker's shards and joins in its place (no process to start); a new standby is started behind
    it, and the next kill of the same worker is served by that one. The tokens are exact both times."""
    prompts = random_prompts([5, 9, WINDOW, 20, 3 * WINDOW, 7, 2 * WINDOW + 3, 12], seed=95)
    params = [SamplingParams(max_tokens=4 * NEW_TOKENS, ignore_eos=True, **sampling(i)) for i in range(len(prompts))]
    expected = [e.token_ids for e in generate(LocalEngine(checkpoint, max_seqs=8), prompts, params)]
    placement = placement_of(checkpoint, standby=True)
    path = tmp_path / "standby.yaml"
    path.write_text(yaml.safe_dump(placement))
    with ShardedCluster.start(path, step_timeout_s=20.0) as cluster:
        seen_standbys = set()
        for round_ in range(2):
            deadline = time.monotonic() + 120
            while "experts1" not in (up := cluster.supervisor.standbys_up()):  # they start in the background
                assert time.monotonic() < deadline, "no standby for experts1 after 120 s"
                time.sleep(0.5)
            standby = up["experts1"]
            standby_pid = ray.get(standby.location.remote()).pid
            assert standby_pid not in seen_standbys  # a new one each round
            seen_standbys.add(standby_pid)
            victim = cluster.locations()["experts1"].pid
            out: dict = {}
            worker = threading.Thread(target=lambda out=out: out.update(r=cluster.generate(prompts, params)))
            worker.start()
            time.sleep(1.0)
            os.kill(victim, signal.SIGKILL)
            worker.join(timeout=240)
            assert [r.token_ids for r in out["r"]] == expected, f"round {round_}"
            health = cluster.health().health
            phases = {w: dict(p) for w, p in health.last_restart_phases}
            assert health.restarted[-1] == ("experts1",), health
            assert "promoted" in phases["experts1"], phases  # loaded by the standby, not by a new process
            assert phases["experts1"]["host_copy"] < phases["experts1"]["promoted"]  # from its copy in host memory
            assert cluster.locations()["experts1"].pid == standby_pid  # the standby is the worker now
            RESULTS[f"standby promoted, round {round_ + 1}"] = {
                "last_recovery_seconds": health.last_recovery_seconds,
                "restart_phases_s": phases,
            }
