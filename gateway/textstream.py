"""Incremental detokenization and stop conditions (max new tokens, EOS, stop strings).

Tokens are taken one at a time, so where a request stops depends only on its tokens, never on how
many arrived in one step: speculative and plain decoding stop at the same token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.sequence import Finish


@dataclass
class TextStream:
    tokenizer: object
    eos_ids: set[int]
    max_new_tokens: int
    stops: tuple[str, ...] = ()
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # everything decoded so far (stop string excluded once found)
    sent: int = 0  # characters of `text` already streamed
    _prefix: int = 0
    _read: int = 0

    def push(self, token: int) -> Finish | None:
        """Take one token; returns why the request finished, if it did. An EOS token is kept in
        `tokens` but not in the text."""
        self.tokens.append(token)
        if token in self.eos_ids:
            return Finish.EOS
        delta = self._decode_next()
        self.text += delta
        for stop in self.stops:
            at = self.text.find(stop, max(0, len(self.text) - len(delta) - len(stop)))
            if at >= 0:
                self.text = self.text[:at]
                return Finish.STOP
        return Finish.LENGTH if len(self.tokens) >= self.max_new_tokens else None

    def take_text(self, final: bool) -> str:
        """Text not streamed yet; while running, hold back what could still begin a stop string."""
        hold = 0 if final else max((len(s) - 1 for s in self.stops), default=0)
        upto = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent : upto], upto
        return out

    def _decode_next(self) -> str:
        # Decode a short window so multi-token characters and merges come out right (vLLM's way).
        before = self.tokenizer.decode(self.tokens[self._prefix : self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.tokens[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.tokens)
            return after[len(before) :]
        return ""
