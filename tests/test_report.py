"""report.py: the table's one-line reading, worked from a hand-made report."""
import cdcda
import options
import report


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
    assert report.models_used(settings)["history pairs"].startswith("identity")
    settings = options.parse(["--task", "lamp2"], cdcda.METHODS)  # the default "rewrite" does not apply to lamp2
    assert report.models_used(settings)["history pairs"].startswith("the task's own")
