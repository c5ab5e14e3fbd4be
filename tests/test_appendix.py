"""experiments/appendix.py: Table 5's statistics worked by hand, the case study's per-answer scores,
and both on a tiny run (`python -m experiments --table5`, `--case-study`)."""
import json
from types import SimpleNamespace

import pytest

import data
import metrics
from errors import InputError
from experiments import __main__ as experiments_main, appendix

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


def test_a_tiny_run_gives_table5_and_a_case_study(tiny_run, tiny_model_dir, tmp_path, monkeypatch):
    out, rep, targets, results, ids = tiny_run.out, tiny_run.rep, tiny_run.targets, tiny_run.results, tiny_run.ids
    tok = appendix.device_tokenizer(str(tiny_model_dir))  # Table 5 of the run
    golds = [q.gold for u in targets for q in u.queries]
    out_tokens = sum(len(tok.encode(g)) for g in golds) / len(golds)
    history = sum(len(u.profile) for u in targets) / 2
    line = f"| LaMP-7 (ours) | {len(ids)} | {history:.2f} | "
    calls = []  # --table5: the finished run is read, a task without one is run
    real_run = experiments_main.run
    monkeypatch.setattr(experiments_main, "run", lambda settings, rows, family: calls.append(settings) or {"missing": ["x"]})
    rows = experiments_main.main(["--table5", "lamp7,lamp2", "--out", str(tmp_path / "runs")])["table5"]
    assert list(rows) == ["lamp7"] and rows["lamp7"]["synthetic"] == rep["counts"]["kept"]
    assert [(s.task, s.methods, s.out) for s in calls] == [("lamp2", ("cdcda",), str(tmp_path / "runs" / "lamp2"))]
    table = (tmp_path / "runs" / "table5.md").read_text()
    assert line in table and f" | {out_tokens:.2f} | {rep['counts']['kept']} | " in table
    monkeypatch.setattr(experiments_main, "run", real_run)

    user = targets[1]  # the case study of one user: history, kept pairs and their scores, every answer
    page = experiments_main.main(["--case-study", user.user_id, "--out", str(out)])["case_study"]
    assert page == out / f"case-study-{user.user_id}.md"
    text = page.read_text()
    assert user.profile[0]["text"] in text and "SCF x => x_syn" in text
    kept = [json.loads(r) for r in (out / "users" / user.user_id / "synthetic.jsonl").read_text().splitlines()]
    kept = [r for r in kept if r["kept"]]
    assert kept and all(f"| {r['syn_input']} | " in text and f"| {r['scf_forward']:.2f} | " in text for r in kept[:10])
    for i, q in enumerate(user.queries):
        assert f"| gold | {q.gold} | |" in text
        for method, label in (("base", "M_device (M_base, non-personalized)"), ("cdcda", "CDCDA-PLM")):
            answer = results[user.user_id]["predictions"][method][i]
            cell = appendix.md_cell(answer)  # one line, cut at 300 characters
            assert f"| {label} | {cell} | R-1 {metrics.rouge_1(answer, q.gold):.2f} |" in text
    first = experiments_main.main(["--case-study", "--out", str(out)])["case_study"]  # no user: the first target
    assert first == out / f"case-study-{targets[0].user_id}.md" and first.is_file()
    with pytest.raises(InputError) as e:
        experiments_main.main(["--case-study", "nobody", "--out", str(out)])
    assert "nobody" in str(e.value) and "\n" not in str(e.value) and user.user_id in str(e.value)
