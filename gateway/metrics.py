"""Prometheus metrics of the gateway: raw counters (`_total`) and histograms in seconds; rates are
derived by the reader (for example attainment = rate(specserve_requests_attained_total) /
rate(specserve_requests_finished_total))."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.admission import attainment
from gateway.scheduler import StepRecord
from gateway.sequence import Sequence

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REJECT_REASONS = ("slo", "queue_full", "client_limit", "invalid_argument", "unavailable")


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.admitted = Counter("specserve_requests_admitted", "Requests admitted", registry=r)
        self.rejected = Counter("specserve_requests_rejected", "Requests refused before running, by reason",
                                ["reason"], registry=r)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self.finished = Counter("specserve_requests_finished", "Requests finished", ["reason"], registry=r)
        self.attained = Counter("specserve_requests_attained", "Finished requests within TTFT and TPOT SLO", registry=r)
        self.violated = Counter("specserve_requests_violated", "Finished requests outside their SLO", registry=r)
        self.output_tokens = Counter("specserve_output_tokens", "Tokens generated", registry=r)
        # hit rate = cached / (cached + prefilled)
        self.cached_tokens = Counter("specserve_prompt_cached_tokens", "Prompt tokens whose KV came from the prefix cache",
                                     registry=r)
        self.prefilled_tokens = Counter("specserve_prompt_prefilled_tokens", "Prompt tokens computed by a prefill",
                                        registry=r)
        self.ttft = Histogram("specserve_ttft_seconds", "Time to first token", buckets=_SECONDS, registry=r)
        self.tpot = Histogram("specserve_tpot_seconds", "Mean time per output token", buckets=_SECONDS, registry=r)
        self.step = Histogram("specserve_step_seconds", "Step time", buckets=_SECONDS, registry=r)
        self.accepted_len = Histogram("specserve_accepted_length", "Tokens committed per session per step",
                                      buckets=tuple(range(1, 18)), registry=r)
        self.drafted = Counter("specserve_draft_tokens", "Draft tokens verified", registry=r)
        self.pruned = Counter("specserve_pruned_slots", "Drafted slots the planner did not verify", registry=r)
        self.accepted = Counter("specserve_accepted_tokens", "Draft tokens accepted", registry=r)
        self.running = Gauge("specserve_running", "Running sessions", registry=r)
        self.queued = Gauge("specserve_queued", "Waiting requests", registry=r)
        self.invalid_ops = Counter("specserve_ops_invalid", "Ops key values rejected as invalid", registry=r)
        self.invalid_strategies = Counter("specserve_strategy_invalid", "Strategy documents ignored as invalid",
                                          registry=r)
        self.drafter_available = Gauge("specserve_drafter_available", "1 while the drafter answers", registry=r)
        self.strategy_version = Gauge("specserve_strategy_version", "Version of the strategy in force", registry=r)
        self.strategy_age = Gauge("specserve_strategy_age_seconds", "Age of the strategy in force", registry=r)
        self.telemetry_dropped = Gauge("specserve_telemetry_dropped", "Telemetry records dropped (Redis away or "
                                       "the buffer full), since start", registry=r)
        self.step_scale = Gauge("specserve_step_time_scale", "Measured over predicted step time (the cost "
                                "model's online correction)", registry=r)
        self.draft_scale = Gauge("specserve_draft_step_time_scale", "Steps that verify drafts: measured over "
                                 "predicted time, over the plain steps' correction", registry=r)
        self.ttft_scale = Gauge("specserve_ttft_scale", "Measured over predicted time to first token "
                                "(admission's online correction)", registry=r)
        self.output_share = Gauge("specserve_output_share", "Generated over max_new_tokens of finished "
                                  "requests (admission's expected output length)", registry=r)
        self._invalid_seen = {"ops": 0, "strategies": 0}

    def follow(self, scheduler, telemetry=None, admission=None) -> None:
        """Gauges read at scrape time from the running scheduler (telemetry emitter, admission)."""
        self.drafter_available.set_function(lambda: float(scheduler.drafter_available))
        self.step_scale.set_function(lambda: scheduler.planner.time_scale)
        self.draft_scale.set_function(lambda: scheduler.planner.draft_scale)
        if admission is not None:
            self.ttft_scale.set_function(lambda: admission.ttft_scale)
            self.output_share.set_function(lambda: admission.output_share)
        self.strategy_version.set_function(lambda: scheduler.planner.strategy.version)
        issued: Callable[[], float] = lambda: scheduler.planner.strategy.issued_at
        self.strategy_age.set_function(lambda: time.time() - issued() if issued() else 0.0)
        if telemetry is not None:
            self.telemetry_dropped.set_function(lambda: telemetry.dropped)

    def observe_invalid(self, ops: int, strategies: int) -> None:
        """The live reader's running counts of ignored ops values and strategy documents; the
        counters follow them."""
        for kind, total, counter in (("ops", ops, self.invalid_ops), ("strategies", strategies, self.invalid_strategies)):
            if total > self._invalid_seen[kind]:
                counter.inc(total - self._invalid_seen[kind])
                self._invalid_seen[kind] = total

    def observe_step(self, rec: StepRecord) -> None:
        self.step.observe(rec.step_ms / 1000)
        self.drafted.inc(sum(rec.drafted))
        self.pruned.inc(rec.pruned)
        self.accepted.inc(sum(rec.accepted))
        for a in rec.accepted:
            self.accepted_len.observe(a + 1)
        self.running.set(rec.running)
        self.queued.set(rec.queue_depth)

    def observe_finish(self, seq: Sequence) -> None:
        self.finished.labels(seq.finish.value if seq.finish else "unknown").inc()
        self.output_tokens.inc(len(seq.generated))
        if seq.first_token_at is not None:
            self.cached_tokens.inc(seq.cached_tokens)
            self.prefilled_tokens.inc(len(seq.prompt) - seq.cached_tokens)
        if seq.first_token_at is not None:
            self.ttft.observe(seq.ttft_ms / 1000)
        if len(seq.generated) > 1:
            self.tpot.observe(seq.tpot_ms / 1000)
        (self.attained if attainment(seq).slo else self.violated).inc()
