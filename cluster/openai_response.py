"""OpenAI responses: a choice's text as its tokens come (stop strings applied), the whole response, stream chunks
and server-sent events.

Pure functions and small classes, no Ray and no HTTP server, so every shape can be tested on its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from cluster.openai_request import ParsedRequest
from router.sampling import SamplingParams


class TextAssembler:
    """Turns a choice's tokens into text as they come: holds back incomplete characters and any tail that may
    still become a stop string, and cuts the text where a stop string appears.

    Each token decodes only the few ids since the last complete text (the window starts one emitted step back, so
    sentencepiece strips a leading space from both decodes alike): decoding every id each time cost 45 us a token
    over a 256-token answer and 166 us over 1024 (2 cores), in the ingress that streams every request."""

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""  # the decoded text of ids[: self._read], complete characters only
        self.emitted = ""  # text already handed out
        self.stopped = False
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._prefix = self._read = 0  # the window's start, and where the text decoded so far ends

    def add(self, token_id: int) -> str:
        """The new text this token makes safe to send (may be empty)."""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        after = self.tokenizer.decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):  # an unfinished multi-byte character waits
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        text = self.text
        for s in self.stop:
            at = text.find(s, max(0, len(self.emitted) - len(s)))
            if at != -1:
                self.stopped = True
                return self._emit(text[:at])
        safe = text
        if self._hold:
            safe = safe[: max(len(self.emitted), len(safe) - self._hold)]
        return self._emit(safe)

    def finish(self) -> str:
        """At the end nothing can become a stop string any more: hand out what was held back."""
        if self.stopped:
            return ""
        return self._emit(self.tokenizer.decode(self.ids))

    def _emit(self, text: str) -> str:
        if not text.startswith(self.emitted) or len(text) <= len(self.emitted):
            return ""
        new = text[len(self.emitted) :]
        self.emitted = text
        return new


@dataclass
class ChoiceState:
    index: int
    prompt_ids: list[int]
    assembler: TextAssembler
    params: SamplingParams | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    finish_reason: str | None = None
    echo: bool = False  # the prompt's text (and log-probabilities) go before the completion's
    prompt_only: bool = False  # echo with max_tokens 0: the token the router makes is not reported
    # With echo and logprobs, from the first token's event: per prompt token (the first has none: None).
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)


def usage(choices: list[ChoiceState], n: int) -> dict[str, int]:
    """Each prompt counts once however many choices (`n`) it has, as OpenAI counts it."""
    prompt_tokens = sum({c.index // n: len(c.prompt_ids) for c in choices}.values())
    completion_tokens = sum(len(c.token_ids) for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(tokenizer, ids: list[int], lps: list, tops: list, offset: int = 0) -> dict:
    """Legacy completions' logprobs. Each position's `top_logprobs` holds the most likely tokens and the chosen one
    (OpenAI: "up to logprobs + 1 elements"); None where there is no log-probability (an echoed prompt's first)."""
    pieces = [tokenizer.decode([i]) for i in ids]
    offsets, pos = [], offset
    for p in pieces:
        offsets.append(pos)
        pos += len(p)
    alternatives = []
    for piece, lp, top in zip(pieces, lps, tops, strict=True):
        if lp is None:
            alternatives.append(None)
            continue
        at = {tokenizer.decode([i]): v for i, v in top or ()}
        at.setdefault(piece, lp)
        alternatives.append(at)
    return {"tokens": pieces, "token_logprobs": lps, "top_logprobs": alternatives, "text_offset": offsets}


def choice_logprobs(tokenizer, choice: ChoiceState, n: int, echo: bool) -> dict:
    """The logprobs of a completion choice's last `n` tokens; with `echo`, the prompt's before them (offsets from
    the prompt's start, the completion's after the prompt's text)."""
    at = len(choice.token_ids) - n
    ids, lps, tops = choice.token_ids[at:], choice.logprobs[at:], choice.top_logprobs[at:]
    if not echo:
        return completion_logprobs(tokenizer, ids, lps, tops)
    unscored = [None] * len(choice.prompt_ids)
    prompt = completion_logprobs(
        tokenizer, choice.prompt_ids, choice.prompt_logprobs or unscored, choice.prompt_top_logprobs or unscored
    )
    rest = completion_logprobs(tokenizer, ids, lps, tops, offset=len(tokenizer.decode(choice.prompt_ids)))
    return {key: prompt[key] + rest[key] for key in prompt}


def chat_logprobs(tokenizer, ids: list[int], lps: list[float], tops: list) -> dict:
    content = []
    for i, lp, top in zip(ids, lps, tops, strict=True):  # appended together, one per token
        piece = tokenizer.decode([i])
        content.append(
            {
                "token": piece,
                "logprob": lp,
                "bytes": list(piece.encode()),
                "top_logprobs": [
                    {"token": tokenizer.decode([t]), "logprob": v, "bytes": list(tokenizer.decode([t]).encode())}
                    for t, v in (top or [])
                ],
            }
        )
    return {"content": content}


def final_response(req: ParsedRequest, model: str, choices: list[ChoiceState], tokenizer) -> dict:
    out_choices = []
    for c in choices:
        text = c.assembler.emitted
        if req.kind == "completion":
            choice: dict[str, Any] = {
                "index": c.index,
                "text": tokenizer.decode(c.prompt_ids) + text if c.echo else text,
                "finish_reason": c.finish_reason,
                "logprobs": None,
            }
            if req.logprobs is not None:
                choice["logprobs"] = choice_logprobs(tokenizer, c, len(c.token_ids), c.echo)
        else:
            choice = {
                "index": c.index,
                "message": {"role": "assistant", "content": text},
                "finish_reason": c.finish_reason,
                "logprobs": None,
            }
            if req.logprobs is not None:
                choice["logprobs"] = chat_logprobs(tokenizer, c.token_ids, c.logprobs, c.top_logprobs)
        if req.return_token_ids:
            choice["token_ids"] = c.token_ids
            choice["prompt_token_ids"] = c.prompt_ids
        out_choices.append(choice)
    return {
        "id": ("cmpl-" if req.kind == "completion" else "chatcmpl-") + req.request_id,
        "object": "text_completion" if req.kind == "completion" else "chat.completion",
        "created": req.created,
        "model": model,
        "choices": out_choices,
        "usage": usage(choices, req.n),
    }


def stream_chunk(
    req: ParsedRequest,
    model: str,
    choice: ChoiceState,
    text: str,
    token_ids: list[int],
    finish_reason: str | None,
    tokenizer,
    first: bool = False,
) -> dict:
    if req.kind == "completion":
        echo = choice.echo and first  # the prompt goes in a choice's first chunk
        if echo:
            text = tokenizer.decode(choice.prompt_ids) + text
        body: dict[str, Any] = {"index": choice.index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if req.logprobs is not None and (token_ids or echo):
            body["logprobs"] = choice_logprobs(tokenizer, choice, len(token_ids), echo)
    else:
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        body = {"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        if req.logprobs is not None and token_ids:
            n = len(token_ids)
            body["logprobs"] = chat_logprobs(tokenizer, token_ids, choice.logprobs[-n:], choice.top_logprobs[-n:])
    if req.return_token_ids:
        body["token_ids"] = token_ids
        if first or finish_reason is not None:
            body["prompt_token_ids"] = choice.prompt_ids
    return {
        "id": ("cmpl-" if req.kind == "completion" else "chatcmpl-") + req.request_id,
        "object": "text_completion" if req.kind == "completion" else "chat.completion.chunk",
        "created": req.created,
        "model": model,
        "choices": [body],
    }


def usage_chunk(req: ParsedRequest, model: str, choices: list[ChoiceState]) -> dict:
    return {
        "id": ("cmpl-" if req.kind == "completion" else "chatcmpl-") + req.request_id,
        "object": "text_completion" if req.kind == "completion" else "chat.completion.chunk",
        "created": req.created,
        "model": model,
        "choices": [],
        "usage": usage(choices, req.n),
    }


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
