"""Baselines (paper sec. 5.1): BM25 worked by hand, dense retrieval, each EDA operation on a
fixed seed, the WordNet parser on a hand-written fixture, the exactness of speculative
sampling, and the reverse KL against a hand computation."""
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

import baselines
import lora
import qwen2

WORDNET = Path(__file__).parent / "fixtures" / "wordnet"


# ---------------------------------------------------------------------------- retrieval

CORPUS = ["cat cat dog", "Dog, bird!", "fish bird bird fish"]


def test_bm25_scores_worked_by_hand():
    # N = 3 documents of 3, 2 and 4 tokens: avgdl = 3, k1 = 1.2, b = 0.75.
    # idf(cat)  = ln(1 + (3 - 1 + 0.5) / (1 + 0.5)) = ln(1 + 2.5/1.5) = ln(8/3)   (n = 1)
    # idf(bird) = ln(1 + (3 - 2 + 0.5) / (2 + 0.5)) = ln(1 + 1.5/2.5) = ln(1.6)   (n = 2)
    # doc 0, cat x2, |D| = 3: 2 * 2.2 / (2 + 1.2 * (0.25 + 0.75 * 3/3)) = 4.4 / 3.2
    # doc 1, bird x1, |D| = 2: 1 * 2.2 / (1 + 1.2 * (0.25 + 0.75 * 2/3)) = 2.2 / 1.9
    # doc 2, bird x2, |D| = 4: 2 * 2.2 / (2 + 1.2 * (0.25 + 0.75 * 4/3)) = 4.4 / 3.5
    expected = [4.4 / 3.2 * math.log(8 / 3), 2.2 / 1.9 * math.log(1.6), 4.4 / 3.5 * math.log(1.6)]
    assert baselines.BM25(CORPUS).scores("Cat? bird") == pytest.approx(expected, rel=1e-12)
    assert baselines.retrieve_bm25("Cat? bird", CORPUS, k=3) == [0, 2, 1]
    assert baselines.retrieve_bm25("bird", CORPUS) == [2]  # 4.4/3.5 > 2.2/1.9


def test_bm25_edge_cases():
    assert baselines.words("Don't STOP, café!") == ["don", "t", "stop", "café"]
    assert baselines.BM25(CORPUS).scores("unknown words") == [0.0, 0.0, 0.0]
    assert baselines.retrieve_bm25("unknown", CORPUS, k=2) == [0, 1]  # ties: earlier first
    assert baselines.BM25(["", ""]).scores("x") == [0.0, 0.0]
    with pytest.raises(ValueError, match="empty"):
        baselines.BM25([])


def test_retrieve_dense_picks_the_nearest_document():
    vectors = {"query about cats": [1.0, 0.0], "dogs": [0.0, 1.0], "cats": [0.8, 0.6], "fish": [-1.0, 0.0]}
    embed = lambda texts: torch.tensor([vectors[t] for t in texts])  # (N, 2), unit rows
    assert baselines.retrieve_dense("query about cats", ["dogs", "cats", "fish"], embed) == [1]
    assert baselines.retrieve_dense("query about cats", ["dogs", "cats", "fish"], embed, k=3) == [1, 0, 2]


# ---------------------------------------------------------------------------- WordNet, EDA

def test_synonyms_lookup():
    wn = baselines.load_wordnet(WORDNET)
    assert baselines._synonyms('"Movie,', wn) == ["film", "picture"]  # punctuation and case
    assert baselines._synonyms("watched", wn) == ["view", "watch"]  # -ed detached, base added
    assert baselines._synonyms("movies", wn) == ["film", "picture", "movie"]
    assert baselines._synonyms("dogs", wn) == ["domestic dog", "canis familiaris", "dog"]
    assert baselines._synonyms("the", wn) == [] and baselines._synonyms("zebra", wn) == []


def test_fixture_wordnet_parses():
    wn = baselines.load_wordnet(WORDNET)
    assert wn["dog"] == ["domestic dog", "canis familiaris"]  # underscores -> spaces, lowercase
    assert wn["movie"] == ["film", "picture"]  # union over the two synsets holding "movie"
    assert wn["big"] == ["large"]  # adjective marker "(a)" dropped
    assert len(wn["happy"]) == 9  # w_cnt "0a" is hexadecimal: 10 lemmas
    assert wn["quickly"] == ["speedily"] and wn["run"] == ["scat"]
    assert "1" not in wn and "a" not in wn  # the licence header lines are skipped


def test_missing_wordnet_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        baselines.load_wordnet(tmp_path)
    (tmp_path / "data.noun").write_text("00000100 05 n xx cat 0 000 | bad count\n")
    for name in ("data.verb", "data.adj", "data.adv"):
        (tmp_path / name).write_text("")
    with pytest.raises(ValueError, match="data.noun:1"):
        baselines.load_wordnet(tmp_path)


SENTENCE = "The happy dog watched a movie, and the Dog was big."  # 11 words


def test_n_changes():
    assert baselines.n_changes(0.1, 11) == 1 and baselines.n_changes(0.1, 3) == 1
    assert baselines.n_changes(0.2, 11) == 2 and baselines.n_changes(0.5, 11) == 6


def test_synonym_replacement():
    wn = baselines.load_wordnet(WORDNET)
    tokens = SENTENCE.split()
    out = baselines.synonym_replacement(tokens, wn, 0.1, random.Random(13))
    # "dog" was drawn: both occurrences (any case) replaced by the same synonym.
    assert " ".join(out) == "The happy domestic dog watched a movie, and the domestic dog was big."
    out = baselines.synonym_replacement(tokens, wn, 0.1, random.Random(4))
    assert " ".join(out) == "The happy dog watched a picture, and the Dog was big."  # "," kept
    out = baselines.synonym_replacement(tokens, wn, 0.1, random.Random(2))
    assert " ".join(out) == "The happy dog view a movie, and the Dog was big."  # watched -> watch
    for seed in range(50):
        out = baselines.synonym_replacement(tokens, wn, 0.3, random.Random(seed))
        assert len(out) == len(tokens)
        for old, new in zip(tokens, out):
            if old != new:
                core = baselines._split(old)[1].lower()
                assert core not in baselines.STOP_WORDS and baselines._split(new)[1] in baselines._synonyms(old, wn)
    assert baselines.synonym_replacement("the a of".split(), wn, 1.0, random.Random(0)) == ["the", "a", "of"]


def test_random_insertion():
    wn = baselines.load_wordnet(WORDNET)
    out = baselines.random_insertion(SENTENCE.split(), wn, 0.1, random.Random(2))
    assert " ".join(out) == "The content happy dog watched a movie, and the Dog was big."
    for seed in range(20):
        out = baselines.random_insertion(SENTENCE.split(), wn, 0.2, random.Random(seed))
        inserted = list((Counter(out) - Counter(SENTENCE.split())).elements())
        assert sorted(out) == sorted(SENTENCE.split() + inserted) and 1 <= len(inserted) <= 2
        # each inserted word is a synonym of a word that is still there (maybe an inserted one)
        assert all(any(w in baselines._synonyms(t, wn) for t in out) for w in inserted)
    assert baselines.random_insertion(["the", "of"], wn, 1.0, random.Random(0)) == ["the", "of"]


def test_random_swap():
    tokens = SENTENCE.split()
    out = baselines.random_swap(tokens, 0.1, random.Random(2))
    assert " ".join(out) == "happy The dog watched a movie, and the Dog was big."
    for seed in range(20):
        out = baselines.random_swap(tokens, 0.3, random.Random(seed))
        assert sorted(out) == sorted(tokens) and out != tokens
    assert baselines.random_swap(["one"], 0.5, random.Random(0)) == ["one"]


def test_random_deletion():
    tokens = SENTENCE.split()
    out = baselines.random_deletion(tokens, 0.1, random.Random(2))
    assert " ".join(out) == "The happy a movie, and the Dog was big."
    for seed in range(50):
        out = baselines.random_deletion(tokens, 0.9, random.Random(seed))
        assert out and all(t in tokens for t in out)
    assert baselines.random_deletion(tokens, 1.0, random.Random(0)) in [[t] for t in tokens]
    assert baselines.random_deletion(["only"], 1.0, random.Random(0)) == ["only"]


def test_eda_is_seeded_and_counts():
    wn = baselines.load_wordnet(WORDNET)
    out = baselines.eda(SENTENCE, wn, alpha=0.1, n_aug=4, rng=random.Random(0))
    assert out == ["dog watched a movie, and the Dog was big.",  # RD
                   "The happy dog watched a movie, and the was Dog big.",  # RS
                   "The canis familiaris happy dog watched a movie, and the Dog was big.",  # RI
                   "The happy dog watch a movie, and the Dog was big."]  # SR
    assert out == baselines.eda(SENTENCE, wn, alpha=0.1, n_aug=4, rng=random.Random(0))
    assert len(baselines.eda(SENTENCE, wn, alpha=0.1, n_aug=9, rng=random.Random(1))) == 9
    assert baselines.eda("   ", wn, rng=random.Random(0)) == []


# ---------------------------------------------------------------------------- speculative

P = torch.tensor([0.40, 0.30, 0.15, 0.10, 0.05])  # target
Q = torch.tensor([0.10, 0.10, 0.20, 0.30, 0.30])  # draft


def test_speculative_step_emits_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    trials, first, accepted = 20_000, torch.zeros(5), 0
    for _ in range(trials):
        x = torch.multinomial(Q, 1, generator=g)  # the draft's proposal, (1,)
        n, token = baselines.speculative_step(torch.stack([P, P]), Q[None], x, g)
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
    assert baselines.speculative_step(p, q, torch.tensor([2, 4, 0]), g) == (2, 1)
    # All accepted: the bonus token comes from the last row of p.
    assert baselines.speculative_step(p, one_hot[[2, 4, 1]], torch.tensor([2, 4, 1]), g) == (3, 3)
    # gamma = 0: a plain sample from p.
    assert baselines.speculative_step(one_hot[[3]], torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), g) == (0, 3)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread avoids the 20x slowdown of two threads on a shared 2-core CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int, vocab: int = 8) -> qwen2.Qwen2:
    torch.manual_seed(seed)
    config = qwen2.Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = qwen2.Qwen2(config).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)  # peaked, model-specific distributions
    return model


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


def test_speculative_generate_greedy_equals_target_greedy():
    target, draft = tiny_model(0, vocab=32), tiny_model(1, vocab=32)
    prompt = torch.tensor([[1, 5, 7, 3]])
    expected = greedy(target, prompt, 20)
    assert torch.equal(expected, qwen2.generate(target, prompt, 20, temperature=0, eos_token_id=None))
    for gamma in (1, 3, 4):
        ids, stats = baselines.speculative_generate(target, draft, prompt, 20, gamma=gamma, temperature=0)
        assert torch.equal(ids, expected)
        assert stats["new_tokens"] == 20 and stats["accepted"] < stats["drafted"]
        # The draft's caches survive rollbacks: its proposals are its own greedy continuations.
        assert stats["accepted"] == greedy_acceptances(target, draft, prompt, 20, gamma)
    ids, stats = baselines.speculative_generate(target, target, prompt, 20, gamma=4, temperature=0)
    assert torch.equal(ids, expected) and stats["acceptance_rate"] == 1.0 and stats["target_calls"] == 4
    eos = expected[0, 9].item()
    ids, _ = baselines.speculative_generate(target, draft, prompt, 20, temperature=0, eos_token_id=eos)
    assert ids[0, -1].item() == eos and torch.equal(ids[0], expected[0, :expected[0, 4:].tolist().index(eos) + 5])


def test_speculative_generate_target_equals_draft_accepts_everything():
    model = tiny_model(0, vocab=32)
    g = torch.Generator().manual_seed(0)
    ids, stats = baselines.speculative_generate(model, model, torch.tensor([[1, 2]]), 13, gamma=4, generator=g)
    assert stats["acceptance_rate"] == 1.0 and stats["drafted"] == 10 and ids.shape == (1, 15)


@torch.no_grad()
def test_speculative_generate_samples_the_target_distribution():
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
        ids, stats = baselines.speculative_generate(target, draft, prompt, 3, gamma=2, temperature=T, generator=g)
        counts[0, ids[0, 4]] += 1
        counts[1, ids[0, 5]] += 1
        accepted += stats["accepted"]
    assert 0 < accepted < 2 * n  # both branches (accept, reject) were exercised
    assert (counts[0] / n - target2).abs().max() < 0.05  # sd <= 0.016 at n = 1000
    assert (counts[1] / n - target3).abs().max() < 0.05


def test_speculative_generate_checks_vocab_and_batch():
    a, b = tiny_model(0, vocab=8), tiny_model(1, vocab=16)
    with pytest.raises(ValueError, match="vocab_size"):
        baselines.speculative_generate(a, b, torch.tensor([[1]]), 2)
    ids, _ = baselines.speculative_generate(a, b, torch.tensor([[1]]), 4, temperature=0, vocab_size=8)
    assert torch.equal(ids, greedy(a, torch.tensor([[1]]), 4))
    with pytest.raises(ValueError, match="batch size 1"):
        baselines.speculative_generate(a, a, torch.tensor([[1], [2]]), 2)


# ---------------------------------------------------------------------------- reverse KL

def test_reverse_kl_by_hand():
    # Position 0: student q = (1/2, 1/4, 1/4), teacher p = (1/4, 1/2, 1/4):
    #   KL(q || p) = 1/2 ln 2 + 1/4 ln(1/2) + 0 = 1/4 ln 2.
    # Position 1: q = (1/3, 1/3, 1/3), p = (1/8, 1/8, 3/4):
    #   KL = 1/3 (2 ln(8/3) + ln(4/9)) = 1/3 ln(256/81).
    student = torch.log(torch.tensor([[[1 / 2, 1 / 4, 1 / 4], [1 / 3, 1 / 3, 1 / 3]]])) + 5.0  # logits: any shift
    teacher = torch.log(torch.tensor([[[1 / 4, 1 / 2, 1 / 4], [1 / 8, 1 / 8, 3 / 4]]]))
    kl0, kl1 = math.log(2) / 4, math.log(256 / 81) / 3
    assert baselines.reverse_kl(student, teacher, torch.tensor([[1, 1]])).item() == pytest.approx((kl0 + kl1) / 2, rel=1e-5)
    assert baselines.reverse_kl(student, teacher, torch.tensor([[1, 0]])).item() == pytest.approx(kl0, rel=1e-5)
    assert baselines.reverse_kl(student, teacher, torch.tensor([[0, 1]])).item() == pytest.approx(kl1, rel=1e-5)
    # Reverse, not forward: KL(p || q) at position 1 is different.
    forward1 = 2 / 8 * math.log(3 / 8) + 3 / 4 * math.log(9 / 4)  # 0.363 vs 0.384
    assert abs(kl1 - forward1) > 0.01
    assert baselines.reverse_kl(student, student - 3.0, torch.tensor([[1, 1]])).item() == pytest.approx(0, abs=1e-6)
    assert baselines.reverse_kl(student, teacher, torch.tensor([[0, 0]])).item() == 0.0


# ---------------------------------------------------------------------------- RKD-FT

WORDS = ["<|im_start|>", "<|im_end|>", "user", "assistant", "system", "hello", "world", "a", "b", "c", "d", "e"]


def tiny_tokenizer(words=WORDS) -> qwen2.Tokenizer:
    import tokenizers
    from tokenizers import models, pre_tokenizers

    tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return qwen2.Tokenizer(tok, {"eos_token": "<|im_end|>", "pad_token": "<|im_end|>"})


EXAMPLES = [([{"role": "user", "content": "hello a b"}], "c d e"),
            ([{"role": "user", "content": "world"}], "e e a b c"),
            ([{"role": "user", "content": "a a"}], "hello")]


def test_rkd_finetune_loss_is_the_reverse_kl_on_response_positions():
    tok = tiny_tokenizer()
    student, teacher = tiny_model(0, vocab=16), tiny_model(1, vocab=16)  # 12 tokens + 4 padding rows
    expected = []
    with torch.no_grad():
        for messages, response in EXAMPLES:
            ids, n_prompt = lora.encode_example(tok, messages, response, 64)
            x = torch.tensor([ids])
            # positions n_prompt - 1 ... len - 2 predict the response tokens and <|im_end|>
            s, t = student(x)[0, n_prompt - 1:-1, :12], teacher(x)[0, n_prompt - 1:-1, :12]
            expected.append(baselines.reverse_kl(s, t, torch.ones(len(s))) * len(s))
    n_response = sum(len(tok.encode(r)) + 1 for _, r in EXAMPLES)
    lora.add_lora(student)
    losses = baselines.rkd_finetune(student, teacher, tok, EXAMPLES, epochs=1, lr=0.0, batch_size=3)
    assert losses[0] == pytest.approx(sum(expected).item() / n_response, rel=1e-5)


def test_rkd_finetune_learns_and_checks_vocab():
    tok = tiny_tokenizer()
    teacher = tiny_model(1, vocab=12)
    student = lora.add_lora(tiny_model(0, vocab=12))
    losses = baselines.rkd_finetune(student, teacher, tok, EXAMPLES, epochs=6, lr=2e-2, batch_size=2)
    assert losses[-1] < 0.7 * losses[0]
    copy = lora.add_lora(tiny_model(1, vocab=12))  # the teacher itself: nothing to learn
    assert baselines.rkd_finetune(copy, teacher, tok, EXAMPLES, epochs=1, lr=0.0)[0] == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="teacher model's tokenizer differs"):
        baselines.rkd_finetune(student, teacher, tok, EXAMPLES, teacher_tokenizer=tiny_tokenizer(WORDS[:-1] + ["f"]))
    with pytest.raises(ValueError, match="the teacher has 8 logits"):
        baselines.rkd_finetune(student, tiny_model(1, vocab=8), tok, EXAMPLES)
    with pytest.raises(ValueError, match="no trainable parameters"):
        baselines.rkd_finetune(tiny_model(0, vocab=12).requires_grad_(False), teacher, tok, EXAMPLES)
