"""The target model: per-session KV caches, batched prefill, batched ragged lossless verify."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from services.verifier.acceptance import dense, verify_greedy, verify_sampled
from specserve.config import SESSION_TTL_S
from specserve.contracts import (
    MAX_PLAIN_STEPS,
    PrefillItem,
    PrefillOutput,
    PrefillResult,
    SamplingParams,
    SessionStatus,
    VerifyItem,
    VerifyOutput,
    VerifyResult,
)
from specserve.errors import InvalidArgument, ResourceExhausted
from specserve.runtime import Row, Runtime
from specserve.sampling import make_generator, processed_probs
from specserve.sessions import SessionTable

VERIFIER_SALT = 1
NO_ROOM_RETRY_MS = 1000  # a prompt refused for want of KV room: sessions finish within about a second


@dataclass
class TargetSession:
    tokens: list[int]  # committed tokens; the runtime caches all but the last (all while partial)
    params: SamplingParams
    generator: torch.Generator
    partial: bool = False  # a chunked prefill is under way; no token generated yet
    cached: int = 0  # prompt tokens whose KV came from the prefix cache


class VerifierWorker:
    """Holds the target model and its sessions. Not thread-safe: call from one worker thread."""

    def __init__(self, runtime: Runtime, session_ttl_s: float = SESSION_TTL_S, eos_token_ids: tuple[int, ...] = ()):
        self.runtime = runtime
        self.eos = frozenset(eos_token_ids)  # a decode burst ends at these (the caller stops there too)
        self.end_burst = threading.Event()  # set from another thread: the burst under way ends
        self.max_context = runtime.max_context
        self.vocab = runtime.vocab_size
        self.device = runtime.device
        self.sessions: SessionTable[TargetSession] = SessionTable(session_ttl_s, runtime.release)

    @property
    def kv_tokens(self) -> int:
        return self.runtime.kv_tokens

    def prefill(self, items: list[PrefillItem]) -> PrefillOutput:
        """Prompts (or their next chunks) alone: a step without verify rows; a refused chunk fails
        the call, as the Prefill RPC always has."""
        out = self.verify([], items)
        for r in out.prefills:
            if r.status is SessionStatus.INVALID:
                field, _, message = r.error.partition(": ")
                raise InvalidArgument(field, message)
            if r.status is SessionStatus.EXHAUSTED:
                raise ResourceExhausted(r.error, retry_after_ms=NO_ROOM_RETRY_MS)
        return PrefillOutput(out.prefills, out.forward_ns)

    @torch.inference_mode()
    def verify(self, items: list[VerifyItem], prefills: list[PrefillItem] = ()) -> VerifyOutput:
        """One step, one forward: the verify rows of running sessions and the prompt chunks of
        sessions being prefilled; a prompt whose last chunk is here commits its first token. Every
        item is checked before anything changes. A prompt chunk fails alone: a malformed one is
        refused (INVALID), and when the KV has no room for the chunks (EXHAUSTED) the running
        sessions' step runs without them."""
        start = time.perf_counter_ns()
        refused: dict[str, PrefillResult] = {}
        chunks: list[tuple[PrefillItem, TargetSession | None]] = []
        for item in prefills:
            try:
                chunks.append((item, self._check_prefill(item)))
            except InvalidArgument as exc:
                refused[item.session_id] = PrefillResult(item.session_id, -1, status=SessionStatus.INVALID, error=str(exc))
        results: dict[str, VerifyResult] = {}
        live: list[tuple[VerifyItem, TargetSession]] = []
        for item in items:
            session = self.sessions.get(item.session_id)
            if session is None or session.partial or len(session.tokens) != item.position:
                results[item.session_id] = VerifyResult(item.session_id, SessionStatus.NOT_FOUND)
                continue
            if not session.params.greedy and len(item.distributions) != len(item.drafts):
                raise InvalidArgument(
                    "draft_distributions", f"session {item.session_id}: sampling needs one per draft token")
            if any(not 0 <= t < self.vocab for t in item.drafts):
                raise InvalidArgument("draft_token_ids", f"session {item.session_id}: token id outside [0, {self.vocab})")
            if not 0 <= item.plain_steps <= MAX_PLAIN_STEPS or (item.plain_steps > 1 and item.drafts):
                raise InvalidArgument("plain_steps", f"session {item.session_id}: must be in [0, {MAX_PLAIN_STEPS}] "
                                      f"and at most 1 with drafts, got {item.plain_steps}")
            room = self.max_context - len(session.tokens)
            if room <= 0:
                raise InvalidArgument("position", f"session {item.session_id}: context window of {self.max_context} is full")
            if len(item.drafts) >= room:
                item = VerifyItem(item.session_id, item.position, item.drafts[: room - 1], item.distributions[: room - 1])
            live.append((item, session))
        for item, session in chunks:
            if session is None:
                self.sessions.release([item.session_id])  # a fresh prefill starts a new session
        # Greedy rows come back as argmax ids: no full-vocabulary row is copied for them.
        prompt_rows = [Row(it.session_id, it.prompt, [len(it.prompt) - 1], it.partial or it.params.greedy)
                       for it, _ in chunks]
        verify_rows = [Row(it.session_id, [s.tokens[-1], *it.drafts], list(range(len(it.drafts) + 1)), s.params.greedy)
                       for it, s in live]
        try:
            logits = self.runtime.forward(prompt_rows + verify_rows) if prompt_rows or verify_rows else []
        except ResourceExhausted as exc:
            if not prompt_rows:
                raise
            # No room for the new prompts now: they are refused, the running sessions step alone.
            for item, _ in chunks:
                refused[item.session_id] = PrefillResult(item.session_id, -1, status=SessionStatus.EXHAUSTED,
                                                         error=str(exc))
            chunks, prompt_rows = [], []
            logits = self.runtime.forward(verify_rows) if verify_rows else []
        done = {item.session_id: self._commit_prefill(item, session, row, out)
                for (item, session), row, out in zip(chunks, prompt_rows, logits)}
        for (item, session), row in zip(live, logits[len(prompt_rows) :]):
            accepted, emitted = self._accept(item, session, row)
            self.runtime.truncate(item.session_id, len(session.tokens) + accepted)
            session.tokens.extend(emitted)
            results[item.session_id] = VerifyResult(item.session_id, SessionStatus.OK, emitted, accepted)
        positions = sum(len(r.tokens) - r.reused for r in prompt_rows + verify_rows)
        forwards, burst = 1, [(it, s) for it, s in live if it.plain_steps > 1]
        for step in range(1, max((it.plain_steps for it, _ in burst), default=0)):
            going = [(it, s) for it, s in burst if it.plain_steps > step and s.tokens[-1] not in self.eos
                     and len(s.tokens) < self.max_context]
            # The first session done ends the burst: its last token goes back now, not after the
            # others' forwards (a client waiting for it would wait for those too).
            if len(going) < len(burst) or self.end_burst.is_set():
                break
            rows = [Row(it.session_id, [s.tokens[-1]], [0], s.params.greedy) for it, s in burst]
            try:
                logits = self.runtime.forward(rows)
            except ResourceExhausted:
                break  # no KV room to go on: the burst ends with what it committed
            for (item, session), row in zip(burst, logits):
                _, emitted = self._accept(VerifyItem(item.session_id, item.position, []), session, row)
                session.tokens.extend(emitted)
                results[item.session_id].tokens.extend(emitted)
            positions, forwards = positions + len(rows), forwards + 1
        # Cleared once the call is done, not when it starts: an end asked for while the call was
        # still on its way (the request and the call cross) ends this call's burst too.
        self.end_burst.clear()
        return VerifyOutput([results[it.session_id] for it in items], positions, time.perf_counter_ns() - start,
                            [refused.get(it.session_id) or done[it.session_id] for it in prefills], forwards)

    def _check_prefill(self, item: PrefillItem) -> TargetSession | None:
        """Validate a prompt chunk; the session an appended chunk continues (else None)."""
        if not item.prompt:
            raise InvalidArgument("prompt_token_ids", f"session {item.session_id}: prompt is empty")
        if any(not 0 <= t < self.vocab for t in item.prompt):
            raise InvalidArgument("prompt_token_ids", f"session {item.session_id}: token id outside [0, {self.vocab})")
        session = self.sessions.get(item.session_id) if item.append else None
        if item.append and (session is None or not session.partial):
            raise InvalidArgument("append", f"session {item.session_id} has no partial prefill to continue")
        held = len(session.tokens) if session else 0
        if held + len(item.prompt) >= self.max_context:
            raise InvalidArgument(
                "prompt_token_ids", f"session {item.session_id}: {held + len(item.prompt)} tokens leave no room "
                f"in the context window of {self.max_context}")
        return session

    def _commit_prefill(self, item: PrefillItem, session: TargetSession | None, row: Row,
                        out: torch.Tensor) -> PrefillResult:
        gen = session.generator if session else make_generator(item.params.seed, VERIFIER_SALT, self.device)
        tokens = (session.tokens if session else []) + item.prompt
        cached = (session.cached if session else 0) + row.reused
        if item.partial:
            self.sessions.put(item.session_id, TargetSession(tokens, item.params, gen, partial=True, cached=cached))
            return PrefillResult(item.session_id, -1, cached)
        first = int(out[0]) if item.params.greedy else _sample(out, item.params, gen)
        self.sessions.put(item.session_id, TargetSession([*tokens, first], item.params, gen, cached=cached))
        return PrefillResult(item.session_id, first, cached)

    def _accept(self, item: VerifyItem, session: TargetSession, logits: torch.Tensor) -> tuple[int, list[int]]:
        """logits: [k+1, V], or the target's argmax ids [k+1] for a greedy session."""
        draft = torch.tensor(item.drafts, dtype=torch.long, device=logits.device)
        if session.params.greedy:
            return verify_greedy(draft, logits)
        p = processed_probs(logits, session.params)
        q = torch.stack([dense(ids, probs, self.vocab, logits.device) for ids, probs in item.distributions]) \
            if item.drafts else p[:0]
        return verify_sampled(draft, q, p, session.generator)

    def release(self, session_ids: list[str]) -> int:
        return self.sessions.release(session_ids)


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """logits: [1, V] -> one token sampled from the processed distribution."""
    return int(torch.multinomial(processed_probs(logits, params)[0], 1, generator=generator))
