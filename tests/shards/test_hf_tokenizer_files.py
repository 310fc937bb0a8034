"""The Hugging Face tokenizer files in a made checkpoint: `transformers.AutoTokenizer` on the directory gives the
token ids, text and chat prompts that `shards.tokenizer` gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sentencepiece import sentencepiece_model_pb2

from shards.config import ConfigError
from shards.hf_tokenizer_files import (
    HF_TOKENIZER_FILES,
    bpe_merges,
    read_sentencepiece_model,
    write_hf_tokenizer_files,
)
from shards.make_checkpoint import mistral_tokenizer_file
from shards.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]

TEXTS = {
    "ascii": "The quick brown fox jumps over the lazy dog.",
    "leading space": " leading",
    "leading spaces": "   three leading",
    "trailing spaces": "trailing  ",
    "inner runs of spaces": "a  b   c" + " " * 20 + "d",
    "only spaces": "    ",
    "newlines and tabs": "line one\nline two\n\n\tindented\r\n",
    "digits": "3.14159 and 2024-06-01, 1,000,000",
    "accents": "café naïve façade Ångström",
    "cjk": "日本語のテキストと中文文本",
    "emoji (byte fallback)": "launch 🚀🤖 now 🫠",
    "instruct markers": "[INST] not a control token [/INST]",
    "code": "def f(x):\n    return {'a': [x, x ** 2]}  # ok",
    "empty": "",
}

CONVERSATIONS = {
    "user only": [{"role": "user", "content": "Hello there"}],
    "multi-turn": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And times 3?"},
    ],
    "system and user": [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
    ],
    "system, then a multi-turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": " Hello! "},
        {"role": "user", "content": "日本語で？\n"},
    ],
    "two system messages": [
        {"role": "system", "content": "One."},
        {"role": "user", "content": "U"},
        {"role": "system", "content": "Two."},
        {"role": "user", "content": "V"},
    ],
    "two user messages in a row": [{"role": "user", "content": "part one"}, {"role": "user", "content": "part two"}],
    "system only": [{"role": "system", "content": "Say hi."}],
    "assistant before the first user": [
        {"role": "system", "content": "S"},
        {"role": "assistant", "content": "I start."},
        {"role": "user", "content": "Go on"},
    ],
}


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    return checkpoint_factory("mixtral")


@pytest.fixture(scope="module")
def ours(checkpoint):
    return Tokenizer(checkpoint)


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


def test_the_checkpoint_loads_as_a_fast_tokenizer_with_mistral_special_tokens(checkpoint, hf):
    from transformers import PreTrainedTokenizerFast

    assert all((checkpoint / name).is_file() for name in HF_TOKENIZER_FILES)
    assert isinstance(hf, PreTrainedTokenizerFast) and hf.is_fast
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert len(hf) == 32000
    assert hf.model_max_length == json.loads((checkpoint / "config.json").read_text())["max_position_embeddings"]


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_text_gives_our_token_ids_with_bos(hf, ours, text):
    assert hf(text)["input_ids"] == ours.encode(text)
    assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text, bos=False)


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_decoding_gives_our_text(hf, ours, text):
    ids = ours.encode(text)
    assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids)
    assert hf.decode(ids[1:]) == ours.decode(ids)


def test_a_special_token_written_in_text_is_text_only_when_split_special_tokens_is_asked(hf, ours):
    """Ours reads "<s>" in a prompt as three characters; Hugging Face tokenizers (every Mistral one too) read it as
    the token unless told `split_special_tokens=True`: a chat template's own <s> and </s> are text as well."""
    text = "a <s> b </s> c <unk>"
    assert hf(text, split_special_tokens=True)["input_ids"] == ours.encode(text)
    assert hf(text)["input_ids"].count(ours.bos_id) == 2


@pytest.mark.parametrize("messages", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
def test_the_chat_template_gives_our_chat_token_ids(hf, ours, messages):
    assert hf.apply_chat_template(messages, tokenize=True, return_dict=False) == ours.encode_chat(messages)


def test_no_merge_builds_a_piece_sentencepiece_never_builds_from_text():
    proto = read_sentencepiece_model(mistral_tokenizer_file().read_bytes(), "v1")
    merges = bpe_merges(proto)
    built = {left + right for left, right in merges}
    assert not built & {"<s>", "</s>", "<unk>", "<0x0A>"}
    assert merges[0] == ["▁", "t"]  # "▁t" is the best-scoring piece
    assert set(merges[-1][0] + merges[-1][1]) == {"▁"}  # runs of spaces score lowest: merged last


def test_a_sentencepiece_model_other_than_bpe_is_refused_naming_the_file(tmp_path):
    proto = read_sentencepiece_model(mistral_tokenizer_file().read_bytes(), "v1")
    proto.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.UNIGRAM
    (tmp_path / "tokenizer.model").write_bytes(proto.SerializeToString())
    with pytest.raises(ConfigError, match=r"tokenizer\.model: a UNIGRAM sentencepiece model"):
        write_hf_tokenizer_files(tmp_path, model_max_length=2048)


def test_a_file_that_is_not_a_sentencepiece_model_is_named(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\xff" * 40)
    with pytest.raises(ConfigError, match=r"tokenizer\.model: not a sentencepiece model"):
        write_hf_tokenizer_files(tmp_path, model_max_length=2048)


def test_the_files_are_written_without_transformers_or_tokenizers(tmp_path):
    """The serving install has neither: only sentencepiece and its protobuf module."""
    (tmp_path / "tokenizer.model").write_bytes(mistral_tokenizer_file().read_bytes())
    script = (
        "import sys; sys.modules['transformers'] = sys.modules['tokenizers'] = None\n"
        "from shards.hf_tokenizer_files import write_hf_tokenizer_files\n"
        f"write_hf_tokenizer_files({str(tmp_path)!r}, model_max_length=2048)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert all((tmp_path / name).is_file() for name in HF_TOKENIZER_FILES)


def test_a_reference_layout_checkpoint_carries_them_too(checkpoint_factory):
    reference = checkpoint_factory("mistral", layout="reference", layers=1)
    assert all((reference / name).is_file() for name in HF_TOKENIZER_FILES)
