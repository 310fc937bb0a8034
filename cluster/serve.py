"""The Ray Serve application: OpenAI-compatible HTTP (and gRPC) in front of the sharded model.

`build_app` is what Serve imports (`import_path: cluster.serve:build_app`), so `serve run`, `serve deploy`,
KubeRay's `serveConfigV2` and `mistral-cluster serve` all start the same thing. The ingress owns the tokenizer
and the request rules; the router actor owns the schedule. The ingress starts the sharded model in the
background so `/health` can say "loading" truthfully until every shard is up.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime.
import asyncio
import contextlib
import hmac
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from cluster import openapi_schema
from cluster.metrics import ServeMetrics
from cluster.openai_errors import APIError, shutting_down
from cluster.openai_request import Limits, ParsedRequest, parse_chat, parse_completion, parse_json
from cluster.openai_response import ChoiceState, TextAssembler, final_response, sse, stream_chunk, usage_chunk
from cluster.router_client import ChoiceStream, RouterClient
from router.sampling import SamplingParams

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


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@api.exception_handler(HTTPException)
async def http_error(request: Request, e: HTTPException) -> JSONResponse:
    """Starlette's own errors (an unknown path, a wrong method) as OpenAI error bodies too."""
    return error_response(
        APIError(e.status_code, str(e.detail), kind="invalid_request_error", headers=dict(e.headers or {}))
    )


@serve.deployment(
    num_replicas=1,
    max_ongoing_requests=1024,
    ray_actor_options={"num_cpus": 0},
    health_check_period_s=5,
    health_check_timeout_s=30,
)
@serve.ingress(api)
class OpenAIIngress:
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
    ) -> None:
        self.cluster_options = {"on_shard_failure": on_shard_failure, "step_timeout_s": step_timeout_s}
        self.placement, self.checkpoint = placement, checkpoint
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
        from cluster.sharded import ShardedCluster
        from shards.tokenizer import Tokenizer

        try:
            cluster = ShardedCluster.start(
                self.placement, self.checkpoint, max_queued_requests=self.max_queued_requests, **self.cluster_options
            )
            self.tokenizer = Tokenizer(cluster.checkpoint_dir)
            self.model_name = self.model_name or Path(cluster.plan.checkpoint).name
            self.limits = Limits(max_seq_len=cluster.config.max_seq_len, **self._limits_args)
            self.cluster = cluster
            log.info("sharded model ready: %s", self.model_name)
        except Exception as e:  # noqa: BLE001 - reported by /health and check_health, not lost in a thread
            self.startup_error = f"{type(e).__name__}: {e}"
            log.error("sharded model failed to start: %s", self.startup_error)

    def check_health(self) -> None:
        """Serve's replica health check: a failed start is unhealthy (loading is not)."""
        if self.startup_error:
            raise RuntimeError(self.startup_error)

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
        if self.api_key is None or request.url.path in PUBLIC_ROUTES:
            return
        header = request.headers.get("authorization", "")
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
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.model_name,
                        "object": "model",
                        "created": 0,
                        "owned_by": "mistral-cluster",
                        "max_model_len": self.limits.max_seq_len,
                    }
                ],
            }
        )

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
            if not isinstance(response, StreamingResponse):  # a stream counts itself out when it ends (`_sse`)
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
            choices, streams = await self._start_choices(req)
        except APIError as e:
            self.metrics.rejected(e.status)
            return error_response(e)
        if req.stream:
            return StreamingResponse(
                self._sse(req, choices, streams), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        try:
            await asyncio.wait_for(
                asyncio.gather(*(self._collect(c, s) for c, s in zip(choices, streams, strict=True))),
                timeout=self.request_timeout_s,
            )
        except APIError as e:
            return error_response(e)
        except TimeoutError:
            return error_response(
                APIError(
                    503,
                    f"the request did not finish within {self.request_timeout_s:g} s",
                    code="timeout",
                    kind="server_error",
                )
            )
        finally:
            self.routers.release(streams)
        return JSONResponse(final_response(req, self.model_name, choices, self.tokenizer))

    async def _start_choices(self, req: ParsedRequest) -> tuple[list[ChoiceState], list[ChoiceStream]]:
        """Submit every choice; all are admitted (or none: the admitted ones are cancelled) before replying."""
        choices = []
        for i, prompt_ids in enumerate(req.prompts):
            for j in range(req.n):
                params = req.params_for(prompt_ids, j, self.limits.max_seq_len)
                choices.append(
                    ChoiceState(i * req.n + j, prompt_ids, TextAssembler(self.tokenizer, params.stop), params)
                )
        streams = await self.routers.admit([(c.prompt_ids, c.params) for c in choices])
        self.metrics.started(req)
        return choices, streams

    async def _next_events(self, choice: ChoiceState, stream: ChoiceStream):
        """Text of one choice until it finishes; applies stop strings (ending the stream early)."""
        started = time.monotonic()
        first_at = None
        async for event in self.routers.events(stream):
            if first_at is None:
                first_at = time.monotonic()
                self.metrics.first_token(first_at - started)
            choice.token_ids.append(event.token_id)
            choice.logprobs.append(event.logprob)
            choice.top_logprobs.append(event.top_logprobs)
            text = choice.assembler.add(event.token_id)
            finish = "stop" if choice.assembler.stopped else event.finish_reason
            if finish is not None and not choice.assembler.stopped:
                text += choice.assembler.finish()
            yield text, finish
            if finish is not None:
                choice.finish_reason = finish
                self.metrics.finished(len(choice.token_ids), time.monotonic() - first_at)
                return

    async def _collect(self, choice: ChoiceState, stream: ChoiceStream) -> None:
        async for _ in self._next_events(choice, stream):
            pass

    async def _sse(self, req: ParsedRequest, choices: list[ChoiceState], streams: list[ChoiceStream]):
        """Server-sent events as OpenAI clients expect: chunks, an optional usage chunk, then [DONE]."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: ChoiceState, stream: ChoiceStream) -> None:
            try:
                first = True
                async for text, finish in self._next_events(choice, stream):
                    n_new = 1
                    ids = choice.token_ids[-n_new:]
                    await queue.put(
                        stream_chunk(req, self.model_name, choice, text, ids, finish, self.tokenizer, first)
                    )
                    first = False
            except APIError as e:
                await queue.put(e)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(c, s)) for c, s in zip(choices, streams, strict=True)]
        remaining = len(tasks)
        deadline = time.monotonic() + self.request_timeout_s
        try:
            while remaining:
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    yield sse(
                        {
                            "error": APIError(
                                503,
                                f"the request did not finish within {self.request_timeout_s:g} s",
                                code="timeout",
                                kind="server_error",
                            ).body()["error"]
                        }
                    )
                    break
                if item is None:
                    remaining -= 1
                elif isinstance(item, APIError):
                    yield sse(item.body())
                    break
                else:
                    yield sse(item)
            else:
                if req.include_usage:
                    yield sse(usage_chunk(req, self.model_name, choices))
            yield sse("[DONE]")
        finally:  # also when the client went away: stop generating, free the cache slots
            for t in tasks:
                t.cancel()
            self.routers.release(streams)
            self.in_flight -= 1

    # --- gRPC (through Serve's gRPC proxy; methods named as in cluster/proto/generation.proto) ---------

    def _grpc_params(self, request) -> tuple[list[int], SamplingParams]:
        self._ready()
        if request.prompt_token_ids:
            ids = list(request.prompt_token_ids)
        elif request.prompt:
            ids = self.tokenizer.encode(request.prompt)
        else:
            raise APIError(400, "prompt: give prompt or prompt_token_ids", param="prompt")
        data = {
            "max_tokens": request.max_tokens or 16,
            "temperature": request.temperature,
            "top_p": request.top_p or 1.0,
            "top_k": request.top_k,
            "stop": list(request.stop) or None,
        }
        if request.HasField("seed"):
            data["seed"] = request.seed
        parsed = parse_completion({"prompt": ids, **data}, self.tokenizer, self.limits)
        return ids, parsed.params_for(ids, 0, self.limits.max_seq_len)

    async def _grpc_stream(self, request, grpc_context):
        import grpc

        try:
            ids, params = self._grpc_params(request)
            choice = ChoiceState(0, ids, TextAssembler(self.tokenizer, params.stop), params)
            [stream] = await self.routers.admit([(ids, params)])
        except APIError as e:
            code = {400: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED}.get(
                e.status, grpc.StatusCode.UNAVAILABLE
            )
            grpc_context.set_code(code)
            grpc_context.set_details(e.message)
            return
        try:
            async for text, finish in self._next_events(choice, stream):
                yield text, choice.token_ids[-1], finish
        except APIError as e:
            grpc_context.set_code(grpc.StatusCode.UNAVAILABLE)
            grpc_context.set_details(e.message)
        finally:
            self.routers.release([stream])

    async def Generate(self, request, grpc_context):
        from cluster.proto.generation_pb2 import GenerateResponse

        texts, ids, finish = [], [], ""
        async for text, token, done in self._grpc_stream(request, grpc_context):
            texts.append(text)
            ids.append(token)
            finish = done or finish
        prompt = list(request.prompt_token_ids) or (self.tokenizer.encode(request.prompt) if self.tokenizer else [])
        return GenerateResponse(text="".join(texts), token_ids=ids, prompt_token_ids=prompt, finish_reason=finish)

    async def GenerateStream(self, request, grpc_context):
        from cluster.proto.generation_pb2 import GenerateChunk

        async for text, token, done in self._grpc_stream(request, grpc_context):
            yield GenerateChunk(text=text, token_ids=[token], finish_reason=done or "")


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder: `args` are the Serve config's `args` (placement, checkpoint, api_key, ...)."""
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
    }
    unknown = set(args) - known
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}; known: {sorted(known)}")
    if "placement" not in args:
        raise ValueError("application args need 'placement': the path of a placement YAML")
    return OpenAIIngress.bind(**args)


GRPC_SERVICER = "cluster.proto.generation_pb2_grpc.add_GenerationServicer_to_server"

__all__ = ["GRPC_SERVICER", "OpenAIIngress", "build_app", "json"]
