"""The gRPC `Generation` service (cluster/proto/generation.proto), as methods of the ingress deployment.

Two callers: Ray Serve's gRPC proxy (apps started from a Serve config: `serve run`, KubeRay), which calls a method of
the ingress by the RPC's name, so `Generate` and `GenerateStream` must be attributes of the deployment class; and
`mistral-cluster serve`'s own gRPC server (`cluster/grpc_front.py`), which calls them through a Serve handle with no
gRPC context. The requests go through the same validation (`parse_completion`), router client and text assembly as
the HTTP ones; an `APIError` becomes the gRPC status that says the same thing: set on the proxy's context, or raised
as a `GrpcError` to the handle's caller.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc

from cluster.openai_errors import APIError
from cluster.openai_request import Limits, parse_completion
from cluster.openai_response import ChoiceState, TextAssembler
from cluster.openai_serving import OpenAIServing
from cluster.proto.generation_pb2 import GenerateChunk, GenerateRequest, GenerateResponse
from cluster.router_client import RouterClient
from router.sampling import SamplingParams
from shards.tokenizer import Tokenizer

# What a Serve config's `grpc_options` names to register the service on Serve's proxy.
GRPC_SERVICER = "cluster.proto.generation_pb2_grpc.add_GenerationServicer_to_server"
GRPC_STATUS = {  # else UNAVAILABLE
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class GrpcError(Exception):
    """The status a call through a handle ends with (`code`: a `grpc.StatusCode` name), for the caller to set."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details


class GenerationService:
    """`Generate` and `GenerateStream`, as methods of the ingress.

    The ingress provides what they use: `_check_key(header)` (raises the 401 of a missing or wrong API key; the key
    travels as the metadata `authorization: Bearer KEY`), `_ready()` (raises the 503 of a server that is loading,
    failed or draining), `in_flight` (the calls a drain waits for), and, once the model is up, `tokenizer`, `limits`,
    `routers` and `serving`. Called through a handle, `authorization` is that metadata's value.
    """

    tokenizer: Tokenizer | None
    limits: Limits | None
    routers: RouterClient
    serving: OpenAIServing | None
    in_flight: int
    _check_key: Callable[[str], None]
    _ready: Callable[[], None]

    async def Generate(self, request: GenerateRequest, grpc_context=None, authorization: str = "") -> GenerateResponse:
        texts, ids, finish = [], [], ""
        async for text, token, done in self._grpc_stream(request, grpc_context, authorization):
            texts.append(text)
            ids.append(token)
            finish = done or finish
        prompt = list(request.prompt_token_ids) or (self.tokenizer.encode(request.prompt) if self.tokenizer else [])
        return GenerateResponse(text="".join(texts), token_ids=ids, prompt_token_ids=prompt, finish_reason=finish)

    async def GenerateStream(
        self, request: GenerateRequest, grpc_context=None, authorization: str = ""
    ) -> AsyncIterator[GenerateChunk]:
        async for text, token, done in self._grpc_stream(request, grpc_context, authorization):
            yield GenerateChunk(text=text, token_ids=[token], finish_reason=done or "")

    def _grpc_params(self, request: GenerateRequest) -> tuple[list[int], SamplingParams]:
        """The prompt's token ids and sampling parameters, checked by the same rules as an HTTP completion."""
        self._ready()
        if request.prompt_token_ids:
            ids = list(request.prompt_token_ids)
        elif request.prompt:
            ids = self.tokenizer.encode(request.prompt)
        else:
            raise APIError(400, "prompt: give prompt or prompt_token_ids", param="prompt")
        data = {
            "model": self.model_name,  # gRPC has one method per model server: the model is implied
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

    async def _grpc_stream(
        self, request: GenerateRequest, grpc_context, authorization: str
    ) -> AsyncIterator[tuple[str, int, str | None]]:
        """(new text, token id, finish reason) per token; an error sets the call's status (or raises it, without a
        context) and ends the stream."""
        if grpc_context is not None:
            authorization = dict(grpc_context.invocation_metadata()).get("authorization", "")
        try:
            self._check_key(authorization)
            ids, params = self._grpc_params(request)
            choice = ChoiceState(0, ids, TextAssembler(self.tokenizer, params.stop), params)
            [stream] = await self.routers.admit([(ids, params)])
        except APIError as e:
            _end_with(grpc_context, GRPC_STATUS.get(e.status, grpc.StatusCode.UNAVAILABLE), e.message)
            return
        self.in_flight += 1
        try:
            async for text, finish in self.serving.choice_text(choice, stream):
                yield text, choice.token_ids[-1], finish
        except APIError as e:
            _end_with(grpc_context, grpc.StatusCode.UNAVAILABLE, e.message)
        finally:
            self.in_flight -= 1
            self.routers.release([stream])


def _end_with(grpc_context, code: grpc.StatusCode, details: str) -> None:
    if grpc_context is None:
        raise GrpcError(code.name, details)
    grpc_context.set_code(code)
    grpc_context.set_details(details)
