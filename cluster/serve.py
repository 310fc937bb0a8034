"""The Ray Serve application: OpenAI-compatible HTTP (and gRPC) in front of the sharded model.

`build_app` is what Serve imports (`import_path: cluster.serve:build_app`), so `serve run`, `serve deploy`,
KubeRay's `serveConfigV2` and `mistral-cluster serve` all start the same thing. The ingress owns the tokenizer
and the request rules; the router actor owns the schedule. The ingress starts the sharded model in the
background so `/health` can say "loading" truthfully until every shard is up.

Each replica of the ingress is one copy of the model: its own placement group, shards and router, named by a prefix
of its own, so `num_replicas: N` (or Serve's autoscaling) gives N independent copies behind one endpoint. Every
response names the replica that answered it in `x-mistral-cluster-replica`.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime.
import asyncio
import contextlib
import hmac
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from starlette.exceptions import HTTPException

from cluster import openapi_schema
from cluster.grpc_service import GRPC_SERVICER, GenerationService
from cluster.metrics import ServeMetrics
from cluster.openai_errors import APIError, shutting_down
from cluster.openai_request import Limits, parse_chat, parse_completion, parse_json
from cluster.openai_serving import OpenAIServing
from cluster.replicas import ReadyReplicasFirst, ReplicaHeader, check_random_weights, random_model_name, replica_name
from cluster.router_client import RouterClient
from shards.tokenizer import Tokenizer

log = logging.getLogger("mistral_cluster.serve")
# The document is served by a route of ours (`/openapi.json`), behind the API key like every route but health and
# metrics; FastAPI's own /docs and /redoc are off (their pages could not send the key to fetch it).
api = FastAPI(
    title="mistral-cluster",
    description="OpenAI-compatible completions over a sharded Mistral/Mixtral",
    openapi_url=None,
    docs_url=None,
    redoc_url=None,
)
PUBLIC_ROUTES = ("/health", "/metrics")


api.add_middleware(ReplicaHeader)


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@api.exception_handler(HTTPException)
async def http_error(request: Request, e: HTTPException) -> JSONResponse:
    """Starlette's own errors (an unknown path, a wrong method) as OpenAI error bodies too."""
    return error_response(
        APIError(e.status_code, str(e.detail), kind="invalid_request_error", headers=dict(e.headers or {}))
    )


@serve.deployment(
    max_ongoing_requests=1024,
    ray_actor_options={"num_cpus": 0},
    health_check_period_s=5,
    health_check_timeout_s=30,
    # A replica that Serve stops (scaling down, a new version) is sent no new requests and given this long for those
    # in flight, then killed with its copy of the model: long enough for a long stream, not Serve's default 20 s.
    graceful_shutdown_timeout_s=120,
    # Each replica says every second whether its model is ready (`record_routing_stats`); the router prefers those.
    request_router_config=RequestRouterConfig(
        request_router_class=ReadyReplicasFirst, request_routing_stats_period_s=1.0, request_routing_stats_timeout_s=5.0
    ),
)
@serve.ingress(api)
class OpenAIIngress(GenerationService):
    def __init__(
        self,
        placement: str,
        checkpoint: str | None = None,
        api_key: str | None = None,
        model_name: str | None = None,
        max_queued_requests: int = 256,
        max_body_bytes: int = 1 << 20,
        max_tokens_ceiling: int | None = None,
        max_prompt_tokens: int | None = None,
        max_n: int = 8,
        request_timeout_s: float = 600.0,
        on_shard_failure: str = "resume",
        step_timeout_s: float = 60.0,
        random_weights: str | None = None,
        max_model_len: int | None = None,
    ) -> None:
        self.cluster_options = {"on_shard_failure": on_shard_failure, "step_timeout_s": step_timeout_s}
        self.placement, self.checkpoint = placement, checkpoint
        self.random_weights = random_weights  # a shape name: weights drawn by each shard, for benchmarks
        self.max_model_len = max_model_len  # with random weights: a shorter context than the shape's
        self.api_key = api_key or os.environ.get("MISTRAL_CLUSTER_API_KEY") or None
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s
        self._limits_args = {
            "max_tokens_ceiling": max_tokens_ceiling,
            "max_prompt_tokens": max_prompt_tokens,
            "max_n": max_n,
        }
        self.max_queued_requests = max_queued_requests
        self.model_name = model_name
        self.cluster = None
        self.tokenizer = None
        self.limits: Limits | None = None
        self.serving: OpenAIServing | None = None
        self.startup_error: str | None = None
        self.metrics = ServeMetrics()
        self.draining = False
        self.in_flight = 0  # OpenAI requests between arrival and the end of their response or stream
        self.routers = RouterClient(
            router=lambda: self.cluster.router,
            restart=lambda dead: self.cluster.restart_router(dead),
            replace_timeout_s=request_timeout_s,
            draining=lambda: self.draining,
        )
        threading.Thread(target=self._start_cluster, name="start-cluster", daemon=True).start()

    # --- lifecycle -------------------------------------------------------------------------------------

    def _start_cluster(self) -> None:
        # Imported here, not at the top: the sharded model's modules take ~1.4 s to import, and every process that only
        # builds the app (`serve run`, Serve's build task for a config, `mistral-cluster serve`) imports this module.
        from cluster.sharded import ShardedCluster

        try:
            if self.random_weights is not None:
                from cluster.placement_file import random_checkpoint

                self.checkpoint = str(random_checkpoint(self.random_weights, self.max_model_len))
                self.model_name = random_model_name(self.random_weights)
            cluster = ShardedCluster.start(
                self.placement, self.checkpoint, max_queued_requests=self.max_queued_requests, **self.cluster_options
            )
            self.tokenizer = Tokenizer(cluster.checkpoint_dir)
            self.model_name = self.model_name or Path(cluster.plan.checkpoint).name
            self.limits = Limits(max_seq_len=cluster.config.max_seq_len, **self._limits_args)
            self.serving = OpenAIServing(
                self.routers, self.tokenizer, self.model_name, self.limits, self.metrics, self.request_timeout_s
            )
            self.cluster = cluster  # last: the routes take a cluster for a model ready to serve
            log.info("sharded model ready: %s", self.model_name)
        except Exception as e:  # noqa: BLE001 - reported by /health and check_health, not lost in a thread
            self.startup_error = f"{type(e).__name__}: {e}"
            log.error("sharded model failed to start: %s", self.startup_error)

    def check_health(self) -> None:
        """Serve's replica health check: a failed start is unhealthy (loading is not)."""
        if self.startup_error:
            raise RuntimeError(self.startup_error)

    def record_routing_stats(self) -> dict[str, Any]:
        """What Serve's router (`ReadyReplicasFirst`) reads about this replica, every second."""
        return {"ready": self.cluster is not None and not self.draining and not self.startup_error}

    async def drain(self, timeout_s: float = 30.0) -> dict[str, int]:
        """Stop admitting requests and wait for those in flight; at `timeout_s` end the rest with a 503 (a stream
        gets an error event, then [DONE]). Called through a handle before shutdown; returns what it found."""
        self.draining = True
        in_flight, deadline = self.in_flight, time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cut = self.in_flight
        self.routers.release_all()
        while self.in_flight and time.monotonic() < deadline + 5:  # the cut ones write their last bytes
            await asyncio.sleep(0.05)
        log.info("drained: %d requests in flight, %d cut at the %g s deadline", in_flight, cut, timeout_s)
        return {"in_flight": in_flight, "cut": cut}

    def __del__(self) -> None:
        if self.cluster is not None:
            with contextlib.suppress(Exception):  # the replica is going away; nothing left to report to
                self.cluster.shutdown()

    # --- request plumbing ------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if request.url.path not in PUBLIC_ROUTES:
            self._check_key(request.headers.get("authorization", ""))

    def _check_key(self, header: str) -> None:
        """`header`: the HTTP `Authorization` header, or gRPC's `authorization` metadata."""
        if self.api_key is None:
            return
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(
                401,
                "missing or wrong API key (send 'Authorization: Bearer <key>')",
                code="invalid_api_key",
                kind="authentication_error",
            )

    def _ready(self) -> None:
        if self.draining:
            raise shutting_down()
        if self.startup_error:
            raise APIError(
                503, f"the model failed to start: {self.startup_error}", code="model_failed", kind="server_error"
            )
        if self.cluster is None:
            raise APIError(
                503,
                "the model is still loading",
                code="model_loading",
                kind="server_error",
                headers={"Retry-After": "5"},
            )

    async def _body(self, request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body_bytes:
            raise APIError(
                413, f"request body of {length} bytes is over the limit of {self.max_body_bytes}", code="body_too_large"
            )
        raw = await request.body()
        if len(raw) > self.max_body_bytes:
            raise APIError(
                413,
                f"request body of {len(raw)} bytes is over the limit of {self.max_body_bytes}",
                code="body_too_large",
            )
        return parse_json(raw)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                400,
                f"model: unknown model {model!r}; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    # --- routes ----------------------------------------------------------------------------------------

    @api.get("/health", openapi_extra=openapi_schema.HEALTH_OPERATION)
    async def health(self) -> Response:
        if self.draining:
            return JSONResponse({"status": "draining", "in_flight": self.in_flight}, status_code=503)
        if self.startup_error:
            return JSONResponse({"status": "failed", "error": self.startup_error}, status_code=503)
        if self.cluster is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        router = self.cluster.router
        try:
            stats = await asyncio.wait_for(router.stats.remote(), timeout=5)
        except ray.exceptions.RayActorError as e:  # dead: start its replacement, ready again once that one is
            self.routers.restart(router)
            return JSONResponse(
                {"status": "recovering", "reason": f"router restarting after {type(e).__name__}"}, status_code=503
            )
        except Exception as e:  # noqa: BLE001 - any other failure to answer is "not ready"
            return JSONResponse({"status": "unhealthy", "error": f"router: {type(e).__name__}: {e}"}, status_code=503)
        if not stats.health.healthy:
            return JSONResponse(
                {"status": "recovering", "reason": stats.health.reason, "shard_failures": stats.health.shard_failures},
                status_code=503,
            )
        return JSONResponse(
            {
                "status": "ready",
                "model": self.model_name,
                "replica": replica_name(),
                "shards": len(self.cluster.plan.shard_names()),
                "running": stats.engine.running,
                "waiting": stats.engine.waiting,
                "shard_failures": stats.health.shard_failures,
                "recoveries": stats.health.recoveries,
            }
        )

    @api.get("/metrics", response_class=PlainTextResponse, openapi_extra=openapi_schema.METRICS_OPERATION)
    async def metrics_route(self) -> Response:
        stats = None
        if self.cluster is not None:
            try:
                stats = await asyncio.wait_for(self.cluster.router.stats.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - metrics still answer, with health 0
                stats = None
        body, content_type = self.metrics.render(stats, ready=self.cluster is not None and stats is not None)
        return Response(body, media_type=content_type)

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi_document(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except APIError as e:
            return error_response(e)
        return JSONResponse(openapi_schema.openapi_document(request.app.openapi()))

    @api.get("/v1/models", openapi_extra=openapi_schema.MODELS_OPERATION)
    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
            self._ready()
        except APIError as e:
            return error_response(e)
        model = {
            "id": self.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "mistral-cluster",
            "max_model_len": self.limits.max_seq_len,
        }
        if self.random_weights is not None:  # never mistaken for a trained model, by a person or a client
            model["owned_by"] = "mistral-cluster (random weights)"
            model["description"] = (
                f"random weights in the shape of {self.random_weights}, drawn by each shard from a fixed seed: "
                "a benchmark aid whose text means nothing"
            )
        return JSONResponse({"object": "list", "data": [model]})

    @api.post("/v1/completions", openapi_extra=openapi_schema.COMPLETIONS_OPERATION)
    async def completions(self, request: Request) -> Response:
        return await self._openai(request, "completion")

    @api.post("/v1/chat/completions", openapi_extra=openapi_schema.CHAT_COMPLETIONS_OPERATION)
    async def chat_completions(self, request: Request) -> Response:
        return await self._openai(request, "chat")

    async def _openai(self, request: Request, kind: str) -> Response:
        """One OpenAI request, counted in flight (for `drain`) until its response, or its stream, has ended."""
        self.in_flight += 1
        response = None
        try:
            response = await self._answer(request, kind)
        finally:
            if not isinstance(response, StreamingResponse):  # a stream counts itself out when it ends (`_counted`)
                self.in_flight -= 1
        return response

    async def _answer(self, request: Request, kind: str) -> Response:
        try:
            self._authorize(request)
            self._ready()
            data = await self._body(request)
            self._check_model(data.get("model"))
            parse = parse_completion if kind == "completion" else parse_chat
            req = parse(data, self.tokenizer, self.limits)
            choices, streams = await self.serving.start(req)
        except APIError as e:
            self.metrics.rejected(e.status)
            return error_response(e)
        if req.stream:
            return StreamingResponse(
                self._counted(self.serving.events(req, choices, streams)),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            return JSONResponse(await self.serving.response(req, choices, streams))
        except APIError as e:
            return error_response(e)

    async def _counted(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """A stream's bytes, counted in flight until the stream ends, however it ends (`drain` waits on the count)."""
        try:
            async with contextlib.aclosing(chunks):  # a client gone away closes the stream: release its choices now
                async for chunk in chunks:
                    yield chunk
        finally:
            self.in_flight -= 1


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder: `args` are the Serve config's `args` (placement, checkpoint, api_key, ...).
    How many copies of the model run is the deployment's `num_replicas` or `autoscaling_config`, set in the config's
    `deployments:` (or by `ingress_app` for the CLI)."""
    return ingress_app(args)


def ingress_app(args: dict[str, Any], **deployment_options: Any) -> serve.Application:
    """The application from `args`, with Serve options of the ingress deployment (`num_replicas`,
    `autoscaling_config`) set in code rather than in a config file."""
    known = {
        "placement",
        "checkpoint",
        "api_key",
        "model_name",
        "max_queued_requests",
        "max_body_bytes",
        "max_tokens_ceiling",
        "max_prompt_tokens",
        "max_n",
        "request_timeout_s",
        "on_shard_failure",
        "step_timeout_s",
        "random_weights",
        "max_model_len",
    }
    unknown = set(args) - known
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}; known: {sorted(known)}")
    if "placement" not in args:
        raise ValueError("application args need 'placement': the path of a placement YAML")
    if args.get("random_weights") is not None or args.get("max_model_len") is not None:
        check_random_weights(args)
    deployment = OpenAIIngress.options(**deployment_options) if deployment_options else OpenAIIngress
    return deployment.bind(**args)


# GRPC_SERVICER: what a Serve config's grpc_options names; ingress_app: what `mistral-cluster serve` runs
__all__ = ["GRPC_SERVICER", "OpenAIIngress", "build_app", "ingress_app"]
