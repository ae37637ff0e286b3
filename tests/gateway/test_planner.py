"""Controllers as pure functions (docs/baselines.md)."""

import pytest

from gateway.planner import Drafted, Hazard, Planner, SessionView, expected_tokens
from specserve.strategy import Calibration, CostModel, Strategy


def test_specserve_worked_example_expected_tokens_and_pruning():
    C = [[0.9, 0.81, 0.729], [0.95, 0.55, 0.05]]
    assert expected_tokens(C) == pytest.approx(5.989)
    # N = 8 unpruned; buckets make N = 4 the next smaller shape, reached by dropping 4 positions:
    # session 2 entirely, then one of session 1 -> k = [2, 0], 3.71 expected tokens.
    def planner(ratio: float) -> Planner:
        # T(N=8) / T(N=4) = ratio with T = fixed + per_pos * pad(N) and no draft cost.
        per_pos = 1.0
        fixed = (8 - 4 * ratio) / (ratio - 1) if ratio > 1 else 1e9
        return Planner(Strategy(mode="specserve", cost=CostModel(
            draft_fixed=0, draft_per_seq=0, verify_fixed=fixed, verify_per_pos=per_pos, verify_per_ctx=0,
            shape_buckets=(4, 8))))

    views = [SessionView("a", 10), SessionView("b", 10)]
    drafted = {"a": Drafted([1, 2, 3], [0.9, 0.9, 0.9]), "b": Drafted([4, 5, 6], [0.95, 0.55 / 0.95, 0.05 / 0.55])}
    assert expected_tokens([[1.0 * c for c in d.cumulative()[:k]] for d, k in zip(drafted.values(), (2, 0))]) \
        == pytest.approx(3.71)
    assert planner(1.7).prune(views, drafted) == {"a": 2, "b": 0}  # 1.7 >= 5.989 / 3.71
    assert planner(1.5).prune(views, drafted) == {"a": 3, "b": 3}  # 1.5 < 1.614: keep all


@pytest.mark.parametrize("ratio, speculate", [(1.5, True), (1.59, True), (1.61, False), (2.0, False)])
def test_specserve_gate_speculates_exactly_when_one_draft_costs_under_1_6x(ratio, speculate):
    """At c̄ = 0.6, one draft per session gives 1.6 tokens per session: speculate iff T(1) < 1.6 T(0)."""
    cost = CostModel(draft_fixed=0, draft_per_seq=(ratio - 1) * 100, verify_fixed=100, verify_per_pos=0, verify_per_ctx=0)
    planner = Planner(Strategy(mode="specserve", mean_confidence=0.6, cost=cost))
    plans = planner.plan([SessionView("a", 5)])
    assert (plans["a"].max_draft_tokens == 1) == speculate


def test_specserve_extends_while_efficiency_rises():
    cost = CostModel(draft_fixed=10, draft_per_seq=0, verify_fixed=100, verify_per_pos=0, verify_per_ctx=0)
    planner = Planner(Strategy(mode="specserve", cost=cost, max_draft_tokens=8))
    views = [SessionView("a", 5)]
    assert planner.extend(views, {"a": Drafted([1], [0.95])}, 1) == {"a": planner.plan(views)["a"]}
    assert planner.extend(views, {"a": Drafted([1], [0.01])}, 1) == {}


def test_smartspec_picks_k_by_goodput_and_needs_ten_percent():
    cost = CostModel(draft_fixed=10, draft_per_seq=0, verify_fixed=100, verify_per_pos=0, verify_per_ctx=0)
    high = Planner(Strategy(mode="smartspec", acceptance_rate=0.9, cost=cost)).plan([SessionView("a", 5)])
    low = Planner(Strategy(mode="smartspec", acceptance_rate=0.05, cost=cost)).plan([SessionView("a", 5)])
    assert high["a"].max_draft_tokens >= 3 and low["a"].max_draft_tokens == 0


def test_adaptive_gives_late_sessions_a_lower_bar_and_respects_the_tpot_cap():
    cost = CostModel(draft_fixed=20, draft_per_seq=1, verify_fixed=100, verify_per_pos=1, verify_per_ctx=0)
    planner = Planner(Strategy(mode="adaptive", cost=cost, mean_confidence=0.8))
    plans = planner.plan([SessionView("late", 5, behind_ms=50), SessionView("ok", 5)])
    assert plans["late"].stop_confidence < plans["ok"].stop_confidence
    capped = planner.plan([SessionView("tight", 5, tpot_slo_ms=150), SessionView("loose", 5)])
    assert capped["tight"].max_draft_tokens == capped["loose"].max_draft_tokens
    assert planner.step_ms([SessionView("t", 5)] * 2, [capped["tight"].max_draft_tokens] * 2) <= 150
    assert planner.plan([SessionView("x", 5, tpot_slo_ms=50)])["x"].max_draft_tokens == 0  # k = 0 always allowed


def test_threshold_and_static_and_off():
    views = [SessionView("a", 5)]
    assert Planner(Strategy(mode="threshold")).plan(views)["a"].min_token_confidence == 0.6
    assert Planner(Strategy(mode="static", static_k=3)).plan(views)["a"].max_draft_tokens == 3
    assert Planner(Strategy(mode="off")).plan(views)["a"].max_draft_tokens == 0


def test_calibration_inverse_round_trips():
    cal = Calibration((0.0, 0.5, 1.0), (0.0, 0.2, 0.9))
    for s in (0.1, 0.2, 0.5, 0.8):
        assert cal(cal.inverse(s)) == pytest.approx(s)


def test_adaptive_bar_rises_with_measured_slowness():
    """The online correction scales the marginal cost as it scales the efficiency: steps measured
    slower than predicted make the bar no lower (before, they made it lower: more drafting)."""
    cost = CostModel(draft_fixed=20, draft_per_seq=5, verify_fixed=100, verify_per_pos=8, verify_per_ctx=0)
    views = [SessionView("a", 5), SessionView("b", 5)]
    planner = Planner(Strategy(mode="adaptive", cost=cost, mean_confidence=0.8))
    nominal = planner.plan(views)["a"].stop_confidence
    planner.time_scale = 3.0
    slow = planner.plan(views)["a"].stop_confidence
    assert slow >= nominal > 0


def test_specserve_running_mean_is_of_draft_confidences_and_survives_new_strategies():
    cost = CostModel(draft_fixed=0, draft_per_seq=0, verify_fixed=100, verify_per_pos=0, verify_per_ctx=0)
    planner = Planner(Strategy(mode="specserve", cost=cost))
    views = [SessionView("a", 5), SessionView("b", 5)]
    drafted = {"a": Drafted([1], [0.9]), "b": Drafted([2], [0.7])}
    planner.extend(views, drafted, 1)
    assert planner.running_confidence == pytest.approx((0.6 + 0.9 + 0.7) / 3)
    planner.set_strategy(Strategy(mode="specserve", cost=cost, mean_confidence=0.2))  # a new publication
    assert planner.running_confidence == pytest.approx((0.6 + 0.9 + 0.7) / 3)


def test_adaptive_prunes_only_where_a_shape_step_makes_it_pay():
    """Slots past a step in the measured verify cost are dropped; on a flat table none are."""
    views = [SessionView("a", 5), SessionView("b", 5)]
    drafted = {"a": Drafted([1, 2, 3], [0.9, 0.9, 0.9]), "b": Drafted([4, 5, 6], [0.5, 0.3, 0.2])}
    stepped = CostModel(draft_fixed=1, draft_per_seq=0, verify_per_ctx=0,
                        verify_table=((1, 50.0), (4, 52.0), (5, 200.0), (8, 210.0)), shape_buckets=(4, 8))
    flat = CostModel(draft_fixed=1, draft_per_seq=0, verify_per_ctx=0, verify_table=((1, 50.0), (8, 51.0)))
    pruned = Planner(Strategy(mode="adaptive", cost=stepped)).prune(views, drafted)
    kept = Planner(Strategy(mode="adaptive", cost=flat)).prune(views, drafted)
    assert sum(pruned.values()) + len(views) <= 4 and pruned["a"] >= pruned["b"]
    assert kept == {"a": 3, "b": 3}


# The llama.cpp shape of this machine class: 2 positions cost 1.6x one, then about 13 ms each.
STEEP = ((1, 75.0), (2, 120.0), (4, 150.0), (8, 200.0))


def test_a_free_drafter_is_asked_for_its_whole_budget_and_pruned_by_each_draft_s_confidence():
    """Drafts that cost no model: the gate does not guess from a prior mean confidence; every
    session may draft its free budget (longer than a model's), and the slot budget keeps a long
    confident copy (13 tokens for 262 ms beats 1 for 75) and drops a guess at 0.3 (1.3 tokens for
    120 ms loses to 1 for 75)."""
    free = CostModel(draft_fixed=0.5, draft_per_seq=0.0, verify_per_ctx=0.0, verify_table=STEEP, draft_free=True)
    planner = Planner(Strategy(mode="adaptive", cost=free, mean_confidence=0.1, max_draft_tokens=7,
                               max_free_draft_tokens=12))
    views = [SessionView("copy", 50)]
    assert planner.plan(views)["copy"].max_draft_tokens == 12
    assert planner.prune(views, {"copy": Drafted(list(range(12)), [1.0] * 12)}) == {"copy": 12}
    assert planner.prune(views, {"copy": Drafted([1], [0.3])}) == {"copy": 0}


def test_a_free_draft_within_the_gate_margin_of_plain_decoding_is_pruned():
    """One free draft at calibrated survival 0.65: 1.65 tokens for 120 ms against 1 for 75 is 1.03x
    plain decoding's rate, a gain the margin of 1.05 does not count on; at 0.75 (1.09x) it is kept."""
    from gateway.planner.adaptive import PRUNE_MARGIN

    free = CostModel(draft_fixed=0.5, draft_per_seq=0.0, verify_per_ctx=0.0, verify_table=STEEP, draft_free=True)
    planner = Planner(Strategy(mode="adaptive", cost=free))
    views = [SessionView("s", 50)]
    assert PRUNE_MARGIN == 1.05
    assert planner.prune(views, {"s": Drafted([1], [0.65], free=True)}) == {"s": 0}
    assert planner.prune(views, {"s": Drafted([1], [0.75], free=True)}) == {"s": 1}


def test_steps_that_verify_drafts_are_corrected_apart_from_plain_steps():
    """Plain steps measured at their price and steps with drafts at 1.3x theirs: the plain price
    stays, the drafted steps' rises (by a tenth of the gap per step), and the free draft at 0.75
    that the table alone keeps (1.09x plain decoding's rate) is dropped once drafts are dearer."""
    free = CostModel(draft_fixed=0.5, draft_per_seq=0.0, verify_per_ctx=0.0, verify_table=STEEP, draft_free=True)
    planner = Planner(Strategy(mode="adaptive", cost=free))
    views = [SessionView("s", 50)]
    plain, one = planner.step_ms(views, [0], free=True), planner.step_ms(views, [1], free=True)
    planner.observe_step(one, 1.3 * one, drafted=True)
    assert planner.draft_scale == pytest.approx(1.03) and planner.time_scale == 1.0
    for _ in range(40):
        planner.observe_step(plain, plain)
        planner.observe_step(planner.step_ms(views, [1], free=True), 1.3 * one, drafted=True)
    assert planner.step_ms(views, [0], free=True) == pytest.approx(plain)
    assert planner.step_ms(views, [1], free=True) == pytest.approx(1.3 * one, rel=0.02)
    assert planner.prune(views, {"s": Drafted([1], [0.75], free=True)}) == {"s": 0}


def test_no_session_drafts_past_its_last_token():
    """A verify emits the accepted drafts and one token more: a session with 3 tokens left drafts
    at most 2, whatever the mode."""
    free = CostModel(draft_fixed=0.5, draft_per_seq=0.0, verify_per_ctx=0.0, verify_table=STEEP, draft_free=True)
    for strategy in (Strategy(mode="adaptive", cost=free), Strategy(mode="static", static_k=6)):
        plans = Planner(strategy).plan([SessionView("end", 50, remaining=3), SessionView("on", 50)])
        assert plans["end"].max_draft_tokens == 2 < plans["on"].max_draft_tokens


def test_each_draft_is_pruned_through_its_own_proposer_s_calibration():
    """The same raw confidence 1.0 means what each proposer's drafts measured: free drafts that
    survived 95% keep a 12-token copy; a model whose drafts at 1.0 survived 20% keeps none."""
    free = CostModel(draft_fixed=0.5, draft_per_seq=0.0, verify_per_ctx=0.0, verify_table=STEEP, draft_free=True)
    low, high = Calibration((0.0, 1.0), (0.0, 0.2)), Calibration((0.0, 1.0), (0.0, 0.95))
    planner = Planner(Strategy(mode="adaptive", cost=free, max_free_draft_tokens=12, calibration=low,
                               free_calibration=high), hybrid=True)
    views = [SessionView("copy", 50)]
    tokens, sure = list(range(12)), [1.0] * 12
    assert planner.prune(views, {"copy": Drafted(tokens, sure, free=True)}) == {"copy": 12}
    assert planner.prune(views, {"copy": Drafted(tokens, sure, free=False)}) == {"copy": 0}


def test_a_session_that_copies_better_than_the_calibration_keeps_longer_drafts():
    """The hazard ratio: a session whose drafts were rejected far less often than the pooled
    calibration predicted (a code edit) keeps a long draft that the calibration alone would cut,
    and one rejected more often keeps fewer; with no history the ratio is 1."""
    free = CostModel(draft_fixed=0.5, draft_per_seq=0.0, verify_per_ctx=0.0, verify_table=STEEP, draft_free=True)
    planner = Planner(Strategy(mode="adaptive", cost=free, max_free_draft_tokens=12))
    drafts = Drafted(list(range(12)), [0.8] * 12, free=True)  # survival 0.8, 0.64, ... as calibrated
    copying, guessing = Hazard(), Hazard()
    assert copying.ratio == 1.0
    for _ in range(10):
        copying.observe(planner.survival(drafts), accepted=12)  # all 12 accepted, 2.4 rejections predicted
        guessing.observe(planner.survival(drafts)[:3], accepted=0)  # the first rejected, 0.2 predicted
    assert copying.ratio < 0.2 and guessing.ratio > 3

    def kept(hazard: Hazard) -> int:
        return planner.prune([SessionView("s", 50, hazard=hazard.ratio)], {"s": drafts})["s"]

    assert kept(copying) == 12 > kept(Hazard()) > kept(guessing)


def test_drafts_are_free_only_while_every_round_s_were():
    drafted = Drafted()
    drafted.add([1, 2], [1.0, 1.0], free=True)
    assert drafted.free
    drafted.add([3], [0.5], free=False)
    assert not drafted.free and drafted.tokens == [1, 2, 3]
    drafted.add([4], [1.0], free=True)
    assert not drafted.free
    recalled = Drafted()
    recalled.add([1], [0.9], free=True, recalled=True)
    assert recalled.recalled
    recalled.add([2], [0.9], free=True)  # a round from the session's own tokens: no longer all recalled
    assert recalled.free and not recalled.recalled


def test_recalled_free_drafts_are_priced_through_their_own_calibration():
    """At the same raw confidence, a draft recalled from another request's answer survives less
    often than one from the session's own tokens: each goes through its own curve."""
    own, recall = Calibration((0.0, 1.0), (0.0, 0.9)), Calibration((0.0, 1.0), (0.0, 0.3))
    planner = Planner(Strategy(free_calibration=own, recall_calibration=recall), draft_free=True)
    drafts = {}
    for name, recalled in (("own", False), ("recalled", True)):
        drafts[name] = Drafted()
        drafts[name].add([1], [0.8], free=True, recalled=recalled)
    assert planner.survival(drafts["own"]) == pytest.approx([0.72])
    assert planner.survival(drafts["recalled"]) == pytest.approx([0.24])


def test_model_drafts_stay_off_where_the_table_says_they_lose():
    """The same steep table with a draft model at half a target token: at the prior mean
    confidence, one draft (1.6 tokens for 37.5 + 120 ms) loses to plain decoding (1 for 75 ms)."""
    model = CostModel(draft_fixed=37.5, draft_per_seq=0.0, verify_per_ctx=0.0, verify_table=STEEP)
    planner = Planner(Strategy(mode="adaptive", cost=model, mean_confidence=0.6))
    assert planner.plan([SessionView("a", 50)])["a"].max_draft_tokens == 0
    assert planner.strategy.cost.t_draft(1, 4) == 150.0  # k forward passes


def test_a_free_drafter_prices_drafting_per_call_even_under_a_model_s_strategy():
    model = CostModel(draft_fixed=37.5, draft_per_seq=2.0, verify_table=STEEP)
    planner = Planner(Strategy(mode="adaptive", cost=model), draft_free=True)
    assert planner.strategy.cost.draft_free and planner.strategy.cost.t_draft(1, 8) < 5
    planner.set_strategy(Strategy(mode="adaptive", cost=model))  # a publication fitted to a model drafter
    assert planner.strategy.cost.t_draft(1, 8) < 5


def test_exploration_probes_a_closed_gate_within_its_share_of_decode_time():
    """Drafting looks unprofitable (the gate is closed by the estimates), yet now and then a step
    drafts one token per session so the acceptance estimates stay true: the probes' extra time
    stays within the budget, and they do happen."""
    from gateway.planner import EXPLORE_SHARE

    model = CostModel(draft_fixed=37.5, draft_per_seq=0.0, verify_per_ctx=0.0, verify_table=STEEP)
    planner = Planner(Strategy(mode="adaptive", cost=model, mean_confidence=0.3))
    views = [SessionView("a", 50), SessionView("b", 50)]
    plain, one = planner.step_ms(views, [0, 0]), planner.step_ms(views, [1, 1])
    probes, total, extra = 0, 0.0, 0.0
    for _ in range(2000):
        plans = planner.plan(views)
        ks = [plans[v.key].max_draft_tokens for v in views]
        step_ms = one if planner.exploring else plain
        probe_ms = one - plain if planner.exploring else 0.0
        assert set(ks) == ({1} if planner.exploring else {0})
        planner.observe_step(step_ms, step_ms, probe_ms)
        probes += planner.exploring
        total += step_ms
        extra += probe_ms
    assert probes > 0
    assert extra <= EXPLORE_SHARE * total * 1.05


def test_decoding_under_a_mode_that_never_explores_earns_no_exploration_budget():
    """Steps decoded under `off` (or a static k) are not decode time of an exploring controller: a
    switch to `adaptive` after them starts with no budget to spend, so the probes stay within 2%
    of the adaptive controller's own decoding."""
    model = CostModel(draft_fixed=37.5, draft_per_seq=0.0, verify_per_ctx=0.0, verify_table=STEEP)
    planner = Planner(Strategy(mode="off", cost=model))
    for _ in range(1000):
        planner.observe_step(75.0, 75.0)
    planner.set_strategy(Strategy(mode="adaptive", cost=model, mean_confidence=0.3))
    assert not planner.may_explore(45.0)
    for _ in range(100):
        planner.observe_step(75.0, 75.0)
    assert planner.may_explore(45.0)


def test_steps_that_read_prompts_earn_no_exploration_budget():
    """A prompt's reading is no decoding: however long the prefills, only decode steps make the
    time that 2% of goes to probes."""
    model = CostModel(draft_fixed=37.5, draft_per_seq=0.0, verify_per_ctx=0.0, verify_table=STEEP)
    planner = Planner(Strategy(mode="adaptive", cost=model, mean_confidence=0.3))
    for _ in range(1000):
        planner.observe_step(2000.0, 2000.0, prompt=True)
    assert planner.decode_ms == 0 and not planner.may_explore(45.0)
    for _ in range(100):
        planner.observe_step(75.0, 75.0)
    assert planner.may_explore(45.0)


def test_a_probe_is_charged_its_predicted_extra_time_or_what_it_measured_where_that_is_more():
    model = CostModel(draft_fixed=37.5, draft_per_seq=0.0, verify_per_ctx=0.0, verify_table=STEEP)
    planner = Planner(Strategy(mode="adaptive", cost=model))
    views = [SessionView("a", 50)]
    plain, one = planner.step_ms(views, [0]), planner.step_ms(views, [1])
    assert planner.probe_ms(views, False, 0, measured_ms=plain) == pytest.approx(one - plain)
    assert planner.probe_ms(views, False, 0, measured_ms=one + 100.0) == pytest.approx(one + 100.0 - plain)
    reading = model.t_positions(400)  # the drafter read 400 tokens first
    assert planner.probe_ms(views, False, 400, measured_ms=plain) == pytest.approx(one + reading - plain)


def test_free_drafts_all_pruned_are_probed_within_the_budget_so_a_low_calibration_can_recover():
    """A calibration that a few rejections set low prices a confident copy at 5% per slot, so
    prune keeps none of it; within the exploration budget a step now and then verifies the first
    free draft of each session anyway (no budget, no probe), and the probes' extra time stays
    within 2% of the decode time."""
    from gateway.planner import EXPLORE_SHARE

    free = CostModel(draft_fixed=0.5, draft_per_seq=0.0, verify_per_ctx=0.0, verify_table=STEEP, draft_free=True)
    planner = Planner(Strategy(mode="adaptive", cost=free, max_free_draft_tokens=12,
                               free_calibration=Calibration((0.0, 1.0), (0.0, 0.05))), draft_free=True)
    views = [SessionView("copy", 50), SessionView("fresh", 50, mode="off")]
    drafted = {"copy": Drafted(list(range(12)), [1.0] * 12, free=True), "fresh": Drafted()}
    planner.plan(views)
    assert planner.prune(views, drafted) == {"copy": 0, "fresh": 0} and not planner.exploring  # no budget yet
    plain, probe = planner.step_ms(views, [0, 0]), planner.step_ms(views, [1, 0], free=True)
    probes, total, extra = 0, 0.0, 0.0
    for _ in range(2000):
        planner.plan(views)
        keep = planner.prune(views, drafted)
        assert keep == ({"copy": 1, "fresh": 0} if planner.exploring else {"copy": 0, "fresh": 0})
        step_ms = probe if planner.exploring else plain
        planner.observe_step(step_ms, step_ms, step_ms - plain)
        probes += planner.exploring
        total += step_ms
        extra += step_ms - plain
    assert probes > 0
    assert extra <= EXPLORE_SHARE * total * 1.05


# A draft model at half a verifier position per draft step, so it reads at half the verifier's speed.
READING_MODEL = CostModel(draft_fixed=20.0, draft_per_seq=0.0, verify_per_ctx=0.0,
                          verify_table=((1, 40.0), (2, 42.0), (4, 46.0), (512, 400.0)))


def test_a_drafter_catch_up_is_paid_back_over_the_steps_a_session_has_left():
    """One draft pays here for a drafter that follows the session; one that must first read 400
    unread tokens pays only where enough steps are left to earn that reading back."""
    # A draft step at half a verifier position: the drafter reads at half the verifier's speed.
    model = READING_MODEL
    planner = Planner(Strategy(mode="adaptive", cost=model, mean_confidence=0.6))
    assert planner.gate([SessionView("a", 400, unread=1, remaining=10)], 0.6)
    assert not planner.gate([SessionView("a", 400, unread=400, remaining=10)], 0.6)
    assert planner.gate([SessionView("a", 400, unread=400, remaining=2000)], 0.6)
    free = Planner(Strategy(mode="adaptive", cost=model), draft_free=True)  # a lookup reads for nothing
    assert free.catchup_ms([SessionView("a", 400, unread=400, remaining=10)]) == 0.0


def test_no_probe_in_a_step_that_carries_a_prompt_and_probes_pay_for_their_catch_up():
    model = CostModel(draft_fixed=37.5, draft_per_seq=0.0, verify_per_ctx=0.0, verify_table=STEEP)
    planner = Planner(Strategy(mode="adaptive", cost=model, mean_confidence=0.3))
    planner.decode_ms = 100_000.0  # a budget of 2 s of probes
    planner.prompt_tokens = 64
    planner.plan([SessionView("a", 50)])
    assert not planner.exploring
    planner.prompt_tokens = 0
    planner.plan([SessionView("a", 5000, unread=5000)])  # reading 5,000 tokens does not fit the budget
    assert not planner.exploring
    planner.plan([SessionView("a", 50, unread=1)])
    assert planner.exploring


def test_a_session_whose_catch_up_would_stall_the_step_drafts_no_model_tokens():
    """Drafting pays here, but not for a session the drafter has not read: reading its 400
    tokens would cost more than a plain step and hold up every first token behind the step."""
    # A draft step at half a verifier position: the drafter reads at half the verifier's speed.
    model = READING_MODEL
    planner = Planner(Strategy(mode="adaptive", cost=model, mean_confidence=0.8))
    plans = planner.plan([SessionView("read", 400, unread=2, remaining=2000),
                          SessionView("unread", 400, unread=400, remaining=2000)])
    assert plans["read"].max_draft_tokens > 0 and plans["unread"].max_draft_tokens == 0


def test_the_drafter_reads_at_most_a_plain_step_s_worth_of_unread_tokens_per_step():
    model = READING_MODEL
    planner = Planner(Strategy(mode="adaptive", cost=model, mean_confidence=0.8))
    views = [SessionView(f"s{i}", 40, unread=20 + i, remaining=2000) for i in range(4)]
    per_session, plain = planner.catchup_ms(views[:1]), planner.step_ms(views, [0] * 4)
    assert per_session < plain < 4 * per_session  # each alone fits, all four do not
    plans = planner.plan(views)
    drafting = [v.key for v in views if plans[v.key].max_draft_tokens > 0]
    assert 0 < len(drafting) < 4 and sum(planner.catchup_ms([v]) for v in views if v.key in drafting) <= plain


def test_a_step_that_carries_a_prompt_drafts_nothing_free_drafts_included():
    """The prompt's first token comes from this step: no draft may lengthen it, not even drafts
    that cost nothing to make (their verify positions do)."""
    model = READING_MODEL
    free = CostModel(draft_fixed=0.5, draft_per_seq=0.0, verify_per_ctx=0.0, verify_table=STEEP, draft_free=True)
    for cost, hybrid in ((model, False), (model, True), (free, False)):
        planner = Planner(Strategy(mode="adaptive", cost=cost, mean_confidence=0.9), hybrid=hybrid)
        view = [SessionView("s", 400, unread=1, remaining=2000)]
        assert planner.plan(view)["s"].max_draft_tokens > 0
        planner.prompt_tokens = 64  # the step also carries a prompt chunk
        assert planner.plan(view)["s"].max_draft_tokens == 0


def test_a_hybrid_session_whose_model_has_not_read_it_gets_free_drafts_only():
    """The hybrid's suffix index read the whole prompt, its model none of it: the model's reading
    counts as unread, so the session is offered free drafts, not a stalling model catch-up."""
    from gateway.scheduler import view_of
    from gateway.sequence import Sequence
    from specserve.contracts import SamplingParams

    seq = Sequence("s", list(range(400)), SamplingParams(max_new_tokens=2000))
    seq.drafter_position, seq.model_unread = 400, 400
    view = view_of(seq)
    assert view.unread == 400
    model = READING_MODEL
    planner = Planner(Strategy(mode="adaptive", cost=model, mean_confidence=0.8), hybrid=True)
    plan = planner.plan([view])["s"]
    assert plan.free_only and plan.max_draft_tokens > 0
    assert planner.catchup_tokens([view]) == 400
    seq.model_unread = 0
    assert not planner.plan([view_of(seq)])["s"].free_only


def test_a_hybrid_s_free_drafts_may_run_past_the_model_s_budget():
    """Gate open or closed, a hybrid's suffix drafts are asked for up to the free budget; the
    model's share stays within K_max."""
    model = READING_MODEL
    view = [SessionView("s", 100, unread=1, remaining=500)]
    for confidence, free_only in ((0.9, False), (0.01, True)):
        planner = Planner(Strategy(mode="adaptive", cost=model, mean_confidence=confidence, max_draft_tokens=8,
                                   max_free_draft_tokens=20), hybrid=True)
        plan = planner.plan(view)["s"]
        assert (plan.max_draft_tokens, plan.free_only) == (20, free_only)
        assert free_only or plan.max_model_draft_tokens == 8
    # A drafter of one kind asks for the model's budget only.
    planner = Planner(Strategy(mode="adaptive", cost=model, mean_confidence=0.9, max_free_draft_tokens=20))
    assert planner.plan(view)["s"].max_draft_tokens == 8


def test_free_drafts_share_their_budget_among_the_batch_down_to_k_max_each():
    free = CostModel(draft_fixed=0.5, draft_per_seq=0.0, verify_per_ctx=0.0, verify_table=STEEP, draft_free=True)
    planner = Planner(Strategy(mode="adaptive", cost=free, max_draft_tokens=8, max_free_draft_tokens=24))
    budgets = [planner.plan([SessionView(f"s{i}", 50) for i in range(n)])["s0"].max_draft_tokens for n in (1, 2, 4)]
    assert budgets == [24, 12, 8]
