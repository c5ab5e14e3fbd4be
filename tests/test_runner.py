"""Shards, progress (runner.py) and the cache's lock (hub.exclusive); the sharded run end to end.

The end-to-end test runs cdcda.py as separate processes on the tiny decoder (conftest.py) with
the methods that need no cloud (base, direct-ft), as a launcher would start them.
"""
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
import hub
import options
import report
import runner
from errors import InputError

ROOT = Path(__file__).resolve().parent.parent


def test_shard_from_the_option_torchrun_and_slurm():
    assert runner.shard_of(None, {}) == runner.Shard(0, 1, None)
    assert runner.shard_of("2/8", {}) == runner.Shard(2, 8, None)
    torchrun = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    assert runner.shard_of(None, torchrun) == runner.Shard(5, 8, 1)
    assert runner.shard_of("0/2", torchrun) == runner.Shard(0, 2, 1)  # the option wins; the GPU is the launcher's
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3"}
    assert runner.shard_of(None, slurm) == runner.Shard(3, 4, 3)
    for bad in ("2/2", "1", "a/b", "-1/2", "1/0"):
        with pytest.raises(InputError, match="--shard"):
            runner.shard_of(bad, {})
    with pytest.raises(InputError, match="RANK"):
        runner.shard_of(None, {"RANK": "8", "WORLD_SIZE": "8"})
    with pytest.raises(SystemExit):
        options.parse(["--shard", "3/2"], cdcda.METHODS)


def test_device_per_process():
    assert runner.device_for("cuda", runner.Shard(5, 8, 1), visible=8) == "cuda:1"
    assert runner.device_for("cuda", runner.Shard(5, 8, 1), visible=1) == "cuda:0"  # the launcher's one GPU
    assert runner.device_for("cuda", runner.Shard(1, 2, None)) == "cuda"  # --shard without a launcher: as given
    assert runner.device_for("cuda:3", runner.Shard(5, 8, 1)) == "cuda:3"
    assert runner.device_for("cpu", runner.Shard(5, 8, 1)) == "cpu"


def test_shares_are_round_robin_disjoint_and_complete():
    targets = list("abcdefg")
    shares = [runner.share(targets, runner.Shard(i, 3, None)) for i in range(3)]
    assert shares == [list("adg"), list("be"), list("cf")]
    assert sorted(sum(shares, [])) == targets


def test_progress_and_eta_by_hand():
    # 2 of 5 done here, both trained here in 50 s: 3 left at 25 s each = 75 s
    assert runner.progress(2, 5, 2, 50.0, 7, 20) == "2/5 users of this shard done, 7/20 of the run, ETA 75 s"
    # 3 of 5 done here, one of them earlier, 2 trained in 300 s: 2 left at 150 s = 5 min
    assert runner.progress(3, 5, 2, 300.0, 7, 20).endswith("ETA 5.0 min")
    assert runner.progress(0, 5, 0, 0.0, 0, 20) == "0/5 users of this shard done, 0/20 of the run"
    assert runner.clock(5400) == "1.5 h" and runner.clock(600) == "10.0 min"


HOLDER = """
import sys, time
from pathlib import Path
import hub
with hub.exclusive(Path(sys.argv[1]), "test"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_the_lock_waits_for_its_holder_and_survives_a_killed_one(tmp_path):
    lock = tmp_path / "locks" / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        import fcntl
        with open(lock, "a") as f:  # held: a non-blocking try fails
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.send_signal(signal.SIGKILL)  # the holder crashes without releasing anything
        holder.wait(timeout=30)
        t = time.time()
        with hub.exclusive(lock, "test"):  # the kernel released it with the process
            assert time.time() - t < 5
    finally:
        holder.kill()


# ---------------------------------------------------------------- sharded runs, end to end
def command(tiny_model_dir, out, *extra) -> list[str]:
    return [sys.executable, "cdcda.py", "--task", "lamp7", "--users", "4", "--methods", "base,direct-ft",
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
    shards = [start(command(tiny_model_dir, two, "--shard", f"{i}/2"), env) for i in range(2)]
    outputs = [finish(p) for p in shards]
    assert sum(o.count("M_base: training on") for o in outputs) == 1
    assert sum(o.count("M_base: cached") for o in outputs) == 1
    base = next((tmp_path / "cache2" / "base").iterdir()) / "model.safetensors"
    mtime = base.stat().st_mtime_ns
    merged = subprocess.run([sys.executable, "cdcda.py", "report", "--out", str(two)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert predictions(two) == predictions(one) and len(predictions(one)) == 4
    assert table(two) == table(one) and len(table(one)) == 4  # header, rule, base, Direct-FT
    assert json.loads((two / "run.json").read_text()) == json.loads((one / "run.json").read_text()) | {
        "out": str(two)}  # every shard wrote the same run.json

    # shard 0 of a new run is killed after its first user, then started again
    three = tmp_path / "three"
    targets = data.split_users(data.load_users("lamp7"), 4)[0]
    mine = [u.user_id for u in runner.share(targets, runner.Shard(0, 2, None))]
    theirs = [u.user_id for u in runner.share(targets, runner.Shard(1, 2, None))]
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
        report.main(["--out", str(three)])
    assert "M_base: training on" not in again and base.stat().st_mtime_ns == mtime  # still the one M_base
    for uid in mine:
        assert predictions(three)[uid] == predictions(one)[uid]


def test_a_rerun_is_checked_run_wide_and_row_by_row_before_any_work(tmp_path):
    """settings.json holds the run's fingerprint, result.json the values each row was made with
    (e.g. a deployed row's rounding): a re-run that differs in either is refused."""
    users = [data.User(uid, [{"text": "x"}], []) for uid in ("a", "b")]
    fingerprint, rows = {"k": 5, "extra": {}}, {"cdcda": {}, "cdcda-deployed": {"deploy_rounding": "nearest"}}
    for user in users:
        (tmp_path / "users" / user.user_id).mkdir(parents=True)
        (tmp_path / "users" / user.user_id / "settings.json").write_text(json.dumps(fingerprint | {"device": "cpu"}))
    (tmp_path / "users" / "b" / "result.json").write_text(json.dumps({"predictions": {}, "settings": rows}))
    runner.check_settings(tmp_path, users, fingerprint, rows)  # the same: fine (a stale --device is ignored)
    runner.check_settings(tmp_path, users, fingerprint, {"cdcda": {}})  # a row not asked for is not checked
    with pytest.raises(InputError, match="users/a/settings.json: written by a run with other settings"):
        runner.check_settings(tmp_path, users, {"k": 3, "extra": {}}, rows)
    with pytest.raises(InputError, match="users/b/result.json: its cdcda-deployed row was made with"):
        runner.check_settings(tmp_path, users, fingerprint, rows | {"cdcda-deployed": {"deploy_rounding": "gptq"}})
