"""gRPC for `mistral-cluster serve`, on the same `--host` as HTTP.

Ray Serve's gRPC proxy has no host option: it listens on every interface whatever `http_options.host` says
(`add_insecure_port(f"[::]:{port}")` in ray/serve/_private/grpc_util.py, Ray 2.60). So the command serves gRPC
itself, bound like HTTP, and passes each call to the ingress through a Serve handle (one hop, as from Serve's proxy).
Apps started from a Serve config (`serve run`, KubeRay) still take Serve's proxy, on every interface.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import grpc
from grpc_reflection.v1alpha import reflection

from cluster.grpc_service import GrpcError
from cluster.proto import generation_pb2, generation_pb2_grpc
from cluster.proto.generation_pb2 import GenerateChunk, GenerateRequest, GenerateResponse


class GenerationFront(generation_pb2_grpc.GenerationServicer):
    """The `Generation` service, each call passed to the method of the same name of the app's ingress."""

    def __init__(self, app_name: str) -> None:
        self.app_name = app_name
        self._handle = None

    def handle(self):
        """The ingress's handle, found at the first call: the port is bound before the app is deployed."""
        if self._handle is None:
            from ray import serve  # loaded by the serve command already

            self._handle = serve.get_app_handle(self.app_name)
        return self._handle

    async def Generate(self, request: GenerateRequest, context: grpc.aio.ServicerContext) -> GenerateResponse:
        try:
            return await self.handle().Generate.remote(request, authorization=_authorization(context))
        except Exception as e:  # noqa: BLE001 - a GrpcError is the call's status; anything else its failure
            await _abort(context, e)

    async def GenerateStream(
        self, request: GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[GenerateChunk]:
        stream = None
        try:
            stream = (
                self.handle().options(stream=True).GenerateStream.remote(request, authorization=_authorization(context))
            )
            async for chunk in stream:
                yield chunk
        except Exception as e:  # noqa: BLE001 - as in Generate
            await _abort(context, e)
        finally:
            if stream is not None:
                stream.cancel()  # a client that left frees its request's cache slot; a no-op once the stream ended


def _authorization(context: grpc.aio.ServicerContext) -> str:
    """The API key's metadata, for the ingress to check as it checks HTTP's header."""
    return dict(context.invocation_metadata() or ()).get("authorization", "")


async def _abort(context: grpc.aio.ServicerContext, e: Exception) -> None:
    cause = getattr(e, "cause", e)  # through a handle, the ingress's exception arrives wrapped in a RayTaskError
    if isinstance(cause, GrpcError):
        await context.abort(grpc.StatusCode[cause.code], cause.details)
    else:
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"{type(cause).__name__}: {cause}")


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcFront:
    """The gRPC server, on an event loop in a thread of its own; `start` returns once it listens (or raises)."""

    def __init__(self, app_name: str, host: str, port: int) -> None:
        self.app_name, self.address = app_name, bind_address(host, port)
        self._loop = asyncio.new_event_loop()
        self._server: grpc.aio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-front", daemon=True)

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=60)

    async def _start(self) -> None:
        server = grpc.aio.server()
        generation_pb2_grpc.add_GenerationServicer_to_server(GenerationFront(self.app_name), server)
        reflection.enable_server_reflection(  # as Serve's proxy does: grpcurl and grpcui find the service
            (generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name, reflection.SERVICE_NAME), server
        )
        try:
            server.add_insecure_port(self.address)
        except RuntimeError:  # gRPC says only "Failed to bind"
            raise OSError(f"cannot listen on {self.address} (in use, or not an address of this machine)") from None
        await server.start()
        self._server = server

    def stop(self, grace_s: float = 0.0) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(grace_s), self._loop).result(timeout=grace_s + 10)
            self._server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
