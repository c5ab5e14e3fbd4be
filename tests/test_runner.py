"""runner.py: progress and the settings check of a re-run; the cache's lock (hub.exclusive)."""
import json
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
import runner
from errors import InputError

ROOT = Path(__file__).resolve().parent.parent


def test_progress_and_eta_by_hand():
    # 2 of 5 done here, both trained here in 50 s: 3 left at 25 s each = 75 s
    assert runner.progress(2, 5, 2, 50.0, 7, 20) == "2/5 users of this process done, 7/20 of the run, ETA 75 s"
    # 3 of 5 done here, one of them earlier, 2 trained in 300 s: 2 left at 150 s = 5 min
    assert runner.progress(3, 5, 2, 300.0, 7, 20).endswith("ETA 5.0 min")
    assert runner.progress(0, 5, 0, 0.0, 0, 20) == "0/5 users of this process done, 0/20 of the run"
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


def test_a_rerun_with_other_settings_is_refused_before_any_work(tmp_path):
    """settings.json holds the run's fingerprint (an extra's options included: a deployed row's
    rounding): a re-run that differs in it is refused, naming the setting; a stale key of an older
    file is not, and a key an older version did not write counts as its default."""
    users = [data.User(uid, [{"text": "x"}], []) for uid in ("a", "b")]
    nearest = options.fingerprint(options.parse([], cdcda.METHODS)) | {"extra": {"deploy_rounding": "nearest"}}
    for user in users:
        (tmp_path / "users" / user.user_id).mkdir(parents=True)
        (tmp_path / "users" / user.user_id / "settings.json").write_text(json.dumps(nearest | {"device": "cpu"}))
    runner.check_settings(tmp_path, users, nearest)  # the same: fine (a stale --device is ignored)
    for other, named in ((nearest | {"k": 3}, "k = 5, this one has 3"),
                         (nearest | {"extra": {"deploy_rounding": "gptq"}}, "extra = ")):
        with pytest.raises(InputError, match=f"users/a/settings.json: written by a run with {named}"):
            runner.check_settings(tmp_path, users, other)
    older = {k: v for k, v in nearest.items() if k != "answer_temperature"}  # before --answer-temperature
    (tmp_path / "users" / "a" / "settings.json").write_text(json.dumps(older))
    runner.check_settings(tmp_path, users, nearest)  # resumes: that version answered at the default
    with pytest.raises(InputError, match="answer_temperature = 0.7, this one has 0.2"):
        runner.check_settings(tmp_path, users, nearest | {"answer_temperature": 0.2})
    (tmp_path / "run.json").write_text(json.dumps({"methods": ["base"], "labels": {}}))  # an earlier version's
    runner.check_finished(tmp_path, options.Settings(methods=("base", "cdcda")), users)  # not a finished run


def tiny_command(model_dir, out) -> list[str]:
    """A real tiny run as a process: the tiny decoder as cloud and device, three users."""
    return [sys.executable, "cdcda.py", "--task", "lamp7", "--users", "3", "--k", "2", "--epochs", "1",
            "--base-epochs", "1", "--max-length", "96", "--cloud-model", str(model_dir), "--device-model",
            str(model_dir), "--history-pairs", "identity", "--augment-decoding", "free", "--out", str(out)]


def test_a_run_killed_mid_user_resumes_to_the_table_of_one_never_killed(tiny_model_dir, tmp_path):
    """SIGKILL while the second user is being worked on (its settings.json is written, its result.json
    is not), then the same command again: the same table and predictions as a run never killed."""
    env = {"CDCDA_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    whole = subprocess.run(tiny_command(tiny_model_dir, tmp_path / "whole"), cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = tmp_path / "killed"
    targets = [u.user_id for u in data.split_users(data.load_users("lamp7"), 3)[0]]
    second = killed / "users" / targets[1]
    process = subprocess.Popen(tiny_command(tiny_model_dir, killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not (second / "settings.json").is_file() and time.time() < deadline and process.poll() is None:
            time.sleep(0.05)
        time.sleep(0.5)  # into the user's work
        assert process.poll() is None, "the run ended before it could be killed mid-user"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    assert not (second / "result.json").is_file() and not (killed / "run.json").is_file()
    again = subprocess.run(tiny_command(tiny_model_dir, killed), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "done earlier" in again.stdout
    for name in ["lamp/golds.json", "lamp/base.json", "lamp/direct-ft.json", "lamp/cdcda.json"]:
        assert (killed / name).read_text() == (tmp_path / "whole" / name).read_text(), name
    rows = [json.loads((d / "results.json").read_text())["rows"] for d in (killed, tmp_path / "whole")]
    assert rows[0] == rows[1]


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_failed_second_invocation_leaves_a_finished_run_byte_identical(tiny_run, tiny_model_dir, tiny_args,
                                                                           monkeypatch):
    """Into a finished run's --out: other rows or more users are refused before any work; a re-run
    that fails inside the work (here: M_base's loading breaks) changes no byte either."""
    before = snapshot(tiny_run.out)
    argv = tiny_args(tiny_model_dir, tiny_run.out)
    for extra in (["--methods", "base,direct-ft,cdcda"], ["--methods", "base,cdcda", "--users", "3"]):
        with pytest.raises(InputError, match="a finished run of base, cdcda for 2 users; its files are final"):
            cdcda.main(argv + extra)
    monkeypatch.setattr(cdcda, "prepare", lambda *a, **kw: pytest.fail("a finished run prepares nothing"))
    rep = cdcda.main(argv + ["--methods", "base,cdcda"])  # the same run: its table again, the same bytes
    assert rep["rows"] == tiny_run.rep["rows"] and snapshot(tiny_run.out) == before
    monkeypatch.setattr(runner.report, "write", lambda *a, **kw: (_ for _ in ()).throw(MemoryError("out of memory")))
    with pytest.raises(MemoryError):
        cdcda.main(argv + ["--methods", "base,cdcda"])
    assert snapshot(tiny_run.out) == before
