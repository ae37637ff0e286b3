"""The wire form of drafts keeps what the gateway prices and calibrates them by."""

from specserve import codec
from specserve.contracts import Draft, ProposeOutput, SessionStatus


def test_a_draft_survives_the_wire_with_its_proposer_and_unread_count():
    out = ProposeOutput([Draft("a", SessionStatus.OK, [5, 6], [1.0, 0.5], model_unread=7, free=True),
                         Draft("b", SessionStatus.OK, [9], [0.25]),
                         Draft("c", SessionStatus.NOT_FOUND)], draft_steps=1, draft_ns=1234)
    back = codec.propose_output_from_pb(codec.propose_output_to_pb(out))
    assert back == out
