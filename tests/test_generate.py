"""generate.py: sampling, batched decoding against transformers' greedy output, chat, and
speculative decoding (exact rejection sampling: the output follows the target's distribution)."""
import pytest
import torch

import generate
import qwen2

pytestmark = pytest.mark.usefixtures("one_thread")


def test_greedy_generation_matches_transformers(tmp_path, tiny_hf):
    hf, directory = tiny_hf.model("qwen2", tmp_path)
    model, _ = qwen2.load(str(directory))
    ids, mask = tiny_hf.padded_batch()
    ours = generate.generate(model, ids, 8, temperature=0, eos_token_id=None, attention_mask=mask)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_batched_left_padded_generation_equals_one_by_one(tmp_path, tiny_hf):
    _, directory = tiny_hf.model("qwen2", tmp_path, tied=True)
    model, _ = qwen2.load(str(directory))
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    ids, mask = generate.left_pad(prompts, pad_token_id=0)
    batched = generate.generate(model, ids, 10, temperature=0, eos_token_id=None, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone = generate.generate(model, torch.tensor([prompt]), 10, temperature=0, eos_token_id=None)
        assert batched[row, -10:].tolist() == alone[0, -10:].tolist()


def test_sampling_seeded_and_stops_at_eos(tmp_path, tiny_hf):
    _, directory = tiny_hf.model("qwen2", tmp_path)
    model, _ = qwen2.load(str(directory))
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    runs = [generate.generate(model, ids, 12, temperature=1.0, eos_token_id=None,
                           generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert runs[0].shape == (2, 15)
    # top_p tiny keeps only the most likely token: sampling becomes greedy
    greedy = generate.generate(model, ids, 12, temperature=0, eos_token_id=None)
    nucleus = generate.generate(model, ids, 12, temperature=1.0, top_p=1e-6, eos_token_id=None,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, nucleus)
    # make the 3rd greedy token of row 0 an eos: row 0 stops there and is filled with eos after it
    eos = int(greedy[0, 5])
    out = generate.generate(model, ids, 12, temperature=0, eos_token_id=[eos])
    first = (greedy[1, 3:] == eos).nonzero()
    end = 3 + (int(first[0]) + 1 if len(first) else 12)
    assert out.shape[1] == max(6, end)
    assert out[0, 5:].eq(eos).all() and out[0, :5].tolist() == greedy[0, :5].tolist()


def test_sample_top_p_formula():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(generate.sample(logits, 1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3: the nucleus is the first two tokens
    assert int(generate.sample(logits, 0.0)) == 0


def test_chat_reply_prefix_starts_the_assistant_turn(tiny_model_dir):
    model, tok = qwen2.load(str(tiny_model_dir))
    conv = [[{"role": "user", "content": "hi"}]]
    primed = generate.chat(model, tok, conv, max_new_tokens=4, temperature=0, reply_prefix="Input: [")
    assert primed[0].startswith("Input: [")
    # the prefix is part of the prompt: the same as generating after a template that ends in it
    ids = tok.encode(tok.apply_chat_template(conv[0]) + "Input: [")
    out = generate.generate(model, torch.tensor([ids]), 4, temperature=0, eos_token_id=tok.eos_token_ids)
    new = out[0, len(ids):].tolist()
    new = new[:[t in tok.eos_token_ids for t in new].index(True)] if any(t in tok.eos_token_ids for t in new) else new
    assert primed[0] == ("Input: [" + tok.decode(new)).strip()


P = torch.tensor([0.40, 0.30, 0.15, 0.10, 0.05])  # target
Q = torch.tensor([0.10, 0.10, 0.20, 0.30, 0.30])  # draft


def test_speculative_step_emits_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    trials, first, accepted = 20_000, torch.zeros(5), 0
    for _ in range(trials):
        x = torch.multinomial(Q, 1, generator=g)  # the draft's proposal, (1,)
        n, token = generate.speculative_step(torch.stack([P, P]), Q[None], x, g)
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
    assert generate.speculative_step(p, q, torch.tensor([2, 4, 0]), g) == (2, 1)
    # All accepted: the bonus token comes from the last row of p.
    assert generate.speculative_step(p, one_hot[[2, 4, 1]], torch.tensor([2, 4, 1]), g) == (3, 3)
    # gamma = 0: a plain sample from p.
    assert generate.speculative_step(one_hot[[3]], torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), g) == (0, 3)


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
        ids, stats = generate.speculative_generate(target, draft, prompt, 20, gamma=gamma, temperature=0)
        assert torch.equal(ids, expected)
        assert stats["new_tokens"] == 20 and stats["accepted"] < stats["drafted"]
        # The draft's caches survive rollbacks: its proposals are its own greedy continuations.
        assert stats["accepted"] == greedy_acceptances(target, draft, prompt, 20, gamma)
    ids, stats = generate.speculative_generate(target, target, prompt, 20, gamma=4, temperature=0)
    assert torch.equal(ids, expected) and stats["acceptance_rate"] == 1.0 and stats["target_calls"] == 4
    eos = expected[0, 9].item()
    ids, _ = generate.speculative_generate(target, draft, prompt, 20, temperature=0, eos_token_id=eos)
    assert ids[0, -1].item() == eos and torch.equal(ids[0], expected[0, :expected[0, 4:].tolist().index(eos) + 5])


def test_speculative_generate_target_equals_draft_accepts_everything(tiny_model):
    model = tiny_model(0, vocab=32)
    g = torch.Generator().manual_seed(0)
    ids, stats = generate.speculative_generate(model, model, torch.tensor([[1, 2]]), 13, gamma=4, generator=g)
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
        ids, stats = generate.speculative_generate(target, draft, prompt, 3, gamma=2, temperature=T, generator=g)
        counts[0, ids[0, 4]] += 1
        counts[1, ids[0, 5]] += 1
        accepted += stats["accepted"]
    assert 0 < accepted < 2 * n  # both branches (accept, reject) were exercised
    assert (counts[0] / n - target2).abs().max() < 0.05  # sd <= 0.016 at n = 1000
    assert (counts[1] / n - target3).abs().max() < 0.05


def test_speculative_generate_checks_vocab_and_batch(tiny_model):
    a, b = tiny_model(0, vocab=8), tiny_model(1, vocab=16)
    with pytest.raises(ValueError, match="vocab_size"):
        generate.speculative_generate(a, b, torch.tensor([[1]]), 2)
    ids, _ = generate.speculative_generate(a, b, torch.tensor([[1]]), 4, temperature=0, vocab_size=8)
    assert torch.equal(ids, greedy(a, torch.tensor([[1]]), 4))
    with pytest.raises(ValueError, match="batch size 1"):
        generate.speculative_generate(a, a, torch.tensor([[1], [2]]), 2)


# ---------------------------------------------------------------------------- reverse KL


def test_chat_stop_ends_each_reply_before_the_stop_text(tiny_model_dir):
    model, tok = qwen2.load(str(tiny_model_dir))
    stops = generate.stop_token_ids(tok, "]")
    assert tok.encode("]")[0] in stops and all("]" in tok.decode([i]) for i in stops)
    convs = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a longer question"}]]
    replies = generate.chat(model, tok, convs, max_new_tokens=16, temperature=1.0, seed=3,
                            reply_prefix=["Input: [", "Input: [x], Response: ["], stop="]")
    assert replies[0].startswith("Input: [") and replies[1].startswith("Input: [x], Response: [")
    assert "]" not in replies[0] and replies[1].count("]") == 1  # the prefix's own "]" only
    free = generate.chat(model, tok, convs, max_new_tokens=16, temperature=1.0, seed=3,
                         reply_prefix=["Input: [", "Input: [x], Response: ["])
    assert free[0].startswith(replies[0])  # the same draws; the stopped reply is the free one cut at "]"


def test_reply_text_cuts_at_the_end_of_turn_or_the_stop_text(tiny_model_dir):
    tok = qwen2.Tokenizer.from_dir(tiny_model_dir)
    ids = tok.encode("ab] cd")
    assert generate.reply_text(tok, ids) == ("ab] cd", None)
    end = tok.eos_token_ids[0]
    assert generate.reply_text(tok, tok.encode("ab") + [end] + tok.encode("cd")) == ("ab", len(tok.encode("ab")))
    text, index = generate.reply_text(tok, ids, stop="]")
    assert text == "ab" and "]" in tok.decode([ids[index]])
