"""A failed step is logged once, at WARNING, with what a person needs to find it: the step's number (the one the
workers' own logs use), the worker that reported it, and the cause as that worker gave it. Run on the router actor's
own class with workers stood in for by threads on the real step link: no Ray, the same frames."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import numpy as np
import pytest
import yaml

from cluster import router_actor
from cluster.placement_file import settle_placement
from cluster.router_actor import RouterActor
from cluster.step_link import LinkClosed, RouterLink, WorkerFailed, WorkerLink
from cluster.step_wire import decode_plan
from cluster.workers import group_workers
from router.sampling import SamplingParams


class FailingWorkers:
    """The supervisor's part the router calls, with each worker a thread on the step link; the last stage's
    worker answers every plan with the error frame a failing stage loop sends."""

    def __init__(self, plan) -> None:
        self.names = [w.name for w in group_workers(plan)]
        self.last_stage_worker = len(self.names) - 1
        self.links: list[WorkerLink] = []

    def handles(self) -> list:
        return [object() for _ in self.names]

    def form_group(self, handles: list, router_link: RouterLink) -> None:
        for index, name in enumerate(self.names):
            link = WorkerLink(router_link.address, index, timeout_s=10)
            self.links.append(link)
            threading.Thread(target=self._loop, args=(link, index, name), daemon=True).start()
        assert router_link.accept(len(self.names), timeout_s=10)

    def recover(self, handles: list, router_link: RouterLink) -> tuple[list, dict]:
        self.form_group(handles, router_link)
        return handles, {"restarted": []}

    def probe(self, handles: list) -> list[bool]:
        return [True] * len(handles)

    def _loop(self, link: WorkerLink, index: int, name: str) -> None:
        try:
            while (message := link.recv_plan()) is not None:
                if index == self.last_stage_worker:  # as WorkerActor._failed words it
                    link.send_error(f"{name} stage{index} step {decode_plan(message).step}: RuntimeError: boom")
        except OSError:
            pass  # the router closed the link (recovery, or the end of the test)

    def close(self) -> None:
        for link in self.links:
            link.close()


@pytest.fixture
def plan(checkpoint_factory, tmp_path):
    checkpoint = checkpoint_factory("mistral", seed=3, window=16)
    path = tmp_path / "placement.yaml"
    path.write_text(yaml.safe_dump({"checkpoint": str(checkpoint), "dtype": "float32", "stages": 2}))
    return settle_placement(path)


def test_a_failed_step_logs_one_warning_naming_the_step_the_worker_and_the_cause(plan, monkeypatch, caplog):
    plan, config = plan
    monkeypatch.setattr(router_actor, "node_ip", lambda: "127.0.0.1")  # the step link stays on this machine
    workers = FailingWorkers(plan)

    async def main():
        actor = RouterActor(workers, plan, config, on_shard_failure="fail", monitor_interval_s=3600)
        admission = await actor.submit("feed", 0, [1, 5, 6, 7], SamplingParams(max_tokens=4))
        events = []
        feed = actor.feed("feed")
        async for batch in feed:
            events += [e for key, e in batch if key == 0]
            if events and events[-1].last:
                break
        await feed.aclose()
        return actor, admission, events

    with caplog.at_level(logging.WARNING, logger="mistral_cluster.router"):
        actor, admission, events = asyncio.run(asyncio.wait_for(main(), timeout=60))
    workers.close()

    assert admission.accepted and events[-1].error is not None
    cause = f"step 0, reported by worker 1 ({workers.names[1]}): WorkerFailed: {workers.names[1]} stage1 step 0"
    records = [r for r in caplog.records if r.name == "mistral_cluster.router"]
    lines = [r.getMessage() for r in records]
    assert len(lines) == actor.loop.stats.failed_steps == 1, lines
    assert records[0].levelno == logging.WARNING
    assert lines[0].startswith("step failed: " + cause) and "RuntimeError: boom" in lines[0], lines
    assert cause in events[-1].error  # the request ended with the same account


def test_the_step_link_says_which_worker_sent_an_error():
    router = RouterLink("127.0.0.1")
    workers = [WorkerLink(router.address, i, timeout_s=10) for i in range(3)]
    assert router.accept(3, timeout_s=10)
    workers[2].send_error("stage2 step 9: ValueError: bad shape")
    with pytest.raises(WorkerFailed, match="^stage2 step 9: ValueError: bad shape$") as failed:
        router.recv_result(0, timeout_s=10)
    assert failed.value.worker == 2
    for link in [*workers, router]:
        link.close()


def test_a_closed_step_link_fails_a_wait_at_once_not_at_its_deadline():
    """Recovery closes the link while steps are still in flight: their waits must end now (a select over no socket
    used to sleep out the whole deadline, 5 s a step, in every wedged-stage recovery)."""
    router = RouterLink("127.0.0.1")
    workers = [WorkerLink(router.address, i, timeout_s=10) for i in range(2)]
    assert router.accept(2, timeout_s=10)
    waited: dict = {}

    def wait() -> None:
        t0 = time.monotonic()
        try:
            router.recv_result(1, timeout_s=30)
        except LinkClosed as e:
            waited["error"] = e
        waited["seconds"] = time.monotonic() - t0

    blocked = threading.Thread(target=wait)
    blocked.start()
    time.sleep(0.2)
    router.close()  # from another thread, as recovery does
    blocked.join(10)
    assert isinstance(waited.get("error"), LinkClosed) and waited["seconds"] < 5, waited
    t0 = time.monotonic()  # and a wait that begins after the close
    with pytest.raises(LinkClosed, match="closed"):
        router.recv_result(1, timeout_s=30)
    with pytest.raises(LinkClosed, match="closed"):
        router.send_plan(np.zeros(4, np.int64))
    assert time.monotonic() - t0 < 1
    for link in workers:
        link.close()
