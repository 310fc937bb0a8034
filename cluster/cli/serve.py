"""`mistral-cluster serve`: start Ray (or join one), start the Serve application, and block serving it.

SIGTERM (what Kubernetes and systemd send) drains: new requests get 503, those in flight finish or are ended
cleanly at `--drain-timeout`, then Serve and Ray shut down and the command exits 0. Ctrl-C stops at once.

`--replicas N` runs N independent copies of the sharded model behind the one endpoint (each its own placement group);
`--autoscale MIN:MAX` lets Serve choose between MIN and MAX copies from the requests each one has in flight. The drain
call reaches one replica; Serve stops the others gracefully, giving their streams up to `--drain-timeout` (after
Ctrl-C too).
`--random-weights SHAPE` serves random weights of a preset's shape, for benchmarks without the download.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.cli.usage import UsageError, positive_int
from cluster.placement_file import random_checkpoint, settle_placement
from cluster.reservation import ray_session
from shards.make_checkpoint import random_shapes

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
        "--random-weights",
        metavar="SHAPE",
        choices=random_shapes(),
        help="benchmark aid: serve random weights of this shape (" + ", ".join(random_shapes()) + "; small-mixtral "
        "is the small default, for CPUs), drawn by each shard on its own device from a fixed seed, with the real "
        "Mistral tokenizer; the model is served as random-SHAPE and its text means nothing (instead of --checkpoint)",
    )
    p.add_argument(
        "--max-model-len",
        type=positive_int,
        default=None,
        help="with --random-weights: a shorter context than the shape's (a smaller KV cache per sequence)",
    )
    p.add_argument(
        "--replicas",
        type=positive_int,
        default=None,
        help="independent copies of the sharded model behind the endpoint, each reserving the whole placement "
        "(default 1)",
    )
    p.add_argument(
        "--autoscale",
        metavar="MIN:MAX",
        default=None,
        help="let Serve run between MIN and MAX copies, from the requests each has in flight (instead of --replicas)",
    )
    p.add_argument(
        "--target-ongoing-requests",
        type=float,
        default=None,
        help="with --autoscale: requests in flight per copy that Serve aims at (default: the placement's max_seqs)",
    )
    p.add_argument(
        "--direct-ingress",
        action="store_true",
        help="each copy also serves HTTP itself, on --port + 1, + 2, ... (Ray Serve's direct ingress: no hop through "
        "the proxy, about a third of the CPU per streamed token); --port still spreads requests over every copy. "
        "Starts a local Ray only: on a cluster of your own, set RAY_SERVE_ENABLE_DIRECT_INGRESS=1 on its nodes",
    )
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


def start_serve(
    app_args: dict, host: str, port: int, grpc_port: int, deployment_options: dict | None = None
) -> GrpcFront | None:
    """Start Serve's HTTP proxy on `host:port`, run the application on it, and serve gRPC on `host:grpc_port`
    (unless it is 0; `cluster/grpc_front.py` says why not through Serve's proxy). `deployment_options`
    (`num_replicas`, `autoscaling_config`) go to the ingress deployment. Returns the gRPC server."""
    # Serve, FastAPI and gRPC (~0.7 s to import) load here, so the other commands do not pay for them at start-up.
    from ray import serve

    from cluster.grpc_front import GrpcFront
    from cluster.serve import ingress_app

    serve.start(http_options={"host": host, "port": port})
    front = None
    if grpc_port:  # bound before the app is deployed: a port in use stops the command with nothing left running
        front = GrpcFront(APP_NAME, host, grpc_port)
        try:
            front.start()
        except OSError as e:
            front.stop()
            raise UsageError(f"--grpc-port {grpc_port}: {e}") from None
    app = ingress_app(app_args, **(deployment_options or {}))
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    return front


def replica_options(args: argparse.Namespace, max_seqs: int) -> tuple[dict, int]:
    """The ingress deployment's options for `--replicas` / `--autoscale`, and the most copies they can run at once."""
    if args.autoscale is None:
        if args.target_ongoing_requests is not None:
            raise UsageError("--target-ongoing-requests goes with --autoscale")
        return ({"num_replicas": args.replicas} if args.replicas else {}), args.replicas or 1
    if args.replicas is not None:
        raise UsageError("give --replicas N or --autoscale MIN:MAX, not both")
    low, sep, high = args.autoscale.partition(":")
    if not (sep and low.isdigit() and high.isdigit()) or int(high) < 1 or int(low) > int(high):
        raise UsageError(f"--autoscale expects MIN:MAX with 0 <= MIN <= MAX and MAX >= 1, got {args.autoscale!r}")
    target = args.target_ongoing_requests if args.target_ongoing_requests is not None else float(max_seqs)
    if target <= 0:
        raise UsageError(f"--target-ongoing-requests must be more than 0, got {target:g}")
    autoscaling = {"min_replicas": int(low), "max_replicas": int(high), "target_ongoing_requests": target}
    return {"autoscaling_config": autoscaling}, int(high)


def direct_ingress_env(args: argparse.Namespace, copies: int) -> None:
    """Ray Serve reads its direct-ingress settings from the environment of the processes it starts, which a local
    Ray started after this inherits (ports: one per copy on this node, from --port + 1)."""
    if args.address or os.environ.get("RAY_ADDRESS"):
        raise UsageError(
            "--direct-ingress starts a local Ray; on a cluster you joined, set RAY_SERVE_ENABLE_DIRECT_INGRESS=1 "
            "(and RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT) in its nodes' environment instead (deploy/README.md)"
        )
    first, last = args.port + 1, args.port + copies
    if last > 65535:
        raise UsageError(
            f"--direct-ingress needs ports {first}-{last} for {copies} copies; --port {args.port} is too high"
        )
    os.environ.update(
        RAY_SERVE_ENABLE_DIRECT_INGRESS="1",
        RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(first),
        RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(max(last, min(first + 1000, 65535))),
    )


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
        # A little grace when draining: a call the drain just ended may still be sending its last status ("shutting
        # down"), which a stop without grace replaces by "Cancelling all calls" (seen once in CI). Ctrl-C: none.
        grpc.stop(grace_s=2.0 if timeout_s > 0 else 0.0)
    serve.shutdown()


def cmd_serve(args: argparse.Namespace) -> int:
    if args.drain_timeout < 0:
        raise UsageError(f"--drain-timeout must be 0 or more seconds, got {args.drain_timeout:g}")
    if args.random_weights and args.checkpoint:
        raise UsageError("give --checkpoint DIR or --random-weights SHAPE, not both")
    if args.max_model_len is not None and not args.random_weights:
        raise UsageError("--max-model-len goes with --random-weights: a checkpoint's context is its own")
    # fail here, before Ray starts, on a bad file (the random checkpoint is a few small files, made on first use)
    made = args.random_weights and random_checkpoint(args.random_weights, args.max_model_len)
    checkpoint = str(made) if made else args.checkpoint
    plan, _ = settle_placement(args.config, checkpoint)
    options, copies = replica_options(args, plan.max_seqs)
    if args.direct_ingress:
        direct_ingress_env(args, copies)
    # Serve's graceful stop of a replica (on SIGTERM, the replicas the drain call below does not reach) waits as long
    options["graceful_shutdown_timeout_s"] = max(args.drain_timeout, 1.0)
    app_args = {"placement": str(Path(args.config).resolve()), "max_queued_requests": args.max_queued_requests}
    if args.random_weights:
        app_args["random_weights"] = args.random_weights
        if args.max_model_len is not None:
            app_args["max_model_len"] = args.max_model_len
    else:
        app_args["checkpoint"] = str(Path(plan.checkpoint).resolve())
    if args.api_key:
        app_args["api_key"] = args.api_key
    from cluster.grpc_front import bind_address  # loads gRPC: here, not at the top, for the reason start_serve gives

    terminated, interrupted = threading.Event(), threading.Event()

    def on_ctrl_c(signum, frame) -> None:
        # A flag, not an exception: a KeyboardInterrupt raised wherever the main thread is (inside Ray's or Serve's
        # code while the app starts) is theirs to handle; the flag is read here. A second Ctrl-C raises at once.
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()

    with ray_session(plan, args.address, copies=copies):
        # after ray.init, which installs a SIGTERM handler of its own that dumps the stack and exits
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: terminated.set())
        ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # started under nohup: Ctrl-C is not ours
        previous_int = signal.getsignal(signal.SIGINT) if ignored else signal.signal(signal.SIGINT, on_ctrl_c)
        what = f"random weights of {args.random_weights}" if args.random_weights else plan.checkpoint
        scale = f"{copies} copies at most" if args.autoscale else f"{copies} cop{'y' if copies == 1 else 'ies'}"
        grpc_where = f"gRPC on {bind_address(args.host, args.grpc_port)}" if args.grpc_port else "no gRPC"
        print(
            f"serving {what} ({scale}) on http://{args.host}:{args.port}/v1 ({grpc_where}); "
            f"health: /health, metrics: /metrics; Ctrl-C stops, SIGTERM drains",
            file=sys.stderr,
        )
        if args.direct_ingress:
            print(
                f"direct ingress: each copy also on its own port, from http://{args.host}:{args.port + 1}/v1",
                file=sys.stderr,
            )
        grpc = None
        try:
            grpc = start_serve(app_args, args.host, args.port, args.grpc_port, deployment_options=options)
            while not (terminated.wait(0.5) or interrupted.is_set()):
                pass
            if interrupted.is_set():
                raise KeyboardInterrupt
            drain_and_shutdown(args.drain_timeout, grpc)
        except KeyboardInterrupt:  # Ctrl-C stops: on a cluster we joined, nothing of ours may stay behind
            print("stopping: the app, its shards and its placement group go now", file=sys.stderr)
            drain_and_shutdown(0.0, grpc)
        finally:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)
    return 0
