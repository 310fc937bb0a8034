"""The tokenizer: sentencepiece with BOS, and the Mistral instruct format."""

from __future__ import annotations

import pytest
import sentencepiece as spm

from shards.config import ConfigError
from shards.make_checkpoint import mistral_tokenizer_file
from shards.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(mistral_tokenizer_file())


def test_encode_prepends_bos_like_mistral(tok):
    sp = spm.SentencePieceProcessor(model_file=str(mistral_tokenizer_file()))
    assert tok.encode("Hello world") == [1] + sp.encode("Hello world")
    assert tok.encode("Hello world", bos=False) == sp.encode("Hello world")
    assert tok.decode(tok.encode("Hello world")) == "Hello world"


def test_chat_format_is_inst_blocks_with_eos_after_each_answer(tok):
    sp = spm.SentencePieceProcessor(model_file=str(mistral_tokenizer_file()))
    ids = tok.encode_chat(
        [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Tell me"},
        ]
    )
    expected = (
        [1] + sp.encode("[INST] Hi there [/INST]") + sp.encode("Hello!") + [2] + sp.encode("[INST] Tell me [/INST]")
    )
    assert ids == expected


def test_unknown_role_is_named(tok):
    with pytest.raises(ConfigError, match=r"messages\[1\].role is 'robot'"):
        tok.encode_chat([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])


def test_missing_tokenizer_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer.model"):
        Tokenizer(tmp_path)
