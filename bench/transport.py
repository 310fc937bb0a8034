"""The data plane we chose against Ray's object store: two shard actors, the same tensors, both ways, one run.

Two Ray actors join one torch.distributed group through the product's own path (`ShardActor.rendezvous` and
`join`, hence `cluster.transport.Transport`: gloo on CPU, NCCL on GPU) and, timed inside the actors:

(a) ping-pong with `Transport.send`/`recv` for 8 KiB .. 32 MiB: A sends, B receives and sends the same bytes
    back; one-way = round trip / 2, median after warm-up;
(b) bandwidth = bytes / one-way time;
(c) the 4-int64 header (`send_header`/`recv_header`) round trip, the fixed cost each expert dispatch adds,
    and the very first round trip on the group (NCCL creates its communicator there);
(d) the same tensors as a Ray actor call argument returned by B (`ray.get(B.echo.remote(t))`), and as
    `ray.put` -> B `ray.get` -> B `ray.put` -> A `ray.get`;
(e) an empty Ray actor call round trip, actor to actor and driver to actor: the control-plane cost per step.

    python bench/transport.py                  # CUDA if torch sees a GPU (needs 2), else CPU
    python bench/transport.py --device cpu     # under a minute on 2 cores
    python bench/transport.py --device cuda    # two actors with one GPU each (NCCL)
    python bench/transport.py --quick          # 3 sizes, fewer iterations; writes ...-quick.json

Writes bench/results/transport-<machine>.json, machine = `cpu` or the GPU's name (`h100`, `h200`, ...).
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
from pathlib import Path

import ray
import torch

from cluster.shard_actor import ShardActor

RESULTS = Path(__file__).parent / "results"
KiB, MiB = 1024, 1024 * 1024
SIZES = [8 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 8 * MiB, 32 * MiB]
QUICK_SIZES = [8 * KiB, 1 * MiB, 8 * MiB]
# Set by whoever launches on a GPU host (NVLink multicast off); Ray actors get them through runtime_env.
PASSED_ENV = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")
HEADER = [3, 17, 42, 1]  # (layer, tokens, step, micro-batch), as `StageActor._dispatch` sends it


class TransportProbe(ShardActor):
    """A shard actor that holds no weights: the product's device choice and group join, then timed loops."""

    def __init__(self, rank: int) -> None:
        super().__init__(f"probe{rank}", rank)
        self.peer = 1 - rank

    def describe(self) -> dict:
        info = {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "python": platform.python_version(),
            "device": str(self.device),
            "backend": self.transport.backend if self.transport else None,
            "gpu": None,
            "env": {k: os.environ[k] for k in PASSED_ENV if k in os.environ},
        }
        if self.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(self.device)
            info["cuda"] = torch.version.cuda
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        return info

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _payload(self, nbytes: int) -> torch.Tensor:
        return torch.randn(nbytes // 4, device=self.device)  # (nbytes / 4,) float32

    def _timed(self, step, warmup: int, iters: int) -> dict:
        """Round trips of `step()`, host clock around a synchronised GPU; on GPU also CUDA events on this stream."""
        cuda = self.device.type == "cuda"
        wall, gpu = [], []
        for i in range(warmup + iters):
            self._sync()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            out = step()
            if cuda:
                end.record()
            self._sync()
            if i >= warmup:
                wall.append(time.perf_counter() - t0)
                if cuda:
                    gpu.append(start.elapsed_time(end) / 1e3)
        return {"round_trip_s": wall, "event_round_trip_s": gpu or None, "last": out}

    # (a, b) Transport ping-pong. A runs `transport_ping`, B `transport_pong`, at the same time.
    def transport_ping(self, nbytes: int, warmup: int, iters: int) -> dict:
        x, t = self._payload(nbytes), self.transport

        def step() -> torch.Tensor:
            t.send(x, self.peer)
            return t.recv(x.shape, x.dtype, self.peer)

        r = self._timed(step, warmup, iters)
        r["echo_ok"] = bool(torch.equal(r.pop("last"), x))
        return r

    def transport_pong(self, nbytes: int, count: int) -> None:
        for _ in range(count):
            self.transport.send(self.transport.recv((nbytes // 4,), torch.float32, self.peer), self.peer)
        self._sync()

    # (c) The header every expert dispatch sends first.
    def header_ping(self, warmup: int, iters: int) -> dict:
        t = self.transport

        def step() -> list[int]:
            t.send_header(HEADER, self.peer)
            return t.recv_header(self.peer)

        r = self._timed(step, warmup, iters)
        r["echo_ok"] = r.pop("last") == HEADER
        return r

    def header_pong(self, count: int) -> None:
        for _ in range(count):
            self.transport.send_header(self.transport.recv_header(self.peer), self.peer)

    # (d) The same tensors through Ray: as a call argument and return value, and by ray.put / ray.get.
    def ray_call_ping(self, peer, nbytes: int, warmup: int, iters: int) -> dict:
        x = self._payload(nbytes)
        r = self._timed(lambda: ray.get(peer.echo.remote(x)), warmup, iters)
        r["echo_ok"] = bool(torch.equal(r.pop("last"), x))
        return r

    def ray_put_ping(self, peer, nbytes: int, warmup: int, iters: int) -> dict:
        x = self._payload(nbytes)

        def step() -> torch.Tensor:
            [back] = ray.get(peer.bounce.remote([ray.put(x)]))  # in a list, so B gets the ref, not the value
            return ray.get(back)

        r = self._timed(step, warmup, iters)
        r["echo_ok"] = bool(torch.equal(r.pop("last"), x))
        return r

    def echo(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def bounce(self, refs: list) -> list:
        return [ray.put(ray.get(refs[0]))]

    # (e) The control plane alone.
    def ray_empty_ping(self, peer, warmup: int, iters: int) -> dict:
        r = self._timed(lambda: ray.get(peer.noop.remote()), warmup, iters)
        r.pop("last")
        return r

    def noop(self) -> None:
        return None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def iterations(nbytes: int, quick: bool) -> tuple[int, int]:
    """(warm-up, timed) round trips for one size: many for small messages, fewer once a round trip moves MiBs."""
    budget, lo, hi = (128 * MiB, 10, 50) if quick else (1024 * MiB, 20, 200)
    iters = max(lo, min(hi, budget // nbytes))
    return max(3, iters // 10), iters


def summary(r: dict, nbytes: int | None = None) -> dict:
    """Median one-way time (round trip / 2) with the spread; bandwidth where there is a payload."""
    rt = sorted(r["round_trip_s"])
    q = statistics.quantiles(rt, n=10)
    out = {
        "iterations": len(rt),
        "one_way_us": statistics.median(rt) / 2 * 1e6,
        "p10_one_way_us": q[0] / 2 * 1e6,
        "p90_one_way_us": q[-1] / 2 * 1e6,
        "round_trip_us": statistics.median(rt) * 1e6,
    }
    if r.get("event_round_trip_s"):
        out["event_one_way_us"] = statistics.median(r["event_round_trip_s"]) / 2 * 1e6
    if nbytes:
        out["gb_per_s"] = nbytes / (out["one_way_us"] * 1e-6) / 1e9
    if "echo_ok" in r and not r["echo_ok"]:
        raise RuntimeError(f"the bytes that came back differ from those sent ({nbytes} B)")
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def machine_slug(info: dict) -> str:
    if not info["gpu"]:
        return "cpu"
    words = [w for w in re.split(r"[^a-z0-9]+", info["gpu"].lower()) if w and w != "nvidia"]
    return words[0] if words else "gpu"


def label(nbytes: int) -> str:
    return f"{nbytes // MiB} MiB" if nbytes >= MiB else f"{nbytes // KiB} KiB"


def start_probes(device: str, timeout_s: float) -> list:
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    options = {"num_cpus": 1, "num_gpus": 1 if device == "cuda" else 0, "max_restarts": 0}
    if env:
        options["runtime_env"] = {"env_vars": env}
    probes = [ray.remote(TransportProbe).options(**options).remote(rank) for rank in (0, 1)]
    ray.get([p.ping.remote() for p in probes], timeout=timeout_s)
    addr, port = ray.get(probes[0].rendezvous.remote(), timeout=timeout_s)  # the product's order: rank 0 names it
    ray.get([p.join.remote(addr, port, 2, timeout_s) for p in probes], timeout=timeout_s)
    return probes


def pair(a_call, b_call, timeout_s: float) -> dict:
    """Run the two sides of a ping-pong together; A's timings come back."""
    a, _ = ray.get([a_call, b_call], timeout=timeout_s)
    return a


def measure(probes: list, sizes: list[int], quick: bool, timeout_s: float) -> dict:
    a, b = probes
    h_warm, h_iters = (20, 200) if quick else (50, 1000)
    first = pair(a.header_ping.remote(0, 1), b.header_pong.remote(1), timeout_s)
    header = summary(pair(a.header_ping.remote(h_warm, h_iters), b.header_pong.remote(h_warm + h_iters), timeout_s))
    header["first_round_trip_ms"] = round(first["round_trip_s"][0] * 1e3, 3)
    header["bytes"] = 8 * len(HEADER)

    empty = summary(ray.get(a.ray_empty_ping.remote(b, h_warm // 2, h_iters // 4), timeout=timeout_s))
    driver = []
    for i in range(h_warm // 2 + h_iters // 4):
        t0 = time.perf_counter()
        ray.get(b.noop.remote())
        if i >= h_warm // 2:
            driver.append(time.perf_counter() - t0)

    rows = []
    for nbytes in sizes:
        warm, iters = iterations(nbytes, quick)
        print(f"  {label(nbytes)}: {warm} + {iters} round trips each way ...", file=sys.stderr)
        ours = summary(
            pair(
                a.transport_ping.remote(nbytes, warm, iters), b.transport_pong.remote(nbytes, warm + iters), timeout_s
            ),
            nbytes,
        )
        call = summary(ray.get(a.ray_call_ping.remote(b, nbytes, warm, iters), timeout=timeout_s), nbytes)
        put = summary(ray.get(a.ray_put_ping.remote(b, nbytes, warm, iters), timeout=timeout_s), nbytes)
        rows.append(
            {
                "bytes": nbytes,
                "label": label(nbytes),
                "warmup": warm,
                "transport": ours,
                "ray_call": call,
                "ray_put_get": put,
                "ray_call_over_transport": round(call["one_way_us"] / ours["one_way_us"], 2),
                "ray_put_get_over_transport": round(put["one_way_us"] / ours["one_way_us"], 2),
            }
        )
    return {
        "sizes": rows,
        "header": header,
        "ray_empty_call": {
            "actor_to_actor": empty,
            "driver_to_actor": {"iterations": len(driver), "round_trip_us": round(statistics.median(driver) * 1e6, 3)},
        },
    }


def print_table(result: dict) -> None:
    m = result["machine"]
    print(
        f"\ntransport ({m['backend']}, {m['gpu'] or m['device']}) vs Ray object store; one-way = round trip / 2,"
        " medians"
    )
    head = ("size", "ours us", "ours GB/s", "ray call us", "call/ours", "put+get us", "put/ours")
    print(f"{head[0]:>8} {head[1]:>10} {head[2]:>10} {head[3]:>12} {head[4]:>10} {head[5]:>11} {head[6]:>9}")
    for r in result["sizes"]:
        o, c, p = r["transport"], r["ray_call"], r["ray_put_get"]
        print(
            f"{r['label']:>8} {o['one_way_us']:>10.1f} {o['gb_per_s']:>10.3f} {c['one_way_us']:>12.1f} "
            f"{r['ray_call_over_transport']:>9.1f}x {p['one_way_us']:>11.1f} {r['ray_put_get_over_transport']:>8.1f}x"
        )
    h, e = result["header"], result["ray_empty_call"]
    print(
        f"\nheader (4 x int64) round trip: {h['round_trip_us']:.1f} us (one-way {h['one_way_us']:.1f} us); "
        f"first round trip on the group: {h['first_round_trip_ms']:.1f} ms"
    )
    print(
        f"empty Ray actor call round trip: actor->actor {e['actor_to_actor']['round_trip_us']:.1f} us, "
        f"driver->actor {e['driver_to_actor']['round_trip_us']:.1f} us"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help=f"sizes {[label(s) for s in QUICK_SIZES]}, fewer iterations")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds any one measurement may take")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU here")
    t_start = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=2 if args.device == "cpu" else 4,
        include_dashboard=False,
        object_store_memory=1024 * MiB,
        logging_level="warning",
    )
    probes: list = []
    try:
        if args.device == "cuda" and ray.cluster_resources().get("GPU", 0) < 2:
            p.error(f"--device cuda needs 2 GPUs, Ray sees {ray.cluster_resources().get('GPU', 0)}")
        print(f"starting two probe actors on {args.device} ...", file=sys.stderr)
        probes = start_probes(args.device, args.timeout)
        info = ray.get(probes[0].describe.remote(), timeout=args.timeout)
        if not info["device"].startswith(args.device):
            raise RuntimeError(f"asked for {args.device}, the actors run on {info['device']}")
        measured = measure(probes, QUICK_SIZES if args.quick else SIZES, args.quick, args.timeout)
        ray.get([p.close.remote() for p in probes], timeout=args.timeout)
    finally:
        ray.shutdown()
    result = {
        "machine": info,
        "quick": args.quick,
        "method": {
            "payload": "float32 tensor on the actor's device",
            "statistic": "median round trip / 2, after warm-up",
            "transport": "Transport.send then Transport.recv of the echo, timed in actor A",
            "ray_call": "ray.get(B.echo.remote(tensor)), B returns the tensor, timed in actor A",
            "ray_put_get": "A ray.put, B ray.get + ray.put, A ray.get (one actor call carries the refs)",
            "clock": "perf_counter around torch.cuda.synchronize on GPU; event_one_way_us from CUDA events",
        },
        **measured,
    }
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"transport-{machine_slug(info)}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"\nwrote {path} in {result['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
