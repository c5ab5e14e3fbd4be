"""plan/ (`python -m plan`): the counts of a plan against what a tiny real run did, with LaMP-7's
history rewrites, the deployed rows and an online buffer; nothing trained by the plan itself."""
import json

import pytest

import cdcda
import data
import generate
import qwen2
import train
from deployment import __main__ as run_deployment, gridtune
from online import __main__ as run_online
from plan import plan as planner


def tokens(tok, examples, max_length) -> int:
    return sum(len(train.encode_example(tok, m, y, max_length)[0]) for m, y in examples)


def test_the_plan_counts_what_the_run_does(tiny_model_dir, tmp_path, monkeypatch, fake_cloud, tiny_args, one_thread):
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    faked = generate.chat  # fake_cloud's; its rewrites made longer than their tweets: counted on the tweets
    monkeypatch.setattr(generate, "chat", lambda model, tok, conversations, *a, **kw: [  # instead, a plan is off
        r + " for real" for r in faked(model, tok, conversations, *a, **kw)] if (kw.get("desc") or "").startswith(
        "rewrite") else faked(model, tok, conversations, *a, **kw))
    trained, calibrated, real_finetune, real_tune = {}, {}, train.finetune, gridtune.tune

    def finetune(model, tok, examples, training, seed=0, desc=None, loss_fn=None):
        trained[desc] = (examples, tok, training)
        return real_finetune(model, tok, examples, training, seed, desc, loss_fn)

    def tune(model, state, calibration, epochs, *a, **kw):
        calibrated.setdefault("calls", []).append(epochs * sum(map(len, calibration)))
        return real_tune(model, state, calibration, epochs, *a, **kw)
    monkeypatch.setattr(train, "finetune", finetune)
    monkeypatch.setattr(gridtune, "tune", tune)
    argv = tiny_args(tiny_model_dir, tmp_path / "run")
    argv = argv[:argv.index("--history-pairs")] + ["--methods", "direct-ft,cdcda"]  # rewrites, structured decoding
    rep = run_deployment.main(argv + ["--deploy-tune-epochs", "1"])
    plan = planner.main(argv + ["--deploy", "--deploy-tune-epochs", "1"])

    max_length, epochs = 96, 1
    base_examples, base_tok, base_training = trained["M_base"]
    assert plan["shared"]["M_base training tokens"] == base_training.epochs * tokens(base_tok, base_examples, max_length)
    assert "rewrite replies" not in plan["shared"]  # made by the run: the plan counts on them
    users = data.split_users(data.load_users("lamp7"), 2)[0]
    for user in users:
        row, counts = plan["users"][user.user_id], json.loads(
            (tmp_path / "run" / "users" / user.user_id / "result.json").read_text())["counts"]
        direct, tok, _ = trained[f"direct-ft {user.user_id}"]
        together, _, _ = trained[f"cdcda {user.user_id}"]
        assert together[:len(direct)] == direct  # CDCDA-PLM trains on D_u, then the kept candidates
        assert row["history"] == len(direct) and row["cloud replies"] == counts["generated"]
        assert row["candidates, at most"] >= counts["candidates"]
        assert row["training tokens, none kept"] == epochs * 2 * tokens(tok, direct, max_length)
        assert row["training tokens, none kept"] < epochs * (tokens(tok, direct, max_length)
                                                             + tokens(tok, together, max_length))
        assert row["tuning tokens, none kept"] == 2 * tokens(tok, direct, max_length)  # 1 tune epoch, both rows
        assert row["answer tokens"] == 4 * len(user.queries) * cdcda.ANSWER_TOKENS["lamp7"]
    assert sorted(calibrated["calls"]) == sorted(  # the tuning's real inputs: prompt + response, as counted
        tokens(trained[f"{m} {u.user_id}"][1], trained[f"{m} {u.user_id}"][0], max_length)
        for u in users for m in ("direct-ft", "cdcda"))
    assert list(rep["rows"]) == ["direct-ft", "direct-ft-deployed", "cdcda", "cdcda-deployed"]

    buffered = run_online.main(argv + ["--out", str(tmp_path / "buffered"), "--buffer", "4"])
    plan = planner.main(argv + ["--out", str(tmp_path / "buffered"), "--buffer", "4"])
    assert plan["totals"]["history"] == buffered["counts"]["buffered"] == 4 * len(users)
    assert plan["totals"]["cloud replies"] == buffered["counts"]["generated"]
    assert not (tmp_path / "cache" / "plan").exists()


def test_the_plan_trains_and_writes_nothing(tiny_model_dir, tmp_path, monkeypatch, tiny_args, one_thread):
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    plan = planner.main(tiny_args(tiny_model_dir, out) + ["--methods", "base,direct-ft,cdcda,eda-ft"])
    assert plan["estimate"]["none kept"]["one process"] < plan["estimate"]["all kept"]["one process"]
    assert all(rate > 0 if isinstance(rate, float) else rate[0] >= 0 and rate[1] > 0 for rate in plan["rates"].values())
    assert not out.exists() and not (tmp_path / "cache" / "base").exists()
    task, tok = data.get_task("lamp7"), qwen2.Tokenizer.from_dir(tiny_model_dir)
    for user in data.split_users(data.load_users("lamp7"), 2)[0]:
        row = plan["users"][user.user_id]
        d_u = tokens(tok, cdcda.training_examples(task, cdcda.upload(task, user)), 96)  # identity pairs
        assert row["history"] == len(user.profile) and row["cloud replies"] == 3 * len(user.profile)
        # direct-ft and cdcda on D_u, eda-ft on D_u and k = 3 variants of each pair; 1 epoch
        assert row["training tokens, none kept"] == (1 + 1 + 4) * d_u
        assert row["training tokens, all kept"] > row["training tokens, none kept"]  # cdcda's candidates


def test_plan_options_are_checked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        planner.main(["--buffer", "-2", "--out", str(tmp_path)])
    assert "--buffer -2: must be at least 0" in capsys.readouterr().err.strip().splitlines()[-1]
