"""Estimators fitted from step records (pure numpy; no torch).

- CostEstimator: T_draft = steps * (draft_fixed + draft_per_seq * n), least squares; T_verify as
  measured tables by verified positions N (median time of each N seen, brought to context 0 by the
  per-context slope fitted within each N), one of decode and verify forwards, with the shape buckets
  where its cost steps up, and one of forwards that read prompts; coefficients kept non-negative,
  over a window of recent steps.
- CalibrationEstimator: observed survival of draft positions against their raw cumulative
  confidence, in bins shrunk toward the proposer's overall survived / expected ratio, made
  monotone; the map Ĉ = f(C).
- AcceptanceEstimator: the global accepted / drafted ratio α and the mean per-token acceptance.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field, replace

import numpy as np

from specserve.strategy import PRIOR_ACCEPTANCE_RATE, Calibration, CostModel


def _nonneg_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with negative coefficients dropped and the rest refitted."""
    active = np.ones(a.shape[1], dtype=bool)
    for _ in range(a.shape[1]):
        coef = np.zeros(a.shape[1])
        coef[active] = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
        if (coef >= 0).all():
            return coef
        active &= coef > 0
    return np.clip(coef, 0, None)


SLOPE_MIN_SAMPLES = 8  # steps of one shape before its contexts enter the per-context slope


def _within_shape_slope(v: np.ndarray) -> float:
    """Forward time per context token, from rows of the same number of positions only (pooled over
    shapes, never negative; 0 where no shape was seen at two contexts). Bigger batches hold more
    context, so a slope fitted across shapes would charge context for the batch's own cost. Shapes
    seen fewer than SLOPE_MIN_SAMPLES times are left out: two steps of a rare shape at two contexts
    would read their noise as the context's cost."""
    cov = var = 0.0
    for n in np.unique(v[:, 1]):
        rows = v[v[:, 1] == n]
        if len(rows) < SLOPE_MIN_SAMPLES:
            continue
        dc = rows[:, 2] - rows[:, 2].mean()
        cov += float(dc @ (rows[:, 3] - rows[:, 3].mean()))
        var += float(dc @ dc)
    return max(cov / var, 0.0) if var > 0 else 0.0


WINDOW = 500  # recent observations kept per part: a few minutes of steps, enough for every shape
TABLE_MIN_SAMPLES = 2  # observations of one shape before its time enters the table
# The line (and its per-context slope) is fitted on decode and verify shapes; forwards that read
# prompts (one logits row per prompt, where a verify computes one per position) enter their own table.
LINE_MAX_POSITIONS = 32


@dataclass
class CostEstimator:
    prior: CostModel = field(default_factory=CostModel)
    draft: collections.deque = field(default_factory=lambda: collections.deque(maxlen=WINDOW))
    verify: collections.deque = field(default_factory=lambda: collections.deque(maxlen=WINDOW))
    # The start-up profile's forward times: kept for good, so shapes the recent steps did not run
    # (long prompt chunks, big batches) stay measured instead of extrapolated.
    profile: list = field(default_factory=list)

    draft_free: bool = False  # the drafts observed last came from a free proposer (one call, no model)

    def observe(self, batch: int, draft_steps: int, draft_ms: float, positions: int, context: int, verify_ms: float,
                profile: bool = False, free: bool = False, prompt: bool = False) -> None:
        """A step's (or a profile's) draft and forward times; `free`: the drafts came from a free
        proposer, whose time is per call (draft_steps is 0 there); `prompt`: the forward read prompt
        tokens."""
        if free != self.draft_free and (free or draft_steps > 0):
            self.draft.clear()  # another proposer: its costs start over
            self.draft_free = free
        steps = 1 if free else draft_steps
        if steps > 0 and draft_ms > 0 and batch > 0:
            self.draft.append((steps, steps * batch, draft_ms))
        if positions > 0 and verify_ms > 0:
            (self.profile if profile else self.verify).append((1.0, positions, context, verify_ms, float(prompt)))

    def fit(self) -> CostModel:
        """The prior until there are enough distinct observations for each part."""
        c = self.prior
        d = np.array(self.draft, dtype=float).reshape(-1, 3)
        if len(d) >= 8 and len(np.unique(d[:, 1] / d[:, 0])) >= 2:
            df, dps = _nonneg_lstsq(d[:, :2], d[:, 2])
            c = replace(c, draft_fixed=float(df), draft_per_seq=float(dps))
        elif len(d) >= 3:  # one batch size seen: per-step time only
            c = replace(c, draft_fixed=float(np.mean(d[:, 2] / d[:, 0])), draft_per_seq=0.0)
        c = replace(c, draft_free=self.draft_free)
        v = np.array([*self.profile, *self.verify], dtype=float).reshape(-1, 5)
        v = v[(v[:, 1] <= LINE_MAX_POSITIONS) & (v[:, 4] == 0)]
        if len(v) >= 8:
            per_ctx = _within_shape_slope(v)
            cols = [0] + ([1] if len(np.unique(v[:, 1])) >= 2 else [])
            coef = dict(zip(cols, _nonneg_lstsq(v[:, cols], v[:, 3] - per_ctx * v[:, 2])))
            c = replace(c, verify_fixed=float(coef[0]), verify_per_pos=float(coef.get(1, 0.0)), verify_per_ctx=per_ctx)
        live = np.array(self.verify, dtype=float).reshape(-1, 5)
        profile = np.array(self.profile, dtype=float).reshape(-1, 5)
        verify, prompt = (self._table(live[live[:, 4] == kind], profile[profile[:, 4] == kind], c.verify_per_ctx)
                          for kind in (0, 1))
        if len(verify) >= 2:
            c = replace(c, shape_buckets=(), verify_table=verify)
            c = replace(c, shape_buckets=c.buckets_from_table())
        return replace(c, prompt_table=prompt)

    @staticmethod
    def _table(v: np.ndarray, profile: np.ndarray, per_ctx: float) -> tuple[tuple[int, float], ...]:
        """Median forward time per number of positions, at context 0: from recent steps where a
        shape ran often enough, else from the start-up profile (rows of one kind of forward)."""
        out = []
        for n in np.unique(np.concatenate([v[:, 1], profile[:, 1]])):
            rows = v[v[:, 1] == n]
            if len(rows) < TABLE_MIN_SAMPLES:
                rows = profile[profile[:, 1] == n]
            if len(rows):
                # At context 0; never below half the measured time (a per-context slope fitted on
                # noisy steps must not drive a shape's cost to nothing).
                at_zero = np.median(rows[:, 3] - per_ctx * rows[:, 2])
                out.append((int(n), float(max(at_zero, 0.5 * np.median(rows[:, 3])))))
        return tuple(out)


@dataclass
class CalibrationEstimator:
    """Bins raw cumulative confidence; each bin's survival shrinks toward the raw confidence times
    the proposer's overall ratio of survived to expected (so a few outcomes already correct a
    drafter that is over- or under-confident everywhere), then is made non-decreasing by pooling
    adjacent violators. Identity before any outcome."""

    bins: int = 10
    scale_weight: float = 2.0  # the identity's weight in the overall ratio, in outcomes
    bin_weight: float = 5.0  # the scaled raw confidence's weight in each bin, in outcomes
    seen: np.ndarray = field(init=False)
    survived: np.ndarray = field(init=False)
    raw: np.ndarray = field(init=False)  # per bin: the sum of the raw confidences seen there

    def __post_init__(self) -> None:
        self.seen, self.survived, self.raw = np.zeros(self.bins), np.zeros(self.bins), np.zeros(self.bins)

    def observe(self, confidences: list[float], outcomes: list[int]) -> None:
        for c, o in zip(confidences, outcomes):
            b = min(int(c * self.bins), self.bins - 1)
            self.seen[b] += 1
            self.survived[b] += o
            self.raw[b] += c

    def fit(self, prior: Calibration | None = None) -> Calibration:
        """The map; before any outcome, `prior` (or the identity)."""
        if not self.seen.sum():
            return prior or Calibration()
        scale = (self.survived.sum() + self.scale_weight) / (self.raw.sum() + self.scale_weight)
        centers = (np.arange(self.bins) + 0.5) / self.bins
        mean_raw = np.where(self.seen > 0, self.raw / np.maximum(self.seen, 1), centers)
        prior = np.minimum(mean_raw * scale, 1.0)
        rate = (self.survived + self.bin_weight * prior) / (self.seen + self.bin_weight)
        weight = self.seen + self.bin_weight
        blocks = [[r, w, 1] for r, w in zip(rate, weight)]  # pool-adjacent-violators
        i = 0
        while i < len(blocks) - 1:
            if blocks[i][0] > blocks[i + 1][0]:
                r0, w0, n0 = blocks[i]
                r1, w1, n1 = blocks.pop(i + 1)
                blocks[i] = [(r0 * w0 + r1 * w1) / (w0 + w1), w0 + w1, n0 + n1]
                i = max(i - 1, 0)
            else:
                i += 1
        survival = [float(r) for r, _, n in blocks for _ in range(n)]
        # Past the last bin's centre the survival stays that bin's: a raw 1.0 (a suffix draft's
        # usual confidence) is worth what such drafts measured, not certainty.
        return Calibration((0.0, *(float(c) for c in centers), 1.0), (0.0, *survival, survival[-1]))


@dataclass
class AcceptanceEstimator:
    drafted: float = 0.0
    accepted: float = 0.0
    prior: float = PRIOR_ACCEPTANCE_RATE
    reached: list[float] = field(default_factory=list)  # per draft position: drafts tested there
    accepted_at: list[float] = field(default_factory=list)  # per draft position: drafts accepted there

    def observe(self, drafted: int, accepted: int, reached: list[int] = (), accepted_at: list[int] = ()) -> None:
        self.drafted += drafted
        self.accepted += accepted
        for j, (r, a) in enumerate(zip(reached, accepted_at)):
            if j == len(self.reached):
                self.reached.append(0.0)
                self.accepted_at.append(0.0)
            self.reached[j] += r
            self.accepted_at[j] += a

    @property
    def conditional(self) -> float | None:
        """The per-token acceptance: accepted / reached over every position (unbiased under prefix
        acceptance, where accepted / drafted reads E[accepted] / k), None before any draft."""
        reached = sum(self.reached)
        return sum(self.accepted_at) / reached if reached else None

    def by_position(self) -> list[float]:
        """The conditional rate at each draft position: accepted there / reached there."""
        return [a / r if r else 0.0 for a, r in zip(self.accepted_at, self.reached)]

    @property
    def rate(self) -> float:
        """α = accepted / drafted, shrunk toward the prior while there is little data."""
        return (self.accepted + 10 * self.prior) / (self.drafted + 10)
