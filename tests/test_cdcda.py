"""The pipeline: steps 1, 4, 5, the options, and a tiny end-to-end run of all five steps.

The end-to-end tests use a tiny random decoder (conftest.py: SmolLM2's tokenizer, 2 layers) as
cloud and device model and the embedded MiniLM as judge, so they take seconds, not minutes.
"""
import json

import pytest
import torch

import cdcda
import data
import hub
import options
import qwen2
import runner
import train
from errors import InputError
from scale import report as scale_report


def test_upload_cuts_the_instruction():
    task = data.get_task("lamp7")
    user = data.User("u", [{"text": "ngl lowkey tired fr"}], [])
    assert cdcda.upload(task, user) == [("ngl lowkey tired fr", "ngl lowkey tired fr")]
    task = data.get_task("lamp4")
    user = data.User("u", [{"text": "The council met.", "title": "Council Meets"}], [])
    assert cdcda.upload(task, user) == [("The council met.", "Council Meets")]


def test_parse_args_defaults_and_errors(capsys):
    settings = options.parse([], cdcda.METHODS)
    assert (settings.task, settings.k, settings.temperature, settings.lora_r, settings.lora_alpha,
            settings.answer_temperature) == ("lamp7", 5, 0.7, 16, 8, 0.7)
    assert settings == options.Settings()  # the command line's defaults are the dataclass's
    assert settings.cloud_model == settings.device_model == qwen2.EMBEDDED
    paper = options.parse(["--paper"], cdcda.METHODS)
    assert paper.device_model == "Qwen/Qwen2.5-0.5B-Instruct" and paper.judge.startswith("nli:")
    with pytest.raises(SystemExit):
        options.parse(["--methods", "base,magic"], cdcda.METHODS)
    assert "--methods" in capsys.readouterr().err


def test_end_to_end_tiny(tiny_model_dir, tmp_path, monkeypatch, fake_cloud, tiny_args):
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    rep = cdcda.main(tiny_args(tiny_model_dir, tmp_path / "run"))
    assert set(rep["rows"]) == {"base", "direct-ft", "cdcda"}
    for row in rep["rows"].values():
        assert set(row) == {"rouge1", "rougeL", "bertscore_f1", "bertscore_model", "bertscore_layer", "gold_nll"}
        assert row["gold_nll"] > 0
    counts = rep["counts"]
    users = data.split_users(data.load_users("lamp7"), 2)[0]
    history = sum(len(u.profile) for u in users)
    assert counts["generated"] == 3 * history and counts["unparsable"] == history  # every third reply
    assert counts["candidates"] == 2 * history
    assert counts["rejected_scf"] >= history  # the off-topic one is never kept
    assert counts["kept"] == history  # every reversed input passes all three filters
    assert "stand-in" in rep["models"]["judge"] and "embedded demo" in rep["models"]["data"]
    for user in users:
        user_dir = tmp_path / "run" / "users" / user.user_id
        records = [json.loads(line) for line in (user_dir / "synthetic.jsonl").read_text().splitlines()]
        assert len(records) == 2 * len(user.profile) and all("scf_forward" in r for r in records)
        assert (user_dir / "cdcda.adapter.safetensors").is_file()
        result = json.loads((user_dir / "result.json").read_text())
        assert len(result["predictions"]["cdcda"]) == len(user.queries)
    md = (tmp_path / "run" / "results.md").read_text()
    assert "| CDCDA-PLM |" in md and "| Direct-FT |" in md
    assert len(list((tmp_path / "cache" / "base").iterdir())) == 1  # M_base trained once, cached


def test_interrupted_run_resumes(tiny_model_dir, tmp_path, monkeypatch, fake_cloud, tiny_args):
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    real_personalize, users = cdcda.personalize, data.split_users(data.load_users("lamp7"), 2)[0]

    def dies_on_second_user(device, task, pairs, settings, seed):
        if seed == runner.user_seed(settings, users[1]):
            raise KeyboardInterrupt  # the run is stopped during the second user
        return real_personalize(device, task, pairs, settings, seed)
    monkeypatch.setattr(cdcda, "personalize", dies_on_second_user)
    with pytest.raises(KeyboardInterrupt):
        cdcda.main(tiny_args(tiny_model_dir, tmp_path / "run"))
    done = list((tmp_path / "run" / "users").glob("*/result.json"))
    assert len(done) == 1 and not (tmp_path / "run" / "run.json").exists()  # the first user is kept
    first = done[0].read_text()

    monkeypatch.setattr(cdcda, "personalize", real_personalize)
    asked, real_augment = [], cdcda.augment
    monkeypatch.setattr(cdcda, "augment", lambda cloud, pairs, *a: asked.append(pairs) or real_augment(cloud, pairs, *a))
    rep = cdcda.main(tiny_args(tiny_model_dir, tmp_path / "run"))
    assert done[0].read_text() == first and len(asked) == 1  # only the second user is worked on again
    assert len(rep["users"]) == 2 and json.loads((tmp_path / "run" / "run.json").read_text())["users"] == rep["users"]
    with pytest.raises(InputError, match="written by a run with k = 3, this one has 2"):
        cdcda.main(tiny_args(tiny_model_dir, tmp_path / "run") + ["--k", "2"])
    rescored = cdcda.main(tiny_args(tiny_model_dir, tmp_path / "run") + ["--bertscore-layer", "2"])  # evaluation only
    assert all(row["bertscore_layer"] == 2 for row in rescored["rows"].values()) and done[0].read_text() == first


def test_gold_nll_is_the_cross_entropy_of_the_gold_tokens(tiny_model_dir):
    model, tok = qwen2.load(str(tiny_model_dir))
    task = data.get_task("lamp7")
    queries = [data.Query("a", task.pair_input.format(text="rain again"), "ugh rain again lol"),
               data.Query("b", task.pair_input.format(text="big game"), "LETS GO")]
    nll = train.nll(model, tok, [(task.messages(q.input), q.gold) for q in queries], options.Settings().max_length)
    for q, value in zip(queries, nll):  # by hand: full logits, the gold's tokens and <|im_end|>
        prompt = tok.encode(tok.apply_chat_template(task.messages(q.input), add_generation_prompt=True))
        gold = tok.encode(q.gold) + tok.encode("<|im_end|>")
        with torch.no_grad():
            logits = model(torch.tensor([prompt + gold]))[0]  # (T, V)
        expected = torch.nn.functional.cross_entropy(logits[len(prompt) - 1:-1].float(), torch.tensor(gold))
        assert value == pytest.approx(expected.item(), rel=1e-5)
    assert nll[0] != nll[1]


@pytest.mark.parametrize("bad, option", [
    (["--temperature", "-1"], "--temperature"), (["--epochs", "0"], "--epochs"), (["--base-epochs", "0"], "--base-epochs"),
    (["--batch-size", "0"], "--batch-size"), (["--max-length", "5"], "--max-length"), (["--eps-tdf", "2"], "--eps-tdf"),
    (["--eps-min-len", "3"], "--eps-min-len"), (["--lr", "nan"], "--lr"), (["--lr", "0"], "--lr"),
    (["--device", "gpu"], "--device"), (["--k", "0"], "--k"), (["--users", "0"], "--users"),
    (["--lora-r", "0"], "--lora-r"), (["--lora-alpha", "-8"], "--lora-alpha"), (["--eps-scf", "3"], "--eps-scf"),
    (["--bertscore-layer", "-1"], "--bertscore-layer"), (["--seed", "-1"], "--seed"),
    (["--answer-temperature", "3"], "--answer-temperature")])
def test_every_bad_option_ends_in_one_line_naming_it(bad, option, capsys):
    with pytest.raises(SystemExit):
        options.parse(bad, cdcda.METHODS)
    err = capsys.readouterr().err.strip().splitlines()
    assert option in err[-1] and any(rule in err[-1] for rule in ("must be", "keep nothing", "use cpu"))


def test_plain_mistakes_end_in_one_line_before_any_work_and_change_nothing(tmp_path, capsys):
    """A finished run's directory, then runs and a report that must fail before touching it."""
    out, a_file = tmp_path / "run", tmp_path / "notes.txt"
    (out / "users").mkdir(parents=True)
    (out / "run.json").write_text('{"a finished run": true}')
    a_file.write_text("not a run")
    cases = [(["--device", "cuda:99"], "--device cuda:99"), (["--device", "gpu"], "--device 'gpu'"),
             (["--out", str(a_file)], f"--out {a_file}: a file")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: this torch"))
    for argv, said in cases:
        with pytest.raises(SystemExit):
            cdcda.main(["--out", str(out)] + argv)
        assert said in capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(SystemExit):
        scale_report.main(["--out", str(out), "--device", "cuda:99"])  # the report: its own device, checked
    assert "--device cuda:99" in capsys.readouterr().err
    assert (out / "run.json").read_text() == '{"a finished run": true}'
    assert sorted(p.name for p in out.rglob("*")) == ["run.json", "users"]


def test_good_options_pass():
    devices = ["cpu"] + (["cuda", "cuda:0"] if torch.cuda.is_available() else [])
    for device in devices:
        assert options.parse(["--device", device], cdcda.METHODS).torch_device == device
    settings = options.parse(["--temperature", "0", "--eps-tdf", "0.99", "--eps-min-len", "2"], cdcda.METHODS)
    assert (settings.temperature, settings.eps_min_len, settings.eps_max_len) == (0.0, 2.0, 2.0)


def test_the_defaults_pair_rewrites_and_decode_the_pair_shape(tiny_model_dir, tmp_path, monkeypatch, fake_cloud,
                                                              tiny_args):
    """Without --history-pairs identity / --augment-decoding free: every method trains on
    (the device's rewrite -> tweet) pairs (fake_cloud's rewrites: the words reversed), and the
    cloud's every generation has the pair's shape."""
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    trained, real_personalize = [], cdcda.personalize
    monkeypatch.setattr(cdcda, "personalize", lambda device, task, pairs, settings, seed: trained.append(
        list(pairs)) or real_personalize(device, task, pairs, settings, seed))
    argv = tiny_args(tiny_model_dir, tmp_path / "run")
    argv = argv[:argv.index("--history-pairs")] + ["--methods", "direct-ft,cdcda"]
    rep = cdcda.main(argv)
    assert rep["counts"]["unparsable"] == 0 and rep["counts"]["candidates"] == rep["counts"]["generated"]
    users = data.split_users(data.load_users("lamp7"), 2)[0]
    assert len(trained) == 2 * len(users)  # each user: direct-ft, then cdcda
    for direct, augmented in zip(trained[::2], trained[1::2]):
        assert direct and all(x != y and sorted(x.split()) == sorted(y.split()) for x, y in direct)
        assert augmented[:len(direct)] == direct
    assert len(list((tmp_path / "cache" / "rewrites").glob("lamp7-*.json"))) == 1




def test_the_m_base_lock_is_the_cached_models_own(tiny_model_dir, tmp_path, monkeypatch):
    """Two runs that share nothing (other seeds, so other M_base models) take different locks,
    each named by the cache directory it protects, so neither waits for the other's training;
    the same run takes the same lock and finds the model cached."""
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    held, real = [], hub.exclusive
    monkeypatch.setattr(hub, "exclusive", lambda path, what: held.append(path) or real(path, what))
    task = data.get_task("lamp7")
    others = [data.User("o", [{"text": "rain again today"}], [data.Query("q", task.pair_input.format(text="hi"), "yo")])]
    made = []
    for seed in (0, 1, 0):
        settings = options.parse(["--device-model", str(tiny_model_dir), "--seed", str(seed), "--base-epochs", "1",
                                  "--max-length", "64", "--methods", "base", "--history-pairs", "identity"],
                                 cdcda.METHODS)
        made.append(cdcda.prepare(settings, others, others, cdcda.METHODS).device.base)
    assert made[0] != made[1] and made[2] == made[0]
    assert [p.name for p in held] == [f"{d.name}.lock" for d in made]
    with pytest.raises(InputError, match="no non-target users to train M_base on"):
        cdcda.prepare(settings, others, [], cdcda.METHODS)


def test_the_m_base_key_holds_every_setting_that_changes_m_base(tiny_model_dir, tmp_path, monkeypatch):
    """A run with another --max-length or --batch-size trains its own M_base, not the cached one."""
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    task = data.get_task("lamp7")
    others = [data.User("o", [{"text": "rain again today"}], [data.Query("q", task.pair_input.format(text="hi"), "yo")])]
    base = ["--device-model", str(tiny_model_dir), "--base-epochs", "1", "--methods", "base", "--history-pairs",
            "identity"]
    made = {cdcda.prepare(options.parse(base + extra, cdcda.METHODS), others, others, cdcda.METHODS).device.base
            for extra in (["--max-length", "64"], ["--max-length", "96"], ["--max-length", "64", "--batch-size", "2"])}
    assert len(made) == 3


def test_the_method_is_five_calls_on_one_screen():
    """A function of cdcda.py calls the paper's five steps by their names, in order, within 40
    lines, and nothing of the harness (no file, cache, lock or progress)."""
    import ast
    from pathlib import Path
    tree = ast.parse((Path(__file__).resolve().parent.parent / "cdcda.py").read_text())
    steps = ["upload", "augment", "select", "download", "personalize"]
    found = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            calls = [c.func.id for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)]
            order = [c for c in calls if c in steps]
            if order == steps and node.end_lineno - node.lineno + 1 <= 40:
                found.append((node.name, calls))
    assert [name for name, _ in found] == ["cdcda_plm"]
    calls = found[0][1]
    assert calls.index("answer") > calls.index("personalize")  # then the device answers
    assert not set(calls) & {"open", "print", "write_atomic", "made_once", "exclusive"}
    assert cdcda.METHODS["cdcda"].answers is cdcda.cdcda_plm  # the row the table reports is that function
