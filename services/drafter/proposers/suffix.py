"""Suffix decoding (Oliaro et al., "SuffixDecoding", arXiv 2411.04975): drafts that cost no model.

Each session keeps an index of its own tokens (prompt and output so far), and the proposer keeps
one over the outputs of recently finished sessions, each after the last LONGEST_MATCH tokens of its
prompt (bounded, oldest out first): a prompt sent again (a retry, a regeneration, an agent's
repeated call) matches its earlier answer's context whole and drafts that answer from its first
step. A match over part of a stored tail counts only from that answer's start: another prompt that
ends the same way (a chat template's closing tokens, which end every prompt) says nothing of its
answer. To draft, the longest suffix of the session's tokens that occurred before (up to MAX_MATCH
tokens, then followed back to LONGEST_MATCH) is looked up; the tokens that followed its occurrences
form a frequency tree, and the draft follows the most frequent child at each depth. Each step's
confidence is that child's frequency among the occurrences, with one unseen continuation counted at
weight 1 / (tokens matched so far): a continuation seen once after a one-token match is a coin toss
(1/2), after a 24-token match near certain (24/25), and seen twenty times in twenty it is 20/21
whatever the match. Their product is the probability the planner and the calibration see; the draft
stops where it falls below a floor, and is at most `alpha` times the match length long (a long
match predicts a long copy; a one-token match, a short guess). The index is updated with each
call's new tokens: no history is rescanned.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_right
from collections import defaultdict, deque
from dataclasses import dataclass, field

from specserve.config import SESSION_TTL_S
from specserve.contracts import Draft, ProposeItem, ProposeOutput, SessionStatus
from specserve.sessions import SessionTable

MAX_MATCH = 24  # longest suffix indexed and looked up
# A match of MAX_MATCH tokens is followed back further, up to this long: a long copy justifies a
# long draft (alpha times the match), where the index alone would cap it at MAX_MATCH.
LONGEST_MATCH = 64
MAX_OCCURRENCES = 64  # most recent occurrences of a match that vote on its continuation
SEPARATOR = -1  # between the outputs in the global index: no match crosses two of them


@dataclass
class SuffixIndex:
    """Tokens and, per context of 1..MAX_MATCH tokens, the positions that followed it. Contexts are
    keyed by their hash: a collision only makes a draft that verification rejects."""

    tokens: list[int] = field(default_factory=list)
    follows: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    # The global index: where each stored output's prompt tail starts (ascending), and its answer.
    tails: list[int] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)

    def add_output(self, tail: list[int], answer: list[int]) -> None:
        self.tails.append(len(self.tokens))
        self.answers.append(len(self.tokens) + len(tail))
        self.extend([*tail, *answer, SEPARATOR])

    def extend(self, new: list[int]) -> None:
        for token in new:
            self.tokens.append(token)
            end = len(self.tokens)
            for m in range(1, min(MAX_MATCH, end) + 1):
                context = tuple(self.tokens[end - m : end])
                if SEPARATOR in context:
                    break
                self.follows[hash(context)].append(end)

    def continuations(self, tail: list[int]) -> tuple[int, list[int]]:
        """The longest suffix of `tail` that occurred here with a continuation: its length (up to
        LONGEST_MATCH, as `_counted` counts it) and where its most recent occurrences continue
        (positions into `tokens`)."""
        for m in range(min(MAX_MATCH, len(tail)), 0, -1):
            starts = [p for p in self.follows.get(hash(tuple(tail[-m:])), ()) if p < len(self.tokens)][-MAX_OCCURRENCES:]
            counted = [(p, self._counted(p, self._matched_back(tail, p, m) if m == MAX_MATCH else m)) for p in starts]
            counted = [(p, n) for p, n in counted if n > 0]
            if counted:
                return max(n for _, n in counted), [p for p, _ in counted]
        return 0, []

    def _counted(self, end: int, m: int) -> int:
        """Of `m` tokens matched before `end`, those that count: all, unless the match starts inside
        a stored prompt tail past its first token (another prompt that only ends the same way); then
        those from the answer's start on."""
        i = bisect_right(self.tails, end - m) - 1
        if i < 0 or end - m == self.tails[i] or end - m >= self.answers[i]:
            return m
        return max(end - self.answers[i], 0)

    def _matched_back(self, tail: list[int], end: int, m: int) -> int:
        """How far the occurrence ending at `end` matches `tail` backwards, from `m` known tokens."""
        tokens = self.tokens
        while m < min(LONGEST_MATCH, len(tail), end) and tokens[end - m - 1] == tail[-m - 1]:
            m += 1
        return m


def draft_from(index: SuffixIndex, starts: list[int], budget: int, floor: float, matched: int,
               stop: set[int] = frozenset()) -> tuple[list[int], list[float]]:
    """Follow the most frequent continuation of the occurrences at `starts` (of a context of
    `matched` tokens), up to `budget` tokens, while the product of the confidences stays at or
    above `floor`. Returns the tokens and each one's confidence: its frequency among the live
    occurrences, shrunk by an unseen continuation of weight 1 / (tokens matched so far)."""
    tokens, confidences, cumulative = [], [], 1.0
    live = starts
    for depth in range(budget):
        votes: dict[int, list[int]] = defaultdict(list)
        for p in live:
            if p + depth < len(index.tokens) and index.tokens[p + depth] != SEPARATOR:
                votes[index.tokens[p + depth]].append(p)
        if not votes:
            break
        # The most frequent next token; among equals, the one seen most recently.
        token, kept = max(votes.items(), key=lambda kv: (len(kv[1]), kv[1][-1]))
        p = len(kept) / (len(live) + 1 / (matched + depth))
        if cumulative * p < floor:
            break
        cumulative *= p
        tokens.append(token)
        confidences.append(p)
        live = kept
        if token in stop:
            break
    return tokens, confidences


def expected_accepted(confidences: list[float]) -> float:
    """Expected accepted tokens of a draft: the sum of its cumulative confidences."""
    total, c = 0.0, 1.0
    for p in confidences:
        c *= p
        total += c
    return total


@dataclass
class _Session:
    index: SuffixIndex
    prompt_len: int  # tokens of the first call: the prompt (and the first token)
    pending: list[int] = field(default_factory=list)  # drafts of the last call


class SuffixProposer:
    """No model: drafts come from the session's own tokens and from recent outputs."""

    free = True  # costs what it measures (microseconds), not a forward per token

    # alpha 4: on a CPU a verify costs about a plain step per position up to 8 positions and a
    # third of one from about 32 on, so a copy's long verifies are its cheap ones; each step of the
    # ramp to them (alpha x the match, which grows by what the step accepts) is one at the dear
    # sizes. The floor and the slot budget still cut a short match's long guess.
    def __init__(self, alpha: float = 4.0, floor: float = 0.1, global_tokens: int = 32768,
                 session_ttl_s: float = SESSION_TTL_S, stop_tokens: tuple[int, ...] = ()):
        self.alpha, self.floor, self.global_tokens = alpha, floor, global_tokens
        # A draft ends at the model's end-of-sequence tokens: an answer that quotes the end of its
        # question would otherwise draft the chat template's closing tokens that followed it there.
        self.stop = frozenset(stop_tokens)
        self.sessions: SessionTable[_Session] = SessionTable(session_ttl_s)
        # Finished sessions' outputs in two generations of up to half the budget each: when the
        # newer fills, the older is dropped whole (no index is ever rebuilt, so no release stalls).
        self.generations: deque[SuffixIndex] = deque([SuffixIndex()], maxlen=2)

    def propose(self, items: list[ProposeItem]) -> ProposeOutput:
        start = time.perf_counter_ns()
        drafts = []
        for item in items:
            session = self._sync(item)
            if session is None:
                drafts.append(Draft(item.session_id, SessionStatus.NOT_FOUND))
                continue
            tokens, confidences, recalled = self._draft(session, item)
            session.pending = (session.pending if item.extend else []) + tokens
            # A deterministic proposer samples from a point mass on its token.
            dists = [] if item.params.greedy else [([t], [1.0]) for t in tokens]
            drafts.append(Draft(item.session_id, SessionStatus.OK, tokens, confidences, dists, free=True,
                                recalled=recalled))
        return ProposeOutput(drafts, 0, time.perf_counter_ns() - start)

    def _sync(self, item: ProposeItem) -> _Session | None:
        if item.position == 0 and not item.extend:
            self.sessions.release([item.session_id])
            session = _Session(SuffixIndex(), len(item.new_tokens))
            self.sessions.put(item.session_id, session)
        else:
            session = self.sessions.get(item.session_id)
            if session is None or len(session.index.tokens) != item.position or (item.extend and item.new_tokens):
                return None
        session.index.extend(item.new_tokens)
        return session

    def _draft(self, session: _Session, item: ProposeItem) -> tuple[list[int], list[float], bool]:
        """From the session's own tokens or from recent outputs, whichever expects more accepted
        tokens (the sum of the cumulative probabilities); True where recent outputs won (recalled
        drafts, which guess more often at the same confidence). A sampled session drafts from its
        own tokens alone: other requests' outputs would change where its drafts fall, and with them
        the random draws its seed fixes, so the same seed would not give the same text."""
        tail = session.index.tokens + (session.pending if item.extend else [])
        room = item.max_draft_tokens  # an extend round's budget is for its own drafts
        best, best_score = ([], [], False), 0.0
        for index in (session.index, *self.generations) if item.params.greedy else (session.index,):
            m, starts = index.continuations(tail)
            budget = min(room, math.ceil(self.alpha * m))
            if budget <= 0:
                continue
            tokens, confidences = draft_from(index, starts, budget, max(self.floor, item.stop_confidence), m, self.stop)
            score = expected_accepted(confidences)
            if score > best_score:
                best, best_score = (tokens, confidences, index is not session.index), score
        return best

    def release(self, session_ids: list[str]) -> int:
        for sid in session_ids:
            session = self.sessions.get(sid)
            if session is not None:
                tokens, answer = session.index.tokens, session.prompt_len
                self._add_output(tokens[max(answer - LONGEST_MATCH, 0) : answer], tokens[answer:])
        return self.sessions.release(session_ids)

    def _add_output(self, tail: list[int], answer: list[int]) -> None:
        """A finished session's output, after its prompt's tail, joins the global index (the oldest
        outputs leave it)."""
        if not answer:
            return
        if len(self.generations[-1].tokens) + len(tail) + len(answer) + 1 > self.global_tokens // 2:
            self.generations.append(SuffixIndex())
        self.generations[-1].add_output(tail, answer)
