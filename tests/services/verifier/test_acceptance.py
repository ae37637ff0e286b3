import torch

from services.verifier.acceptance import dense, verify_greedy, verify_sampled


def test_greedy_accepts_matching_prefix_then_recovers():
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([3, 4, 9, 7]):
        logits[row, best] = 5.0
    assert verify_greedy(torch.tensor([3, 4, 1]), logits) == (2, [3, 4, 9])
    assert verify_greedy(torch.tensor([3, 4, 9]), logits) == (3, [3, 4, 9, 7])  # bonus
    assert verify_greedy(torch.tensor([0, 4, 9]), logits) == (0, [3])
    assert verify_greedy(torch.tensor([], dtype=torch.long), logits[:1]) == (0, [3])


def _draws(p: torch.Tensor, q: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """First emitted token of n speculative steps with one draft sampled from q."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(p.shape[-1])
    for _ in range(n):
        x = torch.multinomial(q, 1, generator=gen)
        _, tokens = verify_sampled(x, q.unsqueeze(0), torch.stack([p, p]), gen)
        counts[tokens[0]] += 1
    return counts / n


def test_sampled_tokens_follow_the_target_distribution():
    """Total variation between emitted and target frequencies stays within sampling noise, for a
    dense q, a sparse (truncated) q, and a point mass; a rule that skipped the residual would not."""
    p = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    for q in (torch.tensor([0.3, 0.1, 0.3, 0.1, 0.2]), torch.tensor([0.0, 0.0, 0.5, 0.5, 0.0]),
              torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])):
        freq = _draws(p, q, 6000, seed=1)
        tv = 0.5 * float((freq - p).abs().sum())
        assert tv < 0.03, (q, freq, tv)


def test_wrong_rule_fails_the_same_bound():
    """Accepting every draft (no rejection) gives q, not p, and the bound catches it."""
    p = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    q = torch.tensor([0.3, 0.1, 0.3, 0.1, 0.2])
    assert 0.5 * float((q - p).abs().sum()) > 0.03


def test_bonus_token_after_all_accepted_is_sampled_from_last_row():
    gen = torch.Generator().manual_seed(0)
    p = torch.zeros(2, 4)
    p[0, 2] = 1.0
    p[1, 3] = 1.0
    accepted, tokens = verify_sampled(torch.tensor([2]), p[:1].clone(), p, gen)
    assert (accepted, tokens) == (1, [2, 3])


def test_dense_places_sparse_probabilities():
    assert dense([1, 3], [0.25, 0.75], 5).tolist() == [0.0, 0.25, 0.0, 0.75, 0.0]


def test_sampled_tokens_follow_the_target_distribution_of_each_runtime(tiny_pair):
    """The same bound with p and q taken from the runtime's own target and draft logits."""
    from specserve.contracts import SamplingParams
    from specserve.runtime import Row
    from specserve.sampling import processed_probs

    target, draft = tiny_pair.runtimes()
    prompt = [5, 9, 11, 40]
    params = SamplingParams(temperature=1.5, top_k=6)
    p = processed_probs(target.forward([Row("s", prompt, [3])])[0], params)[0]
    q = processed_probs(draft.forward([Row("s", prompt, [3])])[0], SamplingParams(temperature=1.0, top_k=4))[0]
    assert 0.5 * float((q - p).abs().sum()) > 0.03  # the draft alone would fail the bound
    freq = _draws(p, q, 6000, seed=2)
    assert 0.5 * float((freq - p).abs().sum()) < 0.03
