"""experiments/: Table 1's baselines, Table 2's ablations and the k sweep, on the tiny random
decoder of conftest.py (`tiny_model_dir`) and its `fake_cloud` replies."""
import json
from pathlib import Path

import pytest

import augment
import cdcda
import data
import generate
import options
from errors import InputError
from experiments import __main__ as experiments_main, methods

WORDNET = Path(__file__).parent / "fixtures" / "wordnet"


def make_run(tmp_path, profile, queries, device_model=None, tokenizer=None, cloud=None, kept=None, k=2):
    task = data.get_task("lamp7")
    user = data.User("u1", profile, [data.Query(f"q{i}", task.pair_input.format(text=q), q) for i, q in enumerate(queries)])
    settings = options.parse(["--k", str(k)], methods.METHODS)
    return cdcda.Run(task, device_model, tokenizer, cloud, None, None, settings, methods.METHODS, cdcda.Steps(), "cpu",
                     user, cdcda.upload(task, user), kept, seed=7, user_dir=tmp_path)


@pytest.mark.parametrize("where", ["cloud", "device"])
def test_rag_prompt_holds_exactly_the_bm25_best_item(tmp_path, monkeypatch, where):
    profile = [{"text": "pizza night with the crew"}, {"text": "rainy day blues again ugh"},
               {"text": "go team go what a game"}]
    run = make_run(tmp_path, profile, ["another rainy day, blues all day", "what a game by the team"],
                   device_model="DEVICE", tokenizer="TOK", cloud=augment.CloudLM("CLOUD", "TOK"))
    seen = {}
    monkeypatch.setattr(generate, "chat", lambda model, tok, conversations, **kw: seen.update(
        model=model, conversations=conversations) or ["ok"] * len(conversations))
    assert methods.prompted(where, "bm25")(run) == ["ok", "ok"]
    assert seen["model"] == where.upper()
    users = [c[-1]["content"] for c in seen["conversations"]]
    for content, best, query in zip(users, ["rainy day blues again ugh", "go team go what a game"], run.user.queries):
        assert content.count("text: ") == 1  # exactly one retrieved item
        assert content == f"text: {best}\n" + query.input + run.task.user_end
    methods.prompted(where)(run)  # the non-personalized row: no history in the prompt
    assert [c[-1]["content"] for c in seen["conversations"]] == [q.input + " " for q in run.user.queries]


def test_dense_retrieval_picks_the_nearest_item(tmp_path):
    profile = [{"text": "my cat knocked the plant over"}, {"text": "stock market crashed today"}]
    run = make_run(tmp_path, profile, ["the kitten broke my flower pot", "shares fell sharply on wall street"])
    assert methods.retrieve(run, methods.encoder.EMBEDDED) == [profile[0], profile[1]]


def write_synthetic(run, n=6, kept=(0, 3)):
    records = [{"input": "a", "output": "a", "syn_input": f"x{i}", "syn_output": f"y{i}", "kept": i in kept}
               for i in range(n)]
    (run.user_dir / "synthetic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run.kept = [(f"x{i}", f"y{i}") for i in kept]


def test_rs_draws_the_kept_count_and_no_ds_takes_every_candidate(tmp_path):
    run = make_run(tmp_path, [{"text": "hello"}], ["hi"])
    write_synthetic(run)
    everything = methods.candidates(run)
    assert everything == [(f"x{i}", f"y{i}") for i in range(6)]
    rs = methods.random_selection(run)
    assert len(rs) == len(run.kept) == 2 and set(rs) <= set(everything) and len(set(rs)) == 2
    assert methods.random_selection(run) == rs  # seeded per user


def test_eda_pairs_add_k_variants_per_pair_with_the_response_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(methods, "WORDNET_DIR", str(WORDNET))
    run = make_run(tmp_path, [{"text": "the cat saw a film"}, {"text": "my dog likes the movie"}], ["q"], k=3)
    pairs = methods.eda_pairs(run)
    assert pairs[:2] == run.pairs and len(pairs) == 2 + 2 * 3
    assert [y for _, y in pairs[2:]] == [run.pairs[0][1]] * 3 + [run.pairs[1][1]] * 3
    assert methods.eda_pairs(run) == pairs  # seeded
    monkeypatch.setattr(methods, "WORDNET_DIR", str(tmp_path / "none"))
    with pytest.raises(InputError, match="apt-get install wordnet-base"):
        methods.eda_pairs(run)


def test_eda_ft_without_wordnet_stops_before_any_work_in_one_line(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(cdcda, "run", lambda settings, rows, steps: calls.append(settings) or {"rows": {}})
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


def test_methods_all_and_ablations_expand(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(methods, "WORDNET_DIR", str(WORDNET))  # Table 1's EDA-FT row checks it first
    monkeypatch.setattr(cdcda, "run", lambda settings, rows, steps: calls.append((settings, rows)) or {"rows": {}})
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
    monkeypatch.setattr(cdcda, "personalize", lambda model, tok, task, pairs, training, seed, desc: trained.append(
        (desc, len(pairs))) or real_personalize(model, tok, task, pairs, training, seed, desc))
    new = [m for m in methods.METHODS if m not in cdcda.METHODS and "contriever" not in m]
    out = tmp_path / "run"
    reports = experiments_main.main(tiny_args(tiny_model_dir, out) + ["--methods", ",".join(["direct-ft"] + new)])
    rep = reports["table1"]
    assert set(rep["rows"]) == set(new) | {"direct-ft"}
    users = data.split_users(data.load_users("lamp7"), 2)[0]
    for user in users:
        result = json.loads((out / "users" / user.user_id / "result.json").read_text())
        assert all(len(result["predictions"][m]) == len(user.queries) for m in new)
        records = [json.loads(line) for line in (out / "users" / user.user_id / "synthetic.jsonl").read_text().splitlines()]
        n_kept = sum(r["kept"] for r in records)
        sizes = dict(trained)
        assert sizes[f"rs {user.user_id}"] == len(user.profile) + n_kept
        assert sizes[f"no-ds {user.user_id}"] == len(user.profile) + len(records)
        assert sizes[f"eda-ft {user.user_id}"] == len(user.profile) * (1 + 3)  # k = 3 variants per pair
        assert sizes[f"direct-ft {user.user_id}"] == len(user.profile)
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
