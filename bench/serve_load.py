"""Load on the served endpoint: an OpenAI-API streaming client of its own, swept over concurrency.

Each level keeps C requests in flight (a closed loop: a finished request is replaced at once) until it has sent
`--waves` × C of them (default 4 waves, at least 8 requests). Every request is a streamed `/v1/completions` of a random
token-id prompt of `--prompt-tokens`, `ignore_eos: true` and `max_tokens: --output-tokens`, so each one costs the
same. Reported per level: output tokens/s (all output tokens over the level's wall time), time to first token and
inter-token latency (the gap between successive chunks) at p50 and p99, and errors (an HTTP error, a broken stream,
a stream without `[DONE]`, fewer tokens than asked). The client is httpx and asyncio only: no project code, so the
same figures can be read against any OpenAI-compatible server.

It either targets a running server (`--url`) or starts `mistral-cluster serve` itself (`--config`, with
`--replicas`, `--random-weights`, `--max-model-len`, `--set key=value` to change the placement's batch knobs) and
stops it with SIGTERM afterwards. It writes JSON (naming the machine: CPUs, platform, GPUs, commit) and a plot;
`--compare A.json B.json ...` plots several runs together.

`--request-rate R [R ...]` opens the loop: a level's requests arrive at Poisson times, R a second on average (seeded),
and C only caps how many are in flight (vLLM's `--request-rate` with `--max-concurrency`); a request the cap holds back
has that wait counted in its time to first token. One level per rate and concurrency; `--level-seconds S` sizes a
rate's levels as S seconds of arrivals (R x S requests) rather than waves. Steady traffic, unlike waves of equal
requests, starts a few prompts at almost every step: the case a server's step that starts prompts beside decoding
ones is tested by.

`--kill-after-s S` (with `--kill-gpu N` on a GPU host) runs each level three times: twice undisturbed (how many
requests keep their tokens from one calm run to the next is the floor), then SIGKILLing a shard worker S seconds in
(on GPU N the process holding most of its memory, else the largest `ray::ShardWorker`): that level reports its
errors, the pause (the longest wait after the kill with no token on any stream) and how many requests got exactly
the tokens of the first undisturbed run (asked for with this server's `return_token_ids`).

    python bench/serve_load.py --config deploy/examples/local.yaml --random-weights small-mixtral \\
        --concurrency 1 4 16 --out bench/results/serve_load-cpu-1replica.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
REPLICA_HEADER = "x-mistral-cluster-replica"  # read when the server sends it: requests per copy, each copy's ledger


# --- one request ---------------------------------------------------------------------------------------------------


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Seconds from a level's start at which its `n` requests arrive: a Poisson process of `rate` a second (the
    first at 0), the same for the same seed."""
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times


async def one_request(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> dict:
    """Send one streamed completion; return its timings (seconds from sending), tokens and how it ended."""
    t0 = time.perf_counter()
    out = {"ttft": None, "gaps": [], "end": None, "tokens": 0, "error": None, "replica": None, "token_ids": []}
    out["sent_at"] = t0
    last = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            out["replica"] = r.headers.get(REPLICA_HEADER)
            if r.status_code != 200:
                out["error"] = f"HTTP {r.status_code}"
                await r.aread()
                return out
            done, chunks, usage = False, 0, None
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    out["error"] = f"error event: {data['error'].get('code') or data['error'].get('message')}"
                if data.get("usage"):
                    usage = data["usage"]
                if data.get("choices"):
                    out["token_ids"] += data["choices"][0].get("token_ids") or []  # a server that sends them
                    now = time.perf_counter() - t0
                    if last is None:
                        out["ttft"] = now
                    else:
                        out["gaps"].append(now - last)
                    last, chunks = now, chunks + 1
            out["end"] = time.perf_counter() - t0
            out["tokens"] = usage["completion_tokens"] if usage else chunks
            if out["error"] is None and not done:
                out["error"] = "no [DONE]"
            elif out["error"] is None and out["tokens"] < body["max_tokens"]:
                out["error"] = f"{out['tokens']} of {body['max_tokens']} tokens"
    except httpx.HTTPError as e:
        out["error"] = type(e).__name__
    return out


def random_prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]  # ids 0-2 are <unk>, <s>, </s> in Mistral's vocabularies


# --- a level of concurrency ------------------------------------------------------------------------------------------


def shard_workers() -> dict[int, dict]:
    """Every `ray::ShardWorker` process of this machine: its resident memory and the GPUs it has open."""
    found = {}
    for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if not cmdline.startswith(b"ray::ShardWorker"):
                continue
            rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            gpus = set()
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/dev/nvidia") and target[len("/dev/nvidia") :].isdigit():
                    gpus.add(int(target[len("/dev/nvidia") :]))
        except OSError:
            continue
        found[pid] = {
            "cmdline": cmdline.replace(b"\0", b" ").decode(errors="replace").strip(),
            "rss": rss,
            "gpus": gpus,
        }
    return found


def worker_victim(workers: dict[int, dict], gpu: int | None) -> tuple[int | None, str]:
    """The process to kill, and how it was chosen. On `gpu`: the `ray::ShardWorker` holding the most of that GPU's
    memory by nvidia-smi (the worker, not its standby, which holds only a CUDA context), when nvidia-smi's pids are
    this machine's (in a container they can be the host's), else the one with that GPU open and the most resident
    memory; without a GPU, the `ray::ShardWorker` with the most resident memory. `workers`: `shard_workers()`."""
    if gpu is None:
        best = max(workers, key=lambda pid: workers[pid]["rss"], default=None)
        return best, "largest resident ray::ShardWorker"
    on_gpu = {pid: w for pid, w in workers.items() if gpu in w["gpus"]}
    try:
        rows = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits", "-i", str(gpu)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
        apps = [tuple(int(x) for x in row.split(",")) for row in rows if row.strip()]
    except (OSError, subprocess.CalledProcessError, ValueError):
        apps = []
    ours = [a for a in apps if a[0] in on_gpu]
    if ours:
        return max(ours, key=lambda a: a[1])[0], f"nvidia-smi: most memory on GPU {gpu}"
    best = max(on_gpu, key=lambda pid: on_gpu[pid]["rss"], default=None)
    return best, f"GPU {gpu} open, most resident memory (nvidia-smi pids {[a[0] for a in apps]} are not this machine's)"


async def kill_later(after_s: float, gpu: int | None, record: dict) -> None:
    await asyncio.sleep(after_s)
    before = shard_workers()
    pid, how = worker_victim(before, gpu)
    record.update(victim_pid=pid, chosen_by=how, killed_at=time.perf_counter())
    record["candidates"] = [
        {"pid": p, "rss_mib": w["rss"] >> 20, "gpus": sorted(w["gpus"])} for p, w in sorted(before.items())
    ]
    if pid is not None:
        record["victim"] = before.get(pid, {}).get("cmdline")
        os.kill(pid, signal.SIGKILL)


async def run_level(
    urls: list[str],
    model: str,
    concurrency: int,
    n_requests: int,
    args,
    seed: int,
    kill_after_s: float | None = None,
    rate: float | None = None,
) -> dict:
    """One level: `n_requests` streamed completions, at most `concurrency` in flight; with `rate`, arriving at
    Poisson times (an open loop), else each sent as soon as one ends (a closed loop)."""
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    bodies = [
        {
            "model": model,
            "prompt": random_prompt(rng, args.prompt_tokens, args.vocab),
            "max_tokens": args.output_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for _ in range(n_requests)
    ]
    if args.kill_after_s is not None:  # this server's extension, so that a fault run can compare tokens
        for body in bodies:
            body["return_token_ids"] = True
    queue: asyncio.Queue = asyncio.Queue()
    for i, b in enumerate(bodies):
        queue.put_nowait((i, b))
    results: list[dict] = []
    fault: dict = {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)

    arrive = arrival_times(len(bodies), rate, seed) if rate else None

    async def worker(client: httpx.AsyncClient, url: str) -> None:
        while not queue.empty():
            i, body = queue.get_nowait()
            waited = 0.0
            if arrive is not None:  # open loop: not before its arrival; a wait for the cap counts in its latency
                late = time.perf_counter() - (t0 + arrive[i])
                if late < 0:
                    await asyncio.sleep(-late)
                waited = max(0.0, late)
            out = await one_request(client, url, body, headers)
            if waited and out["ttft"] is not None:
                out["ttft"] += waited
            if waited and out["end"] is not None:
                out["end"] += waited
            results.append({"index": i, "queued_s": waited, **out})

    async with httpx.AsyncClient(timeout=args.request_timeout_s, limits=limits) as client:
        copies = args.replicas or 1
        before = await engine_ledger(client, urls, headers, copies)
        t0 = time.perf_counter()
        killer = None
        if kill_after_s is not None:
            killer = asyncio.ensure_future(kill_later(kill_after_s, args.kill_gpu, fault))
        # several URLs (each copy's own, with direct ingress): the clients are spread over them evenly
        await asyncio.gather(*(worker(client, urls[k % len(urls)]) for k in range(concurrency)))
        seconds = time.perf_counter() - t0
        if killer is not None:
            killer.cancel()
        after = await engine_ledger(client, urls, headers, copies)
    ok = [r for r in results if r["error"] is None]
    tokens = sum(r["tokens"] for r in results)
    level = {
        "concurrency": concurrency,
        "request_rate": rate,
        "requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_kinds": dict(Counter(r["error"] for r in results if r["error"])),
        "seconds": round(seconds, 3),
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / seconds,
        "requests_per_s": len(ok) / seconds,
        "ttft_s": summary([r["ttft"] for r in ok if r["ttft"] is not None]),
        "itl_s": summary([g for r in ok for g in r["gaps"]]),
        "tpot_s": summary([(r["end"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]),
        "e2e_s": summary([r["end"] for r in ok]),
    }
    if before is not None and after is not None:
        level["engine"] = ledger_delta(before, after, seconds, copies)
    replicas = Counter(r["replica"] for r in results if r["replica"])
    if replicas:
        level["requests_per_replica"] = dict(sorted(replicas.items()))
    if "killed_at" in fault:
        level["fault"] = {
            "victim_pid": fault["victim_pid"],
            "victim": fault.get("victim"),
            "chosen_by": fault["chosen_by"],
            "candidates": fault["candidates"],
            "killed_after_s": round(fault["killed_at"] - t0, 3),
            "pause_s": round(pause_after(results, fault["killed_at"]), 3),
        }
    level["token_ids"] = {r["index"]: r["token_ids"] for r in results if r["error"] is None}
    return level


LEDGER_LINE = re.compile(r'^mistral_cluster_engine_step_(steps|tokens|seconds)_total\{kind="(\w+)"\} (\S+)$')


async def engine_ledger(client: httpx.AsyncClient, urls: list[str], headers: dict, copies: int = 0) -> dict | None:
    """The engine's step ledger from /metrics, summed over the copies: {kind: {steps, tokens, seconds}} (None when a
    server does not publish it). Read before and after a level, it says where the level's wall time went.

    One URL a copy (direct ingress) reads each once. Several copies behind one URL (Serve's proxy): each scrape
    reaches one copy, named in its `x-mistral-cluster-replica` header, so it scrapes until it has read all `copies`
    (between levels, when no copy runs a request, the replica router picks among them at random)."""
    copies = copies or len(urls)
    pages: dict[str, str] = {}
    targets = urls if len(urls) == copies else [urls[0]] * (40 * copies)
    for i, url in enumerate(targets):
        try:
            r = await client.get(url + "/metrics", headers=headers, timeout=30)
        except httpx.HTTPError:
            return None
        pages[url if len(urls) == copies else r.headers.get(REPLICA_HEADER, str(i))] = r.text
        if len(pages) == copies:
            break
    if len(pages) < copies:
        return None
    total: dict[str, dict[str, float]] = {}
    for text in pages.values():
        for line in text.splitlines():
            m = LEDGER_LINE.match(line)
            if m:
                row = total.setdefault(m[2], {"steps": 0.0, "tokens": 0.0, "seconds": 0.0})
                row[m[1]] += float(m[3])
    return total or None


def ledger_delta(before: dict, after: dict, seconds: float, copies: int = 1) -> dict:
    """Where a level's `seconds` went in the engine: each step kind's steps, tokens and share of the busy time (ms
    a step, and for decode steps their tokens a second: the figure gpu_scale's steady rate compares with), and the
    rest, when the engine had no step in flight (waiting for requests). With several copies the figures are their
    sums, and the idle time is counted against `copies` x `seconds`."""
    out: dict = {}
    busy = 0.0
    for kind, now in after.items():
        was = before.get(kind, {})
        d = {k: now[k] - was.get(k, 0.0) for k in ("steps", "tokens", "seconds")}
        busy += d["seconds"]
        out[kind] = {
            "steps": int(d["steps"]),
            "tokens": int(d["tokens"]),
            "seconds": round(d["seconds"], 3),
            "ms_per_step": round(1e3 * d["seconds"] / d["steps"], 2) if d["steps"] else None,
        }
        if kind == "decode" and d["seconds"] > 0:
            out[kind]["tokens_per_s"] = round(d["tokens"] / d["seconds"], 1)
    out["copies"] = copies  # with several, decode tokens_per_s is a copy's: their tokens over their summed seconds
    out["busy_s"] = round(busy, 3)
    out["idle_s"] = round(seconds * copies - busy, 3)
    return out


def arrivals(result: dict) -> list[float]:
    """When (host clock) each of the request's tokens arrived."""
    if result["ttft"] is None:
        return []
    times = [result["sent_at"] + result["ttft"]]
    for g in result["gaps"]:
        times.append(times[-1] + g)
    return times


def pause_after(results: list[dict], moment: float) -> float:
    """The longest time with no token arriving on any stream, among the waits that end after `moment`: a killed
    shard stalls every stream at once (the last tokens of the steps already in flight can still arrive after it)."""
    times = sorted(t for r in results for t in arrivals(r))
    return max((b - a for a, b in zip(times, times[1:], strict=False) if b > moment), default=0.0)


def kept_tokens(calm: dict[int, list[int]], ids: dict[int, list[int]]) -> dict:
    """How many requests of a later run of the same level got the tokens the first undisturbed run gave them (greedy:
    in float32 they must be identical; in bf16 a request's rows meet other batch shapes, and a resumed request's
    context is recomputed with other rounding). A request that failed in either run is counted by `errors`."""
    same = [ids[i] == tokens for i, tokens in calm.items() if i in ids and tokens]
    return {"tokens_compared": len(same), "tokens_identical": sum(same)}


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: list[float]) -> dict | None:
    if not values:
        return None
    return {
        "p50": percentile(values, 0.5),
        "p99": percentile(values, 0.99),
        "mean": sum(values) / len(values),
        "n": len(values),
    }


# --- the server, when this script starts it --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def placement_copy(config: str, settings: list[str], tmp: Path) -> str:
    """The placement file with `key=value` settings applied (batch knobs: max_seqs, micro_batch_size, ...)."""
    if not settings:
        return str(Path(config).resolve())
    spec = yaml.safe_load(Path(config).read_text())
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        spec[key] = yaml.safe_load(value)
    path = tmp / Path(config).name
    path.write_text(yaml.safe_dump(spec))
    return str(path)


class ServerProcess:
    """`mistral-cluster serve` in a process group of its own, on a free port; SIGTERM (drain) when done."""

    def __init__(self, args, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "cluster.cli", "serve", "--config", placement_copy(args.config, args.set, tmp)]
        cmd += ["--port", str(self.port), "--grpc-port", "0"]
        for flag, value in (
            ("--checkpoint", args.checkpoint),
            ("--random-weights", args.random_weights),
            ("--max-model-len", args.max_model_len),
            ("--replicas", args.replicas),
            ("--api-key", args.api_key),
        ):
            if value is not None:
                cmd += [flag, str(value)]
        if args.direct:
            cmd.append("--direct-ingress")
        self.command = cmd
        self.log_path = tmp / "serve.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, replicas: int, timeout_s: float) -> float:
        """Seconds until /health is 200 from `replicas` distinct replicas (one, when the server names none)."""
        t0, seen = time.monotonic(), set()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                if r.status_code == 200:
                    seen.add(r.headers.get(REPLICA_HEADER, "one"))
                    if len(seen) >= replicas or REPLICA_HEADER not in r.headers:
                        return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"the server was not ready in {timeout_s:g} s:\n{self.log_tail()}")

    def direct_urls(self, replicas: int, timeout_s: float) -> list[str]:
        """With --direct-ingress: each copy's own address (--port + 1, + 2, ...), once each answers /health."""
        urls = [f"http://127.0.0.1:{self.port + 1 + i}" for i in range(replicas)]
        deadline = time.monotonic() + timeout_s
        for url in urls:
            while True:
                try:
                    if httpx.get(url + "/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"{url} (direct ingress) did not answer in {timeout_s:g} s:\n{self.log_tail()}")
                time.sleep(0.5)
        return urls

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text()[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# --- the machine, the run, the plot ----------------------------------------------------------------------------------


def machine() -> dict:
    def run(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=ROOT).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = run(["git", "rev-parse", "--short", "HEAD"])
    dirty = bool(run(["git", "status", "--porcelain", "--untracked-files=no"]))
    gpus = [g for g in run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]).splitlines() if g]
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "gpus": gpus,
        "commit": commit + ("-dirty" if dirty else ""),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def print_header() -> None:
    head = f"{'rate':>5} {'conc':>5} {'reqs':>5} {'err':>4} {'out tok/s':>10}"
    print(head + f" {'TTFT p50':>9} {'p99':>8} {'ITL p50':>8} {'p99':>8}")


def print_table(levels: list[dict]) -> None:
    for lv in levels:
        ttft, itl = lv["ttft_s"] or {}, lv["itl_s"] or {}
        rate = lv.get("request_rate")
        print(
            f"{'-' if rate is None else f'{rate:g}':>5} {lv['concurrency']:>5} {lv['requests']:>5} {lv['errors']:>4} "
            f"{lv['output_tokens_per_s']:>10.1f} "
            f"{ttft.get('p50', math.nan):>9.3f} {ttft.get('p99', math.nan):>8.3f} "
            f"{itl.get('p50', math.nan):>8.4f} {itl.get('p99', math.nan):>8.4f}",
            flush=True,
        )
        if "engine" in lv:  # where the level's wall time went in the engine
            e = lv["engine"]
            kinds = "  ".join(
                f"{k} {e[k]['steps']} x {e[k]['ms_per_step']} ms = {e[k]['seconds']:.2f} s"
                for k in ("decode", "mixed", "prefill")
                if e.get(k, {}).get("steps")
            )
            rate = e.get("decode", {}).get("tokens_per_s")
            per = " a copy" if e.get("copies", 1) > 1 else ""
            print(f"      engine: {kinds}  idle {e['idle_s']:.2f} s" + (f"  decode {rate} tok/s{per}" if rate else ""))


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    # open-loop runs (every level at a request rate) are drawn against the rate, closed loops against concurrency
    by_rate = all(lv.get("request_rate") for run in runs for lv in run["levels"])
    for run in runs:
        label = run["label"]
        xs = [lv["request_rate" if by_rate else "concurrency"] for lv in run["levels"]]
        axes[0].plot(xs, [lv["output_tokens_per_s"] for lv in run["levels"]], "o-", label=label)
        for ax, key in ((axes[1], "ttft_s"), (axes[2], "itl_s")):
            for q, style in (("p50", "o-"), ("p99", "x--")):
                ys = [(lv[key] or {}).get(q, math.nan) for lv in run["levels"]]
                ax.plot(xs, ys, style, label=f"{label} {q}")
    titles = ("output tokens/s", "time to first token (s)", "inter-token latency (s)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("requests a second (Poisson)" if by_rate else "concurrent requests")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[1:]:
        ax.set_yscale("log")
    m, s = runs[0]["machine"], runs[0]["settings"]
    where = ", ".join(m["gpus"]) if m["gpus"] else f"{m['cpus']} CPUs"
    fig.suptitle(
        f"serve_load: prompt {s['prompt_tokens']} / output {s['output_tokens']} tokens; {where}; "
        f"{m['platform']}; commit {m['commit']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def level_plan(args) -> list[tuple[float | None, int]]:
    """The levels in order: (requests a second or None for a closed loop, concurrency), every rate at every
    concurrency."""
    return [(rate, c) for rate in (args.request_rate or [None]) for c in args.concurrency]


def level_requests(args, rate: float | None, concurrency: int) -> int:
    """A level's requests: `--level-seconds` of arrivals at its rate, else `--waves` x its concurrency; at least 8."""
    if rate is not None and args.level_seconds is not None:
        return max(8, round(rate * args.level_seconds))
    return max(8, args.waves * concurrency)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--url", nargs="+", help="a running server, e.g. http://127.0.0.1:8000 (several: clients spread over them)"
    )
    target.add_argument("--config", help="start `mistral-cluster serve` on this placement")
    target.add_argument("--compare", nargs="+", metavar="JSON", help="only plot these runs together (into --out)")
    p.add_argument("--checkpoint")
    p.add_argument("--random-weights", metavar="SHAPE")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--replicas", type=int)
    p.add_argument(
        "--direct",
        action="store_true",
        help="with --config: serve with --direct-ingress and load each copy on its own port (no proxy hop)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change the placement's knobs")
    p.add_argument("--api-key", default=os.environ.get("MISTRAL_CLUSTER_API_KEY"))
    p.add_argument("--model", help="default: the first model /v1/models lists")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument(
        "--request-rate",
        type=float,
        nargs="+",
        help="requests a second, Poisson arrivals (the concurrency then caps them); several: a level for each",
    )
    p.add_argument(
        "--level-seconds",
        type=float,
        help="with --request-rate: each level's requests arrive over about this long (rate x seconds of them)",
    )
    p.add_argument("--waves", type=int, default=4, help="requests per level: this many x concurrency (at least 8)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000, help="prompt ids are drawn from [3, vocab)")
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument("--ready-timeout-s", type=float, default=900.0)
    p.add_argument("--label", help="this run's name in plots (default: from --replicas)")
    p.add_argument(
        "--kill-after-s",
        type=float,
        help="after each level, run its requests again and SIGKILL a worker this many seconds in: errors, the "
        "pause and whether every request's tokens are the undisturbed run's",
    )
    p.add_argument("--kill-gpu", type=int, help="with --kill-after-s: kill the worker on this GPU (default: no GPU)")
    p.add_argument("--out", required=True, help="JSON path (the plot goes beside it as .png); with --compare the .png")
    args = p.parse_args()
    for rate in args.request_rate or []:
        if not 0 < rate < float("inf"):
            p.error(f"--request-rate must be a positive number of requests a second, got {rate}")
    if args.level_seconds is not None and not (args.request_rate and 0 < args.level_seconds < float("inf")):
        p.error(f"--level-seconds needs --request-rate and a positive number of seconds, got {args.level_seconds}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.compare:
        plot([json.loads(Path(f).read_text()) for f in args.compare], out)
        return
    if not (args.url or args.config):
        p.error("give --url, --config or --compare")

    # SIGTERM (a `timeout` around this script) ends it through the `finally` below, which stops the server it started
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    run = {"label": args.label or f"{args.replicas or 1} replica{'s' if (args.replicas or 1) > 1 else ''}"}
    run["machine"] = machine()
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "compare", "api_key")}
    run["settings"] = settings
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(args, Path(tmp)) if args.config else None
        try:
            urls = args.url or [server.url]
            if server:
                ready_s = server.wait_ready(args.replicas or 1, args.ready_timeout_s)
                run["server"] = {"command": server.command[1:], "ready_s": round(ready_s, 1)}
                print(f"server ready in {run['server']['ready_s']:.0f} s", flush=True)
                if args.direct:
                    urls = server.direct_urls(args.replicas or 1, 60.0)
                    run["server"]["direct_urls"] = urls
            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            models = httpx.get(urls[0] + "/v1/models", headers=headers, timeout=30).json()["data"]
            model = args.model or models[0]["id"]
            run["model"] = next((m for m in models if m["id"] == model), {"id": model})
            # warm-up, not reported: one wave of the first level's streams, so its steps' shapes (graph captures,
            # Triton's compiles for steps that start many prompts) are not timed; two requests left the first
            # level of a GPU server slow in just those steps (bench/NOTES.md, eleventh session)
            warm = max(2, args.concurrency[0])
            asyncio.run(run_level(urls, model, warm, warm, args, seed=12345))
            run["levels"] = []
            print_header()
            for i, (rate, c) in enumerate(level_plan(args)):
                n = level_requests(args, rate, c)
                run["levels"].append(asyncio.run(run_level(urls, model, c, n, args, seed=i, rate=rate)))
                calm = run["levels"][-1].pop("token_ids")
                print_table(run["levels"][-1:])
                if args.kill_after_s is not None:
                    # the same requests undisturbed once more: how many keep their tokens with no fault at all
                    # (in bf16 a request's rows meet other batch shapes from run to run) is the floor to read
                    # the faulted run's count against
                    again = asyncio.run(run_level(urls, model, c, n, args, seed=i, kill_after_s=None, rate=rate))
                    run["levels"][-1]["calm_repeat"] = kept_tokens(calm, again["token_ids"])
                    print(f"calm repeat: {json.dumps(run['levels'][-1]['calm_repeat'])}", flush=True)
                    # the same requests again, a worker killed during them
                    level = asyncio.run(
                        run_level(urls, model, c, n, args, seed=i, kill_after_s=args.kill_after_s, rate=rate)
                    )
                    level.setdefault("fault", {}).update(kept_tokens(calm, level.pop("token_ids")))
                    if server:  # what the server said about the fault: detection, promotion, recovery
                        said = re.compile(r"recover|promot|standby|died|dead|fail|restart", re.IGNORECASE)
                        lines = [x[:300] for x in server.log_path.read_text().splitlines() if said.search(x)]
                        level["fault"]["server_log"] = lines[-40:]
                    run["levels"].append(level)
                    print_table(run["levels"][-1:])
                    print(f"fault: {json.dumps(level.get('fault'))}", flush=True)
                out.write_text(json.dumps(run, indent=2) + "\n")  # each level as it ends: a cut-off run keeps them
        finally:
            if server:
                server.stop()
    out.write_text(json.dumps(run, indent=2) + "\n")
    print(f"wrote {out}")
    plot([run], out.with_suffix(".png"))


if __name__ == "__main__":
    main()
