"""Structured output on the random-weight model: whatever it would say, the grammar makes the answer parse and
validate against the schema, every seed; a request resumed mid-answer goes on under the same grammar, token-exact."""

from __future__ import annotations

import json

import jsonschema
import pytest

from router.generation import generate
from router.sampling import SamplingParams
from router.structured_output import StructuredOutput, StructuredOutputError, check_schema
from shards.engine import LocalEngine
from shards.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "member"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(checkpoint_factory):
    checkpoint = checkpoint_factory("mixtral", seed=21)
    return LocalEngine(checkpoint, max_seqs=8), checkpoint


def test_every_seed_gives_json_that_validates_against_the_schema(engine):
    local, checkpoint = engine
    tokenizer = Tokenizer(checkpoint)
    prompt = tokenizer.encode("Describe a person as JSON:")
    structured = StructuredOutput.json_schema(SCHEMA)
    params = [SamplingParams(max_tokens=120, temperature=1.0, seed=s, structured=structured) for s in range(8)]
    params.append(SamplingParams(max_tokens=120, temperature=0, structured=structured, repetition_penalty=1.3))
    completions = generate(local, [prompt] * len(params), params, tokenizer_path=str(checkpoint / "tokenizer.model"))
    for c in completions:
        assert c.finish_reason == "stop" and c.token_ids[-1] == tokenizer.eos_id
        value = json.loads(tokenizer.decode(c.token_ids[:-1]))
        jsonschema.validate(value, SCHEMA)
    assert len({tuple(c.token_ids) for c in completions}) > 1  # the grammar constrains, the seeds still differ


def test_json_object_mode_gives_an_object_or_a_prefix_of_one(engine):
    local, checkpoint = engine
    tokenizer = Tokenizer(checkpoint)
    prompt = tokenizer.encode("Some JSON:")
    params = [
        SamplingParams(max_tokens=60, temperature=0.8, seed=s, structured=StructuredOutput("json_object"))
        for s in range(6)
    ]
    completions = generate(local, [prompt] * 6, params, tokenizer_path=str(checkpoint / "tokenizer.model"))
    for c in completions:
        text = tokenizer.decode([t for t in c.token_ids if t != tokenizer.eos_id])
        assert text.startswith("{")
        if c.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
    assert all(c.finish_reason in ("stop", "length") for c in completions)


def test_a_resumed_request_goes_on_under_the_grammar_token_exact(engine):
    """A router that died mid-answer: the new one gets prompt + the tokens already sent and must produce the rest
    exactly as the first would have (the grammar state is rebuilt from the tokens, not carried)."""
    from router.engine_core import EngineCore
    from router.scheduler import Scheduler, SchedulerConfig
    from router.step import StepOutput
    from router.structured_output import grammars_for

    local, checkpoint = engine
    tokenizer_path = str(checkpoint / "tokenizer.model")
    prompt = Tokenizer(checkpoint).encode("JSON please")
    params = SamplingParams(max_tokens=120, temperature=1.0, seed=7, structured=StructuredOutput.json_schema(SCHEMA))
    [whole] = generate(local, [prompt], params, tokenizer_path=tokenizer_path)
    cut = len(whole.token_ids) // 2
    config = SchedulerConfig(max_seqs=local.max_seqs).settled(local.cache_capacity)
    scheduler = Scheduler(config, local.max_seq_len, local.config.eos_token_id, lambda: grammars_for(tokenizer_path))

    async def execute(plan):
        return StepOutput.from_logits(local.step(plan))

    seq = scheduler.add(prompt, params, output_ids=whole.token_ids[:cut])
    import asyncio

    asyncio.run(EngineCore(scheduler, execute).run_until_done())
    assert seq.output_ids == whole.token_ids


def test_a_schema_xgrammar_cannot_enforce_is_refused_with_its_reason():
    with pytest.raises(StructuredOutputError):
        check_schema(StructuredOutput.json_schema({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}))
    check_schema(StructuredOutput.json_schema(SCHEMA))  # a good one passes
