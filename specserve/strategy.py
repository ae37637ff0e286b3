"""The speculation strategy: the versioned document the policy publishes and the gateway follows.

Stored as JSON under `specserve:strategy`, announced on `specserve:strategy:updates`. Any program
that writes a valid document is a policy.
"""

from __future__ import annotations

import bisect
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property

from specserve.errors import InvalidArgument

STRATEGY_KEY = "specserve:strategy"
UPDATES_CHANNEL = "specserve:strategy:updates"

MODES: tuple[str, ...] = ("off", "static", "threshold", "smartspec", "specserve", "adaptive")
MAX_DRAFT_TOKENS_LIMIT = 64  # longest draft any strategy, ops key or request may ask for
# Priors before any draft outcome is seen: the SpecServe paper's initial c̄, and a per-token
# acceptance typical of a same-family draft model.
PRIOR_MEAN_CONFIDENCE = 0.6
PRIOR_ACCEPTANCE_RATE = 0.7


CLOCK_SKEW_S = 5.0  # a document may be issued this far in the future (clocks of two hosts differ)


def _int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(name, f"must be an integer, got {value!r}")
    return value


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgument(name, f"must be a finite number, got {value!r}")
    return float(value)


def _validate_cost(cost: "CostModel") -> None:
    for name in ("draft_fixed", "draft_per_seq", "verify_fixed", "verify_per_pos", "verify_per_ctx"):
        if _number(f"cost.{name}", getattr(cost, name)) < 0:
            raise InvalidArgument(f"cost.{name}", f"must be >= 0, got {getattr(cost, name)}")
    buckets = [_int("cost.shape_buckets", b) for b in cost.shape_buckets]
    if any(b <= 0 for b in buckets) or buckets != sorted(set(buckets)):
        raise InvalidArgument("cost.shape_buckets", "must be positive, increasing and unique")
    for name in ("verify_table", "prompt_table"):
        table = getattr(cost, name)
        positions = [_int(f"cost.{name}", p) for p, _ in table]
        if any(p <= 0 for p in positions) or positions != sorted(set(positions)):
            raise InvalidArgument(f"cost.{name}", "positions must be positive, increasing and unique")
        if any(_number(f"cost.{name}", t) <= 0 for _, t in table):
            raise InvalidArgument(f"cost.{name}", "every time must be > 0")
    if not isinstance(cost.draft_free, bool):
        raise InvalidArgument("cost.draft_free", f"must be true or false, got {cost.draft_free!r}")
    if not cost.verify_table and cost.verify_fixed + cost.verify_per_pos <= 0:
        raise InvalidArgument("cost.verify_fixed", "a verify must cost > 0 (verify_fixed + verify_per_pos)")


# A verify shape ends where one more position costs this much more (kernels change shape there).
SHAPE_STEP = 0.10


@dataclass(frozen=True)
class CostModel:
    """Step-time model in milliseconds.

    T_draft(n, k) = k * (draft_fixed + draft_per_seq * n)          (k draft forward passes)
    or, for a free proposer (`draft_free`: suffix or n-gram lookup, no model), one call whatever k:
    T_draft(n, k) = draft_fixed + draft_per_seq * n
    T_verify(N, ctx) = table(pad(N)) + verify_per_ctx * ctx, where N is the verified positions and
    ctx the summed context of the batch. `verify_table` holds measured (N, ms at ctx 0) points of
    forwards that compute a logits row per position (decode and verify steps); between them the
    time is interpolated, and a larger shape that measured cheaper than a smaller one sets the
    smaller one's time too (more positions can be cheaper: kernel shapes). Without a table, T is the
    line verify_fixed + verify_per_pos * N. pad(N) is the smallest shape bucket holding N (N itself
    when there are no buckets). A forward that reads prompt tokens computes one logits row per
    prompt, where a verify computes one per position (on a 2-core CPU a prompt chunk of 16 took
    0.6-0.8 of a verify of 16): `prompt_table` holds those, and prices them where it has points,
    never above a verify of the same size where verifies were measured.
    """

    draft_fixed: float = 78.0
    draft_per_seq: float = 10.0
    verify_fixed: float = 180.0
    verify_per_pos: float = 6.0
    verify_per_ctx: float = 0.01
    shape_buckets: tuple[int, ...] = ()
    verify_table: tuple[tuple[int, float], ...] = ()  # (positions, ms), positions increasing
    draft_free: bool = False
    prompt_table: tuple[tuple[int, float], ...] = ()  # (positions, ms) of forwards that read prompts

    def pad(self, positions: int) -> int:
        if not self.shape_buckets or positions > self.shape_buckets[-1]:
            return positions
        return self.shape_buckets[bisect.bisect_left(self.shape_buckets, positions)]

    def t_draft(self, n: int, k: int) -> float:
        if k <= 0 or n <= 0:
            return 0.0
        per_call = self.draft_fixed + self.draft_per_seq * n
        return per_call if self.draft_free else k * per_call

    def t_verify(self, positions: int, ctx: int, prompt: bool = False) -> float:
        """`prompt`: the forward reads prompt tokens (most of its positions are theirs)."""
        return self.t_positions(positions if prompt else self.pad(positions), prompt) + self.verify_per_ctx * ctx

    @cached_property
    def _envelopes(self) -> tuple[tuple[list[int], list[float]], tuple[list[int], list[float]]]:
        """Each table's positions and its lower envelope (each time the least of it and larger shapes')."""
        return tuple(([p for p, _ in table], [min(t for _, t in table[i:]) for i in range(len(table))])
                     for table in (self.verify_table, self.prompt_table))

    def t_positions(self, n: int, prompt: bool = False) -> float:
        """Forward time of n positions at context 0: a table's lower envelope, interpolated; for
        `prompt` tokens the prompt table's, never above a verify's where verifies were measured."""
        if not self.verify_table:
            verify = self.verify_fixed + self.verify_per_pos * n
        else:
            verify = _interpolate(*self._envelopes[0], n, self.verify_per_pos)
        if not prompt or not self.prompt_table:
            return verify
        chunk = _interpolate(*self._envelopes[1], n, self.verify_per_pos)
        return min(verify, chunk) if self.verify_table and n <= self.verify_table[-1][0] else chunk

    def buckets_from_table(self) -> tuple[int, ...]:
        """The verify shapes: table positions after which one more position costs SHAPE_STEP more."""
        xs = [p for p, _ in self.verify_table]
        return tuple(p for p, q in zip(xs, xs[1:])
                     if self.t_positions(p + 1) > self.t_positions(p) * (1 + SHAPE_STEP) and q == p + 1)


def _interpolate(xs: list[int], env: list[float], n: int, slope: float) -> float:
    """The envelope at n, interpolated between points; past the last, on the last two points' slope."""
    if n <= xs[0]:
        return env[0]
    if n >= xs[-1]:
        slope = (env[-1] - env[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else slope
        return env[-1] + max(slope, 0.0) * (n - xs[-1])
    i = bisect.bisect_left(xs, n)
    return env[i - 1] + (env[i] - env[i - 1]) * (n - xs[i - 1]) / (xs[i] - xs[i - 1])


@dataclass(frozen=True)
class Calibration:
    """Maps a raw cumulative draft confidence to the observed probability that the drafts so far all
    survive: piecewise linear through (raw[i], survival[i]), both increasing. Identity by default."""

    raw: tuple[float, ...] = (0.0, 1.0)
    survival: tuple[float, ...] = (0.0, 1.0)

    def __call__(self, c: float) -> float:
        i = bisect.bisect_right(self.raw, c)
        if i <= 0:
            return self.survival[0]
        if i >= len(self.raw):
            return self.survival[-1]
        x0, x1, y0, y1 = self.raw[i - 1], self.raw[i], self.survival[i - 1], self.survival[i]
        return y0 + (y1 - y0) * (c - x0) / (x1 - x0) if x1 > x0 else y1

    def inverse(self, s: float) -> float:
        """The smallest raw confidence whose calibrated value reaches s."""
        if s <= self.survival[0]:
            return 0.0
        for i in range(1, len(self.raw)):
            y0, y1 = self.survival[i - 1], self.survival[i]
            if y1 >= s:
                x0, x1 = self.raw[i - 1], self.raw[i]
                return x0 + (x1 - x0) * (s - y0) / (y1 - y0) if y1 > y0 else x0
        return 1.0 + 1e-9  # unreachable: never draft past this


def _validate_calibration(name: str, cal: Calibration) -> None:
    for part, values in (("raw", cal.raw), ("survival", cal.survival)):
        if any(not 0.0 <= _number(f"{name}.{part}", v) <= 1.0 for v in values):
            raise InvalidArgument(f"{name}.{part}", "values must be in [0, 1]")
    if len(cal.raw) != len(cal.survival) or len(cal.raw) < 2 or list(cal.raw) != sorted(cal.raw) \
            or list(cal.survival) != sorted(cal.survival):
        raise InvalidArgument(name, "raw and survival must be increasing and of equal length >= 2")


CALIBRATIONS = ("calibration", "free_calibration", "recall_calibration")  # the Strategy's Calibration fields


@dataclass(frozen=True)
class Strategy:
    mode: str = "adaptive"
    max_draft_tokens: int = 8  # K_max
    # A free drafter's (suffix lookup's) longest draft: its tokens cost nothing to draft, only their
    # verify positions, which the slot budget weighs (a copied run is often longer than K_max).
    max_free_draft_tokens: int = 64
    static_k: int = 4
    threshold: float = 0.6  # the threshold controller's per-token cut
    gate_margin: float = 1.0  # speculate only if predicted gain beats plain decoding by this factor
    smartspec_margin: float = 1.1
    mean_confidence: float = PRIOR_MEAN_CONFIDENCE  # c̄: confidence assumed for a position not drafted yet
    acceptance_rate: float = PRIOR_ACCEPTANCE_RATE  # α: global accepted / drafted
    cost: CostModel = field(default_factory=CostModel)
    calibration: Calibration = field(default_factory=Calibration)  # a draft model's confidences
    free_calibration: Calibration = field(default_factory=Calibration)  # a free proposer's (suffix, n-gram)
    recall_calibration: Calibration = field(default_factory=Calibration)  # free drafts from other requests' outputs
    version: int = 0
    policy: str = "default"
    issued_at: float = 0.0  # unix seconds
    ttl_s: float = 30.0

    def validate(self) -> "Strategy":
        """Raise InvalidArgument naming the first bad field: counts are integers, every number is
        finite, costs are >= 0 and every verify shape costs > 0, the table is sorted and unique,
        the TTL is positive and the document is not issued in the future."""
        if self.mode not in MODES:
            raise InvalidArgument("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("max_draft_tokens", "max_free_draft_tokens", "static_k"):
            value = _int(name, getattr(self, name))
            if not 0 <= value <= MAX_DRAFT_TOKENS_LIMIT:
                raise InvalidArgument(name, f"must be in [0, {MAX_DRAFT_TOKENS_LIMIT}], got {value}")
        _int("version", self.version)
        for name in ("threshold", "mean_confidence", "acceptance_rate"):
            if not 0.0 <= _number(name, getattr(self, name)) <= 1.0:
                raise InvalidArgument(name, f"must be in [0, 1], got {getattr(self, name)}")
        for name in ("gate_margin", "smartspec_margin"):
            if _number(name, getattr(self, name)) <= 0:
                raise InvalidArgument(name, f"must be > 0, got {getattr(self, name)}")
        if _number("ttl_s", self.ttl_s) <= 0:
            raise InvalidArgument("ttl_s", f"must be > 0, got {self.ttl_s}")
        if _number("issued_at", self.issued_at) > time.time() + CLOCK_SKEW_S:
            raise InvalidArgument("issued_at", f"{self.issued_at} is in the future")
        _validate_cost(self.cost)
        for name in CALIBRATIONS:
            _validate_calibration(name, getattr(self, name))
        return self

    def calibration_for(self, free: bool, recalled: bool = False) -> Calibration:
        """The calibration of a model's drafts, a free proposer's, or free drafts recalled from
        other requests' outputs."""
        return (self.recall_calibration if recalled else self.free_calibration) if free else self.calibration

    def expired(self, now: float | None = None) -> bool:
        return self.issued_at > 0 and (now or time.time()) > self.issued_at + self.ttl_s

    def with_overrides(self, **changes) -> "Strategy":
        return replace(self, **changes).validate()

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Strategy":
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict):
                raise TypeError("the document must be a JSON object")
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(doc) - known)
            if unknown:
                raise InvalidArgument("strategy", f"unknown field {unknown[0]!r}")
            cost_doc = doc.pop("cost", {})
            cals = {name: doc.pop(name, {}) for name in CALIBRATIONS}
            if not isinstance(cost_doc, dict) or not all(isinstance(c, dict) for c in cals.values()):
                raise TypeError("cost and calibrations must be JSON objects")
            cost = CostModel(**cost_doc)
            cost = replace(cost, shape_buckets=tuple(cost.shape_buckets),
                           verify_table=tuple((p, t) for p, t in cost.verify_table),
                           prompt_table=tuple((p, t) for p, t in cost.prompt_table))
            cals = {name: Calibration(tuple(c.get("raw", (0.0, 1.0))), tuple(c.get("survival", (0.0, 1.0))))
                    for name, c in cals.items()}
            return cls(**doc, cost=cost, **cals).validate()
        except InvalidArgument:
            raise
        except (ValueError, TypeError, AttributeError, OverflowError) as exc:
            raise InvalidArgument("strategy", f"not a valid strategy document: {exc}") from None
