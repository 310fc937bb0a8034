"""Hostile HTTP against a running server: schemathesis fuzzes the app's own OpenAPI document, then raw bodies no
schema describes. Nothing gets a 5xx; every refusal is a 4xx with an OpenAI error body; good requests still work."""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

from tests.cluster.serve_fixtures import running_server

CEILING = 4  # max_tokens_ceiling: fuzzed requests that pass every check stay cheap
# Per operation and generation mode: about 20 s in all on 2 cores. MISTRAL_CLUSTER_FUZZ_SCALE=20 soaks for longer.
SCALE = int(os.environ.get("MISTRAL_CLUSTER_FUZZ_SCALE", "1"))
EXAMPLES = {"post": 60 * SCALE, "get": 5 * SCALE}


@pytest.fixture(scope="module")
def server(checkpoint_factory, tmp_path_factory):
    checkpoint = checkpoint_factory("mixtral", seed=61, window=16)
    with running_server(checkpoint, tmp_path_factory.mktemp("fuzz"), max_tokens_ceiling=CEILING, max_n=2) as s:
        yield s


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.base + "/openapi.json", headers=server.auth(), timeout=30)


def assert_openai_error(response) -> None:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error


def good_request_works(server) -> None:
    r = httpx.post(
        server.base + "/v1/completions",
        headers=server.auth(),
        timeout=60,
        json={"model": server.model, "prompt": "still fine", "max_tokens": 2, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


COMMON_FIELDS = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "return_token_ids",
    "ignore_eos",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_p",
    "logit_bias",
    "response_format",
    "best_of",
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
}
REQUEST_FIELDS = {
    "POST /v1/completions": ("prompt", COMMON_FIELDS | {"prompt", "logprobs", "echo"}),
    "POST /v1/chat/completions": (
        "messages",
        COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice"},
    ),
}


def test_the_openapi_document_describes_every_field_the_parser_reads(api_schema):
    operations = {op.label: op.definition.raw for op in (r.ok() for r in api_schema.get_all_operations())}
    for label, (required, fields) in REQUEST_FIELDS.items():
        body = operations[label]["requestBody"]["content"]["application/json"]["schema"]
        assert body["required"] == [required] and set(body["properties"]) == fields
        assert set(body["properties"]["stream_options"]["anyOf"][0]["properties"]) == {"include_usage"}
        assert set(operations[label]["responses"]) == {"200", "400", "401", "413", "429", "503"}
        for status in ("400", "401", "413", "429", "503"):
            error = operations[label]["responses"][status]["content"]["application/json"]["schema"]
            assert error["required"] == ["error"] and set(error["properties"]["error"]["required"]) == {
                "message",
                "type",
                "param",
                "code",
            }


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_requests_never_get_a_server_error(server, api_schema, mode):
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if mode == GenerationMode.NEGATIVE and operation.method == "get":
            continue  # no parameters and no body: nothing to get wrong

        @settings(
            max_examples=EXAMPLES[operation.method],
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def call(case):
            response = case.call(base_url=server.base, headers=server.auth(), timeout=60)
            case.validate_response(
                response, checks=[not_a_server_error, status_code_conformance, response_schema_conformance]
            )
            if response.status_code >= 400 and case.operation.path != "/health":
                assert_openai_error(response)

        call()
    good_request_works(server)


DEEP = b"[" * 100_000 + b"]" * 100_000
HOSTILE_BODIES = {
    "empty body": (b"", "application/json", 400),
    "not an object": (b'["prompt", "hi"]', "application/json", 400),
    "null": (b"null", "application/json", 400),
    "NaN literal": (b'{"prompt": "hi", "temperature": NaN}', "application/json", 400),
    "Infinity literal": (b'{"prompt": "hi", "max_tokens": Infinity}', "application/json", 400),
    "-Infinity in an unknown field": (b'{"prompt": "hi", "user": -Infinity}', "application/json", 400),
    "number too large for a double": (b'{"prompt": "hi", "max_tokens": 1e400}', "application/json", 400),
    "integer of 5000 digits": (b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", "application/json", 400),
    "huge n": (b'{"prompt": "hi", "n": 100000000000000000000}', "application/json", 400),
    "deeply nested arrays": (DEEP, "application/json", 400),
    "deeply nested prompt": (b'{"prompt": ' + DEEP + b"}", "application/json", 400),
    "invalid UTF-8": (b'{"prompt": "\xff\xfe\xc3\x28"}', "application/json", 400),
    "unpaired surrogate escape": (b'{"prompt": "\\ud800 hi"}', "application/json", 400),
    "UTF-16 body": ('{"prompt": "hi"}'.encode("utf-16"), "application/json", 400),
    "byte order mark": (b'\xef\xbb\xbf{"prompt": "hi"}', "application/json", 400),
    "form-encoded body": (b"prompt=hi&max_tokens=2", "application/x-www-form-urlencoded", 400),
    "multipart body": (
        b'--x\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi\r\n--x--\r\n',
        "multipart/form-data; boundary=x",
        400,
    ),
    "plain text": (b"complete this please", "text/plain", 400),
    "2 MiB body": (b'{"prompt": "' + b"a" * (2 << 20) + b'"}', "application/json", 413),
}


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_hostile_bodies_get_a_4xx_with_an_openai_error_body(server, route):
    for name, (body, content_type, status) in HOSTILE_BODIES.items():
        r = httpx.post(
            server.base + route, content=body, timeout=60, headers={**server.auth(), "Content-Type": content_type}
        )
        assert r.status_code == status, f"{name}: {r.status_code} {r.text[:200]}"
        assert_openai_error(r)
    good_request_works(server)


def test_a_2_mib_body_without_a_content_length_is_refused_too(server):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(32):
            yield b"a" * (64 << 10)
        yield b'"}'

    r = httpx.post(
        server.base + "/v1/completions",
        content=chunks(),
        timeout=60,
        headers={**server.auth(), "Content-Type": "application/json"},
    )
    assert r.status_code == 413 and "content-length" not in r.request.headers
    assert_openai_error(r)
    good_request_works(server)


def test_unknown_paths_and_wrong_methods_get_openai_error_bodies(server):
    for method, path, status in (
        ("GET", "/v1/nothing-here", 404),
        ("GET", "/v1/completions", 405),
        ("DELETE", "/v1/models", 405),
    ):
        r = httpx.request(method, server.base + path, headers=server.auth(), timeout=30)
        assert r.status_code == status
        assert_openai_error(r)
