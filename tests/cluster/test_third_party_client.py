"""The endpoint as a client nobody here wrote sees it: GuideLLM (vLLM's benchmarking tool) runs a benchmark against
the served model and must finish every request it was told to send, none errored or cut short.

GuideLLM's requests are what OpenAI-style clients really send, not what our own tests think of: chat messages whose
content is a list of parts, `max_completion_tokens`, `stream_options.continuous_usage_stats`, `ignore_eos`, and
token counts read from the server's `usage` (no tokenizer of its own is loaded).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.cluster.serve_fixtures import running_server

REQUESTS = 8
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def server(checkpoint_factory, tmp_path_factory):
    with running_server(checkpoint_factory("mixtral", seed=41, window=16), tmp_path_factory.mktemp("client")) as s:
        yield s


def guidellm(server, out_dir, request_format: str, stream: bool) -> dict:
    """One GuideLLM benchmark: REQUESTS prompts, 4 at a time; returns its JSON report."""
    prompts = out_dir / "prompts.json"
    rows = [{"prompt": f"Tell me story number {i}", "output_tokens_count": MAX_TOKENS} for i in range(REQUESTS)]
    prompts.write_text(json.dumps(rows))
    report = out_dir / "report.json"
    backend = (
        f"kind=openai_http,target={server.base},model={server.model},api_key={server.key},"
        f"request_format={request_format},stream={stream},timeout=120"
    )
    command = [
        *(sys.executable, "-m", "guidellm", "run", "--backend", backend),
        *("--profile", "kind=concurrent,streams=4"),
        *("--constraint", f"kind=max_requests,count={REQUESTS}"),
        *("--data", f"kind=json_file,path={prompts}"),
        *("--output", f"kind=json,path={report}"),
        "--disable-progress",
    ]
    # offline, and its dataset cache in the test's directory, not the user's
    env = {**os.environ, "HF_HOME": str(out_dir / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=out_dir, check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"guidellm ran past 240 s:\n{(e.stdout or b'')[-4000:]}\n{(e.stderr or b'')[-4000:]}")
    output = f"guidellm exited {run.returncode}\n--- stdout\n{run.stdout[-6000:]}\n--- stderr\n{run.stderr[-6000:]}"
    assert run.returncode == 0 and report.is_file(), output
    [benchmark] = json.loads(report.read_text())["benchmarks"]
    return benchmark


@pytest.mark.parametrize(
    "request_format,stream",
    [("/v1/chat/completions", True), ("/v1/completions", False)],
    ids=["chat-streaming", "completions"],
)
def test_guidellm_completes_every_request_it_was_told_to_send_with_no_error(server, tmp_path, request_format, stream):
    benchmark = guidellm(server, tmp_path, request_format, stream)
    totals = benchmark["metrics"]["request_totals"]
    errors = [r["info"]["error"] for r in benchmark["requests"]["errored"]]
    assert totals == {"successful": REQUESTS, "errored": 0, "incomplete": 0, "total": REQUESTS}, errors
    done = benchmark["requests"]["successful"]
    assert len(done) == REQUESTS
    assert all(r["output_metrics"]["text_tokens"] == MAX_TOKENS for r in done)  # usage as the server counted it
    assert all(r["output"] for r in done)
