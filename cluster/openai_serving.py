"""One OpenAI request on the router, from its parsed form to its last byte: every choice admitted, each choice's token
events turned into text (stop strings applied, latency counted), and the request answered as one JSON body or as
server-sent events.

No FastAPI here: the HTTP routes wrap what this returns, and the gRPC methods use `choice_text` the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from cluster.metrics import ServeMetrics
from cluster.openai_errors import APIError
from cluster.openai_request import Limits, ParsedRequest
from cluster.openai_response import ChoiceState, TextAssembler, final_response, sse, stream_chunk, usage_chunk
from cluster.router_client import ChoiceStream, RouterClient
from router.sampling import SamplingParams
from shards.tokenizer import Tokenizer


def echo_params(req: ParsedRequest, params: SamplingParams) -> SamplingParams:
    """What the router runs for a choice: with echo and logprobs, the prompt is scored too. Echo with max_tokens 0
    still makes one token (the prefill computes its logits anyway), which the response leaves out, as vLLM does."""
    if not req.echo:
        return params
    return replace(params, max_tokens=max(params.max_tokens, 1), prompt_logprobs=req.logprobs)


class OpenAIServing:
    """Serves parsed requests for one model: the router client to generate, the tokenizer to turn tokens into text."""

    def __init__(
        self,
        routers: RouterClient,
        tokenizer: Tokenizer,
        model_name: str,
        limits: Limits,
        metrics: ServeMetrics,
        timeout_s: float,
    ) -> None:
        self.routers, self.tokenizer, self.model_name = routers, tokenizer, model_name
        self.limits, self.metrics, self.timeout_s = limits, metrics, timeout_s

    async def start(self, req: ParsedRequest) -> tuple[list[ChoiceState], list[ChoiceStream]]:
        """Submit every choice; all are admitted (or none: the admitted ones are cancelled) before replying."""
        choices = []
        for i, prompt_ids in enumerate(req.prompts):
            for j in range(req.n):
                params = echo_params(req, req.params_for(prompt_ids, j, self.limits.max_seq_len))
                assembler = TextAssembler(self.tokenizer, params.stop)
                choices.append(
                    ChoiceState(
                        i * req.n + j, prompt_ids, assembler, params, echo=req.echo, prompt_only=req.max_tokens == 0
                    )
                )
        streams = await self.routers.admit([(c.prompt_ids, c.params) for c in choices])
        self.metrics.started(req)
        return choices, streams

    async def choice_text(self, choice: ChoiceState, stream: ChoiceStream) -> AsyncIterator[tuple[str, str | None]]:
        """(new text, finish reason) per token of one choice until it finishes; applies stop strings (ending the
        stream early)."""
        started = time.monotonic()
        first_at = None
        async for event in self.routers.events(stream):
            if first_at is None:
                first_at = time.monotonic()
                self.metrics.first_token(first_at - started)
            if event.prompt_logprobs is not None:  # with the first token: the prompt's own, the first has none
                choice.prompt_logprobs = [None, *event.prompt_logprobs]
                choice.prompt_top_logprobs = [None, *(list(top) for top in event.prompt_top_logprobs)]
            if choice.prompt_only:  # the token the router made to get the prompt's scores is not reported
                yield "", "length"
                choice.finish_reason = "length"
                return
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

    async def response(
        self, req: ParsedRequest, choices: list[ChoiceState], streams: list[ChoiceStream]
    ) -> dict[str, Any]:
        """The whole response body once every choice has finished; an APIError (503) if that takes too long."""
        try:
            await asyncio.wait_for(
                asyncio.gather(*(self._finish(c, s) for c, s in zip(choices, streams, strict=True))),
                timeout=self.timeout_s,
            )
        except TimeoutError:
            raise self._timed_out() from None
        finally:
            self.routers.release(streams)
        return final_response(req, self.model_name, choices, self.tokenizer)

    async def _finish(self, choice: ChoiceState, stream: ChoiceStream) -> None:
        async for _ in self.choice_text(choice, stream):
            pass

    async def events(
        self, req: ParsedRequest, choices: list[ChoiceState], streams: list[ChoiceStream]
    ) -> AsyncIterator[bytes]:
        """Server-sent events as OpenAI clients expect: chunks, an optional usage chunk, then [DONE]. An error ends
        the stream with an error event, then [DONE]."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: ChoiceState, stream: ChoiceStream) -> None:
            try:
                first = True
                async for text, finish in self.choice_text(choice, stream):
                    chunk = stream_chunk(
                        req, self.model_name, choice, text, choice.token_ids[-1:], finish, self.tokenizer, first
                    )
                    await queue.put(chunk)
                    first = False
            except APIError as e:
                await queue.put(e)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(c, s)) for c, s in zip(choices, streams, strict=True)]
        remaining = len(tasks)
        deadline = time.monotonic() + self.timeout_s
        try:
            while remaining:
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    yield sse(self._timed_out().body())
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

    def _timed_out(self) -> APIError:
        return APIError(
            503, f"the request did not finish within {self.timeout_s:g} s", code="timeout", kind="server_error"
        )
