"""Admission never waits forever on a router: one that neither accepts a request nor answers a ping is treated as
dead (the caller replaces it), one that is merely slow is waited for."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import ray

import cluster.serve as serve_module
from router.step import Admission

first_item = serve_module.OpenAIIngress.func_or_class._first_item


class FakeStream:
    def __init__(self, answer_after_s: float | None) -> None:
        self.answer_after_s = answer_after_s

    async def __anext__(self):
        if self.answer_after_s is None:
            await asyncio.Event().wait()  # never answers
        await asyncio.sleep(self.answer_after_s)
        future = asyncio.get_running_loop().create_future()
        future.set_result(Admission.accept())
        return future


class FakeRouter:
    def __init__(self, alive: bool) -> None:
        self.alive = alive
        self.ping = self

    def remote(self):
        async def answer():
            if not self.alive:
                await asyncio.Event().wait()  # hung: the ping never comes back
            return True

        return answer()


@pytest.fixture
def quick_ping(monkeypatch):
    monkeypatch.setattr(serve_module, "ADMIT_PING_S", 0.05)


def run(router, stream):
    cls = serve_module.OpenAIIngress.func_or_class
    ingress = SimpleNamespace(_next=cls._next, _router_answers=cls._router_answers)  # all `_first_item` uses
    return asyncio.run(asyncio.wait_for(first_item(ingress, router, stream), timeout=20))


def test_a_hung_router_is_reported_dead_instead_of_hanging_the_request(quick_ping):
    with pytest.raises(ray.exceptions.RayActorError):
        run(FakeRouter(alive=False), FakeStream(answer_after_s=None))


def test_a_slow_but_live_router_is_waited_for(quick_ping):
    assert run(FakeRouter(alive=True), FakeStream(answer_after_s=0.3)) == Admission.accept()
