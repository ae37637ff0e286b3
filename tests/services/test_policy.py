"""The policy brain: estimators, the consumer group on a real Redis, publishing, ops keys."""

import random
import subprocess
import sys

import pytest

from services.policy.__main__ import publish
from services.policy.consumer import Consumer
from services.policy.estimators import CalibrationEstimator, CostEstimator
from services.policy.state import PolicyState, parse_algorithm
from specserve.errors import InvalidArgument
from specserve.live import LiveConfig
from specserve.ops import parse_op
from specserve.strategy import STRATEGY_KEY, CostModel, Strategy
from specserve.telemetry import STREAM, encode


def test_cost_estimator_recovers_known_coefficients():
    rng = random.Random(0)
    est = CostEstimator()
    for _ in range(300):
        n, k, ctx = rng.randrange(1, 9), rng.randrange(1, 6), rng.randrange(50, 2000)
        positions = n * (k + 1)
        est.observe(n, k, k * (70 + 12 * n) * rng.uniform(0.98, 1.02), positions, ctx,
                    (150 + 4 * positions + 0.02 * ctx) * rng.uniform(0.98, 1.02))
    c = est.fit()
    assert c.draft_fixed == pytest.approx(70, rel=0.1) and c.draft_per_seq == pytest.approx(12, rel=0.1)
    assert c.verify_fixed == pytest.approx(150, rel=0.1) and c.verify_per_pos == pytest.approx(4, rel=0.15)
    assert c.verify_per_ctx == pytest.approx(0.02, rel=0.25)


def test_the_per_context_slope_is_not_the_batch_s_own_cost():
    """Bigger batches hold more context: with forward times convex in positions (as measured on a
    CPU) and context growing with the batch, the per-context slope comes from steps of one shape at
    different contexts, so a batch of 3 at 300 context tokens is priced near what it measured."""
    rng = random.Random(1)
    measured = {1: 45.0, 2: 78.0, 3: 104.0, 4: 150.0, 8: 480.0}
    est = CostEstimator()
    for _ in range(300):
        n = rng.choice(list(measured))
        ctx = 100 * n + rng.randrange(-40, 40)
        est.observe(n, 0, 0.0, n, ctx, measured[n] + 0.01 * ctx)
    c = est.fit()
    assert c.verify_per_ctx == pytest.approx(0.01, abs=1e-6)
    assert c.t_verify(3, 300) == pytest.approx(104 + 3, rel=0.01)


@pytest.mark.parametrize("prompt", [True, False])
def test_prompt_chunks_and_rare_shapes_do_not_set_the_per_context_slope(prompt):
    """Measured on a 2-core CPU: plain steps cost 40 ms plus 0.05 per context token; a profiled
    prompt chunk of 16 at context 0 took 223 ms and two verifies of 16 at context 97 took 430 (a
    verify computes a logits row per position). Their gap is no context cost, whether the chunk is
    known as one or not: the slope stays the plain steps', so a long context does not make
    drafting look cheap next to a plain step."""
    rng = random.Random(2)
    est = CostEstimator()
    est.observe(0, 0, 0.0, 16, 0, 223.0, profile=True, prompt=prompt)
    for ctx in (97, 99):
        est.observe(1, 0, 0.0, 16, ctx, 430.0)
    for _ in range(100):
        ctx = rng.randrange(50, 150)
        est.observe(1, 0, 0.0, 1, ctx, (40 + 0.05 * ctx) * rng.uniform(0.99, 1.01))
    c = est.fit()
    assert c.verify_per_ctx == pytest.approx(0.05, abs=0.03)
    assert c.t_verify(1, 300) == pytest.approx(55, rel=0.05)


def test_verifies_and_prompt_chunks_of_one_size_are_priced_apart():
    """A verify of 16 positions computes 16 logits rows, a prompt chunk of 16 one: each kind of
    forward is priced from its own measurements, and a prompt chunk never above a verify."""
    state = PolicyState()
    for positions, ms, prompt in ((1, 40.0, False), (2, 80.0, False), (16, 430.0, False), (64, 1000.0, False),
                                  (16, 223.0, True), (64, 765.0, True), (512, 6500.0, True)):
        for _ in range(2):
            state.observe({"component": "verifier", "call": "profile", "verified_positions": positions,
                           "context_tokens": 0 if prompt else 65, "forward_ms": ms, "prompt": prompt})
    step = {"component": "gateway", "batch_size": 0, "verified_positions": 64, "draft_steps": 0, "draft_ms": 0.0,
            "context_tokens": 0, "verify_ms": 700.0, "confidences": [], "outcomes": [], "drafted": [],
            "accepted": [], "prompt_tokens": 64}
    for _ in range(3):
        state.observe(step)  # live prompt steps of 64 replace the profile's, in the prompt table only
    cost = Strategy.from_json(state.decide().to_json()).cost
    assert cost.t_verify(16, 0) == pytest.approx(430, rel=0.01)
    assert cost.t_verify(16, 0, prompt=True) == pytest.approx(223, rel=0.01)
    assert cost.t_verify(64, 0) == pytest.approx(1000, rel=0.01)
    assert cost.t_verify(64, 0, prompt=True) == pytest.approx(700, rel=0.01)
    assert cost.t_positions(2, prompt=True) == pytest.approx(80, rel=0.01)  # below the prompt table: a verify's
    assert cost.t_positions(512, prompt=True) == pytest.approx(6500, rel=0.01)


def test_calibration_converges_to_observed_survival():
    """Drafts survive with probability c**2 (over-confident drafter): the fitted map learns it."""
    rng = random.Random(1)
    est = CalibrationEstimator()
    for _ in range(20000):
        c = rng.random()
        est.observe([c], [int(rng.random() < c * c)])
    cal = est.fit()
    for c in (0.25, 0.55, 0.85):
        assert cal(c) == pytest.approx(c * c, abs=0.05)
    assert list(cal.survival) == sorted(cal.survival)


def test_a_few_outcomes_correct_a_drafter_that_is_wrong_everywhere():
    """Six misses at raw 0.95 pull every confidence down, bins never seen included; six hits at raw
    0.4 pull it up; nothing seen is the identity."""
    assert CalibrationEstimator().fit()(0.7) == pytest.approx(0.7)
    over = CalibrationEstimator()
    over.observe([0.95] * 6, [0] * 6)
    cal = over.fit()
    assert cal(0.95) < 0.3 and cal(0.55) < 0.3
    under = CalibrationEstimator()
    under.observe([0.4] * 6, [1] * 6)
    assert under.fit()(0.4) > 0.6


@pytest.mark.parametrize("bins", [4, 20])
def test_calibration_has_the_bins_it_is_given(bins):
    est = CalibrationEstimator(bins=bins)
    est.observe([i / 100 for i in range(100)], [i % 2 for i in range(100)])
    assert len(est.seen) == bins and est.seen.sum() == 100
    assert len(est.fit().raw) == bins + 2  # the bin centres between 0 and 1


def _record(i: int) -> dict:
    return encode({"batch_size": 2, "verified_positions": 6, "draft_steps": 2, "draft_ms": 20.0 + i % 3,
                   "context_tokens": 100, "verify_ms": 50.0, "confidences": [0.9, 0.5], "outcomes": [1, 0],
                   "drafted": [2, 2], "accepted": [1, 1], "running": 2, "queue_depth": 0}, component="gateway")


def test_consumer_dies_mid_batch_and_every_entry_is_applied_exactly_once(redis_client):
    ids = [redis_client.xadd(STREAM, _record(i)) for i in range(30)]
    redis_client.xadd(STREAM, {"garbage": "1"})  # malformed: skipped, not fatal
    applied: list[str] = []
    dead = Consumer(redis_client, "a", lambda r: None, min_idle_ms=0)
    # "a" reads a batch, applies 10 of them, then dies before touching the rest.
    reply = redis_client.xreadgroup(dead.group, "a", {STREAM: ">"}, count=20)
    entries = reply[0][1]
    for entry_id, _ in entries[:10]:
        applied.append(entry_id)
        redis_client.xack(STREAM, dead.group, entry_id)
    state = PolicyState()
    survivor = Consumer(redis_client, "b", state.observe, min_idle_ms=0)
    original_handle = survivor._handle

    def tracking(entries):
        applied.extend(e for e, f in entries if f is not None and b"garbage" not in f)
        return original_handle(entries)

    survivor._handle = tracking
    survivor.reclaim()
    while survivor.poll(block_ms=10):
        pass
    assert sorted(applied) == sorted(ids) and len(applied) == len(set(applied))
    assert survivor.malformed == 1 and state.applied == 20
    assert redis_client.xpending(STREAM, survivor.group)["pending"] == 0


@pytest.mark.parametrize("field, raw", [("batch_size", "1e400"), ("confidences", "[Infinity, 0.5]"),
                                        ("verify_ms", "NaN"), ("draft_ms", "-1e999"), ("batch_size", "[1, 2]")])
def test_a_bad_record_is_acked_counted_and_the_next_one_applied(redis_client, field, raw):
    bad = {**_record(0), field: raw}
    redis_client.xadd(STREAM, bad)
    redis_client.xadd(STREAM, _record(1))
    state = PolicyState()
    consumer = Consumer(redis_client, "c", state.observe, min_idle_ms=0)
    while consumer.poll(block_ms=10):
        pass
    assert consumer.malformed == 1 and state.applied == 1
    assert redis_client.xpending(STREAM, consumer.group)["pending"] == 0


def test_an_invalid_fit_is_not_published(redis_client):
    bad = Strategy(cost=CostModel(verify_fixed=0.0, verify_per_pos=0.0))
    assert not publish(redis_client, bad) and redis_client.get(STRATEGY_KEY) is None
    assert publish(redis_client, Strategy()) and Strategy.from_json(redis_client.get(STRATEGY_KEY)) == Strategy()


def test_policy_publishes_a_valid_strategy_from_records(redis_client):
    state = PolicyState("specserve")
    from specserve.telemetry import decode

    for i in range(20):
        state.observe(decode(_record(i)))
    publish(redis_client, state.decide())
    strategy = Strategy.from_json(redis_client.get(STRATEGY_KEY))
    assert strategy.mode == "specserve" and strategy.version == 1 and 0.4 < strategy.acceptance_rate < 0.6
    assert state.decide().version == 2


@pytest.mark.parametrize("name, raw", [("mode", "fast"), ("static_k", "-1"), ("static_k", "x"),
                                       ("max_batch_size", "0"), ("max_plain_steps", "0"), ("max_plain_steps", "65"),
                                       ("linger_ms", "-1"), ("linger_ms", "1000"),
                                       ("default_tpot_ms", "nan?"), ("nope", "1")])
def test_ops_values_are_validated(name, raw):
    with pytest.raises(InvalidArgument) as err:
        parse_op(name, raw)
    assert err.value.field == name


def test_ops_override_the_published_strategy_and_expiry_falls_back():
    import time

    live = LiveConfig(Strategy(mode="adaptive"))
    live.published = Strategy(mode="smartspec", issued_at=time.time(), ttl_s=60)
    assert live.strategy().mode == "smartspec"
    live.ops = {"mode": "static", "static_k": 2}
    assert (live.strategy().mode, live.strategy().static_k) == ("static", 2)
    live.ops = {}
    learned = CostModel(draft_fixed=300.0, verify_table=((1, 80.0), (2, 160.0)))
    live.published = Strategy(mode="smartspec", cost=learned, issued_at=time.time() - 120, ttl_s=60)
    live.reachable = False  # Redis away: nobody can publish a newer one, so the last one stays
    assert live.strategy().mode == "smartspec"
    live.reachable = True  # Redis answers and the strategy is stale: the policy is away
    fallback = live.strategy()
    assert fallback.mode == "adaptive" and fallback.cost == learned and "gateway-fallback" in fallback.policy
    assert LiveConfig(Strategy(mode="off")).strategy().mode == "off"  # never published: the default
    # The draft-length limits are the gateway's own, not the policy's, unless an ops key sets them.
    live = LiveConfig(Strategy(max_draft_tokens=5, max_free_draft_tokens=40))
    live.published = Strategy(mode="smartspec", issued_at=time.time(), ttl_s=60)
    assert (live.strategy().max_draft_tokens, live.strategy().max_free_draft_tokens) == (5, 40)
    live.ops = {"max_free_draft_tokens": 12}
    assert (live.strategy().mode, live.strategy().max_free_draft_tokens) == ("smartspec", 12)


def test_algorithm_names():
    assert parse_algorithm("static:3") == ("static", 3)
    with pytest.raises(InvalidArgument):
        parse_algorithm("static:x")


def test_policy_service_starts_without_torch():
    code = "import sys, services.policy.__main__; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_start_up_profiles_seed_the_cost_model():
    state = PolicyState()
    for n, k in ((1, 1), (1, 4), (2, 2), (4, 3), (1, 2), (2, 4), (4, 1), (1, 3)):
        state.observe({"component": "drafter", "call": "profile", "batch_size": n, "draft_steps": k,
                       "draft_ms": k * (50 + 5 * n)})
    for positions in (1, 2, 4, 8, 1, 2, 4, 8):
        state.observe({"component": "verifier", "call": "profile", "verified_positions": positions,
                       "context_tokens": 65, "forward_ms": 100 + 10 * positions})
    cost = state.decide().cost
    assert cost.draft_fixed == pytest.approx(50, rel=0.01) and cost.draft_per_seq == pytest.approx(5, rel=0.01)
    assert cost.verify_per_pos == pytest.approx(10, rel=0.01)
    assert cost.verify_fixed + cost.verify_per_ctx * 65 == pytest.approx(100, rel=0.01)


def test_verify_cost_is_a_measured_table_with_its_shape_steps():
    """Verify times that step (flat for 1-3 positions, then double, and 4 cheaper than 3, as
    measured on real kernels) are kept as a table, not a line, and the steps become buckets."""
    measured = {1: 100.0, 2: 102.0, 3: 140.0, 4: 120.0, 5: 240.0, 6: 245.0}
    est = CostEstimator()
    for _ in range(3):
        for n, ms in measured.items():
            est.observe(1, 0, 0.0, n, 0, ms)
    cost = est.fit()
    assert [round(cost.t_positions(n)) for n in range(1, 7)] == [100, 102, 120, 120, 240, 245]
    assert cost.shape_buckets == (2, 4)  # one more position past 2 or 4 costs over 10% more
    assert cost.pad(3) == 4 and cost.pad(1) == 2


def test_profiled_prompt_chunks_stay_in_the_table_however_many_steps_follow():
    """The verifier's profile measures prompt chunks up to 512 positions; hundreds of later decode
    steps of one position (more than the window holds) do not evict them, so a fused step's
    prompt tokens are priced from a measurement, never from a slope extrapolated off 1-8."""
    state = PolicyState()
    profile = {**{n: 70.0 + 5 * n for n in (1, 2, 3, 4, 5, 6, 8)}, 16: 160.0, 64: 700.0, 256: 2900.0, 512: 5800.0}
    for positions, ms in profile.items():
        state.observe({"component": "verifier", "call": "profile", "verified_positions": positions,
                       "context_tokens": 65 if positions <= 8 else 0, "forward_ms": ms, "prompt": positions > 8})
    step = {"component": "gateway", "batch_size": 1, "verified_positions": 1, "draft_steps": 0, "draft_ms": 0.0,
            "context_tokens": 200, "verify_ms": 80.0, "confidences": [], "outcomes": [], "drafted": [0], "accepted": [0]}
    for _ in range(600):
        state.observe(step)
    cost = state.decide().cost
    assert cost.t_positions(512, prompt=True) == pytest.approx(5800, rel=0.01)
    assert cost.t_positions(256, prompt=True) == pytest.approx(2900, rel=0.01)
    assert cost.t_positions(160, prompt=True) == pytest.approx(700 + (2900 - 700) * 96 / 192, rel=0.01)  # interpolated
    assert all(t > 0 for _, t in (*cost.verify_table, *cost.prompt_table))


def test_a_free_proposer_is_priced_per_call_from_its_own_measurements():
    """Suffix or n-gram drafts run no model (draft_steps 0): their calls' times are fitted as a cost
    per call, not dropped in favour of the 78 ms-per-token prior."""
    state = PolicyState()
    for n in (1, 1, 2, 4, 1, 2, 4, 1):
        state.observe({"component": "drafter", "call": "profile", "batch_size": n, "draft_steps": 0,
                       "draft_ms": 0.3 + 0.05 * n, "free": True})
    cost = state.decide().cost
    assert cost.draft_free
    assert cost.t_draft(1, 8) == pytest.approx(0.35, rel=0.01) and cost.t_draft(4, 1) == pytest.approx(0.5, rel=0.01)


def test_acceptance_is_the_conditional_rate_per_position_not_accepted_over_drafted():
    """Drafts of k = 4 that each survive with probability 0.8 given the ones before: accepted /
    drafted reads about 0.59, accepted / reached there reads 0.8 at every position."""
    import random

    rng = random.Random(3)
    state = PolicyState()
    for _ in range(3000):
        accepted = next((j for j in range(4) if rng.random() >= 0.8), 4)
        state.observe({"component": "gateway", "batch_size": 1, "verified_positions": 5, "draft_steps": 4,
                       "draft_ms": 10.0, "context_tokens": 50, "verify_ms": 80.0, "confidences": [], "outcomes": [],
                       "drafted": [4], "accepted": [accepted],
                       "position_reached": [int(j <= accepted) for j in range(4)],
                       "position_accepted": [int(j < accepted) for j in range(4)]})
    acc = state.acceptance
    assert acc.accepted / acc.drafted == pytest.approx(0.59, abs=0.03)
    assert acc.by_position() == pytest.approx([0.8] * 4, abs=0.03)
    assert state.decide().mean_confidence == pytest.approx(0.8, abs=0.02)


def test_a_decode_burst_is_priced_per_forward():
    """A record of a burst (4 plain forwards of 2 sessions in one call, 400 ms) teaches the cost of one
    forward of 2 positions (100 ms), not of 8 positions in 400."""
    state = PolicyState()
    for ctx in range(100, 400, 10):
        state.observe({"component": "gateway", "batch_size": 2, "verified_positions": 8, "forwards": 4,
                       "draft_steps": 0, "draft_ms": 0.0, "context_tokens": ctx, "verify_ms": 400.0,
                       "confidences": [], "outcomes": [], "drafted": [0, 0], "accepted": [0, 0]})
    cost = state.decide().cost
    assert cost.t_verify(2, 250) == pytest.approx(100.0, rel=0.05)


def test_each_proposer_gets_its_own_calibration_and_c_bar_is_the_model_s_rate():
    """A hybrid drafter's steps mix suffix drafts (raw confidence 1.0, survive 90%) and model drafts
    (raw 0.9, survive 30%): each calibration sees only its own proposer's drafts, and c̄, which
    prices the model's next draft, is the model's conditional rate, not the pooled one."""
    import random

    rng = random.Random(5)
    state = PolicyState()
    for i in range(2000):
        free = i % 2
        ok = int(rng.random() < (0.9 if free else 0.3))
        state.observe({"component": "gateway", "batch_size": 1, "verified_positions": 2, "draft_steps": 1 - free,
                       "draft_ms": 1.0, "context_tokens": 50, "verify_ms": 80.0, "confidences": [1.0 if free else 0.9],
                       "outcomes": [ok], "free_slots": [free], "drafted": [1], "accepted": [ok],
                       "position_reached": [1], "position_accepted": [ok],
                       "free_position_reached": [free], "free_position_accepted": [free * ok]})
    strategy = state.decide()
    assert strategy.free_calibration(0.99) == pytest.approx(0.9, abs=0.04)
    assert strategy.calibration(0.9) == pytest.approx(0.3, abs=0.05)
    assert strategy.calibration(0.99) < 0.5  # the model's drafts never reached 1.0: not the suffix's 0.9
    assert strategy.mean_confidence == pytest.approx(0.3, abs=0.04)
    assert state.acceptance.conditional == pytest.approx(0.6, abs=0.04)  # pooled, for the report
    # No recalled draft yet: recalled drafts are calibrated as the free proposer's others.
    assert strategy.recall_calibration == strategy.free_calibration


def test_recalled_free_drafts_get_a_calibration_of_their_own():
    """Free drafts from the session's own tokens (slot kind 1, survive 90%) and recalled from other
    requests' outputs (kind 2, survive 30%) at the same raw confidence: two curves."""
    import random

    rng = random.Random(7)
    state = PolicyState()
    for i in range(2000):
        kind = 1 + i % 2
        ok = int(rng.random() < (0.9 if kind == 1 else 0.3))
        state.observe({"component": "gateway", "batch_size": 1, "verified_positions": 2, "draft_steps": 0,
                       "draft_ms": 0.2, "context_tokens": 50, "verify_ms": 80.0, "confidences": [0.95],
                       "outcomes": [ok], "free_slots": [kind], "drafted": [1], "accepted": [ok],
                       "position_reached": [1], "position_accepted": [ok],
                       "free_position_reached": [1], "free_position_accepted": [ok], "draft_free": True})
    strategy = state.decide()
    assert strategy.free_calibration(0.95) == pytest.approx(0.9, abs=0.04)
    assert strategy.recall_calibration(0.95) == pytest.approx(0.3, abs=0.05)


def test_ops_cli_sets_validates_and_unsets(redis_url, redis_client):
    def ops(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "specserve.cli", "ops", "--redis-url", redis_url, *args],
                              capture_output=True, text=True, timeout=60)

    assert ops("set", "static_k", "3").stdout.strip() == "static_k = 3"
    bad = ops("set", "static_k", "-4")
    assert bad.returncode == 2 and "static_k" in bad.stderr
    assert ops("unset", "static_k").stdout.strip() == "static_k = (unset)"
    assert redis_client.get("specserve:ops:static_k") is None


def test_a_restarted_policy_goes_on_from_the_published_strategy(redis_client):
    """Versions continue, and the cost model the earlier run learned (drafting is dear here) stays
    until this run has learned its own; an unreadable document is not resumed."""
    from services.policy.__main__ import last_strategy
    from services.policy.state import RESUME_STEPS
    from specserve.telemetry import decode

    assert last_strategy(redis_client) is None
    dear = CostModel(draft_fixed=5000.0, verify_table=((1, 10.0), (2, 20.0), (4, 40.0)))
    publish(redis_client, Strategy(mode="adaptive", cost=dear, mean_confidence=0.2, version=41, issued_at=1.0))
    state = PolicyState("adaptive")
    state.resume(last_strategy(redis_client))
    first = state.decide()
    assert first.version == 42 and first.cost == dear and first.mean_confidence == 0.2 and first.issued_at > 1.0
    for i in range(RESUME_STEPS):
        state.observe(decode(_record(i)))
    assert state.decide().cost != dear
    redis_client.set(STRATEGY_KEY, "not json")
    assert last_strategy(redis_client) is None
    fresh = PolicyState("adaptive")
    fresh.resume(last_strategy(redis_client))
    assert fresh.decide().version == 1
