"""Baselines (paper sec. 5.1): BM25 worked by hand, dense retrieval, each EDA operation on a
fixed seed, the WordNet parser on a hand-written fixture, the exactness of speculative
sampling, and the reverse KL against a hand computation."""
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

import lora
import options
import qwen2
import train
from errors import InputError
from experiments import baselines

pytestmark = pytest.mark.usefixtures("one_thread")

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
    with pytest.raises(InputError, match="apt-get install wordnet-base"):
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


def test_rkd_finetune_loss_is_the_reverse_kl_on_response_positions(tiny_model):
    tok = tiny_tokenizer()
    student, teacher = tiny_model(0, vocab=16), tiny_model(1, vocab=16)  # 12 tokens + 4 padding rows
    expected = []
    with torch.no_grad():
        for messages, response in EXAMPLES:
            ids, n_prompt = train.encode_example(tok, messages, response, 64)
            x = torch.tensor([ids])
            # positions n_prompt - 1 ... len - 2 predict the response tokens and <|im_end|>
            s, t = student(x)[0, n_prompt - 1:-1, :12], teacher(x)[0, n_prompt - 1:-1, :12]
            expected.append(baselines.reverse_kl(s, t, torch.ones(len(s))) * len(s))
    n_response = sum(len(tok.encode(r)) + 1 for _, r in EXAMPLES)
    lora.add_lora(student)
    losses = baselines.rkd_finetune(student, teacher, tok, EXAMPLES, options.Settings(epochs=1, lr=0.0, batch_size=3))
    assert losses[0] == pytest.approx(sum(expected).item() / n_response, rel=1e-5)


def test_rkd_finetune_learns_and_checks_vocab(tiny_model):
    tok = tiny_tokenizer()
    teacher = tiny_model(1, vocab=12)
    student = lora.add_lora(tiny_model(0, vocab=12))
    losses = baselines.rkd_finetune(student, teacher, tok, EXAMPLES, options.Settings(epochs=6, lr=2e-2, batch_size=2))
    assert losses[-1] < 0.7 * losses[0]
    copy = lora.add_lora(tiny_model(1, vocab=12))  # the teacher itself: nothing to learn
    assert baselines.rkd_finetune(copy, teacher, tok, EXAMPLES, options.Settings(epochs=1, lr=0.0))[0] == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="teacher model's tokenizer differs"):
        baselines.rkd_finetune(student, teacher, tok, EXAMPLES, options.Settings(), teacher_tokenizer=tiny_tokenizer(WORDS[:-1] + ["f"]))
    with pytest.raises(ValueError, match="the teacher has 8 logits"):
        baselines.rkd_finetune(student, tiny_model(1, vocab=8), tok, EXAMPLES, options.Settings())
    with pytest.raises(ValueError, match="no trainable parameters"):
        baselines.rkd_finetune(tiny_model(0, vocab=12).requires_grad_(False), teacher, tok, EXAMPLES, options.Settings())
