"""The strategy document: strict validation, so no document can crash a reader."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specserve.errors import InvalidArgument
from specserve.strategy import Strategy


def _doc(**changes) -> str:
    doc = json.loads(Strategy().to_json())
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            doc[outer][inner] = value
        else:
            doc[key] = value
    return json.dumps(doc)


@pytest.mark.parametrize("changes, field", [
    ({"static_k": 2.0}, "static_k"),
    ({"max_draft_tokens": True}, "max_draft_tokens"),
    ({"ttl_s": float("nan")}, "ttl_s"),
    ({"ttl_s": float("inf")}, "ttl_s"),
    ({"issued_at": time.time() + 3600}, "issued_at"),
    ({"cost.verify_fixed": 0.0, "cost.verify_per_pos": 0.0}, "cost.verify_fixed"),
    ({"cost.verify_table": [[1, 0.0], [2, 0.0]]}, "cost.verify_table"),
    ({"cost.verify_table": [[1, 80.0], [1, 90.0]]}, "cost.verify_table"),
    ({"cost.verify_table": [[2, 80.0], [1, 90.0]]}, "cost.verify_table"),
    ({"cost.verify_table": [[1.5, 80.0]]}, "cost.verify_table"),
    ({"cost.draft_fixed": -1.0}, "cost.draft_fixed"),
    ({"cost.shape_buckets": [4, 2]}, "cost.shape_buckets"),
    ({"calibration.raw": [0.0, 2.0]}, "calibration.raw"),
    ({"free_calibration.survival": [0.5, 0.2]}, "free_calibration"),
    ({"recall_calibration.survival": [0.5, 0.2]}, "recall_calibration"),
    ({"gate_margin": 0}, "gate_margin"),
    ({"surprise": 1}, "strategy"),
])
def test_bad_documents_are_rejected_naming_the_field(changes, field):
    with pytest.raises(InvalidArgument) as err:
        Strategy.from_json(_doc(**changes))
    assert err.value.field == field, str(err.value)
    if field == "strategy":
        assert "surprise" in str(err.value)


def test_a_good_document_round_trips():
    strategy = Strategy(static_k=3, issued_at=time.time()).validate()
    assert Strategy.from_json(strategy.to_json()) == strategy


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                     max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*json.loads(Strategy().to_json()), "cost", "calibration", "free_calibration", "x"]), _JSON,
                       max_size=4) | _JSON)
def test_any_document_is_a_strategy_or_an_invalid_argument(doc):
    base = json.loads(Strategy().to_json())
    text = json.dumps({**base, **doc} if isinstance(doc, dict) else doc)
    try:
        assert isinstance(Strategy.from_json(text), Strategy)
    except InvalidArgument as exc:
        assert exc.field and str(exc)
