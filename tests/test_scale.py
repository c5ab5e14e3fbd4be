"""scale/: shards of the target users (their share, the launcher's rank, the device), sharded runs
as separate processes equal to one process, a killed shard resumed; and the plan (`--plan`)
counted against what a tiny real run did, with LaMP-7's history rewrites, the deployed rows and
an online buffer, nothing trained by the plan itself."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cdcda
import data
import generate
import qwen2
import train
from deployment import __main__ as run_deployment, gridtune
from errors import InputError
from experiments import methods as experiments
from online import __main__ as run_online
from scale import __main__ as run_scale, report as scale_report, shards


def tokens(tok, examples, max_length) -> int:
    return sum(len(train.encode_example(tok, m, y, max_length)[0]) for m, y in examples)


def test_the_plan_counts_what_the_run_does(tiny_model_dir, tmp_path, monkeypatch, fake_cloud, tiny_args, one_thread):
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    faked = generate.chat  # fake_cloud's; its rewrites made longer than their tweets: counted on the tweets
    monkeypatch.setattr(generate, "chat", lambda model, tok, conversations, *a, **kw: [  # instead, a plan is off
        r + " for real" for r in faked(model, tok, conversations, *a, **kw)] if (kw.get("desc") or "").startswith(
        "rewrite") else faked(model, tok, conversations, *a, **kw))
    trained, calibrated, real_finetune, real_tune = [], {}, train.finetune, gridtune.tune

    def finetune(model, tok, examples, settings, seed=0, desc=None, loss=None):
        trained.append((desc, examples, tok, settings))
        return real_finetune(model, tok, examples, settings, seed, desc, loss)

    def tune(model, state, calibration, epochs, *a, **kw):
        calibrated.setdefault("calls", []).append(epochs * sum(map(len, calibration)))
        return real_tune(model, state, calibration, epochs, *a, **kw)
    monkeypatch.setattr(train, "finetune", finetune)
    monkeypatch.setattr(gridtune, "tune", tune)
    argv = tiny_args(tiny_model_dir, tmp_path / "run")
    argv = argv[:argv.index("--history-pairs")] + ["--methods", "direct-ft,cdcda"]  # rewrites, structured decoding
    rep = run_deployment.main(argv + ["--deploy-tune-epochs", "1"])
    plan = run_scale.main(argv + ["--deploy", "--deploy-tune-epochs", "1", "--plan"])

    max_length, epochs = 96, 1
    (base_examples, base_tok, base_training), = [t[1:] for t in trained if t[0] == "M_base"]
    personal = [t[1:3] for t in trained if t[0] is None]  # each user's direct-ft, then cdcda
    assert plan["shared"]["M_base training tokens"] == base_training.epochs * tokens(base_tok, base_examples, max_length)
    assert "rewrite replies" not in plan["shared"]  # made by the run: the plan counts on them
    users = data.split_users(data.load_users("lamp7"), 2)[0]
    assert len(personal) == 2 * len(users)
    for user, (direct, tok), (together, _) in zip(users, personal[::2], personal[1::2]):
        row, counts = plan["users"][user.user_id], json.loads(
            (tmp_path / "run" / "users" / user.user_id / "result.json").read_text())["counts"]
        assert together[:len(direct)] == direct  # CDCDA-PLM trains on D_u, then the kept candidates
        assert row["history"] == len(direct) and row["cloud replies"] == counts["generated"]
        assert row["candidates, at most"] >= counts["candidates"]
        assert row["training tokens, none kept"] == epochs * 2 * tokens(tok, direct, max_length)
        assert row["training tokens, none kept"] < epochs * (tokens(tok, direct, max_length)
                                                             + tokens(tok, together, max_length))
        assert row["tuning tokens, none kept"] == 2 * tokens(tok, direct, max_length)  # 1 tune epoch, both rows
        assert row["answer tokens"] == 4 * len(user.queries) * cdcda.ANSWER_TOKENS["lamp7"]
    assert sorted(calibrated["calls"]) == sorted(  # the tuning's real inputs: prompt + response, as counted
        tokens(tok, examples, max_length) for examples, tok in personal)
    assert list(rep["rows"]) == ["direct-ft", "direct-ft-deployed", "cdcda", "cdcda-deployed"]

    buffered = run_online.main(argv + ["--out", str(tmp_path / "buffered"), "--buffer", "4"])
    plan = run_scale.main(argv + ["--out", str(tmp_path / "buffered"), "--buffer", "4", "--plan"])
    kept = [json.loads((tmp_path / "buffered" / "users" / u.user_id / "buffer.json").read_text())["kept"] for u in users]
    assert plan["totals"]["history"] == sum(kept) == 4 * len(users)
    assert plan["totals"]["cloud replies"] == buffered["counts"]["generated"]
    assert not (tmp_path / "cache" / "plan").exists()


def test_the_plan_trains_and_writes_nothing(tiny_model_dir, tmp_path, monkeypatch, tiny_args, one_thread):
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(experiments, "WORDNET_DIR", str(Path(__file__).parent / "fixtures" / "wordnet"))
    out = tmp_path / "run"
    plan = run_scale.main(tiny_args(tiny_model_dir, out) + ["--methods", "base,direct-ft,cdcda,eda-ft", "--plan"])
    assert plan["estimate"]["none kept"]["one process"] < plan["estimate"]["all kept"]["one process"]
    assert all(rate > 0 if isinstance(rate, float) else rate[0] >= 0 and rate[1] > 0 for rate in plan["rates"].values())
    assert not out.exists() and not (tmp_path / "cache" / "base").exists()
    task, tok = data.get_task("lamp7"), qwen2.Tokenizer.from_dir(tiny_model_dir)
    for user in data.split_users(data.load_users("lamp7"), 2)[0]:
        row = plan["users"][user.user_id]
        d_u = tokens(tok, cdcda.examples(task, cdcda.upload(task, user)), 96)  # identity pairs
        assert row["history"] == len(user.profile) and row["cloud replies"] == 3 * len(user.profile)
        # direct-ft and cdcda on D_u, eda-ft on D_u and k = 3 variants of each pair; 1 epoch
        assert row["training tokens, none kept"] == (1 + 1 + 4) * d_u
        assert row["training tokens, all kept"] > row["training tokens, none kept"]  # cdcda's candidates


def test_plan_options_are_checked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_scale.main(["--buffer", "-2", "--out", str(tmp_path), "--plan"])
    assert "--buffer -2: must be at least 0" in capsys.readouterr().err.strip().splitlines()[-1]


ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- shards
def test_shard_from_the_option_torchrun_and_slurm():
    assert shards.shard_of(None, {}) == shards.Shard(0, 1, None)
    assert shards.shard_of("2/8", {}) == shards.Shard(2, 8, None)
    torchrun = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    assert shards.shard_of(None, torchrun) == shards.Shard(5, 8, 1)
    assert shards.shard_of("0/2", torchrun) == shards.Shard(0, 2, 1)  # the option wins; the GPU is the launcher's
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3"}
    assert shards.shard_of(None, slurm) == shards.Shard(3, 4, 3)
    for bad in ("2/2", "1", "a/b", "-1/2", "1/0"):
        with pytest.raises(InputError, match="--shard"):
            shards.shard_of(bad, {})
    with pytest.raises(InputError, match="RANK"):
        shards.shard_of(None, {"RANK": "8", "WORLD_SIZE": "8"})
    with pytest.raises(SystemExit):
        run_scale.main(["--shard", "3/2"])


def test_device_per_process():
    assert shards.device_for("cuda", shards.Shard(5, 8, 1), visible=8) == "cuda:1"
    assert shards.device_for("cuda", shards.Shard(5, 8, 1), visible=1) == "cuda:0"  # the launcher's one GPU
    assert shards.device_for("cuda", shards.Shard(1, 2, None)) == "cuda"  # --shard without a launcher: as given
    assert shards.device_for("cuda:3", shards.Shard(5, 8, 1)) == "cuda:3"
    assert shards.device_for("cpu", shards.Shard(5, 8, 1)) == "cpu"


def test_shares_are_round_robin_disjoint_and_complete():
    targets = list("abcdefg")
    shares = [shards.share(targets, shards.Shard(i, 3, None)) for i in range(3)]
    assert shares == [list("adg"), list("be"), list("cf")]
    assert sorted(sum(shares, [])) == targets


# ---------------------------------------------------------------- sharded runs, end to end
def command(tiny_model_dir, out, *extra) -> list[str]:
    return [sys.executable, "-m", "scale", "--task", "lamp7", "--users", "4", "--methods", "base,direct-ft",
            "--epochs", "1", "--base-epochs", "1", "--max-length", "96", "--device-model", str(tiny_model_dir),
            "--cloud-model", str(tiny_model_dir), "--history-pairs", "identity", "--out", str(out), *extra]


def environment(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")}
    return env | {"CDCDA_CACHE": str(cache), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def start(argv, env) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def table(out: Path) -> list[str]:
    """The results table's rows (not the seconds, which differ between runs)."""
    return [line for line in (out / "results.md").read_text().splitlines() if line.startswith("|")]


def predictions(out: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text())["predictions"] for p in (out / "users").glob("*/result.json")}


def test_two_shards_equal_one_process_and_a_killed_shard_resumes(tiny_model_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    finish(start(command(tiny_model_dir, one), environment(tmp_path / "cache1")))

    # two shards at once into one --out, a cold cache: M_base is trained by one of them
    env = environment(tmp_path / "cache2")
    processes = [start(command(tiny_model_dir, two, "--shard", f"{i}/2"), env) for i in range(2)]
    outputs = [finish(p) for p in processes]
    assert sum(o.count("M_base: training on") for o in outputs) == 1
    assert sum(o.count("M_base: cached") for o in outputs) == 1
    base = next((tmp_path / "cache2" / "base").iterdir()) / "model.safetensors"
    mtime = base.stat().st_mtime_ns
    merged = subprocess.run([sys.executable, "-m", "scale.report", "--out", str(two)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert predictions(two) == predictions(one) and len(predictions(one)) == 4
    assert table(two) == table(one) and len(table(one)) == 4  # header, rule, base, Direct-FT
    assert json.loads((two / "run.json").read_text()) == json.loads((one / "run.json").read_text()) | {
        "out": str(two)}  # every shard wrote the same run.json

    # shard 0 of a new run is killed after its first user, then started again
    three = tmp_path / "three"
    targets = data.split_users(data.load_users("lamp7"), 4)[0]
    mine = [u.user_id for u in shards.share(targets, shards.Shard(0, 2, None))]
    theirs = [u.user_id for u in shards.share(targets, shards.Shard(1, 2, None))]
    history = {u.user_id: len(u.profile) for u in targets}
    first = three / "users" / mine[0] / "result.json"
    process = start(command(tiny_model_dir, three, "--shard", "0/2"), env)
    deadline = time.time() + 600
    while not first.is_file() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert first.is_file() and not (three / "users" / mine[1] / "result.json").is_file()
    written = first.stat().st_mtime_ns
    again = finish(start(command(tiny_model_dir, three, "--shard", "0/2"), env))
    assert f"{mine[0]}: done earlier" in again and f"{mine[1]}: {history[mine[1]]} history items" in again
    assert first.stat().st_mtime_ns == written  # the finished user was not redone
    assert "are not yet" in again and not (three / "results.md").exists()  # shard 1's users are missing
    with pytest.raises(InputError, match=f"2 of 4 users are not finished: {', '.join(theirs)}"):
        scale_report.main(["--out", str(three)])
    assert "M_base: training on" not in again and base.stat().st_mtime_ns == mtime  # still the one M_base
    for uid in mine:
        assert predictions(three)[uid] == predictions(one)[uid]
