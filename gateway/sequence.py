"""One request's state in the gateway, from admission to its last token."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

from gateway.planner.base import Hazard
from specserve.contracts import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # admitted, not prefilled yet
    RUNNING = "running"  # prefilled, in the decode batch
    FINISHED = "finished"


class Finish(enum.Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"
    DEADLINE = "deadline"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass
class Slo:
    """Latency objectives in milliseconds; 0 means none."""

    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    deadline_ms: float = 0.0
    best_effort: bool = False


@dataclass
class Delta:
    """What one stream message carries."""

    token_ids: list[int]
    text: str
    finish: Finish | None = None
    error: Exception | None = None


@dataclass
class Sequence:
    id: str  # the session id on both model services: the gateway's own, never the client's
    prompt: list[int]
    params: SamplingParams
    slo: Slo = field(default_factory=Slo)
    priority: int = 0
    mode: str = ""  # per-request speculation override: "", "off" or "static"
    static_k: int = 0
    request_id: str = ""  # the client's id, echoed back
    ignore_eos: bool = False  # end-of-sequence tokens do not finish it
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    generated: list[int] = field(default_factory=list)
    finish: Finish | None = None
    unattainable: bool = False  # admitted best-effort although its SLO was predicted to fail
    # The drafter's view: committed tokens it has seen (0: it must start the session again).
    drafter_position: int = 0
    model_unread: int = 0  # of those, tokens a hybrid drafter's model has not read yet
    # Tokens of the current prefill already sent to the verifier (chunked prefill).
    prefilled: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the verifier's prefix cache
    expect_cached: int = 0  # of its prompt, tokens the gateway expects the verifier's cache to hold
    predicted_ttft_ms: float = 0.0  # admission's prediction, compared with the measured TTFT
    held_back: bool = False  # its prompt waited for the running sessions' TPOT, within its TTFT slack
    # Timings (monotonic seconds) and counters.
    first_token_at: float | None = None
    last_token_at: float | None = None
    steps: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    hazard: Hazard = field(default_factory=Hazard)  # its drafts' rejections against the calibration
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    stream_closed: bool = False  # the front's stream slot is given back
    plain_reason: str = ""  # why the latest step gave it no drafts

    @property
    def tokens(self) -> list[int]:
        """Every committed token: the prompt, then the generated ones."""
        return self.prompt + self.generated

    @property
    def position(self) -> int:
        return len(self.prompt) + len(self.generated)

    @property
    def deadline(self) -> float | None:
        return self.arrival + self.slo.deadline_ms / 1000 if self.slo.deadline_ms else None

    @property
    def ttft_deadline(self) -> float | None:
        return self.arrival + self.slo.ttft_ms / 1000 if self.slo.ttft_ms else None

    @property
    def ttft_ms(self) -> float:
        return ((self.first_token_at or time.monotonic()) - self.arrival) * 1000

    @property
    def tpot_ms(self) -> float:
        """Mean time per output token after the first."""
        if self.first_token_at is None or self.last_token_at is None or len(self.generated) < 2:
            return 0.0
        return (self.last_token_at - self.first_token_at) * 1000 / (len(self.generated) - 1)

    @property
    def behind_ms(self) -> float:
        """How far the session lags its TPOT schedule now (> 0 is late)."""
        if not self.slo.tpot_ms or self.first_token_at is None:
            return 0.0
        # The next token is due one TPOT after the schedule of the ones already out.
        due = self.first_token_at + len(self.generated) * self.slo.tpot_ms / 1000
        return (time.monotonic() - due) * 1000

    def sort_key(self) -> tuple:
        """Earliest deadline first (TTFT or whole-request, whichever is sooner), then priority."""
        deadlines = [d for d in (self.ttft_deadline, self.deadline) if d is not None]
        return (min(deadlines) if deadlines else float("inf"), -self.priority, self.arrival)
