"""The OpenAPI description of the HTTP routes: request bodies, responses and the API key.

The POST routes read the raw body themselves (so a bad request is an OpenAI-shaped 400, never FastAPI's 422),
which leaves FastAPI nothing to derive their schemas from; they are written out here, field by field as
`cluster/openai_request.py` accepts them, and attached to the routes with `openapi_extra`. Limits that the server
is configured with (`max_tokens_ceiling`, `max_n`, the context length) are in the descriptions, not the schema.
"""

from __future__ import annotations

import copy
from typing import Any

from cluster.openai_request import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_STOP_STRINGS

SECURITY_SCHEME = "apiKey"


def _nullable(schema: dict[str, Any], description: str) -> dict[str, Any]:
    """A field that may also be null, which the parser reads as "left out"."""
    return {"anyOf": [schema, {"type": "null"}], "description": description}


TOKEN_IDS = {
    "type": "array",
    "minItems": 1,
    "items": {"type": "integer", "minimum": 0},
    "description": "token ids, each below the tokenizer's vocabulary size",
}

COMMON_FIELDS: dict[str, Any] = {
    "model": {"type": "string", "description": "the served model's name (GET /v1/models); other names are a 400"},
    "max_tokens": _nullable(
        {"type": "integer", "minimum": 1},
        "tokens to generate; at most the server's max_tokens_ceiling, and prompt + max_tokens "
        "within the model's context",
    ),
    "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}, "0 is greedy; default 1"),
    "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}, "nucleus sampling; default 1"),
    "top_k": _nullable({"type": "integer", "minimum": -1}, "keep the k most likely tokens; 0 or -1: no cut"),
    "seed": _nullable({"type": "integer"}, "choice j of a seeded request samples with seed + j"),
    "stop": _nullable(
        {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "maxItems": MAX_STOP_STRINGS, "items": {"type": "string", "minLength": 1}},
            ]
        },
        f"up to {MAX_STOP_STRINGS} non-empty stop strings; the text is cut before the first one",
    ),
    "n": _nullable({"type": "integer", "minimum": 1}, "choices per prompt; at most the server's max_n (default 8)"),
    "stream": _nullable({"type": "boolean"}, "Server-Sent Events ending with `data: [DONE]`"),
    "stream_options": _nullable(
        {
            "type": "object",
            "properties": {"include_usage": _nullable({"type": "boolean"}, "a last chunk with the usage")},
        },
        "only with stream: true",
    ),
    "return_token_ids": _nullable({"type": "boolean"}, "each choice carries token_ids and prompt_token_ids"),
    "ignore_eos": _nullable({"type": "boolean"}, "keep generating past the end-of-sequence token"),
    "presence_penalty": _nullable(
        {"type": "number", "minimum": -2, "maximum": 2}, "subtracted from every token already in the output"
    ),
    "frequency_penalty": _nullable(
        {"type": "number", "minimum": -2, "maximum": 2}, "subtracted per occurrence of a token in the output"
    ),
    "repetition_penalty": _nullable(
        {"type": "number", "exclusiveMinimum": 0, "maximum": 2},
        "tokens of the prompt or output: logit / r when positive, logit * r otherwise; default 1",
    ),
    "min_p": _nullable(
        {"type": "number", "minimum": 0, "maximum": 1}, "drop tokens less likely than min_p times the most likely"
    ),
    "logit_bias": _nullable(
        {
            "type": "object",
            "maxProperties": MAX_LOGIT_BIAS,
            "propertyNames": {"pattern": "^[0-9]{1,9}$"},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        },
        "token id (as a string) -> bias added to its logit",
    ),
    "response_format": _nullable(
        {
            "type": "object",
            "required": ["type"],
            "properties": {
                "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
                "json_schema": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "schema": {"type": "object"},
                        "strict": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
                    },
                },
            },
        },
        "json_object or json_schema: the output is enforced token by token to parse (and match the schema)",
    ),
    **{
        name: {"description": "informational: accepted and not used"}
        for name in ("user", "metadata", "store", "service_tier", "parallel_tool_calls")
    },
    "best_of": _nullable({"type": "integer", "minimum": 1}, "only equal to n is supported"),
}

COMPLETION_REQUEST: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,  # any other field is a 400 naming it
    "required": ["prompt"],
    "properties": {
        "prompt": {
            "description": "one prompt (text or token ids) or a list of them",
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                TOKEN_IDS,
                {"type": "array", "minItems": 1, "items": TOKEN_IDS},
            ],
        },
        **COMMON_FIELDS,
        "max_tokens": _nullable(
            {"type": "integer", "minimum": 0},
            COMMON_FIELDS["max_tokens"]["description"] + "; 0 only with echo (the prompt alone)",
        ),
        "logprobs": _nullable(
            {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS},
            "log-probability of each chosen token and of this many alternatives",
        ),
        "echo": _nullable(
            {"type": "boolean"},
            "the prompt's text before the completion's, and with logprobs the prompt tokens' log-probabilities "
            "(the first token's null); streamed, they come in the first chunk",
        ),
    },
}

MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "user", "assistant"]},
        "content": {
            "anyOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["type", "text"],
                        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
                    },
                },
            ]
        },
    },
}

CHAT_REQUEST: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,  # any other field is a 400 naming it
    "required": ["messages"],
    "properties": {
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": MESSAGE,
            "description": "a conversation in the Mistral instruct format: it starts with a user or system message",
        },
        **COMMON_FIELDS,
        "max_completion_tokens": _nullable({"type": "integer", "minimum": 1}, "max_tokens under its newer name"),
        "logprobs": _nullable({"type": "boolean"}, "log-probability of each chosen token"),
        "top_logprobs": _nullable(
            {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS}, "alternatives per token; needs logprobs: true"
        ),
        "tools": _nullable({"type": "array", "maxItems": 0}, "function calling is not supported: empty or left out"),
        "tool_choice": _nullable({"type": "string", "enum": ["none", "auto"]}, "none or auto (there are no tools)"),
    },
}

# --- responses ---------------------------------------------------------------------------------------------

ERROR_BODY: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"], "description": "the request field at fault"},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        k: {"type": "integer", "minimum": 0} for k in ("prompt_tokens", "completion_tokens", "total_tokens")
    },
}

FINISH_REASON = {"type": ["string", "null"], "enum": ["stop", "length", None]}
CHOICE_TOKEN_IDS = {
    "token_ids": {"type": "array", "items": {"type": "integer"}},
    "prompt_token_ids": {"type": "array", "items": {"type": "integer"}},
}


def _completion_object(kind: str, choice: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": [kind]},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice},
            "usage": USAGE,
        },
    }


COMPLETION_RESPONSE = _completion_object(
    "text_completion",
    {
        "type": "object",
        "required": ["index", "text", "finish_reason", "logprobs"],
        "properties": {
            "index": {"type": "integer"},
            "text": {"type": "string"},
            "finish_reason": FINISH_REASON,
            "logprobs": {"type": ["object", "null"]},
            **CHOICE_TOKEN_IDS,
        },
    },
)

CHAT_RESPONSE = _completion_object(
    "chat.completion",
    {
        "type": "object",
        "required": ["index", "message", "finish_reason", "logprobs"],
        "properties": {
            "index": {"type": "integer"},
            "message": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {"role": {"type": "string", "enum": ["assistant"]}, "content": {"type": "string"}},
            },
            "finish_reason": FINISH_REASON,
            "logprobs": {"type": ["object", "null"]},
            **CHOICE_TOKEN_IDS,
        },
    },
)


# Before OpenAPI 3.2 an event stream's `schema` describes one event.
STREAM_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "a JSON chunk (`text_completion` or "
            "`chat.completion.chunk`), the usage chunk, an "
            '`{"error": ...}` object, then `[DONE]`',
        }
    },
}


def _error(description: str, retry_after: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": ERROR_BODY}}}
    if retry_after:
        out["headers"] = {
            "Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "string"}}
        }
    return out


UNAUTHORIZED = _error("missing or wrong API key (`Authorization: Bearer KEY`)")
NOT_READY = _error("the model is still loading or failed to start", retry_after=True)


def _post_operation(request: dict[str, Any], response: dict[str, Any], summary: str) -> dict[str, Any]:
    return copy.deepcopy(
        {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
            "responses": {
                "200": {
                    "description": "the completion; with stream: true, Server-Sent Events of chunks ending with "
                    "`data: [DONE]`",
                    "content": {
                        "application/json": {"schema": response},
                        "text/event-stream": {"schema": STREAM_EVENT},
                    },
                },
                "400": _error("a field is wrong (`param` names it), or the body is not a JSON object"),
                "401": UNAUTHORIZED,
                "413": _error("the body is over the server's max_body_bytes"),
                "429": _error("more than max_queued_requests are waiting for a cache slot", retry_after=True),
                "503": NOT_READY,
            },
        }
    )


COMPLETIONS_OPERATION = _post_operation(COMPLETION_REQUEST, COMPLETION_RESPONSE, "Complete a prompt")
CHAT_COMPLETIONS_OPERATION = _post_operation(CHAT_REQUEST, CHAT_RESPONSE, "Answer a conversation")

MODELS_OPERATION = copy.deepcopy(
    {
        "responses": {
            "200": {
                "description": "the served model",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["object", "data"],
                            "properties": {
                                "object": {"type": "string", "enum": ["list"]},
                                "data": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["id", "object"],
                                        "properties": {
                                            "id": {"type": "string"},
                                            "object": {"type": "string"},
                                            "owned_by": {"type": "string"},
                                            "description": {
                                                "type": "string",
                                                "description": "present when the weights are random (a benchmark)",
                                            },
                                            "max_model_len": {"type": "integer"},
                                        },
                                    },
                                },
                            },
                        }
                    }
                },
            },
            "401": UNAUTHORIZED,
            "503": NOT_READY,
        },
    }
)

HEALTH_BODY = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"type": "string", "description": "ready; otherwise why not"}},
}
HEALTH_OPERATION = copy.deepcopy(
    {
        "security": [],
        "responses": {
            "200": {
                "description": "every shard is loaded and the router answers",
                "content": {"application/json": {"schema": HEALTH_BODY}},
            },
            "503": {
                "description": "loading, failed, or the router does not answer (`error` says why)",
                "content": {"application/json": {"schema": HEALTH_BODY}},
            },
        },
    }
)
METRICS_OPERATION = {"security": []}


def openapi_document(app_document: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's document with the API key scheme: every route needs it but those marked `security: []`."""
    doc = copy.deepcopy(app_document)
    doc.setdefault("components", {})["securitySchemes"] = {
        SECURITY_SCHEME: {"type": "http", "scheme": "bearer", "description": "the server's --api-key"},
    }
    doc["security"] = [{SECURITY_SCHEME: []}]
    return doc
