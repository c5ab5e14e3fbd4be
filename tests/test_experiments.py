"""experiments/: Table 1's baselines, Table 2's ablations and the k sweep, on the tiny random
decoder of conftest.py (`tiny_model_dir`) and its `fake_cloud` replies."""
import json
from pathlib import Path

import pytest

import augment
import cdcda
import data
import filters
import generate
import options
from errors import InputError
from experiments import __main__ as experiments_main, methods

WORDNET = Path(__file__).parent / "fixtures" / "wordnet"


def make_user(profile, queries):
    task = data.get_task("lamp7")
    return data.User("u1", profile, [data.Query(f"q{i}", task.pair_input.format(text=q), q) for i, q in enumerate(queries)])


def make_shared(tmp_path, device_model=None, tokenizer=None, cloud=None, k=2) -> cdcda.Shared:
    settings = options.parse(["--k", str(k), "--out", str(tmp_path)], methods.METHODS)
    device = cdcda.Device(device_model, tokenizer, cdcda.Family(), tmp_path / "base")
    return cdcda.Shared(data.get_task("lamp7"), settings, device, cloud, None, None)


@pytest.mark.parametrize("where", ["cloud", "device"])
def test_rag_prompt_holds_exactly_the_bm25_best_item(tmp_path, monkeypatch, where):
    profile = [{"text": "pizza night with the crew"}, {"text": "rainy day blues again ugh"},
               {"text": "go team go what a game"}]
    user = make_user(profile, ["another rainy day, blues all day", "what a game by the team"])
    s = make_shared(tmp_path, device_model="DEVICE", tokenizer="TOK", cloud=augment.CloudLM("CLOUD", "TOK"))
    seen = {}
    monkeypatch.setattr(generate, "chat", lambda model, tok, conversations, **kw: seen.update(
        model=model, conversations=conversations) or ["ok"] * len(conversations))
    assert methods.prompted(where, "bm25")(s, user, 7).texts == ["ok", "ok"]
    assert seen["model"] == where.upper()
    users = [c[-1]["content"] for c in seen["conversations"]]
    for content, best, query in zip(users, ["rainy day blues again ugh", "go team go what a game"], user.queries):
        assert content.count("text: ") == 1  # exactly one retrieved item
        assert content == f"text: {best}\n" + query.input + s.task.user_end
    methods.prompted(where)(s, user, 7)  # the non-personalized row: no history in the prompt
    assert [c[-1]["content"] for c in seen["conversations"]] == [q.input + " " for q in user.queries]


def test_dense_retrieval_picks_the_nearest_item(tmp_path):
    profile = [{"text": "my cat knocked the plant over"}, {"text": "stock market crashed today"}]
    user = make_user(profile, ["the kitten broke my flower pot", "shares fell sharply on wall street"])
    assert methods.retrieve(make_shared(tmp_path), user, methods.encoder.EMBEDDED) == [profile[0], profile[1]]


def test_rs_draws_the_kept_count_from_every_candidate():
    candidates = data.Candidates([0] * 6, [(f"x{i}", f"y{i}") for i in range(6)], {})
    selection = filters.Selection([("x0", "y0"), ("x3", "y3")], [], {})
    rs = methods.random_selection(candidates, selection, 7)
    assert len(rs) == 2 and set(rs) <= set(candidates.pairs) and len(set(rs)) == 2
    assert methods.random_selection(candidates, selection, 7) == rs  # seeded per user
    assert methods.METHODS["no-ds"].cloud and methods.METHODS["rs"].cloud


def test_eda_pairs_add_k_variants_per_pair_with_the_response_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(methods, "WORDNET_DIR", str(WORDNET))
    history = cdcda.upload(data.get_task("lamp7"), make_user([{"text": "the cat saw a film"},
                                                             {"text": "my dog likes the movie"}], ["q"]))
    pairs = methods.eda_pairs(history, 3, 7)
    assert pairs[:2] == history and len(pairs) == 2 + 2 * 3
    assert [y for _, y in pairs[2:]] == [history[0][1]] * 3 + [history[1][1]] * 3
    assert methods.eda_pairs(history, 3, 7) == pairs  # seeded
    monkeypatch.setattr(methods, "WORDNET_DIR", str(tmp_path / "none"))
    with pytest.raises(InputError, match="apt-get install wordnet-base"):
        methods.eda_pairs(history, 3, 7)


def test_eda_ft_without_wordnet_stops_before_any_work_in_one_line(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(experiments_main, "run", lambda settings, rows, family: calls.append(settings) or {"rows": {}})
    monkeypatch.setattr(methods, "WORDNET_DIR", str(tmp_path / "wordnet"))
    for chosen in ("all", "base,eda-ft"):
        with pytest.raises(InputError) as e:
            experiments_main.main(["--methods", chosen, "--out", str(tmp_path)])
        message = str(e.value)
        assert "\n" not in message and str(tmp_path / "wordnet") in message and "data.noun" in message
        assert "make wordnet" in message and "apt-get install wordnet-base" in message
    assert not calls  # nothing ran
    experiments_main.main(["--methods", "base,direct-ft", "--out", str(tmp_path)])  # no EDA-FT: no WordNet needed
    monkeypatch.setattr(methods, "WORDNET_DIR", str(WORDNET))
    experiments_main.main(["--methods", "all", "--out", str(tmp_path)])
    assert len(calls) == 2


def test_table_tasks_are_checked_before_any_work(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(experiments_main, "run", lambda settings, rows, family: calls.append(settings) or {"rows": {}})
    for flag in ("--table4", "--table5"):
        with pytest.raises(SystemExit):
            experiments_main.main(["--methods", "base", flag, "lamp7,lamp9", "--out", str(tmp_path)])
        assert f"{flag} lamp7,lamp9: unknown task lamp9" in capsys.readouterr().err
    assert not calls  # not even Table 1's row ran


def test_methods_all_and_ablations_expand(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(methods, "WORDNET_DIR", str(WORDNET))  # Table 1's EDA-FT row checks it first
    monkeypatch.setattr(experiments_main, "run", lambda settings, rows, family: calls.append((settings, rows)) or
                        {"rows": {}})
    experiments_main.main(["--methods", "all", "--out", str(tmp_path)])
    settings, rows = calls[-1]
    assert list(settings.methods) == methods.TABLE1 and rows is methods.METHODS
    assert len(methods.TABLE1) == 11 and set(methods.TABLE1) <= set(methods.METHODS)
    experiments_main.main(["--ablations", "--out", str(tmp_path)])
    settings, rows = calls[-1]
    assert (settings.methods, settings.out) == (("cdcda", "rs", "no-ds", "direct-ft", "base"), str(tmp_path / "ablations"))
    assert rows["rs"].label == "Full model (RS)" and rows["direct-ft"].label == "-DS -LDA"
    assert settings.extra == {}  # the experiment's own flags stay out of the run's settings


def test_every_new_method_end_to_end_tiny(tiny_model_dir, tmp_path, monkeypatch, fake_cloud, tiny_args):
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(methods, "WORDNET_DIR", str(WORDNET))
    trained, real_personalize = [], cdcda.personalize
    monkeypatch.setattr(methods, "personalize", lambda device, task, pairs, settings, seed: trained.append(
        len(pairs)) or real_personalize(device, task, pairs, settings, seed))
    monkeypatch.setattr(cdcda, "personalize", methods.personalize)
    new = [m for m in methods.METHODS if m not in cdcda.METHODS and "contriever" not in m]
    out = tmp_path / "run"
    reports = experiments_main.main(tiny_args(tiny_model_dir, out) + ["--methods", ",".join(["direct-ft"] + new)])
    rep = reports["table1"]
    assert set(rep["rows"]) == set(new) | {"direct-ft"}
    users = data.split_users(data.load_users("lamp7"), 2)[0]
    for user, sizes in zip(users, [trained[i:i + 4] for i in range(0, len(trained), 4)]):
        result = json.loads((out / "users" / user.user_id / "result.json").read_text())
        assert all(len(result["predictions"][m]) == len(user.queries) for m in new)
        records = [json.loads(line) for line in (out / "users" / user.user_id / "synthetic.jsonl").read_text().splitlines()]
        n_kept = sum(r["kept"] for r in records)
        direct, eda, rs, no_ds = sizes  # in the rows' order: direct-ft, eda-ft, rs, no-ds
        assert (direct, eda) == (len(user.profile), len(user.profile) * (1 + 3))  # k = 3 variants per pair
        assert (rs, no_ds) == (len(user.profile) + n_kept, len(user.profile) + len(records))
        assert {"rkd-ft", "eda-ft", "rs", "no-ds"} <= set(result["losses"])
    assert len(trained) == 4 * len(users)  # the speculative row reuses Direct-FT's adapter
    spec = json.loads((out / "results.json").read_text())["speculative"]
    assert spec["drafted"] > 0 and spec["acceptance_rate"] == spec["accepted"] / spec["drafted"]
    md = (out / "results.md").read_text()
    assert "| RKD-FT |" in md and "| M_cloud + BM25 |" in md and "acceptance rate" in md


def test_sweep_writes_one_result_per_k(tiny_model_dir, tmp_path, monkeypatch, fake_cloud, tiny_args):
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    rep = experiments_main.main(tiny_args(tiny_model_dir, out) + ["--sweep-k"])["sweep_k"]
    assert list(rep["rows"]) == ["k=1", "k=3", "k=5"]
    for k in (1, 3, 5):
        assert json.loads((out / "sweep-k" / f"k{k}" / "results.json").read_text())["settings"]["k"] == k
    history = sum(len(u.profile) for u in data.split_users(data.load_users("lamp7"), 2)[0])
    kept = [rep["counts"][f"kept (k={k})"] for k in (1, 3, 5)]
    assert kept[1] == history and kept[0] < kept[1] < kept[2]  # fake_cloud: every third reply passes
    saved = json.loads((out / "sweep-k" / "sweep-k.json").read_text())
    assert saved["rows"] == rep["rows"] and "| CDCDA-PLM, k = 3 |" in (out / "sweep-k" / "sweep-k.md").read_text()
    assert (out / "sweep-k" / "sweep-k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
