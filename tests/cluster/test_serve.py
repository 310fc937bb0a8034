"""The Serve endpoint with the official openai client: transformers' greedy tokens, streaming, chat, n and seed,
continuous batching under concurrency, OpenAI error bodies, disconnects freeing cache slots, gRPC, the API key."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import httpx
import jsonschema
import openai
import pytest
import ray
import torch
import yaml
from ray import serve

from cluster.cli.serve import start_serve, wait_until_healthy
from cluster.proto import generation_pb2 as pb
from cluster.proto import generation_pb2_grpc as pb_grpc
from router.generation import generate
from router.sampling import SamplingParams
from shards.engine import LocalEngine
from shards.tokenizer import Tokenizer
from tests.conftest import hf_greedy, random_prompts
from tests.ports import free_port

KEY = "test-key-0123456789"
WINDOW = 16
MODEL = "small-test"


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    return checkpoint_factory("mixtral", seed=61, window=WINDOW)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    placement = {
        "checkpoint": str(checkpoint),
        "dtype": "float32",
        "stages": 2,
        "expert_groups": 2,
        "resources": {"CPU": 0.5},
        "micro_batch_size": 8,
        "token_budget": 256,
        "max_seqs": 12,
    }
    path = tmp_path_factory.mktemp("serve") / "placement.yaml"
    path.write_text(yaml.safe_dump(placement))
    http_port, grpc_port = free_port(), free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    grpc_server = start_serve(
        {"placement": str(path), "api_key": KEY, "model_name": MODEL, "max_queued_requests": 40},
        "127.0.0.1",
        http_port,
        grpc_port,
    )
    base = f"http://127.0.0.1:{http_port}"
    if not wait_until_healthy(base, 180):
        pytest.fail("the server did not become ready in 180 s")
    yield {"base": base, "grpc": f"127.0.0.1:{grpc_port}"}
    grpc_server.stop()
    serve.shutdown()
    ray.shutdown()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return Tokenizer(checkpoint)


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def test_greedy_completion_equals_transformers(client, checkpoint, hf_model, tokenizer):
    prompt = "The quick brown fox jumps over the lazy dog, and then it keeps running far away"
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=24, temperature=0, extra_body={"return_token_ids": True}
    )
    choice = r.choices[0]
    ids = tokenizer.encode(prompt)
    assert len(ids) > WINDOW
    assert choice.prompt_token_ids == ids
    expected = hf_greedy(hf_model(checkpoint), ids, 24)
    eos = tokenizer.eos_id
    if eos in expected:
        expected = expected[: expected.index(eos) + 1]
    assert choice.token_ids == expected
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(expected)


def test_streaming_gives_the_same_tokens_and_text_as_non_streaming(client):
    args = {
        "model": MODEL,
        "prompt": ["Once upon a time", "Hi"],
        "max_tokens": 12,
        "temperature": 0,
        "extra_body": {"return_token_ids": True},
    }
    whole = client.completions.create(**args)
    streamed: dict[int, list[int]] = {}
    texts: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(**args, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            streamed.setdefault(c.index, []).extend(c.token_ids)
            texts[c.index] = texts.get(c.index, "") + c.text
    for c in whole.choices:
        assert streamed[c.index] == c.token_ids
        assert texts[c.index] == c.text
    assert usage is not None and usage.completion_tokens == sum(len(c.token_ids) for c in whole.choices)


def test_chat_completion_uses_the_instruct_format(client, checkpoint, hf_model, tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0, extra_body={"return_token_ids": True}
    )
    choice = r.choices[0]
    ids = tokenizer.encode_chat(messages)
    assert choice.prompt_token_ids == ids
    expected = hf_greedy(hf_model(checkpoint), ids, 10)
    assert choice.token_ids == expected[: len(choice.token_ids)] and len(choice.token_ids) >= 1
    assert choice.message.role == "assistant" and choice.message.content == tokenizer.decode(choice.token_ids)


def test_chat_streaming_starts_with_the_role_and_ends_with_done(server):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", server["base"] + "/v1/chat/completions", json=body, headers=auth(), timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_n_choices_with_a_seed_differ_from_each_other_and_repeat_exactly(client):
    args = {
        "model": MODEL,
        "prompt": "Tell me a story",
        "max_tokens": 12,
        "temperature": 1.0,
        "seed": 7,
        "n": 3,
        "extra_body": {"return_token_ids": True},
    }
    a = client.completions.create(**args)
    b = client.completions.create(**args)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.token_ids for c in a.choices] == [c.token_ids for c in b.choices]
    assert len({tuple(c.token_ids) for c in a.choices}) > 1
    c = client.completions.create(**{**args, "seed": 8})
    assert [x.token_ids for x in c.choices] != [x.token_ids for x in a.choices]


def test_stop_string_cuts_the_text(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    text = r.choices[0].text
    assert len(text) > 4
    stop = text[2:4]
    cut = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_logprobs_report_the_chosen_token_and_alternatives(client):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    for value, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and len(top) == 3 and max(top.values()) == pytest.approx(value, abs=1e-5)


def hf_logprobs(checkpoint, hf_model, prompt: list[int]) -> torch.Tensor:
    """transformers' log-softmax at every position of `prompt` (float64 from its float32 logits)."""
    with torch.no_grad():
        return torch.log_softmax(hf_model(checkpoint)(torch.tensor([prompt])).logits[0].double(), -1)


def test_echo_logprobs_equal_transformers_for_a_batch_of_prompts(server, checkpoint, hf_model, tokenizer):
    """Each prompt token's log-probability is transformers' at the position before it, across the prefill chunks of
    a prompt longer than the window (chunks of 16 here); the first token has none."""
    long = "The quick brown fox jumps over the lazy dog, and then it keeps running far away from home. "
    prompts = [2 * long, "Hi", "ab c"]
    body = {"model": MODEL, "prompt": prompts, "max_tokens": 2, "temperature": 0, "logprobs": 2, "echo": True}
    r = httpx.post(server["base"] + "/v1/completions", json=body, headers=auth(), timeout=120)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(tokenizer.encode(prompts[0])) > 2 * WINDOW
    for prompt, choice in zip(prompts, choices, strict=True):
        ids = tokenizer.encode(prompt)
        lp = choice["logprobs"]
        assert choice["text"].startswith(tokenizer.decode(ids)) and len(choice["text"]) > len(tokenizer.decode(ids))
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
        assert len(lp["tokens"]) == len(ids) + 2  # the prompt's tokens, then the two generated
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        ref = hf_logprobs(checkpoint, hf_model, ids)
        expected = ref[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(expected.tolist(), abs=1e-4)
        for top, best in zip(lp["top_logprobs"][1 : len(ids)], ref[:-1].max(-1).values.tolist(), strict=True):
            assert 2 <= len(top) <= 3 and max(top.values()) == pytest.approx(best, abs=1e-4)  # top 2 and the token
    assert r.json()["usage"]["completion_tokens"] == 2 * len(prompts)


def test_the_lm_eval_loglikelihood_request_gives_what_lm_eval_reads(server, checkpoint, hf_model):
    """lm-eval's local-completions multiple-choice request, as it sends it (token ids, echo, max_tokens 1), read as
    lm-eval reads it: the continuation's log-likelihood is the sum of token_logprobs[ctxlen:-1], and it is greedy
    when each of those equals the best of its top_logprobs."""
    context = random_prompts([23], seed=91)[0]
    greedy = hf_greedy(hf_model(checkpoint), context, 4)
    continuations = [greedy, [7, 8, 9, 10]]
    payload = {
        "model": MODEL,
        "prompt": [context + c for c in continuations],
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    r = httpx.post(server["base"] + "/v1/completions", json=payload, headers=auth(), timeout=120)
    assert r.status_code == 200, r.text
    ctxlen = len(context)
    for choice, continuation in zip(sorted(r.json()["choices"], key=lambda c: c["index"]), continuations, strict=True):
        token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        assert len(token_logprobs) == len(top_logprobs) == len(continuation)
        is_greedy = all(lp == max(top.values()) for lp, top in zip(token_logprobs, top_logprobs, strict=True))
        assert is_greedy == (continuation == greedy)
        ref = hf_logprobs(checkpoint, hf_model, context + continuation)
        expected = sum(ref[ctxlen - 1 + i, t].item() for i, t in enumerate(continuation))
        assert sum(token_logprobs) == pytest.approx(expected, abs=1e-3)


def test_echo_alone_and_echo_streamed(server, tokenizer):
    """max_tokens 0 with echo is the prompt alone, with its log-probabilities; streamed, the prompt comes in the first
    chunk; without logprobs, echo only puts the prompt's text first."""
    ids = tokenizer.encode("Once upon a time, in a land far away")
    base = {"model": MODEL, "prompt": ids, "temperature": 0, "echo": True}
    url = server["base"] + "/v1/completions"
    alone = httpx.post(url, json={**base, "max_tokens": 0, "logprobs": 0}, headers=auth(), timeout=60).json()
    choice = alone["choices"][0]
    assert choice["text"] == tokenizer.decode(ids) and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["token_logprobs"]) == len(ids) and alone["usage"]["completion_tokens"] == 0
    assert all(len(top) == 1 for top in choice["logprobs"]["top_logprobs"][1:])  # logprobs 0: the token's own
    assert httpx.post(url, json={**base, "echo": False, "max_tokens": 0}, headers=auth(), timeout=60).status_code == 400

    whole = httpx.post(url, json={**base, "max_tokens": 3, "logprobs": 1}, headers=auth(), timeout=60).json()
    body = {**base, "max_tokens": 3, "logprobs": 1, "stream": True}
    with httpx.stream("POST", url, json=body, headers=auth(), timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = [c["choices"][0] for c in chunks]
    assert "".join(c["text"] for c in streamed) == whole["choices"][0]["text"]
    assert [t for c in streamed for t in c["logprobs"]["token_logprobs"]] == whole["choices"][0]["logprobs"][
        "token_logprobs"
    ]
    assert len(streamed[0]["logprobs"]["tokens"]) == len(ids) + 1  # the prompt, then the first token
    with httpx.stream("POST", url, json={**body, "max_tokens": 0}, headers=auth(), timeout=60) as r:
        [only] = [json.loads(line[6:])["choices"][0] for line in r.iter_lines() if line.startswith("data: {")]
    assert (only["text"], only["finish_reason"]) == (choice["text"], "length")
    plain = httpx.post(url, json={**base, "max_tokens": 3}, headers=auth(), timeout=60).json()["choices"][0]
    assert plain["text"] == whole["choices"][0]["text"] and plain["logprobs"] is None


def test_32_concurrent_streams_of_mixed_lengths_all_get_their_tokens(server, checkpoint):
    prompts = [f"Request {i}: " + "lorem ipsum " * (i % 9) for i in range(32)]
    max_tokens = [4 + (i % 5) * 3 for i in range(32)]

    async def one(aclient, prompt, n):
        ids = []
        stream = await aclient.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=n,
            temperature=0,
            stream=True,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        async for chunk in stream:
            for c in chunk.choices:
                ids.extend(c.token_ids)
        return ids

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=300)
        return await asyncio.gather(*(one(aclient, p, n) for p, n in zip(prompts, max_tokens, strict=True)))

    got = asyncio.run(main())
    tok = Tokenizer(checkpoint)
    encoded = [tok.encode(p) for p in prompts]
    engine = LocalEngine(checkpoint, max_seqs=32)
    expected = generate(engine, encoded, [SamplingParams(max_tokens=n, ignore_eos=True) for n in max_tokens])
    for ids, exp in zip(got, expected, strict=True):
        assert ids == exp.token_ids


BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 400, "model"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 99}, 400, "logprobs"),
    ("/v1/completions", {"prompt": [[1, 2], [1, 99999999]]}, 400, "prompt[1]"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    # no field is accepted and ignored: what the server does not implement is a 400 naming it
    ("/v1/completions", {"prompt": "hi", "suffix": "bye"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "functions": [{}]}, 400, "functions"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
        400,
        "tools",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "name": "bob"}]}, 400, "messages[0].name"),
    ("/v1/completions", {"prompt": "hi", "response_format": {"type": "yaml"}}, 400, "response_format.type"),
    (
        "/v1/completions",
        {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}},
        400,
        "response_format.json_schema",
    ),
    (
        "/v1/completions",
        {"prompt": "hi", "response_format": {"type": "json_object"}, "ignore_eos": True},
        400,
        "ignore_eos",
    ),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "hi", "min_p": -0.1}, 400, "min_p"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
]


@pytest.mark.parametrize("route,body,status,param", BAD_REQUESTS)
def test_bad_request_gets_its_status_and_an_openai_error_body(server, route, body, status, param):
    r = httpx.post(server["base"] + route, json=body, headers=auth(), timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_malformed_json_is_400_and_good_requests_still_work_after_a_burst(server, client):
    r = httpx.post(server["base"] + "/v1/completions", content=b"{nope", headers=auth(), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    for route, body, _, _ in BAD_REQUESTS * 2:
        assert httpx.post(server["base"] + route, json=body, headers=auth(), timeout=30).status_code < 500
    ok = client.completions.create(model=MODEL, prompt="still fine", max_tokens=3, temperature=0)
    assert len(ok.choices) == 1 and ok.usage.completion_tokens >= 1


def grpc_auth() -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEY}"),)


def metric(server, name: str) -> float:
    for line in httpx.get(server["base"] + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} not found")


def test_metrics_split_the_engine_steps_by_kind_and_the_kinds_add_up(server, client):
    """The step ledger serve_load reads: a prompt's steps then its decode steps, each counted once by kind, the
    kinds' steps adding up to every step, and serve_load's parser reading the same /metrics."""
    import asyncio

    from bench.serve_load import engine_ledger

    def read() -> dict:
        async def get():
            async with httpx.AsyncClient() as c:
                return await engine_ledger(c, [server["base"]], {})

        return asyncio.run(get())

    before = read()
    client.completions.create(model=MODEL, prompt="count the steps", max_tokens=6, temperature=0)
    after = read()
    assert set(after) == {"decode", "mixed", "prefill"}
    grew = {k: after[k]["steps"] - before[k]["steps"] for k in after}
    assert grew["decode"] >= 5 and grew["prefill"] + grew["mixed"] >= 1  # 6 tokens: one from the prompt's step
    assert after["decode"]["tokens"] - before["decode"]["tokens"] >= 5
    assert all(after[k]["seconds"] > before[k]["seconds"] for k in after if grew[k])
    assert sum(after[k]["steps"] for k in after) == metric(server, "mistral_cluster_steps_total")


def test_a_client_that_disconnects_mid_stream_frees_its_cache_slot(server):
    body = {
        "model": MODEL,
        "prompt": "A very long story",
        "max_tokens": 1500,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", server["base"] + "/v1/completions", json=body, headers=auth(), timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert metric(server, "mistral_cluster_kv_cache_slots_in_use") >= 1
    deadline = time.time() + 30
    while metric(server, "mistral_cluster_kv_cache_slots_in_use") != 0:
        assert time.time() < deadline, "the slot of a disconnected stream was never freed"
        time.sleep(0.5)
    assert metric(server, "mistral_cluster_aborted_requests_total") >= 1


def test_a_grpc_client_that_cancels_mid_stream_frees_its_cache_slot(server):
    aborted = metric(server, "mistral_cluster_aborted_requests_total")
    with grpc.insecure_channel(server["grpc"]) as channel:
        stream = pb_grpc.GenerationStub(channel).GenerateStream(
            pb.GenerateRequest(prompt="A very long story", max_tokens=1500), timeout=120, metadata=grpc_auth()
        )
        assert [next(stream) for _ in range(3)]
        assert metric(server, "mistral_cluster_kv_cache_slots_in_use") >= 1
        stream.cancel()
    deadline = time.time() + 30
    while metric(server, "mistral_cluster_kv_cache_slots_in_use") != 0:
        assert time.time() < deadline, "the slot of a cancelled gRPC stream was never freed"
        time.sleep(0.5)
    assert metric(server, "mistral_cluster_aborted_requests_total") > aborted


def test_queue_full_gets_429_with_retry_after(server):
    async def burst():
        async with httpx.AsyncClient(timeout=300) as c:
            body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "temperature": 0}
            return await asyncio.gather(
                *(c.post(server["base"] + "/v1/completions", json=body, headers=auth()) for _ in range(90))
            )

    responses = asyncio.run(burst())
    codes = {r.status_code for r in responses}
    assert codes <= {200, 429} and 429 in codes and 200 in codes
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.headers["retry-after"].isdigit() and limited.json()["error"]["code"] == "queue_full"


def test_grpc_stream_returns_the_same_tokens_as_http(server, client):
    http = client.completions.create(
        model=MODEL,
        prompt="Hello from gRPC",
        max_tokens=8,
        temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    with grpc.insecure_channel(server["grpc"]) as channel:
        stub = pb_grpc.GenerationStub(channel)
        md = grpc_auth()
        chunks = list(stub.GenerateStream(pb.GenerateRequest(prompt="Hello from gRPC", max_tokens=8), metadata=md))
        whole = stub.Generate(pb.GenerateRequest(prompt="Hello from gRPC", max_tokens=8), metadata=md)
    assert [t for c in chunks for t in c.token_ids] == http.choices[0].token_ids == list(whole.token_ids)
    assert chunks[-1].finish_reason == http.choices[0].finish_reason


def test_a_bad_grpc_request_ends_with_the_status_naming_the_field(server):
    with grpc.insecure_channel(server["grpc"]) as channel:
        stub = pb_grpc.GenerationStub(channel)
        for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
            with pytest.raises(grpc.RpcError) as refused:
                call(pb.GenerateRequest(prompt="hi", max_tokens=4, temperature=7), timeout=60, metadata=grpc_auth())
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "temperature" in refused.value.details()


def test_every_route_but_health_and_metrics_needs_the_key(server):
    base = server["base"]
    assert httpx.get(base + "/health", timeout=30).status_code == 200
    assert httpx.get(base + "/metrics", timeout=30).status_code == 200
    wrong = {"Authorization": "Bearer " + "x" * len(KEY)}
    for headers in ({}, wrong):
        for method, route in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
            r = httpx.request(method, base + route, json={"prompt": "hi"}, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "colour": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "colour"],
    "additionalProperties": False,
}


def test_chat_json_schema_output_validates_for_every_choice(client):
    """The official client's structured output request: every choice parses and validates, on random weights."""
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Who are you? Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
        n=4,
        seed=3,
        temperature=1.0,
        max_tokens=80,
    )
    assert len(r.choices) == 4
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_the_clients_pydantic_parse_gets_a_valid_object(client):
    """`chat.completions.parse` with a pydantic model: what LangChain's with_structured_output does underneath."""
    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        name: str = Field(max_length=8)
        legs: int = Field(ge=0, le=8)

    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    r = parse(model=MODEL, messages=[{"role": "user", "content": "A pet"}], response_format=Pet, max_tokens=60, seed=1)
    pet = r.choices[0].message.parsed
    assert isinstance(pet, Pet) and 0 <= pet.legs <= 8


def test_penalties_and_bias_over_http_equal_the_one_process_engine(client, checkpoint):
    """The fields reach the router's sampler intact: the served tokens equal the offline engine's with the same
    settings (whose math is checked against transformers in tests/router/test_logit_adjustments.py)."""
    body = {
        "frequency_penalty": 1.2,
        "presence_penalty": 0.4,
        "repetition_penalty": 1.3,
        "logit_bias": {"1000": 4.0},
        "min_p": 0.05,
        "return_token_ids": True,
        "ignore_eos": True,
    }
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0, extra_body=body)
    ids = r.choices[0].prompt_token_ids
    params = SamplingParams(
        max_tokens=16,
        temperature=0,
        ignore_eos=True,
        frequency_penalty=1.2,
        presence_penalty=0.4,
        repetition_penalty=1.3,
        logit_bias=((1000, 4.0),),
        min_p=0.05,
    )
    [expected] = generate(LocalEngine(checkpoint, max_seqs=2), [ids], params)
    assert r.choices[0].token_ids == expected.token_ids
