"""Suffix decoding: the index, the frequency tree, the draft length rule, the global index of recent
outputs, session sync, and lossless output through the step loop."""

import pytest

from services.drafter.proposers.suffix import (
    LONGEST_MATCH,
    MAX_MATCH,
    SEPARATOR,
    SuffixIndex,
    SuffixProposer,
    draft_from,
)
from specserve.contracts import ProposeItem, SamplingParams, SessionStatus
from specserve.strategy import CostModel, Strategy
from tests.helpers import assert_lossless, run_local

CODE = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]


def _index(tokens: list[int]) -> SuffixIndex:
    index = SuffixIndex()
    index.extend(tokens)
    return index


def test_the_longest_earlier_suffix_continues_a_copy():
    index = _index([*CODE, 99, *CODE[:4]])
    m, starts = index.continuations(index.tokens)
    assert m == 4 and starts == [4]  # "10 11 12 13" occurred once before, continued at position 4
    tokens, confidences = draft_from(index, starts, budget=3, floor=0.1, matched=m)
    # Seen once: an unseen continuation weighs 1 / (tokens matched so far), so confidence grows
    # along a copy.
    assert tokens == [14, 15, 16] and confidences == pytest.approx([4 / 5, 5 / 6, 6 / 7])
    assert _index([1, 2, 3]).continuations([1, 2, 3]) == (0, [])  # nothing occurred before


def test_the_frequency_tree_follows_the_majority_and_stops_below_the_floor():
    # After "5": 6 twice, 7 once; after "5 6": 8 once, 9 once.
    index = _index([5, 6, 8, 5, 6, 9, 5, 7, 5])
    m, starts = index.continuations(index.tokens)
    assert m == 1 and len(starts) == 3
    tokens, confidences = draft_from(index, starts, budget=4, floor=0.1, matched=m)
    # 2 of 3 (plus the unseen at weight 1), then 1 of 2 (plus 1/2); ties: the most recent.
    assert tokens[:2] == [6, 9] and confidences[:2] == pytest.approx([2 / 4, 1 / 2.5])
    tokens, _ = draft_from(index, starts, budget=4, floor=0.5, matched=m)
    assert tokens == [6]  # 1/2 * 2/5 = 1/5 < 0.5: the second token is dropped


def test_a_short_match_seen_once_is_a_guess_and_a_long_one_or_a_frequent_one_is_not():
    once_short = _index([7, 8, 30, 7])  # "7" once, followed by 8
    m, starts = once_short.continuations(once_short.tokens)
    assert m == 1 and draft_from(once_short, starts, 1, 0.1, m)[1] == pytest.approx([1 / 2])
    long = _index([*CODE, 99, *CODE[:8]])
    m, starts = long.continuations(long.tokens)
    assert m == 8 and draft_from(long, starts, 1, 0.1, m)[1] == pytest.approx([8 / 9])
    frequent = _index([7, 8] * 20 + [7])
    m, starts = frequent.continuations([7])
    assert draft_from(frequent, starts[-20:], 1, 0.1, 1)[1] == pytest.approx([20 / 21])


def test_draft_length_follows_the_match_length():
    proposer = SuffixProposer(alpha=1.0)
    prompt = [*CODE, 99, *CODE[:2]]  # a two-token match: at most two drafts
    out = proposer.propose([ProposeItem("a", 0, prompt, 8, SamplingParams())])
    assert out.drafts[0].tokens == [12, 13]
    longer = [*CODE, 99, *CODE[:6]]
    out = proposer.propose([ProposeItem("b", 0, longer, 8, SamplingParams())])
    assert out.drafts[0].tokens == [16, 17, 18, 19, 99, 10]  # six matched: six drafts, the text as it went on
    assert out.draft_steps == 0 and len(CODE) < MAX_MATCH


def test_a_copy_longer_than_the_index_drafts_as_long_as_it_matched():
    text = list(range(100, 180))
    index = _index([*text, 99, *text[:50]])
    assert index.continuations(index.tokens) == (50, [50])  # followed back past MAX_MATCH
    assert _index([*text, 99, *text]).continuations([*text, 99, *text])[0] == LONGEST_MATCH
    proposer = SuffixProposer(alpha=1.0)
    out = proposer.propose([ProposeItem("a", 0, [*text, 99, *text[:50]], 64, SamplingParams())])
    assert out.drafts[0].tokens == [*text[50:], 99, *text][:50] and MAX_MATCH < 50


def test_sessions_stay_in_sync_and_extend_continues_after_pending_drafts():
    proposer = SuffixProposer()
    first = proposer.propose([ProposeItem("a", 0, [*CODE, 99, 10, 11], 2, SamplingParams())])
    assert first.drafts[0].tokens == [12, 13]
    more = proposer.propose([ProposeItem("a", 13, [], 2, SamplingParams(), extend=True)])
    assert more.drafts[0].tokens == [14, 15]
    stale = proposer.propose([ProposeItem("a", 5, [1], 2, SamplingParams())])
    assert stale.drafts[0].status is SessionStatus.NOT_FOUND
    assert proposer.release(["a", "b"]) == 1


def test_a_finished_output_serves_later_sessions():
    proposer = SuffixProposer(alpha=1.0)
    answer = [40, 41, 42, 43, 44, 45]
    proposer.propose([ProposeItem("a", 0, [1, 2, 3], 4, SamplingParams())])
    proposer.propose([ProposeItem("a", 3, answer, 4, SamplingParams())])
    proposer.release(["a"])
    out = proposer.propose([ProposeItem("b", 0, [7, 8, 40, 41], 4, SamplingParams())])
    assert out.drafts[0].tokens == [42, 43]  # from the global index: the match is two tokens long
    assert out.drafts[0].free and out.drafts[0].recalled  # calibrated as recalled drafts
    # Once the session's own tokens match longer, its drafts come from them, and say so.
    own = proposer.propose([ProposeItem("b", 4, [42, 50, 51, 52, 7, 8, 40, 41, 42], 4, SamplingParams())])
    assert own.drafts[0].tokens == [50, 51, 52, 7] and not own.drafts[0].recalled
    # A sampled session drafts from its own tokens alone, so its seed alone fixes its text.
    sampled = proposer.propose([ProposeItem("c", 0, [7, 8, 40, 41], 4, SamplingParams(temperature=0.8, seed=3))])
    assert sampled.drafts[0].tokens == []


def test_a_prompt_sent_again_drafts_its_earlier_answer_from_the_first_step():
    """The global index keeps each output after its prompt's tail, so the match of a repeated
    prompt is long at once (its answer's first token alone would be a one-token match: a short
    guess); a prompt that shares only the first token drafts little."""
    proposer = SuffixProposer()
    prompt, answer = list(range(1, 31)), list(range(40, 70))
    proposer.propose([ProposeItem("a", 0, [*prompt, answer[0]], 0, SamplingParams())])
    proposer.propose([ProposeItem("a", 31, answer[1:], 0, SamplingParams())])
    proposer.release(["a"])
    again = proposer.propose([ProposeItem("b", 0, [*prompt, answer[0]], 24, SamplingParams())])
    assert again.drafts[0].tokens == answer[1:25]
    other = proposer.propose([ProposeItem("c", 0, [*range(100, 130), answer[0]], 24, SamplingParams())])
    assert len(other.drafts[0].tokens) <= 4


def test_a_prompt_that_only_ends_like_a_stored_one_counts_the_match_from_the_answer_on():
    """Chat prompts all end with the template's closing tokens: matching them says nothing of
    another request's answer, so the match counts only its tokens past that answer's start."""
    proposer = SuffixProposer()
    closing, answer = [90, 91, 92, 93, 94, 95, 96], list(range(40, 70))
    proposer.propose([ProposeItem("a", 0, [*range(1, 31), *closing, answer[0]], 0, SamplingParams())])
    proposer.propose([ProposeItem("a", 38, answer[1:], 0, SamplingParams())])
    proposer.release(["a"])
    other = [*range(100, 130), *closing, answer[0]]  # another question, the same closing and first token
    first = proposer.propose([ProposeItem("b", 0, other, 24, SamplingParams())])
    assert first.drafts[0].tokens == []  # counted, the 8-token match would draft 24 tokens
    later = proposer.propose([ProposeItem("b", len(other), answer[1:3], 24, SamplingParams())])
    assert later.drafts[0].tokens == answer[3:11]  # two answer tokens matched: alpha 4 x 2


def test_a_draft_ends_at_an_end_of_sequence_token():
    """An answer that quotes the end of its question would otherwise go on to draft the chat
    template's closing tokens that followed the question in the prompt."""
    end, closing = 151645, [151645, 198, 151644, 77091, 198]
    prompt = [*range(1, 20), 30, 31, 32, *closing]
    for stop, drafted in (((end,), [32, end]), ((), [32, *closing, 30, 31])):
        proposer = SuffixProposer(stop_tokens=stop)
        proposer.propose([ProposeItem("a", 0, prompt, 0, SamplingParams())])
        out = proposer.propose([ProposeItem("a", len(prompt), [30, 31], 8, SamplingParams())])
        assert out.drafts[0].tokens == drafted


def test_the_global_index_stays_bounded():
    proposer = SuffixProposer(global_tokens=100)
    for i in range(30):
        proposer.propose([ProposeItem(f"s{i}", 0, [1], 0, SamplingParams())])
        proposer.propose([ProposeItem(f"s{i}", 1, list(range(100 + i, 110 + i)), 0, SamplingParams())])
        proposer.release([f"s{i}"])
    assert sum(len(g.tokens) for g in proposer.generations) <= 100
    assert proposer.generations[-1].tokens[-11:] == [*range(129, 139), SEPARATOR]
    # The oldest outputs are gone, the newest still draft for a later session.
    out = proposer.propose([ProposeItem("late", 0, [0, 100, 101], 4, SamplingParams())])
    fresh = proposer.propose([ProposeItem("new", 0, [0, 129, 130], 4, SamplingParams())])
    assert out.drafts[0].tokens == [] and fresh.drafts[0].tokens[:2] == [131, 132]


@pytest.mark.parametrize("strategy", [Strategy(mode="static", static_k=4),
                                      Strategy(mode="adaptive", cost=CostModel(draft_free=True, draft_fixed=0.1))])
def test_suffix_drafts_are_lossless_across_batch_mixes(tiny_pair, strategy):
    tokenizer = tiny_pair.tokenizer
    code = tokenizer.encode("for i in range(10):\n    print(i)\nfor i in range(10):\n")
    requests = [(code, SamplingParams(max_new_tokens=30)), (code[:7], SamplingParams(max_new_tokens=12)),
                ([5, 9, 11], SamplingParams(max_new_tokens=20))]
    records = []
    seqs, outs = run_local(tiny_pair, requests, strategy, proposer="suffix", overrides=[("", 0), ("static", 2)],
                           on_step=records.append)
    for (prompt, params), (tokens, _, _) in zip(requests, outs):
        assert_lossless(tokens, tiny_pair.reference(prompt, params.max_new_tokens, tokenizer.eos_token_id))
    assert sum(s.draft_tokens for s in seqs) > 0
    # Every verified draft is the suffix's (from the session's own tokens, 1, or recalled from an
    # earlier request's answer, 2), and its records say so, per slot and per position.
    slots = [f for r in records for f in r.free_slots]
    assert len(slots) == sum(len(r.confidences) for r in records) and slots and set(slots) <= {1, 2}
    assert all(r.free_position_reached == r.position_reached for r in records)


def test_the_hybrid_drafts_from_the_suffix_where_it_expects_enough_and_from_the_model_elsewhere(tiny_pair):
    from services.drafter.proposers.hybrid import HybridProposer

    proposer = HybridProposer(tiny_pair.runtimes()[1])
    copy = [*CODE, 99, *CODE[:5]]
    out = proposer.propose([ProposeItem("copy", 0, copy, 4, SamplingParams()),
                            ProposeItem("fresh", 0, [5, 9, 11], 4, SamplingParams())])
    assert out.drafts[0].tokens == [15, 16, 17, 18] and out.drafts[0].confidences == pytest.approx([5 / 6, 6 / 7, 7 / 8, 8 / 9])
    assert len(out.drafts[1].tokens) == 4 and out.draft_steps == 4  # the model drafted the fresh one only
    assert [d.free for d in out.drafts] == [True, False]  # each calibrated as its proposer's
    assert proposer.model.sessions.get("copy") is None  # the model never read the copied session
    # The gateway learns what the model would read first if it drafted for the session.
    assert [d.model_unread for d in out.drafts] == [len(copy), 0]
    # Free drafts only: the model is left alone, even where the suffix has nothing.
    out = proposer.propose([ProposeItem("fresh", 3, [7], 4, SamplingParams(), free_only=True)])
    assert out.draft_steps == 0 and out.drafts[0].status is SessionStatus.OK
    # When the model drafts for the copied session later, it catches up on everything it missed.
    out = proposer.propose([ProposeItem("copy", len(copy), [1, 2, 3], 2, SamplingParams())])
    assert out.draft_steps == 2 and len(proposer.model.sessions.get("copy").tokens) == len(copy) + 3
    assert out.drafts[0].model_unread == 0
    # A budget past the model's: the model stops at its own.
    out = proposer.propose([ProposeItem("fresh", 4, [8], 12, SamplingParams(), max_model_draft_tokens=3)])
    assert out.draft_steps == 3 and len(out.drafts[0].tokens) == 3
    assert proposer.release(["copy", "fresh"]) == 2


def test_hybrid_drafts_are_lossless(tiny_pair):
    tokenizer = tiny_pair.tokenizer
    code = tokenizer.encode("for i in range(10):\n    print(i)\nfor i in range(10):\n")
    requests = [(code, SamplingParams(max_new_tokens=30)), ([5, 9, 11], SamplingParams(max_new_tokens=20))]
    cheap = CostModel(draft_fixed=1.0, draft_per_seq=0.1, verify_per_pos=0.0)  # the tiny drafts are unsure: verifying is free
    for strategy in (Strategy(mode="static", static_k=3), Strategy(mode="adaptive", cost=cheap)):
        records = []
        seqs, outs = run_local(tiny_pair, requests, strategy, proposer="hybrid", on_step=records.append)
        for (prompt, params), (tokens, _, _) in zip(requests, outs):
            assert_lossless(tokens, tiny_pair.reference(prompt, params.max_new_tokens, tokenizer.eos_token_id))
        assert sum(s.draft_tokens for s in seqs) > 0
        # Step records say which proposer drafted each verified position.
        for r in records:
            assert len(r.free_slots) == len(r.confidences)
            assert all(f <= n for f, n in zip(r.free_position_reached, r.position_reached))
        if strategy.mode == "static":
            assert 0 in [f for r in records for f in r.free_slots]  # the model drafted the fresh prompt


def test_a_step_verifying_free_drafts_only_is_priced_without_the_model_s_drafting(tiny_pair):
    """A hybrid whose model drafts at a prohibitive price drafts from the suffix alone; those steps'
    predicted time leaves the model's drafting out (else the step-time correction learns the gap)."""
    tokenizer = tiny_pair.tokenizer
    code = tokenizer.encode("for i in range(10):\n    print(i)\nfor i in range(10):\n    print(i)\nfor i in range(10):\n")
    costly = CostModel(draft_fixed=10_000.0, draft_per_seq=0.0, verify_fixed=3.0, verify_per_pos=0.1, verify_per_ctx=0)
    records = []
    run_local(tiny_pair, [(code, SamplingParams(max_new_tokens=30))], Strategy(mode="adaptive", cost=costly),
              proposer="hybrid", on_step=records.append, max_plain_steps=1)  # a step per token: drafts to look at
    free = [r for r in records if r.free_slots and all(r.free_slots)]
    assert free and all(not r.draft_steps for r in free)
    assert free[0].predicted_step_ms < 1_000, [r.predicted_step_ms for r in free[:3]]
