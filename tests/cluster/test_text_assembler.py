"""The streamed text of a choice, token by token, must add up to what the tokenizer decodes from all its ids at once
(cut at the first stop string), whatever the ids: byte-fallback pieces that make up one character over several
tokens, control ids that decode to nothing, spaces at the start. The assembler decodes a window of recent ids, not
every id each time, so this is the check that the window never drifts from the whole."""

from __future__ import annotations

import random

import pytest

from cluster.openai_response import TextAssembler
from shards.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(checkpoint_factory):
    return Tokenizer(checkpoint_factory("mixtral", seed=3))


def random_ids(rng: random.Random, n: int) -> list[int]:
    # Mistral's vocabulary: 0-2 control, 3-258 the bytes <0x00>..<0xFF>, then pieces
    return [rng.choice([rng.randrange(0, 3), rng.randrange(3, 259), rng.randrange(259, 32000)]) for _ in range(n)]


def streamed(tokenizer: Tokenizer, ids: list[int], stop: tuple[str, ...]) -> str:
    assembler = TextAssembler(tokenizer, stop)
    out = ""
    for i in ids:
        out += assembler.add(i)
        if assembler.stopped:
            return out
    return out + assembler.finish()


@pytest.mark.parametrize("stop", [(), ("ab",), ("\n", "the ")])
def test_streamed_text_is_the_whole_decode_cut_at_the_first_stop(tokenizer, stop):
    for seed in range(150):
        ids = random_ids(random.Random(seed), random.Random(seed + 1000).randrange(1, 60))
        whole = tokenizer.decode(ids)
        cuts = [at for at in (whole.find(s) for s in stop) if at != -1]
        assert streamed(tokenizer, ids, stop) == (whole[: min(cuts)] if cuts else whole), (seed, ids)


def test_a_character_split_over_byte_tokens_comes_out_whole_once_complete(tokenizer):
    ids = tokenizer.encode("naïve café ☕", bos=False)
    assembler = TextAssembler(tokenizer, ())
    pieces = [assembler.add(i) for i in ids]
    assert "".join(pieces) + assembler.finish() == "naïve café ☕"
    assert all("\ufffd" not in p for p in pieces)
