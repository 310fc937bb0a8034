"""Dispatch + combine of one MoE layer between two GPUs, exactly as the runtime does it, eager and in CUDA graphs.

Two Ray actors with a device each join a `cluster.transport.Transport` of two ranks with one `experts` channel, as
two workers do. Rank 0 plays a stage's `StageRunner._experts`: it sends one packed (b, dim + 2k) message
(`pack_for_experts`: activations, expert ids and weights of every token) and receives the (b, dim) sum back.
Rank 1 plays `ExpertServer.serve`: it receives, then sends back at once (`echo`), or first runs one Mixtral expert
group's forward (4 of the 8 experts of one layer at real shape, `experts`). Timed on rank 0, median of many round
trips, at batch 1, 32 and 128:

- `eager`: both sides call send/recv from Python for every message (the server always works so today);
- `stage_graph`: rank 0 replays a CUDA graph holding its send and receive, rank 1 eager: the runtime today, where
  a stage replays its decode step as a graph and the expert server serves each message eagerly;
- `both_graphs`: both sides replay captured graphs (where the design goes: a decode step as a graph on every GPU);
- `host`: the round trip staged through host memory on gloo (a `Channel` with `via_host`; GPUs only);
- `ray_call`: the packed tensor as a Ray actor call's argument, returned; and an empty Ray call;
- `compute`: rank 1's expert forward alone, eager and captured: round trip - compute = what dispatch costs.

Graphs are captured with capture_error_mode="thread_local" (NCCL point-to-point inside a graph works so); the
last probe (`global_capture`) says whether torch's default "global" mode captures the exchange too, the mode
`shards/decode_graphs.py` captured in when this script was written.
Target: a batch-1 round trip (dispatch + combine of one layer) of at most 50 us.

    PYTHONPATH=. python bench/transport.py --device cuda    # two actors with one GPU each (NCCL), ~1-2 minutes
    PYTHONPATH=. python bench/transport.py --device cpu     # gloo, no graphs: a dry run (small experts)
    PYTHONPATH=. python bench/transport.py --quick          # fewer round trips; writes ...-quick.json

Writes bench/results/transport-moe-<machine>.json, machine = `cpu` or the GPU's name (`h200`, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import ray
import torch

from cluster.stage_runner import pack_for_experts, unpack_for_experts
from cluster.transport import Channel, ChannelKey, Transport, device_key, free_port, node_ip
from shards.moe import ExpertGroup

RESULTS = Path(__file__).parent / "results"
BATCHES = (1, 32, 128)
FAR_SIDES = ("echo", "experts")
MODES = {"eager": ("eager", "eager"), "stage_graph": ("graph", "eager"), "both_graphs": ("graph", "graph")}
KEY = ChannelKey("experts", 0, 1, 0)  # the channel a stage on rank 0 opens to a worker holding experts
# Set by whoever launches on a GPU host (NVLink multicast off); Ray actors get them through runtime_env.
PASSED_ENV = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")
TARGET_US = 50.0


class MoEProbe:
    """One side of the exchange: the product's device choice and process group, the runtime's packing, timed loops.
    Every measurement is prepared first (messages made, graphs captured), then run, so a capture that fails never
    leaves the other side waiting for a message."""

    def __init__(self, rank: int, dim: int, hidden: int, experts: int, top_k: int, held: int) -> None:
        self.rank, self.dim, self.hidden, self.n_experts, self.k, self.held = rank, dim, hidden, experts, top_k, held
        cuda = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(1)
        self.dtype = torch.bfloat16 if cuda else torch.float32  # the runtime's dtypes on each
        self.group: ExpertGroup | None = None
        self.transport: Transport | None = None
        self.step: Callable[[], object] | None = None
        self._keep: list = []  # what the prepared step reads: static buffers, graphs

    # --- control ---------------------------------------------------------------------------------------------

    def describe(self) -> dict:
        info = {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "python": platform.python_version(),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "backend": self.transport.backend if self.transport else None,
            "gpu": None,
            "env": {k: os.environ[k] for k in PASSED_ENV if k in os.environ},
        }
        if self.device.type == "cuda":
            info.update(gpu=torch.cuda.get_device_name(self.device), cuda=torch.version.cuda)
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        return info

    def location_key(self) -> str:
        """Node and device, as `ShardWorker.location().device_key`: equal keys share a device."""
        return f"{ray.get_runtime_context().get_node_id()}/{device_key(self.device)}"

    def rendezvous(self) -> tuple[str, int]:
        return node_ip(), free_port()

    def join(self, addr: str, port: int, timeout_s: float, keys: list[str]) -> str:
        """The process group and its one channel, as `ShardWorker.join` forms them; one message each way to warm
        it up (NCCL builds the pair's communicator on the first one)."""
        self.transport = Transport(self.rank, 2, addr, port, self.device, timeout_s, keys, [KEY])
        self.ch = self.transport.channel(KEY.kind, KEY.a, KEY.b, KEY.tag)
        self.host_ch = None
        if self.device.type == "cuda":  # the same group's gloo backend, through host memory
            self.host_ch = Channel(KEY, self.ch.group, self.rank, self.device, via_host=True)
        for ch in (self.ch, self.host_ch):
            if ch is not None:
                probe = torch.zeros(1, device=self.device)
                if self.rank == 0:
                    ch.send(probe, "warm_up")
                    ch.recv((1,), probe.dtype, "warm_up")
                else:
                    ch.recv((1,), probe.dtype, "warm_up")
                    ch.send(probe, "warm_up")
                self._sync()
        return self.transport.backend

    def build_experts(self) -> None:
        """Rank 1: one layer's group of `held` experts at the given shape, random weights made on the device."""
        self.group = ExpertGroup(self.dim, self.hidden, list(range(self.held)), self.n_experts)
        w13 = torch.randn(self.held, 2 * self.hidden, self.dim, dtype=self.dtype, device=self.device) * 0.02
        w2 = torch.randn(self.held, self.dim, self.hidden, dtype=self.dtype, device=self.device) * 0.02
        self.group.w13, self.group.w2 = torch.nn.Parameter(w13, False), torch.nn.Parameter(w2, False)
        self.group._local_index(self.device)

    def close(self) -> None:
        self.step, self._keep = None, []
        if self.transport is not None:
            self.transport.close()

    # --- the messages --------------------------------------------------------------------------------------------

    def _message(self, b: int) -> torch.Tensor:
        """(b, dim + 2k): what a stage packs for one MoE layer, top-k distinct experts per token drawn uniformly, the
        same on both ranks for a given b (the compute-only figure runs the exchange's message). One token chooses
        one held expert and one held elsewhere: what uniform routing gives the group of half the experts on average."""
        gen = torch.Generator().manual_seed(b)
        x = torch.randn(b, self.dim, generator=gen) * 0.1
        ids = torch.rand(b, self.n_experts, generator=gen).topk(self.k, dim=-1).indices
        if b == 1:
            ids = torch.tensor([[0, self.n_experts - 1]])[:, : self.k]
        weights = torch.softmax(torch.rand(b, self.k, generator=gen), dim=-1)
        return pack_for_experts(x.to(self.dtype), ids, weights.to(self.dtype)).to(self.device)

    def _answer(self, packed: torch.Tensor, far: str) -> torch.Tensor:
        if far == "echo":
            return packed[:, : self.dim]
        x, ids, weights = unpack_for_experts(packed, self.dim, self.k)
        return self.group(x, ids, weights)

    # --- preparing a measurement -------------------------------------------------------------------------------

    def prepare_stage(self, b: int, mode: str) -> str | None:
        """Rank 0: the stage's side of one layer (send the packed message, receive the sum); None, or why not."""
        packed = self._message(b)
        ch = self.host_ch if mode == "host" else self.ch

        def exchange(p=packed) -> torch.Tensor:
            ch.send(p, "expert_in")
            return ch.recv((b, self.dim), self.dtype, "expert_out")

        return self._prepare(exchange, packed, graph=mode == "graph")

    def prepare_server(self, b: int, far: str, mode: str) -> str | None:
        """Rank 1: the expert server's side of one layer (receive, answer, send); None, or why not."""
        static_in = self._message(b)  # valid ids: the warm-up before a capture runs the experts on it
        if far == "experts":
            self._answer(static_in, far)  # kernels chosen and compiled (Triton) before any capture
            self._sync()

        ch = self.host_ch if mode == "host" else self.ch

        def serve_eager() -> None:  # as `ExpertServer.serve`: a fresh buffer per message
            packed = ch.recv(tuple(static_in.shape), self.dtype, "expert_in")
            ch.send(self._answer(packed, far), "expert_out")

        def serve_captured(buf=static_in) -> None:  # a graph's input is a static buffer
            self.ch.recv_into(buf, "expert_in")
            self.ch.send(self._answer(buf, far), "expert_out")

        graph = mode == "graph"
        return self._prepare(serve_captured if graph else serve_eager, static_in, graph)

    def prepare_compute(self, b: int, mode: str) -> str | None:
        """Rank 1: the expert forward alone, no message."""
        packed = self._message(b)
        x, ids, weights = unpack_for_experts(packed, self.dim, self.k)
        x, ids, weights = x.contiguous(), ids.contiguous(), weights.contiguous()
        self.group(x, ids, weights)
        self._sync()
        return self._prepare(lambda: self.group(x, ids, weights), packed, graph=mode == "graph")

    def _prepare(self, fn: Callable[[], object], static: torch.Tensor, graph: bool) -> str | None:
        self.step, self._keep = fn, [static]
        if not graph:
            return None
        g = torch.cuda.CUDAGraph()
        self._sync()
        try:
            with torch.cuda.graph(g, capture_error_mode="thread_local"):
                out = fn()
        except Exception as e:  # noqa: BLE001 - reported in the result, this measurement skipped
            self.step = None
            return f"capture failed: {type(e).__name__}: {e}"[:500]
        self.step, self._keep = g.replay, [static, g, out]
        return None

    # --- running it -------------------------------------------------------------------------------------------

    def run_timed(self, warmup: int, iters: int) -> dict:
        """The prepared step `warmup + iters` times; host clock around a synchronised device, and CUDA events."""
        cuda = self.device.type == "cuda"
        wall, events = [], []
        for i in range(warmup + iters):
            self._sync()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            self.step()
            if cuda:
                end.record()
            self._sync()
            if i >= warmup:
                wall.append(time.perf_counter() - t0)
                if cuda:
                    events.append(start.elapsed_time(end) / 1e3)
        return {"seconds": wall, "event_seconds": events or None}

    def run_count(self, count: int, profile: bool = False) -> dict | None:
        """The far side: the prepared step `count` times, issued without waiting (as the server's loop does); with
        `profile`, under torch's profiler: its kernels per step (`bench/decode_profile.kernel_profile`)."""
        if profile:
            from bench.decode_profile import kernel_profile

            return kernel_profile(self.step, self.device, 1, count, None)
        for _ in range(count):
            self.step()
        self._sync()
        return None

    def ray_call(self, peer, b: int, warmup: int, iters: int) -> dict:
        packed = self._message(b)
        self.step = lambda: ray.get(peer.echo.remote(packed))
        return self.run_timed(warmup, iters)

    def ray_empty_call(self, peer, warmup: int, iters: int) -> dict:
        self.step = lambda: ray.get(peer.noop.remote())
        return self.run_timed(warmup, iters)

    def echo(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def noop(self) -> None:
        return None

    # --- the runtime's capture mode, last ------------------------------------------------------------------------

    def try_global_capture(self, b: int) -> str | None:
        """Rank 0: capture the stage's exchange in torch's default ("global") capture mode."""
        packed = self._message(b)

        def exchange() -> torch.Tensor:
            self.ch.send(packed, "expert_in")
            return self.ch.recv((b, self.dim), self.dtype, "expert_out")

        g = torch.cuda.CUDAGraph()
        self._sync()
        try:
            with torch.cuda.graph(g):
                out = exchange()
        except Exception as e:  # noqa: BLE001 - the answer this probe is for
            return f"{type(e).__name__}: {e}"[:500]
        self.step, self._keep = g.replay, [packed, g, out]
        return None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# --- the driver ----------------------------------------------------------------------------------------------------


def summary(r: dict) -> dict:
    """Median round trip in us with p10/p90, and the CUDA-event median where there is one."""
    s = sorted(r["seconds"])
    q = statistics.quantiles(s, n=10) if len(s) >= 2 else [s[0]] * 9
    out = {
        "iterations": len(s),
        "round_trip_us": round(statistics.median(s) * 1e6, 2),
        "p10_us": round(q[0] * 1e6, 2),
        "p90_us": round(q[-1] * 1e6, 2),
    }
    if r.get("event_seconds"):
        out["event_round_trip_us"] = round(statistics.median(r["event_seconds"]) * 1e6, 2)
    return out


def start_probes(cuda: bool, shape: dict, timeout_s: float) -> list:
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    options = {"num_cpus": 1, "num_gpus": 1 if cuda else 0, "max_restarts": 0}
    if env:
        options["runtime_env"] = {"env_vars": env}
    probes = [ray.remote(MoEProbe).options(**options).remote(rank, **shape) for rank in (0, 1)]
    keys = ray.get([p.location_key.remote() for p in probes], timeout=timeout_s)
    addr, port = ray.get(probes[0].rendezvous.remote(), timeout=timeout_s)
    ray.get([p.join.remote(addr, port, timeout_s, keys) for p in probes], timeout=timeout_s)
    ray.get(probes[1].build_experts.remote(), timeout=timeout_s)
    return probes


def exchange(probes: list, b: int, far: str, stage_mode: str, server_mode: str, n: tuple[int, int], t: float) -> dict:
    """One timed series of round trips: both sides prepared (captured), then run together; rank 0's times back."""
    stage, server = probes
    prepared = [stage.prepare_stage.remote(b, stage_mode), server.prepare_server.remote(b, far, server_mode)]
    errors = ray.get(prepared, timeout=t)
    if any(errors):
        return {"error": "; ".join(e for e in errors if e)}
    warmup, iters = n
    timed, _ = ray.get([stage.run_timed.remote(warmup, iters), server.run_count.remote(warmup + iters)], timeout=t)
    return summary(timed)


def measure(probes: list, cuda: bool, quick: bool, timeout_s: float) -> dict:
    stage, server = probes
    n = (10, 100) if quick else (50, 1000)
    n_ray = (5, 30) if quick else (20, 200)
    layers: list[dict] = []
    for b in BATCHES:
        row: dict = {"batch": b}
        for far in FAR_SIDES:
            for name, (stage_mode, server_mode) in MODES.items():
                if cuda or name == "eager":
                    print(f"  b={b} {far} {name} ...", file=sys.stderr, flush=True)
                    row[f"{far}_{name}"] = exchange(probes, b, far, stage_mode, server_mode, n, timeout_s)
        if cuda:
            row["echo_host"] = exchange(probes, b, "echo", "host", "host", n, timeout_s)
        for mode in ("eager", "graph") if cuda else ("eager",):
            error = ray.get(server.prepare_compute.remote(b, mode), timeout=timeout_s)
            timed = None if error else ray.get(server.run_timed.remote(*n), timeout=timeout_s)
            row[f"compute_{mode}"] = {"error": error} if error else summary(timed)
        row["ray_call"] = summary(ray.get(stage.ray_call.remote(server, b, *n_ray), timeout=timeout_s))
        layers.append(row)
    out = {"layers": layers}
    out["ray_empty_call"] = summary(ray.get(stage.ray_empty_call.remote(server, *n_ray), timeout=timeout_s))
    if cuda:  # last: a failed capture in "global" mode may leave the process unusable
        out["global_capture"] = global_capture(probes, n, timeout_s)
    return out


def profile_server(probes: list, cuda: bool, batches: list[int], timeout_s: float) -> dict:
    """Rank 1's kernels per message, both sides in graphs: answering the exchange against its expert forward alone.
    The round trip at 32 and 128 tokens exceeded compute + echo by 115 and 320 us on an H200 (transport-moe-h200-
    quick.json); the kernel lists say whether its kernels ran slower or other kernels ran."""
    stage, server = probes
    mode = "graph" if cuda else "eager"  # no graphs on a CPU: a dry run of the script
    out: dict = {}
    for b in batches:
        n = (10, 60)
        errors = ray.get([stage.prepare_stage.remote(b, mode), server.prepare_server.remote(b, "experts", mode)])
        if any(errors):
            out[str(b)] = {"error": "; ".join(e for e in errors if e)}
            continue
        timed, exchange_prof = ray.get(
            [stage.run_timed.remote(*n), server.run_count.remote(sum(n), True)], timeout=timeout_s
        )
        error = ray.get(server.prepare_compute.remote(b, mode), timeout=timeout_s)
        compute_prof = None if error else ray.get(server.run_count.remote(sum(n), True), timeout=timeout_s)
        out[str(b)] = {"round_trip": summary(timed), "exchange_server": exchange_prof, "compute": compute_prof}
    return out


def global_capture(probes: list, n: tuple[int, int], timeout_s: float) -> dict:
    stage, server = probes
    try:
        error = ray.get(stage.try_global_capture.remote(1), timeout=timeout_s)
        if error:
            return {"ok": False, "error": error}
        ray.get(server.prepare_server.remote(1, "echo", "eager"), timeout=timeout_s)
        timed, _ = ray.get([stage.run_timed.remote(*n), server.run_count.remote(sum(n))], timeout=timeout_s)
        return {"ok": True, "echo_b1": summary(timed)}
    except Exception as e:  # noqa: BLE001 - the actor died or hung: that is the answer
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}


def machine_slug(info: dict) -> str:
    if not info["gpu"]:
        return "cpu"
    words = [w for w in re.split(r"[^a-z0-9]+", info["gpu"].lower()) if w and w != "nvidia"]
    return words[0] if words else "gpu"


def print_table(result: dict) -> None:
    m = result["machine"]
    print(
        f"\nMoE dispatch + combine per layer, round trip us (median), {m['backend']} on {m['gpu'] or m['device']}, "
        f"{m['dtype']}, dim {result['shape']['dim']}, expert hidden {result['shape']['hidden']}"
    )

    def us(r: dict | None) -> str:
        if r is None:
            return "-"
        return "err" if "error" in r else f"{r['round_trip_us']:.1f}"

    head = ("batch", "far side", "eager", "stage graph", "both graphs", "host (gloo)", "compute e/g", "ray call")
    print(f"{head[0]:>5} {head[1]:<9}" + "".join(f"{h:>14}" for h in head[2:]))
    for row in result["layers"]:
        for far in FAR_SIDES:
            cells = [us(row.get(f"{far}_{name}")) for name in MODES]
            if far == "echo":
                cells += [us(row.get("echo_host")), "", us(row.get("ray_call"))]
            else:
                cells += ["", f"{us(row.get('compute_eager'))}/{us(row.get('compute_graph'))}", ""]
            print(f"{row['batch']:>5} {far:<9}" + "".join(f"{c:>14}" for c in cells))
    print(f"empty Ray call round trip: {result['ray_empty_call']['round_trip_us']:.1f} us")
    b1 = result["layers"][0]
    best = [b1[c].get("round_trip_us") for c in ("echo_both_graphs", "echo_stage_graph", "echo_eager") if c in b1]
    best = [v for v in best if v is not None]
    if best:
        verdict = "met" if min(best) <= TARGET_US else "not met"
        print(f"target <= {TARGET_US:.0f} us per layer at batch 1: best echo round trip {min(best):.1f} us ({verdict})")
    for row in result["layers"]:
        for name in MODES:
            for far in FAR_SIDES:
                error = row.get(f"{far}_{name}", {}).get("error")
                if error:
                    print(f"!!! b={row['batch']} {far} {name}: {error}")
    if "global_capture" in result:
        print(f"capture in torch's default (global) mode: {result['global_capture']}")


def print_profiles(profiles: dict) -> None:
    for b, p in profiles.items():
        if "error" in p:
            print(f"!!! profile b={b}: {p['error']}")
            continue
        print(f"\nrank 1 at batch {b}: round trip {p['round_trip']['round_trip_us']:.1f} us")
        for name in ("exchange_server", "compute"):
            prof = p.get(name) or {}
            busy, wall = prof.get("kernel_us_per_step"), prof.get("wall_ms_per_step")
            print(f"  {name}: {busy} us of kernels a message, {wall} ms wall")
            for k in prof.get("kernels", [])[:14]:
                print(f"    {k['per_layer']:6.2f} x {k['us_each']:8.2f} us  {k['name'][:100]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer round trips; writes ...-quick.json")
    p.add_argument("--hidden", type=int, default=None, help="expert hidden size (default 14336 on GPU, 512 on CPU)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds any one measurement may take")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--profile-batches", type=int, nargs="*", default=[], help="also profile rank 1's kernels at these batches"
    )
    p.add_argument("--only-profile", action="store_true", help="skip the round-trip table (GPU: profile only)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU here")
    # Mixtral 8x7B: dim 4096, top-2 of 8 experts; a group of 4 as in deploy/examples/mixtral-2gpu-experts.yaml.
    shape = {"dim": 4096, "hidden": args.hidden or (14336 if cuda else 512), "experts": 8, "top_k": 2, "held": 4}
    t_start = time.perf_counter()
    ray.init(address="local", num_cpus=2 if not cuda else 4, include_dashboard=False, logging_level="warning")
    try:
        if cuda and ray.cluster_resources().get("GPU", 0) < 2:
            p.error(f"--device cuda needs 2 GPUs, Ray sees {ray.cluster_resources().get('GPU', 0)}")
        print(f"starting two probe actors on {args.device} ...", file=sys.stderr)
        probes = start_probes(cuda, shape, args.timeout)
        info = ray.get(probes[0].describe.remote(), timeout=args.timeout)
        if not info["device"].startswith(args.device):
            raise RuntimeError(f"asked for {args.device}, the actors run on {info['device']}")
        measured = {} if args.only_profile else measure(probes, cuda, args.quick, args.timeout)
        if args.profile_batches:
            measured["server_profiles"] = profile_server(probes, cuda, args.profile_batches, args.timeout)
        ray.get([q.close.remote() for q in probes], timeout=args.timeout)
    finally:
        ray.shutdown()
    result = {
        "machine": info,
        "quick": args.quick,
        "shape": shape,
        "target_round_trip_us_b1": TARGET_US,
        "method": {
            "round_trip": "rank 0 sends the packed (b, dim + 2k) message and receives (b, dim), as "
            "StageRunner._experts; rank 1 receives, answers (echo: the activations; experts: the group's forward) "
            "and sends",
            "statistic": "median over the timed round trips after warm-up, host clock around torch.cuda.synchronize;"
            " event_round_trip_us from CUDA events on rank 0's stream",
            "modes": "eager: both eager; stage_graph: rank 0 replays a captured graph, rank 1 eager (the runtime "
            "today); both_graphs: both replay captured graphs; host: through host memory on gloo",
            "compute": "rank 1's expert forward alone, no message",
            "ray_call": "ray.get(B.echo.remote(packed)): the tensor as an actor call's argument and result",
        },
        **measured,
    }
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "-profile" if args.only_profile else "-quick" if args.quick else ""
    path = args.out / f"transport-moe-{machine_slug(info)}{tag}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    if "layers" in result:
        print_table(result)
    print_profiles(result.get("server_profiles", {}))
    print(f"\nwrote {path} in {result['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
