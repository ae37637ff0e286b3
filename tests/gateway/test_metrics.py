"""Gateway counters that follow the live reader's running counts."""

from prometheus_client import generate_latest

from gateway.metrics import GatewayMetrics


def test_invalid_ops_and_strategies_are_counted_once_each():
    metrics = GatewayMetrics()
    metrics.observe_invalid(ops=1, strategies=2)
    metrics.observe_invalid(ops=1, strategies=3)  # running totals: only the increase counts
    text = generate_latest(metrics.registry).decode()
    assert "specserve_ops_invalid_total 1.0" in text
    assert "specserve_strategy_invalid_total 3.0" in text
