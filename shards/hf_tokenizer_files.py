"""Hugging Face tokenizer files written from the checkpoint's sentencepiece model, so that tools which call
`AutoTokenizer.from_pretrained(checkpoint)` (guidellm, lm-eval, aiperf) count and build prompts with our token ids.

`tokenizer.json` is the sentencepiece BPE model restated for the `tokenizers` library: the same pieces as its vocab,
and merges derived from the pieces' scores (sentencepiece merges the adjacent pair whose joined piece scores highest;
a BPE merge list ranked by that score does the same). `tokenizer_config.json` carries a chat template that renders
the instruct format `shards.tokenizer.Tokenizer.encode_chat` encodes. Needs sentencepiece's own protobuf module only,
not transformers.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2

from shards.config import ConfigError

SPACE = "▁"  # sentencepiece's visible space (U+2581)
PIECE = sentencepiece_model_pb2.ModelProto.SentencePiece  # its Type values: NORMAL, CONTROL, BYTE, ...
SPECIAL_TYPES = (PIECE.UNKNOWN, PIECE.CONTROL)  # pieces text never produces: added tokens in tokenizer.json
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# mistral-common's v1 instruct format, which `encode_chat` uses: the system messages, joined by a blank line, go in
# front of the first user message; runs of messages of one role are joined by a blank line (a system message ends a
# run); a conversation that does not open with a user turn gets an empty one. Each turn is its own sentencepiece call,
# `[INST] {text} [/INST]` for a user and `{text}` then </s> for the assistant, so each starts with sentencepiece's
# prefixed space: the normalizer gives it to text right after <s> or </s>, and the template writes it everywhere else.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='', turns=[], role=none, parts=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('message roles are system, user and assistant; got ' ~ message['role']) -}}"
    "{%- endif -%}"
    "{%- if message['role'] != ns.role -%}"
    "{%- if ns.role in ['user', 'assistant'] -%}"
    "{%- set ns.turns = ns.turns + [{'role': ns.role, 'content': ns.parts | join('\\n\\n')}] -%}"
    "{%- endif -%}"
    "{%- set ns.role = message['role'] -%}"
    "{%- set ns.parts = [] -%}"
    "{%- endif -%}"
    "{%- if message['content'] -%}"
    "{%- set ns.parts = ns.parts + [message['content']] -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = ns.system ~ ('\\n\\n' if ns.system else '') ~ message['content'] -%}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.role in ['user', 'assistant'] -%}"
    "{%- set ns.turns = ns.turns + [{'role': ns.role, 'content': ns.parts | join('\\n\\n')}] -%}"
    "{%- endif -%}"
    "{%- if not ns.turns or ns.turns[0]['role'] != 'user' -%}"
    "{%- set ns.turns = [{'role': 'user', 'content': ''}] + ns.turns -%}"
    "{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for turn in ns.turns -%}"
    "{%- if turn['role'] == 'user' -%}"
    "{{- ' ' if not loop.first and loop.previtem['role'] == 'user' else '' -}}"
    "{{- '[INST] ' ~ (ns.system ~ '\\n\\n' if loop.first and ns.system else '') ~ turn['content'] ~ ' [/INST]' -}}"
    "{%- else -%}"
    "{{- ' ' ~ turn['content'] ~ eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def write_hf_tokenizer_files(out_dir: str | Path, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json next to `out_dir/tokenizer.model`."""
    out = Path(out_dir)
    source = out / "tokenizer.model"
    try:
        model = source.read_bytes()
    except OSError as e:
        raise ConfigError(f"{source}: cannot be read ({e.strerror})") from None
    proto = read_sentencepiece_model(model, str(source))
    _check_supported(proto, str(source))
    spec = proto.trainer_spec
    special = {p.piece: _added_token(i, p.piece) for i, p in enumerate(proto.pieces) if p.type in SPECIAL_TYPES}

    def token_entry(piece: str) -> dict:
        return {k: v for k, v in special[piece].items() if k not in ("id", "special")}

    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": spec.bos_piece,
        "eos_token": spec.eos_piece,
        "unk_token": spec.unk_piece,
        "pad_token": None,
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in special.values()},
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        # The slow LlamaTokenizer's name for what tokenizer.json does: a space before the text after a special token.
        "legacy": True,
        "model_max_length": model_max_length,
        "spaces_between_special_tokens": False,
    }
    special_map = {f"{name}_token": token_entry(getattr(spec, f"{name}_piece")) for name in ("bos", "eos", "unk")}
    texts = {
        "tokenizer.json": _tokenizer_json_text(model),
        "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special_map, ensure_ascii=False, indent=2) + "\n",
    }
    for name, text in texts.items():
        (out / name).write_text(text, encoding="utf-8")


def read_sentencepiece_model(model: bytes, source: str) -> sentencepiece_model_pb2.ModelProto:
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model)
    except DecodeError as e:
        raise ConfigError(f"{source}: not a sentencepiece model ({e})") from None
    return proto


@lru_cache(maxsize=2)
def _tokenizer_json_text(model: bytes) -> str:
    """Cached: every checkpoint `make_checkpoint` writes (a test session makes dozens) has the same model."""
    return json.dumps(tokenizer_json(read_sentencepiece_model(model, "tokenizer.model")), ensure_ascii=False) + "\n"


def tokenizer_json(proto: sentencepiece_model_pb2.ModelProto) -> dict:
    """The `tokenizers` serialization of a sentencepiece BPE model `_check_supported` accepts: the same ids, the
    same segmentation."""
    pieces = [(p.piece, p.type) for p in proto.pieces]
    normalizers = [{"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]
    decoders = [
        {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if proto.normalizer_spec.add_dummy_prefix:
        normalizers.insert(0, {"type": "Prepend", "prepend": SPACE})
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    spec = proto.trainer_spec
    bos = spec.bos_piece
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(i, piece) for i, (piece, kind) in enumerate(pieces) if kind in SPECIAL_TYPES],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [spec.bos_id], "tokens": [bos]}},
        },
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": spec.unk_piece,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": spec.byte_fallback,
            "ignore_merges": False,
            "vocab": {piece: i for i, (piece, _) in enumerate(pieces)},
            "merges": bpe_merges(proto),
        },
    }


def bpe_merges(proto: sentencepiece_model_pb2.ModelProto) -> list[list[str]]:
    """Every split of a text piece into two text pieces, the best-scoring joined piece first.

    Only text pieces take part: sentencepiece never builds <s>, <unk> or a <0x..> byte piece out of text.
    """
    scores = [p.score for p in proto.pieces]
    text_pieces = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == PIECE.NORMAL}
    ranked = []
    for piece, piece_id in text_pieces.items():
        for cut in range(1, len(piece)):
            left_id, right_id = text_pieces.get(piece[:cut]), text_pieces.get(piece[cut:])
            if left_id is not None and right_id is not None:
                ranked.append((-scores[piece_id], piece_id, left_id, [piece[:cut], piece[cut:]]))
    ranked.sort(key=lambda r: r[:3])
    return [merge for *_, merge in ranked]


def _added_token(token_id: int, piece: str) -> dict:
    # Matched in the raw text and special, as a Mistral tokenizer.json declares <unk>, <s> and </s>.
    return {
        "id": token_id,
        "content": piece,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def _check_supported(proto: sentencepiece_model_pb2.ModelProto, source: str) -> None:
    """The sentencepiece features the restatement covers; with any other the ids would differ silently."""
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(spec.model_type)
        raise ConfigError(f"{source}: a {kind} sentencepiece model; only BPE models get Hugging Face tokenizer files")
    user_defined = [p.piece for p in proto.pieces if p.type == PIECE.USER_DEFINED]
    if user_defined:
        raise ConfigError(f"{source}: user-defined pieces such as {user_defined[0]!r} are not supported")
    if norm.remove_extra_whitespaces or norm.precompiled_charsmap or not norm.escape_whitespaces:
        raise ConfigError(
            f"{source}: its normalizer {norm.name!r} rewrites the text; only the identity normalizer is supported"
        )
    if min(spec.unk_id, spec.bos_id, spec.eos_id) < 0:
        raise ConfigError(f"{source}: the model needs <unk>, <s> and </s> pieces")
