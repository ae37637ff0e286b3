"""A model's tokenizer without torch: `tokenizers` for the vocabulary, jinja2 for the chat template.

The gateway tokenizes every request but holds no model, and importing transformers loads torch, so
a model folder that carries `tokenizer.json` (every fast tokenizer saved by transformers, and the
built-in pair) is read here; anything else (a hub id, a bare GGUF file) goes through transformers.
Chat templates render in the same sandboxed jinja2 environment transformers uses.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any


class Tokenizer:
    def __init__(self, folder: Path):
        from tokenizers import Tokenizer as Backend

        self.backend = Backend.from_file(str(folder / "tokenizer.json"))
        config_path = folder / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.exists() else {}
        template = folder / "chat_template.jinja"
        self.chat_template = template.read_text() if template.exists() else self.config.get("chat_template")
        self.added = self.backend.get_added_tokens_decoder()  # id -> AddedToken

    def _token(self, name: str) -> str | None:
        value = self.config.get(name)
        return value.get("content") if isinstance(value, dict) else value

    @property
    def eos_token(self) -> str | None:
        return self._token("eos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self.backend.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def special_ids(self) -> list[int]:
        return sorted(i for i, t in self.added.items() if t.special)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def _template(self):
        """The chat template, compiled once (compiling it took longer than tokenizing a prompt)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        return _environment().from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = True,
                            **_: Any) -> list[int] | str:
        text = self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
            bos_token=self._token("bos_token") or "", eos_token=self.eos_token or "")
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _environment():
    """The jinja2 environment transformers renders chat templates in."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def load_tokenizer(path: str):
    """The tokenizer of a model folder (without torch when it carries tokenizer.json), a hub id, or
    a bare GGUF file."""
    from specserve.runtime import find_gguf

    p = Path(path)
    if p.is_dir() and (p / "tokenizer.json").exists():
        return Tokenizer(p)
    from transformers import AutoTokenizer

    gguf = find_gguf(path)
    if gguf is not None:
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return AutoTokenizer.from_pretrained(path)


def fingerprint(tokenizer) -> str:
    """A stable hash of the vocabulary, the special tokens and the end-of-sequence id: equal
    fingerprints mean equal token ids. Computed alike from a Tokenizer and a transformers one."""
    vocab = sorted(tokenizer.get_vocab().items())
    if isinstance(tokenizer, Tokenizer):
        special = tokenizer.special_ids
    else:
        special = sorted(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    payload = repr((vocab, special, tokenizer.eos_token_id)).encode()
    return hashlib.sha256(payload).hexdigest()[:16]
