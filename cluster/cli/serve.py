"""`mistral-cluster serve`: start Ray (or join one), start the Serve application, and block serving it.

SIGTERM (what Kubernetes and systemd send) drains: new requests get 503, those in flight finish or are ended
cleanly at `--drain-timeout`, then Serve and Ray shut down and the command exits 0. Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.cli.usage import UsageError
from cluster.placement_file import settle_placement
from cluster.reservation import ray_session

if TYPE_CHECKING:
    from cluster.grpc_front import GrpcFront

APP_NAME = "mistral-cluster"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve the sharded model over OpenAI-compatible HTTP and gRPC")
    p.add_argument("--config", required=True, help="placement YAML (see deploy/examples/PLACEMENT.md)")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the file's 'checkpoint')")
    p.add_argument("--address", default=None, help="join this Ray cluster (default: RAY_ADDRESS or a local one)")
    p.add_argument(
        "--host", default="127.0.0.1", help="HTTP and gRPC bind address (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000, help="0 turns gRPC off")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health and /metrics, and on gRPC calls",
    )
    p.add_argument("--max-queued-requests", type=int, default=256)
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds to let requests in flight finish before ending them (default 30)",
    )
    p.set_defaults(func=cmd_serve)


def wait_until_healthy(base_url: str, timeout_s: float) -> bool:
    """Poll `/health` until it answers 200 (every shard loaded) or the deadline passes."""
    # httpx is a test dependency, not the package's: only the tests and benchmarks call this, so it loads here.
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(base_url + "/health", timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False


def start_serve(app_args: dict, host: str, port: int, grpc_port: int) -> GrpcFront | None:
    """Start Serve's HTTP proxy on `host:port`, run the application on it, and serve gRPC on `host:grpc_port`
    (unless it is 0; `cluster/grpc_front.py` says why not through Serve's proxy). Returns the gRPC server."""
    # Serve, FastAPI and gRPC (~0.7 s to import) load here, so the other commands do not pay for them at start-up.
    from ray import serve

    from cluster.grpc_front import GrpcFront
    from cluster.serve import build_app

    serve.start(http_options={"host": host, "port": port})
    front = None
    if grpc_port:  # bound before the app is deployed: a port in use stops the command with nothing left running
        front = GrpcFront(APP_NAME, host, grpc_port)
        try:
            front.start()
        except OSError as e:
            front.stop()
            raise UsageError(f"--grpc-port {grpc_port}: {e}") from None
    serve.run(build_app(app_args), name=APP_NAME, route_prefix="/", blocking=False)
    return front


def drain_and_shutdown(timeout_s: float, grpc: GrpcFront | None = None) -> None:
    """Refuse new requests, let those in flight finish (up to `timeout_s`), then stop gRPC and shut Serve down."""
    from ray import serve  # loaded by start_serve already; imported here for the reason given there

    print(f"draining: new requests get 503; up to {timeout_s:g} s for those in flight", file=sys.stderr)
    try:
        found = serve.get_app_handle(APP_NAME).drain.remote(timeout_s).result(timeout_s=timeout_s + 15)
        print(f"drained: {found['in_flight']} in flight, {found['cut']} ended at the deadline", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - a failed drain must not stop the shutdown
        print(f"drain failed ({type(e).__name__}: {e}); shutting down anyway", file=sys.stderr)
    if grpc is not None:
        grpc.stop()
    serve.shutdown()


def cmd_serve(args: argparse.Namespace) -> int:
    if args.drain_timeout < 0:
        raise UsageError(f"--drain-timeout must be 0 or more seconds, got {args.drain_timeout:g}")
    plan, _ = settle_placement(args.config, args.checkpoint)  # fail here, before Ray starts, on a bad file
    app_args = {"placement": str(Path(args.config).resolve()), "max_queued_requests": args.max_queued_requests}
    app_args["checkpoint"] = str(Path(plan.checkpoint).resolve())
    if args.api_key:
        app_args["api_key"] = args.api_key
    from cluster.grpc_front import bind_address  # loads gRPC: here, not at the top, for the reason start_serve gives

    terminated = threading.Event()
    with ray_session(plan, args.address):
        # after ray.init, which installs a SIGTERM handler of its own that dumps the stack and exits
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: terminated.set())
        grpc_where = f"gRPC on {bind_address(args.host, args.grpc_port)}" if args.grpc_port else "no gRPC"
        print(
            f"serving {plan.checkpoint} on http://{args.host}:{args.port}/v1 ({grpc_where}); "
            f"health: /health, metrics: /metrics; Ctrl-C stops, SIGTERM drains",
            file=sys.stderr,
        )
        grpc = None
        try:
            grpc = start_serve(app_args, args.host, args.port, args.grpc_port)
            while not terminated.wait(1):
                pass
            drain_and_shutdown(args.drain_timeout, grpc)
        except KeyboardInterrupt:  # Ctrl-C stops: on a cluster we joined, nothing of ours may stay behind
            print("stopping: the app, its shards and its placement group go now", file=sys.stderr)
            drain_and_shutdown(0.0, grpc)
        finally:
            signal.signal(signal.SIGTERM, previous)
    return 0
