"""Telemetry records survive the stream as the values they were."""

import pytest

from gateway.scheduler import StepRecord
from services.policy.state import PolicyState
from specserve.telemetry import decode, encode


def _step(**changes) -> StepRecord:
    fields = dict(step_id=1, batch_size=1, verified_positions=3, draft_steps=2, drafted=[2], accepted=[1],
                  position_accepted=[1, 0], position_drafted=[1, 1], confidences=[0.9, 0.5], outcomes=[1, 0],
                  predicted_step_ms=80.0, draft_ms=70.0, verify_ms=90.0, step_ms=170.0, planner_ms=0.1, queue_depth=0,
                  running=1, context_tokens=100, strategy_version=1, mode="adaptive")
    return StepRecord(**{**fields, **changes})


def test_flags_numbers_and_lists_read_back_as_themselves():
    record = decode(encode(_step(draft_free=False, explored=True, position_reached=[1, 1])))
    assert record["draft_free"] is False and record["explored"] is True
    assert record["verify_ms"] == 90.0 and record["position_reached"] == [1, 1] and record["mode"] == "adaptive"


def test_a_model_drafter_s_steps_are_not_priced_as_free_drafts():
    state = PolicyState()
    for n in (1, 2, 4, 1, 2, 4, 1, 2):
        state.observe({**decode(encode(_step(batch_size=n, draft_ms=20.0 + 10 * n))), "component": "gateway"})
    cost = state.decide().cost
    # Two draft passes of 10 + 5n ms per step: four passes at batch 1 take 60 ms (a free one would take 15).
    assert not cost.draft_free and cost.t_draft(1, 4) == pytest.approx(60)
