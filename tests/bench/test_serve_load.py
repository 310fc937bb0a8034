"""The load generator's fault arithmetic: a kill's pause is the stall every stream saw, not a gap that happened to
contain the kill's moment (the last tokens of steps already in flight arrive after it)."""

from __future__ import annotations

import pytest

from bench.serve_load import arrivals, engine_ledger, ledger_delta, pause_after


def stream(sent_at: float, ttft: float, gaps: list[float]) -> dict:
    return {"sent_at": sent_at, "ttft": ttft, "gaps": gaps}


def test_a_stall_that_starts_just_after_the_kill_is_the_pause():
    # two streams at 20 ms a token; the kill at 2.000 s, their last tokens before the stall at 2.01 and 2.02
    a = stream(0.0, 0.01, [0.02] * 100 + [3.2] + [0.02] * 10)
    b = stream(0.0, 0.02, [0.02] * 100 + [3.1] + [0.02] * 10)
    # silent from b's token at 2.02 to b's next at 5.12 (a's comes at 5.21): neither stream's own gap (3.2, 3.1)
    assert abs(pause_after([a, b], 2.0) - 3.10) < 1e-6
    assert pause_after([a], 5.3) < 0.021  # after the stall only the token cadence is left


def test_a_stream_that_had_not_started_has_no_arrivals():
    assert arrivals({"sent_at": 1.0, "ttft": None, "gaps": []}) == []
    assert arrivals(stream(1.0, 0.5, [0.25, 0.25])) == [1.5, 1.75, 2.0]


def test_the_engine_ledger_is_read_from_metrics_and_split_into_busy_kinds_and_idle():
    import asyncio

    import httpx

    def metrics(decode_s: float) -> str:
        return "\n".join(
            [
                "# HELP mistral_cluster_engine_step_seconds_total busy wall time",
                f'mistral_cluster_engine_step_seconds_total{{kind="decode"}} {decode_s}',
                'mistral_cluster_engine_step_seconds_total{kind="mixed"} 0.5',
                f'mistral_cluster_engine_step_steps_total{{kind="decode"}} {decode_s * 100}',
                'mistral_cluster_engine_step_steps_total{kind="mixed"} 2.0',
                f'mistral_cluster_engine_step_tokens_total{{kind="decode"}} {decode_s * 3200}',
                'mistral_cluster_engine_step_tokens_total{kind="mixed"} 700.0',
                "mistral_cluster_steps_total 123.0",
            ]
        )

    scrapes = iter([metrics(1.0), metrics(1.0), metrics(9.0), metrics(5.0)])
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=next(scrapes)))

    async def read() -> tuple[dict, dict]:
        async with httpx.AsyncClient(transport=transport) as client:
            urls = ["http://a", "http://b"]  # two copies, direct ingress: their ledgers add up
            return await engine_ledger(client, urls, {}), await engine_ledger(client, urls, {})

    before, after = asyncio.run(read())
    assert before["decode"] == {"steps": 200.0, "tokens": 6400.0, "seconds": 2.0}
    level = ledger_delta(before, after, seconds=10.0, copies=2)
    decode = {"steps": 1200, "tokens": 38400, "seconds": 12.0, "ms_per_step": 10.0, "tokens_per_s": 3200.0}
    assert level["decode"] == decode
    assert level["mixed"] == {"steps": 0, "tokens": 0, "seconds": 0.0, "ms_per_step": None}
    assert level["busy_s"] == 12.0 and level["idle_s"] == 8.0  # 2 copies x 10 s, 12 of them busy
    assert level["copies"] == 2


def test_behind_one_url_the_ledger_scrapes_until_it_has_read_every_copy():
    import asyncio

    import httpx

    from bench.serve_load import REPLICA_HEADER

    def page(decode_s: float) -> str:
        return f'mistral_cluster_engine_step_seconds_total{{kind="decode"}} {decode_s}'

    answers = iter([("a", 1.0), ("a", 1.0), ("a", 1.0), ("b", 2.5)])  # the proxy picks copy a three times first

    def answer(request: httpx.Request) -> httpx.Response:
        name, seconds = next(answers)
        return httpx.Response(200, text=page(seconds), headers={REPLICA_HEADER: name})

    async def read(copies: int):
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            return await engine_ledger(client, ["http://proxy"], {}, copies)

    assert asyncio.run(read(2))["decode"]["seconds"] == 3.5  # a once, b once: not a counted three times
    answers = iter([("a", 1.0)] * 80)
    assert asyncio.run(read(2)) is None  # copy b never answered: no ledger rather than half of one


def test_poisson_arrivals_are_seeded_and_average_the_rate():
    from bench.serve_load import arrival_times

    times = arrival_times(4000, rate=20.0, seed=3)
    assert times == arrival_times(4000, rate=20.0, seed=3) and times != arrival_times(4000, rate=20.0, seed=4)
    assert times[0] == 0.0 and all(b > a for a, b in zip(times, times[1:], strict=False))
    assert abs(times[-1] / (len(times) - 1) - 1 / 20.0) < 0.004  # mean gap 50 ms (std of the mean ~0.8 ms)


def test_an_open_loop_level_sends_each_request_at_its_arrival_and_counts_a_wait_for_the_cap():
    """A stand-in server that answers at once: with room for every request, each is sent at its arrival; with a cap
    of one request in flight and answers that take 50 ms, the requests queue and their waits reach their TTFT."""
    import argparse
    import asyncio
    import json

    import httpx

    from bench import serve_load
    from bench.serve_load import arrival_times, run_level

    def stream(delay: float):
        async def handler(request):
            await asyncio.sleep(delay)
            chunk = {"choices": [{"text": "x"}], "usage": None}
            done = {"choices": [], "usage": {"completion_tokens": 1}}
            body = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(done)}\n\ndata: [DONE]\n\n"
            return httpx.Response(200, text=body)

        return httpx.MockTransport(handler)

    args = argparse.Namespace(api_key=None, request_timeout_s=10.0, replicas=None, prompt_tokens=4, vocab=100,
                              output_tokens=1, kill_after_s=None, kill_gpu=None)  # fmt: skip
    real = httpx.AsyncClient
    try:
        serve_load.httpx.AsyncClient = lambda **kw: real(transport=stream(0.0), **kw)
        level = asyncio.run(run_level(["http://s"], "m", 16, 12, args, seed=5, rate=40.0))
        arrive = arrival_times(12, 40.0, 5)
        assert level["request_rate"] == 40.0 and level["errors"] == 0
        assert level["seconds"] >= arrive[-1]  # the last request was not sent before its arrival
        assert level["ttft_s"]["p99"] < 0.05  # nothing waited for the cap
        serve_load.httpx.AsyncClient = lambda **kw: real(transport=stream(0.05), **kw)
        capped = asyncio.run(run_level(["http://s"], "m", 1, 12, args, seed=5, rate=40.0))
        # 12 answers of 50 ms one at a time take 0.6 s, the arrivals 0.44 s: the last waits >= 0.16 s for the cap
        assert capped["seconds"] >= 0.6 and capped["ttft_s"]["p99"] > 12 * 0.05 - arrive[-1] - 0.01
    finally:
        serve_load.httpx.AsyncClient = real


def test_each_rate_runs_at_each_concurrency_and_level_seconds_size_a_rates_levels():
    import argparse

    from bench.serve_load import level_plan, level_requests

    args = argparse.Namespace(request_rate=[2.0, 10.0], concurrency=[32, 128], waves=2, level_seconds=25.0)
    assert level_plan(args) == [(2.0, 32), (2.0, 128), (10.0, 32), (10.0, 128)]
    assert [level_requests(args, r, c) for r, c in level_plan(args)] == [50, 50, 250, 250]
    args.level_seconds = None  # waves then, as for a closed loop
    assert [level_requests(args, r, c) for r, c in level_plan(args)] == [64, 256, 64, 256]
    args.request_rate, args.level_seconds = None, 25.0
    assert level_plan(args) == [(None, 32), (None, 128)]
    assert level_requests(args, None, 2) == 8  # at least 8 requests


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--request-rate", "2", "0"], "--request-rate must be a positive number of requests a second, got 0.0"),
        (["--level-seconds", "20"], "--level-seconds needs --request-rate and a positive number of seconds, got 20.0"),
        (["--request-rate", "2", "--level-seconds", "-1"], "got -1.0"),
    ],
)
def test_a_bad_rate_or_level_length_is_refused_naming_it(argv, message, capsys, monkeypatch):
    import sys

    from bench import serve_load

    monkeypatch.setattr(sys, "argv", ["serve_load.py", "--url", "http://s", "--out", "x.json", *argv])
    with pytest.raises(SystemExit) as e:
        serve_load.main()
    assert e.value.code == 2 and message in capsys.readouterr().err
