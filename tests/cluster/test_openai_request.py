"""Request parsing names the field at fault: a prompt too long by itself is the prompt's fault, a prompt that fits
but leaves too little room for max_tokens is max_tokens' (a 400 with `context_length_exceeded` either way)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cluster.openai_errors import APIError
from cluster.openai_request import Limits, parse_completion

LIMITS = Limits(max_seq_len=16)
TOKENIZER = SimpleNamespace(vocab_size=32000)  # prompts are given as token ids: only the vocabulary size is read


def error_of(data: dict) -> APIError:
    with pytest.raises(APIError) as caught:
        parse_completion(data, tokenizer=TOKENIZER, limits=LIMITS)
    return caught.value


def test_a_prompt_longer_than_the_context_names_the_prompt():
    e = error_of({"prompt": list(range(1, 17)), "max_tokens": 4})
    assert (e.status, e.param, e.code) == (400, "prompt", "context_length_exceeded")
    assert (
        e.message
        == "prompt: has 16 tokens: with one token to generate that is over the model's context limit of 16 tokens"
    )


def test_a_prompt_that_fits_with_too_many_new_tokens_names_max_tokens():
    e = error_of({"prompt": list(range(1, 11)), "max_tokens": 8})
    assert (e.status, e.param, e.code) == (400, "max_tokens", "context_length_exceeded")
    assert "the prompt has 10 tokens and max_tokens is 8: 18 is over the model's context limit of 16" in e.message


def test_a_prompt_that_fits_with_its_new_tokens_parses():
    req = parse_completion({"prompt": list(range(1, 11)), "max_tokens": 6}, tokenizer=TOKENIZER, limits=LIMITS)
    assert req.prompts == [list(range(1, 11))]


def test_max_tokens_0_is_the_prompt_alone_with_echo_and_refused_without():
    req = parse_completion({"prompt": [1, 2, 3], "max_tokens": 0, "echo": True}, tokenizer=TOKENIZER, limits=LIMITS)
    assert req.echo and req.max_tokens == 0
    e = error_of({"prompt": [1, 2, 3], "max_tokens": 0})
    assert (e.status, e.param) == (400, "max_tokens") and "must be at least 1" in e.message
