from services.drafter.proposers.ngram import NgramProposer, ngram_lookup
from specserve.contracts import ProposeItem, SamplingParams, SessionStatus


def test_lookup_continues_after_latest_longest_match():
    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert ngram_lookup(tokens, 2) == [7, 8]  # the latest earlier "1 2 3" is followed by 7 8
    assert ngram_lookup(tokens, 0) == []
    assert ngram_lookup([4, 5, 6], 3) == []
    assert ngram_lookup([5, 6, 5], 4, max_n=1) == [6, 5]


def test_proposer_keeps_sessions_in_sync():
    proposer = NgramProposer()
    out = proposer.propose([ProposeItem("a", 0, [1, 2, 3, 1, 2], 2, SamplingParams())])
    assert out.drafts[0].tokens == [3, 1]
    stale = proposer.propose([ProposeItem("a", 3, [7], 2, SamplingParams())])
    assert stale.drafts[0].status is SessionStatus.NOT_FOUND
    out = proposer.propose([ProposeItem("a", 5, [3], 2, SamplingParams(), extend=False)])
    assert out.drafts[0].tokens == [1, 2]
    assert proposer.release(["a", "b"]) == 1


def test_idle_eviction_frees_all_of_a_session():
    proposer = NgramProposer(session_ttl_s=0.0)
    for i in range(20):
        proposer.propose([ProposeItem(f"s{i}", 0, [1, 2, 3, 1, 2], 2, SamplingParams())])
    assert proposer.sessions.evict_idle() == 20
    per_session = [v for v in vars(proposer).values() if isinstance(v, dict | list) or hasattr(v, "__len__")]
    assert all(len(v) == 0 for v in per_session)
