"""appendix.py: Table 5's statistics worked by hand, and the case study's per-answer scores."""
from types import SimpleNamespace

import pytest

import appendix
import data

WORDS = SimpleNamespace(encode=str.split)  # a tokenizer whose tokens are the words: counts by hand


def users():
    task = data.get_task("lamp7")  # its instruction is 11 words: "Paraphrase the following ... after it: "
    q = task.instruction
    return task, [data.User("u1", [{"text": "a"}, {"text": "b"}, {"text": "c"}],
                            [data.Query("q1", q + "rain again ugh", "ugh rain again lol")]),
                  data.User("u2", [{"text": "d"}],
                            [data.Query("q2", q + "big game tonight lets go", "LETS GO"),
                             data.Query("q3", q + "coffee", "need coffee now")])]


def test_table5_counts_by_hand():
    task, targets = users()
    assert len(task.instruction.split()) == 11
    kept = {"u1": [("again rain", "x y z")], "u2": [("game big tonight", "LETS GO"), ("go", "a")],
            "u9": [("not a target", "left out")]}
    row = appendix.table5(task, targets, kept, WORDS)
    assert row == {"queries": 3, "history": (3 + 1) / 2,
                   "query_in": ((11 + 3) + (11 + 5) + (11 + 1)) / 3, "query_out": (4 + 2 + 3) / 3,
                   "synthetic": 3,  # u9 is no target
                   "synthetic_in": ((11 + 2) + (11 + 3) + (11 + 1)) / 3,  # x behind the instruction, as trained
                   "synthetic_out": (3 + 2 + 1) / 3}
    none = appendix.table5(task, targets, None, WORDS)  # a run without synthetic data
    assert none["synthetic"] is none["synthetic_in"] is none["synthetic_out"] is None and none["queries"] == 3
    empty = appendix.table5(task, targets, {}, WORDS)  # synthetic data, none kept
    assert empty["synthetic"] == 0 and empty["synthetic_in"] is None


def test_table5_counts_tokens_without_special_tokens(tiny_model_dir, tmp_path, t5_checkpoint):
    tok = appendix.device_tokenizer(str(tiny_model_dir))  # SmolLM2's tokenizer
    task, targets = users()
    row = appendix.table5(task, targets, None, tok)
    assert row["query_out"] == sum(len(tok.encode(q.gold)) for u in targets for q in u.queries) / 3
    assert len(tok.encode("LETS GO")) == len(tok.tokenizer.encode("LETS GO", add_special_tokens=False).ids) >= 2
    t5_checkpoint(tmp_path)  # a T5 device model: its own tokenizer class, no </s> counted
    tok = appendix.device_tokenizer(str(tmp_path))
    assert isinstance(tok, appendix.t5.Tokenizer) and 1 not in tok.encode("the cat sat")


def test_table5_markdown_puts_the_papers_row_beside_ours():
    task, targets = users()
    text = appendix.table5_markdown({"lamp7": appendix.table5(task, targets, None, WORDS)}, "words")
    assert "| LaMP-7 (ours) | 3 | 2.00 | 14.00 | 3.00 | - | - | - |" in text
    assert "| LaMP-7 (paper) | 100 | 120.15 | 40.90 | 27.66 | 16490 | 39.56 | 0.00 |" in text and "`words`" in text


@pytest.mark.parametrize("task, prediction, gold, score", [
    ("lamp2", " comedy ", "comedy", "right"), ("lamp2", "Comedy", "comedy", "wrong"),  # LaMP's exact match
    ("lamp1", "[2]", "[1]", "wrong"), ("lamp3", "4", "2", "|error| 2.00"),
    ("lamp3", "oops", "2", "|error| 3.00"),  # not a number: the farther of 1 and 5
    ("lamp7", "the cat sat", "the cat ran", "R-1 0.67"),  # 2 of 3 unigrams both ways
    ("lamp5", "", "A Title", "R-1 0.00")])
def test_case_study_scores_each_answer_as_lamp_does(task, prediction, gold, score):
    assert appendix.query_score(data.get_task(task), prediction, gold) == score


def test_a_cell_is_one_escaped_line_cut_to_length():
    assert appendix.md_cell("a | b\nc") == "a \\| b c"
    assert appendix.md_cell("x" * 20, limit=10) == "xxxxxxx..."
