"""Sentencepiece tokenizer from the checkpoint's `tokenizer.model`, with BOS and the instruct chat format as Mistral
does them."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from shards.config import ConfigError

ROLES = ("system", "user", "assistant")


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / "tokenizer.model"
        if not self.path.is_file():
            raise ConfigError(f"tokenizer file {str(self.path)!r} does not exist")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise ConfigError(f"{self.path}: not a sentencepiece model ({e})") from None
        self._chat = None
        self._vocab_size = self.sp.vocab_size()

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids: list[int]) -> str:
        n = self._vocab_size
        return self.sp.decode([i for i in ids if 0 <= i < n])

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """`[INST] user [/INST] assistant</s>[INST] ...` through mistral-common's instruct tokenizer.

        Raises ConfigError naming the message index for a malformed conversation.
        """
        # The instruct tokenizer and its pydantic models take ~0.3 s to import, and only chat needs them: plain
        # encoding (the CLI, the benchmarks) does without.
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
        from mistral_common.protocol.instruct.request import ChatCompletionRequest
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        if self._chat is None:
            self._chat = MistralTokenizer.from_file(str(self.path))
        kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
        parsed = []
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in kinds:
                raise ConfigError(f"messages[{i}].role is {role!r}; expected one of {list(ROLES)}")
            if not isinstance(content, str):
                raise ConfigError(f"messages[{i}].content must be a string")
            parsed.append(kinds[role](content=content))
        try:
            return list(self._chat.encode_chat_completion(ChatCompletionRequest(messages=parsed)).tokens)
        except (MistralCommonException, ValueError) as e:
            raise ConfigError(f"messages: {e}") from None
