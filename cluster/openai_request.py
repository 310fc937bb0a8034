"""OpenAI requests at the edge: strict JSON, then every field checked into a `ParsedRequest`.

Pure functions, no Ray and no HTTP server, so every rule can be tested on its own. Every error names the offending
field (`param`) and becomes a 4xx with an OpenAI error body, never a 500.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from cluster.openai_errors import APIError
from router.sampling import SamplingParams
from router.structured_output import StructuredOutput, StructuredOutputError, check_schema
from shards.config import ConfigError

MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 5
MAX_LOGIT_BIAS = 300  # OpenAI's own limit on logit_bias entries

# Every field a route reads. Anything else is a 400 naming it, except the fields OpenAI documents as informational
# (they change no token of the answer). No field is accepted and silently ignored.
SAMPLING_FIELDS = frozenset(
    {
        "model",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "n",
        "stream",
        "stream_options",
        "return_token_ids",
        "ignore_eos",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logit_bias",
        "response_format",
        "best_of",
    }
)
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "logprobs", "echo"}
CHAT_FIELDS = SAMPLING_FIELDS | {
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
}
INFORMATIONAL_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})


def bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, f"{param}: {message}" if param else message, param=param, code=code)


def _no_constant(name: str) -> None:
    raise APIError(400, f"the request body is not valid JSON: {name} is not a JSON number", code="invalid_json")


def parse_json(raw: bytes) -> dict[str, Any]:
    """Strict JSON (RFC 8259): UTF-8, no NaN/Infinity, no unpaired surrogate escapes; any failure is a 400."""
    try:
        text = raw.decode("utf-8")
        data = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # bad syntax or UTF-8, an integer of over 4300 digits, deep nesting
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    if re.search(r"\\u[dD][89a-fA-F]", text):  # a surrogate escape; only a pair makes a character
        try:
            json.dumps(data, ensure_ascii=False).encode()
        except (UnicodeEncodeError, RecursionError):
            raise APIError(
                400,
                "the request body is not valid JSON: a \\u escape is an unpaired UTF-16 surrogate",
                code="invalid_json",
            ) from None
    return data


# --- field checks --------------------------------------------------------------------------------------


def _int(data: dict, key: str, default: int | None, low: int | None = None, high: int | None = None) -> int | None:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise bad(key, f"must be an integer, got {json.dumps(value)}")
    if low is not None and value < low:
        raise bad(key, f"must be at least {low}, got {value}")
    if high is not None and value > high:
        raise bad(key, f"must be at most {high}, got {value}")
    return value


def _number(data: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(key, f"must be a number, got {json.dumps(value)}")
    if value < low or (low_open and value == low) or value > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise bad(key, f"must be in {interval}, got {value}")
    return float(value)


def _bool(data: dict, key: str, default: bool) -> bool:
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(key, f"must be true or false, got {json.dumps(value)}")
    return value


def _stop(data: dict) -> tuple[str, ...]:
    value = data.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad("stop", "must be a string or a list of strings")
    if len(value) > MAX_STOP_STRINGS:
        raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(value)}")
    if any(s == "" for s in value):
        raise bad("stop", "stop strings must not be empty")
    return tuple(value)


@dataclass
class Limits:
    """What the server accepts; the edges reject more with a 400 naming the field."""

    max_seq_len: int
    max_tokens_ceiling: int | None = None
    max_prompt_tokens: int | None = None
    max_n: int = 8
    max_prompts: int = 64


@dataclass
class ParsedRequest:
    kind: str  # "completion" or "chat"
    model: str | None
    prompts: list[list[int]]  # token ids, one per prompt
    max_tokens: int | None  # None: until the context is full; 0 (only with echo): the prompt alone
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    return_token_ids: bool
    logprobs: int | None  # completions: top alternatives per token; chat: 0 means only the chosen token's
    echo: bool = False
    # An unseeded request still gets a seed, chosen here at the edge: then a replay after a crash draws the same.
    base_seed: int = field(default_factory=lambda: int.from_bytes(os.urandom(7), "big"))
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    def params_for(self, prompt_ids: list[int], choice: int, max_seq_len: int) -> SamplingParams:
        """Choice j of a request with a seed draws with seed + j, so `n` choices differ yet repeat exactly."""
        p = self.params
        max_tokens = self.max_tokens if self.max_tokens is not None else max_seq_len - len(prompt_ids)
        seed = (self.base_seed if p.seed is None else p.seed) + choice
        return replace(p, max_tokens=max_tokens, seed=seed, logprobs=self.logprobs)


def _logit_bias(data: dict, vocab_size: int) -> tuple[tuple[int, float], ...]:
    value = data.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise bad("logit_bias", "must be an object mapping token ids (as strings) to a bias in [-100, 100]")
    if len(value) > MAX_LOGIT_BIAS:
        raise bad("logit_bias", f"has {len(value)} entries, more than the limit of {MAX_LOGIT_BIAS}")
    entries = []
    for key, bias in value.items():
        if not re.fullmatch(r"\d{1,9}", key) or int(key) >= vocab_size:
            raise bad("logit_bias", f"key {key!r} is not a token id in [0, {vocab_size})")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise bad("logit_bias", f"the bias of token {key} must be a number in [-100, 100], got {json.dumps(bias)}")
        entries.append((int(key), float(bias)))
    return tuple(sorted(entries))


def _response_format(data: dict) -> StructuredOutput | None:
    value = data.get("response_format")
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise bad("response_format", "must be an object with a type: text, json_object or json_schema")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind != "json_schema":
        raise bad("response_format.type", f"must be text, json_object or json_schema, got {json.dumps(kind)}")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise bad("response_format.json_schema", "must be an object with a name and a schema (a JSON Schema object)")
    schema = spec.get("schema", {"type": "object"})
    structured = StructuredOutput.json_schema(schema)
    try:
        check_schema(structured)
    except StructuredOutputError as e:
        raise bad("response_format.json_schema.schema", f"cannot be enforced: {e}") from None
    return structured


def _sampling(data: dict, max_tokens: int | None, vocab_size: int) -> SamplingParams:
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("seed", f"must be an integer, got {json.dumps(seed)}")
    structured = _response_format(data)
    ignore_eos = _bool(data, "ignore_eos", False)
    if structured is not None and ignore_eos:
        raise bad("ignore_eos", "cannot be true with a response_format: the output ends where the format ends")
    return SamplingParams(
        max_tokens=max_tokens or 1,
        temperature=_number(data, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(data, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=_int(data, "top_k", 0, low=-1) if data.get("top_k") != -1 else 0,
        seed=seed,
        stop=_stop(data),
        ignore_eos=ignore_eos,
        presence_penalty=_number(data, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(data, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_number(data, "repetition_penalty", 1.0, 0.0, 2.0, low_open=True),
        min_p=_number(data, "min_p", 0.0, 0.0, 1.0),
        logit_bias=_logit_bias(data, vocab_size),
        structured=structured,
    )


def _known_fields(data: dict, kind: str) -> None:
    """A field the route does not read is a 400 naming it, so nothing that would change the answer is dropped."""
    known = COMPLETION_FIELDS if kind == "completion" else CHAT_FIELDS
    for key in data:
        if key not in known and key not in INFORMATIONAL_FIELDS:
            raise bad(key, f"is not supported by /v1/{'completions' if kind == 'completion' else 'chat/completions'}")
    if kind == "chat":
        tools, choice = data.get("tools"), data.get("tool_choice")
        if tools:  # function calling in Mistral's format is not implemented: refuse rather than answer without
            raise bad("tools", "function calling is not supported yet; leave tools out")
        if choice not in (None, "none", "auto"):
            raise bad("tool_choice", f"must be none or auto without tools, got {json.dumps(choice)}")


def _common(
    data: dict,
    kind: str,
    prompts: list[list[int]],
    limits: Limits,
    max_tokens_key: str,
    default_max_tokens: int | None,
    vocab_size: int,
) -> ParsedRequest:
    _known_fields(data, kind)
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"must be a string, got {json.dumps(model)}")
    ceiling = limits.max_tokens_ceiling
    if ceiling is not None:  # a request that leaves max_tokens out gets no more than the ceiling either
        default_max_tokens = min(default_max_tokens or ceiling, ceiling)
    # echo: the prompt's text (and with logprobs, its log-probabilities) before the completion; max_tokens may then be
    # 0, the prompt alone (lm-eval's loglikelihood reads the prompt's scores this way)
    echo = _bool(data, "echo", False) if kind == "completion" else False
    max_tokens = _int(data, max_tokens_key, default_max_tokens, low=0 if echo else 1, high=ceiling)
    if kind == "chat" and "max_completion_tokens" in data and "max_tokens" not in data:
        max_tokens = _int(data, "max_completion_tokens", default_max_tokens, low=1, high=ceiling)
    n = _int(data, "n", 1, low=1, high=limits.max_n)
    if len(prompts) * n > limits.max_prompts:
        raise bad("n", f"{len(prompts)} prompts x n={n} is more than {limits.max_prompts} choices in one request")
    stream = _bool(data, "stream", False)
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options", "must be an object")
    include_usage = _bool(options or {}, "include_usage", False)
    if options is not None and not stream:
        raise bad("stream_options", "is only allowed when stream is true")
    for i, ids in enumerate(prompts):
        where = "messages" if kind == "chat" else ("prompt" if len(prompts) == 1 else f"prompt[{i}]")
        if limits.max_prompt_tokens and len(ids) > limits.max_prompt_tokens:
            raise bad(where, f"has {len(ids)} tokens, more than the limit of {limits.max_prompt_tokens}")
        if len(ids) >= limits.max_seq_len:  # the prompt alone leaves no room: its own fault, whatever max_tokens is
            raise bad(
                where,
                f"has {len(ids)} tokens: with one token to generate that is over the model's context limit of "
                f"{limits.max_seq_len} tokens",
                code="context_length_exceeded",
            )
        needed = len(ids) + (max_tokens or 1)
        if needed > limits.max_seq_len:
            raise bad(
                max_tokens_key if max_tokens else where,
                f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens or 1}: {needed} is over the "
                f"model's context limit of {limits.max_seq_len} tokens",
                code="context_length_exceeded",
            )
    params = _sampling(data, max_tokens, vocab_size)
    logprobs = None
    if kind == "completion":
        logprobs = _int(data, "logprobs", None, low=0, high=MAX_LOGPROBS)
    else:
        if _bool(data, "logprobs", False):
            logprobs = _int(data, "top_logprobs", 0, low=0, high=MAX_LOGPROBS)
        elif data.get("top_logprobs") is not None:
            raise bad("top_logprobs", "requires logprobs to be true")
    best_of = data.get("best_of")
    if best_of is not None and best_of != n:
        raise bad("best_of", "is not supported (leave it out or equal to n)")
    return ParsedRequest(
        kind,
        model,
        prompts,
        max_tokens,
        params,
        n,
        stream,
        include_usage,
        _bool(data, "return_token_ids", False),
        logprobs,
        echo,
    )


def parse_completion(data: dict, tokenizer, limits: Limits) -> ParsedRequest:
    if "prompt" not in data:
        raise bad("prompt", "is required")
    prompt = data["prompt"]
    if isinstance(prompt, str):
        texts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        texts = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        texts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        texts = prompt
    else:
        raise bad("prompt", "must be a non-empty string, a list of strings, or token ids")
    prompts = []
    for i, p in enumerate(texts):
        where = "prompt" if len(texts) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            if not p:
                raise bad(where, "must not be empty")
            prompts.append(tokenizer.encode(p))
        else:
            if not p or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < tokenizer.vocab_size for t in p
            ):
                raise bad(where, f"token ids must be a non-empty list of integers in [0, {tokenizer.vocab_size})")
            prompts.append(list(p))
    if len(prompts) > limits.max_prompts:
        raise bad("prompt", f"{len(prompts)} prompts is more than the limit of {limits.max_prompts}")
    return _common(data, "completion", prompts, limits, "max_tokens", 16, tokenizer.vocab_size)


def parse_chat(data: dict, tokenizer, limits: Limits) -> ParsedRequest:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list of {role, content} objects")
    flat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", "must be an object with role and content")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text parts are understood
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"messages[{i}].content[{j}]", "only parts of type 'text' are supported")
                parts.append(part["text"])
            content = "".join(parts)
        for key, value in m.items():  # a reply echoed back by a client may carry empty fields: those change nothing
            if key not in ("role", "content") and value not in (None, "", [], {}):
                raise bad(f"messages[{i}].{key}", "is not supported (tool calls and participant names are not)")
        if m.get("role") not in ("system", "user", "assistant"):
            raise bad(f"messages[{i}].role", f"must be system, user or assistant, got {json.dumps(m.get('role'))}")
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", "must be a string or a list of text parts")
        flat.append({"role": m["role"], "content": content})
    try:
        ids = tokenizer.encode_chat(flat)
    except ConfigError as e:
        raise bad("messages", str(e)) from None
    return _common(data, "chat", [ids], limits, "max_tokens", None, tokenizer.vocab_size)
