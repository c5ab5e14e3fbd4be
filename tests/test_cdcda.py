"""The pipeline: steps 1, 4, 5, the options, and a tiny end-to-end run of all five steps.

The end-to-end tests use a tiny random decoder (conftest.py: SmolLM2's tokenizer, 2 layers) as
cloud and device model and the embedded MiniLM as judge, so they take seconds, not minutes.
"""
import json

import pytest
import torch

import augment
import cdcda
import data
import deploy
import gridtune
import options
import qwen2
from errors import InputError


def test_upload_cuts_the_instruction():
    task = data.get_task("lamp7")
    user = data.User("u", [{"text": "ngl lowkey tired fr"}], [])
    assert cdcda.upload(task, user) == [("ngl lowkey tired fr", "ngl lowkey tired fr")]
    task = data.get_task("lamp4")
    user = data.User("u", [{"text": "The council met.", "title": "Council Meets"}], [])
    assert cdcda.upload(task, user) == [("The council met.", "Council Meets")]


def test_parse_args_defaults_and_errors(capsys):
    args = options.parse([], cdcda.METHODS)
    assert (args.task, args.k, args.temperature, args.lora_r, args.lora_alpha) == ("lamp7", 5, 0.7, 16, 8)
    assert args.cloud_model == args.device_model == qwen2.EMBEDDED
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
    real_personalize, calls = cdcda.personalize, []

    def dies_on_second_user(*a, **kw):
        calls.append(kw.get("desc") or a[-1])
        if len({c.split()[-1] for c in calls}) == 2:
            raise KeyboardInterrupt  # the run is stopped during the second user
        return real_personalize(*a, **kw)
    monkeypatch.setattr(cdcda, "personalize", dies_on_second_user)
    with pytest.raises(KeyboardInterrupt):
        cdcda.main(tiny_args(tiny_model_dir, tmp_path / "run"))
    done = list((tmp_path / "run" / "users").glob("*/result.json"))
    assert len(done) == 1  # the first user is finished and kept
    first = done[0].read_text()

    monkeypatch.setattr(cdcda, "personalize", real_personalize)
    augmented = []
    monkeypatch.setattr(augment, "augment", lambda *a, **kw: augmented.append(1) or pytest.fail("re-augmented"))
    rep = cdcda.main(tiny_args(tiny_model_dir, tmp_path / "run"))  # the second user's synthetic data is reused
    assert done[0].read_text() == first and not augmented
    assert len(rep["users"]) == 2
    with pytest.raises(InputError, match="other settings"):
        cdcda.main(tiny_args(tiny_model_dir, tmp_path / "run") + ["--k", "2"])
    rescored = cdcda.main(tiny_args(tiny_model_dir, tmp_path / "run") + ["--bertscore-layer", "2"])  # evaluation only
    assert all(row["bertscore_layer"] == 2 for row in rescored["rows"].values()) and done[0].read_text() == first


def test_buffer_keeps_n_items_and_only_they_are_uploaded(tiny_model_dir, tmp_path, monkeypatch, fake_cloud, tiny_args):
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    uploaded, trained = [], []
    real_augment, real_personalize = augment.augment, cdcda.personalize
    monkeypatch.setattr(augment, "augment", lambda cloud, tok, pairs, *a, **kw: uploaded.append(list(pairs))
                        or real_augment(cloud, tok, pairs, *a, **kw))
    monkeypatch.setattr(cdcda, "personalize", lambda model, tok, task, pairs, args, seed, desc: trained.append(
        (desc, list(pairs))) or real_personalize(model, tok, task, pairs, args, seed, desc))
    out = tmp_path / "run"
    rep = cdcda.main(tiny_args(tiny_model_dir, out) + ["--buffer", "4", "--synthesis-filter", "rouge1"])
    users = data.split_users(data.load_users("lamp7"), 2)[0]
    task = data.get_task("lamp7")
    for user, sent in zip(users, uploaded):
        buffer = json.loads((out / "users" / user.user_id / "buffer.json").read_text())
        history = cdcda.upload(task, user)
        assert len(sent) == 4 and buffer["kept"] == 4 and buffer["seen"] == len(history) > 4
        assert sent == [p for p in history if p in sent]  # a subsequence of the history, in order
        assert dict(trained)[f"direct-ft {user.user_id}"] == sent
        records = [json.loads(line) for line in (out / "users" / user.user_id / "synthetic.jsonl").read_text().splitlines()]
        assert records and all("rouge_1" in r and (r["input"], r["output"]) in sent for r in records)
        assert dict(trained)[f"cdcda {user.user_id}"] == sent + [(r["syn_input"], r["syn_output"]) for r in records if r["kept"]]
    assert rep["counts"]["history"] == sum(len(u.profile) for u in users) and rep["counts"]["buffered"] == 8
    assert "4-item online buffer, scores" in rep["models"]["history"] and "ROUGE-1" in rep["models"]["synthesis filter"]


def test_buffer_and_filter_options_are_checked(capsys):
    assert options.parse([], cdcda.METHODS).buffer == 0 and options.parse([], cdcda.METHODS).synthesis_filter == "cdcda"
    for bad in (["--buffer", "-1"], ["--buffer-policy", "best"], ["--synthesis-filter", "nli"],
                ["--eps-rouge1", "2"], ["--synthesis-filter", "rouge1", "--cloud", "http://x"]):
        with pytest.raises(SystemExit):
            options.parse(bad, cdcda.METHODS)
    assert "--cloud-api" in capsys.readouterr().err


def test_gold_nll_is_the_cross_entropy_of_the_gold_tokens(tiny_model_dir):
    model, tok = qwen2.load(str(tiny_model_dir))
    task = data.get_task("lamp7")
    queries = [data.Query("a", task.pair_input.format(text="rain again"), "ugh rain again lol"),
               data.Query("b", task.pair_input.format(text="big game"), "LETS GO")]
    args = options.parse([], cdcda.METHODS)
    nll = cdcda.gold_nll(model, tok, task, queries, args.max_length)
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
    (["--deploy-tune-epochs", "-1"], "--deploy-tune-epochs")])
def test_every_bad_option_ends_in_one_line_naming_it(bad, option, capsys):
    with pytest.raises(SystemExit):
        options.parse(bad, cdcda.METHODS)
    err = capsys.readouterr().err.strip().splitlines()
    assert option in err[-1] and any(rule in err[-1] for rule in ("must be", "keep nothing", "use cpu"))


def test_good_options_pass():
    for device in ("cpu", "cuda", "cuda:3"):
        assert options.parse(["--device", device], cdcda.METHODS).device == device
    args = options.parse(["--temperature", "0", "--eps-tdf", "0.99", "--eps-min-len", "2"], cdcda.METHODS)
    assert (args.temperature, args.eps_min_len, args.eps_max_len) == (0.0, 2.0, 2.0)


def test_the_defaults_pair_rewrites_and_decode_the_pair_shape(tiny_model_dir, tmp_path, monkeypatch, fake_cloud,
                                                              tiny_args):
    """Without --history-pairs identity / --augment-decoding free: every method trains on
    (the device's rewrite -> tweet) pairs (fake_cloud's rewrites: the words reversed), and the
    cloud's every generation has the pair's shape."""
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    trained, real_personalize = [], cdcda.personalize
    monkeypatch.setattr(cdcda, "personalize", lambda model, tok, task, pairs, training, seed, desc: trained.append(
        (desc, list(pairs))) or real_personalize(model, tok, task, pairs, training, seed, desc))
    argv = tiny_args(tiny_model_dir, tmp_path / "run")
    argv = argv[:argv.index("--history-pairs")] + ["--methods", "direct-ft,cdcda"]
    rep = cdcda.main(argv)
    assert rep["counts"]["unparsable"] == 0 and rep["counts"]["candidates"] == rep["counts"]["generated"]
    history = dict(trained)
    for user in data.split_users(data.load_users("lamp7"), 2)[0]:
        pairs = history[f"direct-ft {user.user_id}"]
        assert pairs and all(x != y and sorted(x.split()) == sorted(y.split()) for x, y in pairs)
        assert history[f"cdcda {user.user_id}"][:len(pairs)] == pairs
    assert len(list((tmp_path / "cache" / "rewrites").glob("lamp7-*.json"))) == 1


@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_deploy_answers_with_the_deployed_model_and_reports_both(tiny_model_dir, tmp_path, monkeypatch, fake_cloud,
                                                                 tiny_args, rounding):
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    calibrations, tuned, real_state, real_tune = [], [], deploy.portable_state, gridtune.tune
    monkeypatch.setattr(deploy, "portable_state", lambda model, *a, **kw: "calibration" in kw
                        and calibrations.append(kw["calibration"]) or real_state(model, *a, **kw))
    monkeypatch.setattr(gridtune, "tune", lambda model, state, calibration, *a, **kw: tuned.append(calibration)
                        or real_tune(model, state, calibration, *a, **kw))
    argv = tiny_args(tiny_model_dir, tmp_path / "run") + ["--methods", "cdcda", "--deploy",
                                                          "--deploy-rounding", rounding]
    rep = cdcda.main(argv)
    counts = [json.loads((d / "result.json").read_text())["counts"] for d in (tmp_path / "run" / "users").iterdir()]
    assert sorted(map(len, tuned)) == sorted(c["generated"] // 3 + c["kept"] for c in counts)  # the grids tuned
    # on the inputs CDCDA-PLM trained on: the user's pairs (k = 3 candidates each) and the kept ones
    assert calibrations == (tuned if rounding == "gptq" else [None] * len(tuned))  # GPTQ on the same
    assert list(rep["rows"]) == ["cdcda", "cdcda-deployed"]
    fine, deployed = rep["rows"]["cdcda"], rep["rows"]["cdcda-deployed"]
    assert deployed["gold_nll"] > 0 and "rouge1" in deployed
    assert deployed["gold_nll"] != fine["gold_nll"]  # a different (quantized) model answered
    assert abs(deployed["gold_nll"] - fine["gold_nll"]) < 0.1 * fine["gold_nll"]  # ... one close to its source
    user_dir = next((tmp_path / "run" / "users").iterdir())
    model, _ = deploy.load(user_dir / "cdcda.deployed")
    assert isinstance(model.model.layers[0].mlp.up_proj, deploy.Int4Linear)
    assert "| CDCDA-PLM, deployed (int4) |" in (tmp_path / "run" / "results.md").read_text()


def test_deployed_methods_need_their_adapter_first(capsys):
    args = options.parse(["--deploy"], cdcda.METHODS)
    assert args.methods == ["base", "direct-ft", "direct-ft-deployed", "cdcda", "cdcda-deployed"]
    with pytest.raises(SystemExit):
        options.parse(["--methods", "cdcda-deployed,cdcda"], cdcda.METHODS)
    assert "cdcda-deployed needs cdcda before it" in capsys.readouterr().err
