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
    rounding): a re-run that differs in it is refused; a stale key of an older file is not."""
    users = [data.User(uid, [{"text": "x"}], []) for uid in ("a", "b")]
    nearest = options.fingerprint(options.parse([], cdcda.METHODS)) | {"extra": {"deploy_rounding": "nearest"}}
    for user in users:
        (tmp_path / "users" / user.user_id).mkdir(parents=True)
        (tmp_path / "users" / user.user_id / "settings.json").write_text(json.dumps(nearest | {"device": "cpu"}))
    runner.check_settings(tmp_path, users, nearest)  # the same: fine (a stale --device is ignored)
    for other in (nearest | {"k": 3}, nearest | {"extra": {"deploy_rounding": "gptq"}}):
        with pytest.raises(InputError, match="users/a/settings.json: written by a run with other settings"):
            runner.check_settings(tmp_path, users, other)
