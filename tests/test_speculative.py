"""experiments/speculative.py: exact rejection sampling, so the output follows the target's
distribution, checked by hand, against plain greedy decoding and by sampling."""
import pytest
import torch

import generate
from experiments import speculative

P = torch.tensor([0.40, 0.30, 0.15, 0.10, 0.05])  # target
Q = torch.tensor([0.10, 0.10, 0.20, 0.30, 0.30])  # draft


def test_speculative_step_emits_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    trials, first, accepted = 20_000, torch.zeros(5), 0
    for _ in range(trials):
        x = torch.multinomial(Q, 1, generator=g)  # the draft's proposal, (1,)
        n, token = speculative.speculative_step(torch.stack([P, P]), Q[None], x, g)
        first[x.item() if n == 1 else token] += 1
        accepted += n
    freq = first / trials
    assert (freq - P).abs().max() < 0.01  # the target's distribution ...
    assert (freq - Q).abs().max() > 0.2  # ... not the draft's
    # Acceptance probability beta = sum_x min(p(x), q(x)) = 0.1 + 0.1 + 0.15 + 0.1 + 0.05 = 0.5
    assert accepted / trials == pytest.approx(0.5, abs=0.01)


def test_speculative_step_cases():
    g = torch.Generator().manual_seed(0)
    one_hot = torch.eye(5)
    # Greedy: point masses. Draft agrees twice, then disagrees -> the target's argmax.
    p = one_hot[[2, 4, 1, 3]]  # (gamma + 1, V)
    q = one_hot[[2, 4, 0]]  # (gamma, V)
    assert speculative.speculative_step(p, q, torch.tensor([2, 4, 0]), g) == (2, 1)
    # All accepted: the bonus token comes from the last row of p.
    assert speculative.speculative_step(p, one_hot[[2, 4, 1]], torch.tensor([2, 4, 1]), g) == (3, 3)
    # gamma = 0: a plain sample from p.
    assert speculative.speculative_step(one_hot[[3]], torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), g) == (0, 3)


@torch.no_grad()
def greedy(model, ids, n):  # full recompute every step, no cache: an independent reference
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    return ids


def greedy_acceptances(target, draft, ids, n, gamma):
    """Accepted drafts of greedy speculative decoding, simulated without caches."""
    accepted, T = 0, ids.shape[1]
    while ids.shape[1] - T < n:
        g = min(gamma, n - (ids.shape[1] - T) - 1)
        proposal = greedy(draft, ids, g)[0, ids.shape[1]:]  # (g,)
        truth = greedy(target, ids, g + 1)[0, ids.shape[1]:]  # (g + 1,)
        k = next((i for i in range(g) if proposal[i] != truth[i]), g)
        accepted += k
        ids = torch.cat([ids, truth[None, :k + 1]], dim=1)
    return accepted


def test_speculative_generate_greedy_equals_target_greedy(tiny_model):
    target, draft = tiny_model(0, vocab=32), tiny_model(1, vocab=32)
    prompt = torch.tensor([[1, 5, 7, 3]])
    expected = greedy(target, prompt, 20)
    assert torch.equal(expected, generate.generate(target, prompt, 20, temperature=0, eos_token_id=None))
    for gamma in (1, 3, 4):
        ids, stats = speculative.speculative_generate(target, draft, prompt, 20, gamma=gamma, temperature=0)
        assert torch.equal(ids, expected)
        assert stats["new_tokens"] == 20 and stats["accepted"] < stats["drafted"]
        # The draft's caches survive rollbacks: its proposals are its own greedy continuations.
        assert stats["accepted"] == greedy_acceptances(target, draft, prompt, 20, gamma)
    ids, stats = speculative.speculative_generate(target, target, prompt, 20, gamma=4, temperature=0)
    assert torch.equal(ids, expected) and stats["acceptance_rate"] == 1.0 and stats["target_calls"] == 4
    eos = expected[0, 9].item()
    ids, _ = speculative.speculative_generate(target, draft, prompt, 20, temperature=0, eos_token_id=eos)
    assert ids[0, -1].item() == eos and torch.equal(ids[0], expected[0, :expected[0, 4:].tolist().index(eos) + 5])


def test_speculative_generate_target_equals_draft_accepts_everything(tiny_model):
    model = tiny_model(0, vocab=32)
    g = torch.Generator().manual_seed(0)
    ids, stats = speculative.speculative_generate(model, model, torch.tensor([[1, 2]]), 13, gamma=4, generator=g)
    assert stats["acceptance_rate"] == 1.0 and stats["drafted"] == 10 and ids.shape == (1, 15)


@torch.no_grad()
def test_speculative_generate_samples_the_target_distribution(tiny_model):
    """Marginals of the 2nd and 3rd new tokens (through drafting, rollback and bonus tokens)
    match the target's, computed exactly by enumeration, and not the draft's."""
    target, draft = tiny_model(0), tiny_model(3)
    prompt, V, T = torch.tensor([[1, 2, 3]]), 8, 0.7

    def exact(model):
        p1 = torch.softmax(model(prompt)[0, -1] / T, -1)  # (V,)
        two = torch.cat([prompt.expand(V, 3), torch.arange(V)[:, None]], 1)  # (V, 4)
        p2 = torch.softmax(model(two)[:, -1] / T, -1)  # (V, V): p(t2 | t1)
        three = torch.cat([two.repeat_interleave(V, 0), torch.arange(V).repeat(V)[:, None]], 1)
        p3 = torch.softmax(model(three)[:, -1] / T, -1).view(V, V, V)  # p(t3 | t1, t2)
        joint12 = p1[:, None] * p2  # (V, V)
        return joint12.sum(0), (joint12[..., None] * p3).sum((0, 1))

    target2, target3 = exact(target)
    draft2, draft3 = exact(draft)
    assert (target2 - draft2).abs().max() > 0.15 and (target3 - draft3).abs().max() > 0.15
    g, n = torch.Generator().manual_seed(0), 1000
    counts, accepted = torch.zeros(2, V), 0
    for _ in range(n):
        ids, stats = speculative.speculative_generate(target, draft, prompt, 3, gamma=2, temperature=T, generator=g)
        counts[0, ids[0, 4]] += 1
        counts[1, ids[0, 5]] += 1
        accepted += stats["accepted"]
    assert 0 < accepted < 2 * n  # both branches (accept, reject) were exercised
    assert (counts[0] / n - target2).abs().max() < 0.05  # sd <= 0.016 at n = 1000
    assert (counts[1] / n - target3).abs().max() < 0.05


def test_speculative_generate_checks_vocab_and_batch(tiny_model):
    a, b = tiny_model(0, vocab=8), tiny_model(1, vocab=16)
    with pytest.raises(ValueError, match="vocab_size"):
        speculative.speculative_generate(a, b, torch.tensor([[1]]), 2)
    ids, _ = speculative.speculative_generate(a, b, torch.tensor([[1]]), 4, temperature=0, vocab_size=8)
    assert torch.equal(ids, greedy(a, torch.tensor([[1]]), 4))
    with pytest.raises(ValueError, match="batch size 1"):
        speculative.speculative_generate(a, a, torch.tensor([[1], [2]]), 2)


# ---------------------------------------------------------------------------- reverse KL
