"""Prometheus metrics of the gateway: raw counters and histograms; rates are derived by the reader
(for example attainment = rate(specserve_requests_attained_total) / rate(specserve_requests_finished_total))."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.admission import attainment
from gateway.scheduler import StepRecord
from gateway.sequence import Sequence

_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.admitted = Counter("specserve_requests_admitted", "Requests admitted", registry=r)
        self.rejected = Counter("specserve_requests_rejected", "Requests rejected by admission control", registry=r)
        self.finished = Counter("specserve_requests_finished", "Requests finished", ["reason"], registry=r)
        self.attained = Counter("specserve_requests_attained", "Finished requests within TTFT and TPOT SLO", registry=r)
        self.violated = Counter("specserve_requests_violated", "Finished requests outside their SLO", registry=r)
        self.output_tokens = Counter("specserve_output_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("specserve_ttft_ms", "Time to first token", buckets=_MS, registry=r)
        self.tpot = Histogram("specserve_tpot_ms", "Mean time per output token", buckets=_MS, registry=r)
        self.step = Histogram("specserve_step_ms", "Step time", buckets=_MS, registry=r)
        self.accepted_len = Histogram("specserve_accepted_length", "Tokens committed per session per step",
                                      buckets=tuple(range(1, 18)), registry=r)
        self.drafted = Counter("specserve_draft_tokens", "Draft tokens verified", registry=r)
        self.accepted = Counter("specserve_accepted_tokens", "Draft tokens accepted", registry=r)
        self.running = Gauge("specserve_running", "Running sessions", registry=r)
        self.queued = Gauge("specserve_queued", "Waiting requests", registry=r)
        self.invalid_ops = Gauge("specserve_ops_invalid", "Ops key values rejected as invalid", registry=r)

    def observe_step(self, rec: StepRecord) -> None:
        self.step.observe(rec.step_ms)
        self.drafted.inc(sum(rec.drafted))
        self.accepted.inc(sum(rec.accepted))
        for a in rec.accepted:
            self.accepted_len.observe(a + 1)
        self.running.set(rec.running)
        self.queued.set(rec.queue_depth)

    def observe_finish(self, seq: Sequence) -> None:
        self.finished.labels(seq.finish.value if seq.finish else "unknown").inc()
        self.output_tokens.inc(len(seq.generated))
        if seq.first_token_at is not None:
            self.ttft.observe(seq.ttft_ms)
        if len(seq.generated) > 1:
            self.tpot.observe(seq.tpot_ms)
        (self.attained if attainment(seq).slo else self.violated).inc()
