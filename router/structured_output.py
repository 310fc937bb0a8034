"""Structured output: a JSON schema (or "any JSON object") enforced token by token with xgrammar.

The grammar is compiled once per schema against the checkpoint's vocabulary and cached; each constrained sequence
has a matcher that masks the logits before sampling. The matcher is rebuilt from the sequence's output tokens
whenever it lags behind them, so a request resumed after a crash (prompt + tokens already emitted) continues
under the same constraint with no state carried across.

JSON is generated compact (no free whitespace): with free whitespace a weak or random model can emit spaces until
max_tokens runs out, and the answer would never parse.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

JSON_OBJECT_SCHEMA = '{"type": "object"}'


class StructuredOutputError(ValueError):
    """A schema xgrammar cannot compile; the message names what is wrong."""


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must be: `kind` "json_object" (any JSON object) or "json_schema" (`schema`, a
    JSON Schema as canonical JSON text, so equal schemas share one compiled grammar)."""

    kind: str
    schema: str = JSON_OBJECT_SCHEMA

    def __post_init__(self) -> None:
        if self.kind not in ("json_object", "json_schema"):
            raise ValueError(f"structured output kind must be json_object or json_schema, got {self.kind!r}")

    @staticmethod
    def json_schema(schema: dict) -> StructuredOutput:
        return StructuredOutput("json_schema", json.dumps(schema, sort_keys=True, separators=(",", ":")))


def check_schema(spec: StructuredOutput) -> None:
    """Raise StructuredOutputError if xgrammar cannot turn the schema into a grammar (no vocabulary needed): the
    edge calls it so a bad schema is a 400 before the request is accepted."""
    import xgrammar as xgr  # a compiled extension: loaded only when a request asks for structured output

    try:
        xgr.Grammar.from_json_schema(spec.schema, any_whitespace=False)
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError/its own types; all are the schema's fault
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StructuredOutputError(first) from None


class Grammars:
    """Compiled grammars for one vocabulary (a sentencepiece `tokenizer.model`), cached by schema text."""

    def __init__(self, tokenizer_path: str | Path) -> None:
        import sentencepiece as spm
        import xgrammar as xgr

        path = Path(tokenizer_path)
        if path.is_dir():
            path = path / "tokenizer.model"
        sp = spm.SentencePieceProcessor(model_file=str(path))
        pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
        # Mistral's sentencepiece model falls back to <0xNN> byte pieces and marks word starts with "▁".
        self.info = xgr.TokenizerInfo(
            pieces,
            xgr.VocabType.BYTE_FALLBACK,
            vocab_size=sp.vocab_size(),
            stop_token_ids=[sp.eos_id()],
            add_prefix_space=True,
        )
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self._lock = threading.Lock()  # the router samples on its loop thread; compiling may come from another

    def compiled(self, spec: StructuredOutput):
        with self._lock:
            return self.compiler.compile_json_schema(spec.schema, any_whitespace=False)

    def constraint(self, spec: StructuredOutput) -> GrammarConstraint:
        return GrammarConstraint(self.compiled(spec), self.info.vocab_size)


@lru_cache(maxsize=4)
def grammars_for(tokenizer_path: str) -> Grammars:
    """One `Grammars` per tokenizer file in this process."""
    return Grammars(tokenizer_path)


class GrammarConstraint:
    """One sequence's matcher: masks the logits to the tokens the grammar allows next."""

    def __init__(self, compiled, vocab_size: int) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.compiled = compiled
        self.vocab_size = vocab_size
        self.matcher = xgr.GrammarMatcher(compiled)
        self.accepted = 0  # output tokens the matcher has consumed
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def catch_up(self, output_ids: list[int]) -> None:
        """Feed the matcher the output tokens it has not seen (all of them for a resumed request)."""
        if self.accepted > len(output_ids):  # the sequence was rewound: start over
            self.matcher = self._xgr.GrammarMatcher(self.compiled)
            self.accepted = 0
        for token in output_ids[self.accepted :]:
            if not self.matcher.accept_token(int(token)):
                raise RuntimeError(f"token {token} breaks the response format's grammar")
            self.accepted += 1

    def mask(self, logits: torch.Tensor, output_ids: list[int]) -> torch.Tensor:
        """`logits` (vocab,) with every token the grammar forbids after `output_ids` set to -inf (a copy)."""
        self.catch_up(output_ids)
        masked = logits.float().clone()
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self._xgr.apply_token_bitmask_inplace(masked[None, : self.vocab_size], self.bitmask, vocab_size=self.vocab_size)
        masked[self.vocab_size :] = -torch.inf  # rows past the tokenizer's vocabulary (a padded embedding)
        return masked
