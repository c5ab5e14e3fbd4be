"""report.py: the table's one-line reading, worked from a hand-made report; LaMP's own files, scored
as LaMP's evaluation does with test-only oracles (scikit-learn, rouge_score), give the report's numbers."""
import json
import math
from pathlib import Path

import pytest

import cdcda
import data
import metrics
import options
import report
import runner
from scale import report as scale_report


def rep(rows):
    return {"task": "lamp7", "users": ["u"], "queries": 1, "models": {}, "counts": {}, "seconds": {},
            "labels": {m: m.upper() for m in rows}, "rows": rows}


def test_reading_orders_the_rows_by_gold_nll_and_the_first_metric():
    r = rep({"base": {"rouge1": 0.5, "gold_nll": 3.0}, "ft": {"rouge1": 0.7, "gold_nll": 2.0},
             "cdcda": {"rouge1": 0.6, "gold_nll": 1.5}})
    assert report.reading(r) == ("reading: gold NLL (lower is better): CDCDA 1.500 < FT 2.000 < BASE 3.000; "
                                 "rouge1 (higher is better): FT 0.700 > CDCDA 0.600 > BASE 0.500")
    assert report.reading(r) in report.markdown(r)
    mae = rep({"a": {"mae": 0.9, "rmse": 1.0}, "b": {"mae": 0.4, "rmse": 0.5}})
    assert report.reading(mae) == "reading: mae (lower is better): B 0.400 < A 0.900"  # no gold NLL column
    assert report.reading(rep({"a": {"accuracy": 1.0}})) == ""  # one row: nothing to order


def test_models_used_names_the_history_pairs_only_where_they_are_a_choice():
    settings = options.parse(["--task", "lamp7", "--history-pairs", "identity"], cdcda.METHODS)
    assert runner.models_used(settings)["history pairs"].startswith("identity")
    settings = options.parse(["--task", "lamp2"], cdcda.METHODS)  # the default "rewrite" does not apply to lamp2
    assert runner.models_used(settings)["history pairs"].startswith("the task's own")


# ---------------------------------------------------------------- LaMP's own files, scored as LaMP does
LAMP_LABELS = {"LaMP_1": ["[1]", "[2]"],  # LaMP's eval/evaluation.py; LaMP-2 is the movie-tagging version's tags
               "LaMP_2": ["sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy",
                          "classic", "psychology", "fantasy", "romance", "thought-provoking", "social commentary",
                          "violence", "true story"]}


def lamp_evaluate(golds_file, predictions_file) -> dict:
    """LaMP's `eval/evaluation.py` on its own files, with the test-only oracles: the predictions'
    ids must be the golds' ids; LaMP-1/2: strip, the label's index or -1, sklearn's accuracy and
    macro F1 over all labels; LaMP-3: float(), a non-number the farther of 1 and 5, MAE and RMSE;
    LaMP-4/5/7: rouge_score's ROUGE-1 and ROUGE-L F, no stemmer, mean over the queries."""
    golds, preds = (json.loads(Path(f).read_text()) for f in (golds_file, predictions_file))
    assert preds["task"] == golds["task"]
    gold = {g["id"]: g["output"] for g in golds["golds"]}
    pred = {p["id"]: p["output"] for p in preds["golds"]}
    assert set(gold) == set(pred)  # LaMP asserts it
    ids = list(gold)
    g, p = [str(gold[i]).strip() for i in ids], [str(pred[i]).strip() for i in ids]
    return lamp_metrics(golds["task"], p, g)


def lamp_metrics(task: str, p: list[str], g: list[str]) -> dict:
    sklearn = pytest.importorskip("sklearn.metrics")
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    if task in LAMP_LABELS:
        labels = LAMP_LABELS[task]
        index = [labels.index(x) if x in labels else -1 for x in p]
        gold = [labels.index(x) if x in labels else -1 for x in g]
        return {"accuracy": sklearn.accuracy_score(gold, index),
                "f1": sklearn.f1_score(gold, index, labels=list(range(len(labels))), average="macro",
                                           zero_division=0)}  # sklearn's default value, without its warning
    if task == "LaMP_3":
        def number(x, y):
            try:
                return float(x)
            except ValueError:
                return 1.0 if abs(1 - float(y)) > abs(5 - float(y)) else 5.0
        pred, gold = [number(x, y) for x, y in zip(p, g)], [float(y) for y in g]
        return {"mae": sklearn.mean_absolute_error(gold, pred), "rmse": math.sqrt(sklearn.mean_squared_error(gold, pred))}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    scores = [scorer.score(y, x) for x, y in zip(p, g)]
    return {"rouge1": sum(s["rouge1"].fmeasure for s in scores) / len(scores),
            "rougeL": sum(s["rougeL"].fmeasure for s in scores) / len(scores)}


CASES = {  # task: (golds, two methods' predictions): off-label, case, spaces, non-numbers, empty text
    "lamp1": (["[1]", "[2]", "[1]", "[2]"], [" [1] ", "[1]", "[3]", "[2]\n"], ["[2]", "[2]", "[2]", "1"]),
    "lamp2": (["comedy", "sci-fi", "action", "comedy"], ["comedy", "Sci-Fi", " action ", "classic"],
              ["comedy", "sci-fi", "action", "comedy "]),
    "lamp3": (["5", "1", "3", "2"], ["4", " 1 ", "oops", "2.5"], ["five", "1", "3", "1"]),
    "lamp7": (["ugh rain again lol", "LETS GO team!!", "need coffee now", "so tired"],
              ["rain again, ugh", "lets go", "", "tired tired tired"], ["ugh rain again lol", "go", "coffee", "z"]),
}


def hand_run(task_name: str, golds, *predictions):
    """Two target users (1 and 3 queries, ids not in order), and their result.json predictions."""
    task = data.get_task(task_name)
    ids = ["110", "7x", "2", "a-1"]
    queries = [data.Query(i, task.instruction + "text", g) for i, g in zip(ids, golds)]
    users = [data.User("u1", [{}], queries[:1]), data.User("u2", [{}], queries[1:])]
    methods = ["base", "cdcda"][:len(predictions)]
    results = [{"predictions": {m: list(p[a:b]) for m, p in zip(methods, predictions)}, "times": {}}
               for a, b in ((0, 1), (1, 4))]
    return task, users, results, methods


@pytest.mark.parametrize("task_name", list(CASES))
def test_lamp_files_score_as_lamps_evaluation_gives_the_reports_numbers(tmp_path, task_name):
    task, users, results, methods = hand_run(task_name, *CASES[task_name])
    rep = report.build(task, users, results, {m: m for m in methods}, {}, {})
    report.lamp_files(task, users, results, methods, tmp_path)
    golds = json.loads((tmp_path / "lamp" / "golds.json").read_text())
    assert golds["task"] == task.lamp_name and [g["id"] for g in golds["golds"]] == ["110", "7x", "2", "a-1"]
    for method in methods:
        written = json.loads((tmp_path / "lamp" / f"{method}.json").read_text())
        assert [p["output"] for p in written["golds"]] == [p for r in results for p in r["predictions"][method]]
        theirs = lamp_evaluate(tmp_path / "lamp" / "golds.json", tmp_path / "lamp" / f"{method}.json")
        assert set(theirs) <= set(rep["rows"][method])
        for key, value in theirs.items():
            assert rep["rows"][method][key] == pytest.approx(value, abs=1e-12), (method, key)
    assert rep["rows"]["base"] != rep["rows"]["cdcda"]


def test_where_the_project_differs_from_lamp_on_purpose(tmp_path):
    """README "LaMP metrics": LaMP's float() takes "nan" and "inf" as numbers, so one of them makes
    its MAE nan or inf (sklearn refuses such input); ours counts them as non-numbers. And a gold
    outside the label list: LaMP maps it to -1 and scores an off-label prediction against it as
    right; ours refuses it (and data.load_users refuses such a file)."""
    task, users, results, methods = hand_run("lamp3", ["5", "1", "3", "2"], ["nan", "inf", "3", "-inf"])
    rep = report.build(task, users, results, {"base": "B"}, {}, {})
    report.lamp_files(task, users, results, methods, tmp_path)
    with pytest.raises(ValueError):  # LaMP: float("nan") is a number, and the MAE of it is no number
        lamp_evaluate(tmp_path / "lamp" / "golds.json", tmp_path / "lamp" / "base.json")
    as_words = lamp_metrics("LaMP_3", ["oops", "oops", "3", "oops"], ["5", "1", "3", "2"])
    assert rep["rows"]["base"] == pytest.approx(as_words)  # ours: the worst case, as for any non-number
    assert rep["rows"]["base"]["mae"] == pytest.approx((4 + 4 + 0 + 3) / 4)
    lamp = lamp_metrics("LaMP_2", ["western", "comedy"], ["horror", "comedy"])
    assert lamp["accuracy"] == 1.0  # -1 == -1: LaMP counts the off-label pair as right
    with pytest.raises(ValueError, match="horror"):
        metrics.evaluate("lamp2", ["western", "comedy"], ["horror", "comedy"])


def test_lamp_files_need_unique_query_ids(tmp_path, capsys):
    task, users, results, methods = hand_run("lamp1", *CASES["lamp1"][:2])
    users[1].queries[0].id = "110"  # the same id as the first user's query
    report.lamp_files(task, users, results, methods, tmp_path)
    assert "110 appear twice" in capsys.readouterr().out and not (tmp_path / "lamp").exists()


def test_a_tiny_run_writes_lamps_files(tiny_run):
    out, rep, targets, results, ids = tiny_run.out, tiny_run.rep, tiny_run.targets, tiny_run.results, tiny_run.ids
    for method in ("base", "cdcda"):  # LaMP's files: the questions' ids, each method's answers
        written = json.loads((out / "lamp" / f"{method}.json").read_text())
        assert written["task"] == "LaMP_7" and [p["id"] for p in written["golds"]] == ids
        assert [p["output"] for p in written["golds"]] == [p for u in targets
                                                          for p in results[u.user_id]["predictions"][method]]
        theirs = lamp_evaluate(out / "lamp" / "golds.json", out / "lamp" / f"{method}.json")
        assert theirs == pytest.approx({k: rep["rows"][method][k] for k in theirs}, abs=1e-12)
    rescored = scale_report.main(["--out", str(out)])  # the report writes them again, the same
    assert rescored["rows"] == rep["rows"] and json.loads((out / "lamp" / "cdcda.json").read_text()) == written
