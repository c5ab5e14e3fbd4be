"""The loop over a run's target users (cdcda.py runs one): resume, the settings check, progress.

A user's directory under --out holds settings.json (the run's fingerprint) from the start and
result.json once the user is done (`each_user`). A re-run skips finished users and refuses other
settings before any work (`check_settings`). Several processes may share one --out, each running
its share of the users (scale/: shards); the table is written once every target user is done
(`finished`), by the last process or by `python cdcda.py report`.
"""
import json
import time
from pathlib import Path
from typing import Callable

import hub
from errors import InputError


def check_settings(out: Path, targets, fingerprint: dict) -> None:
    """Before any work: every target user already under `out` was made with these settings (a
    re-run with other settings would mix two runs' files in one table)."""
    for user in targets:
        path = out / "users" / user.user_id / "settings.json"
        if path.is_file() and {k: v for k, v in json.loads(path.read_text()).items()
                               if k in fingerprint} != fingerprint:  # an older run's file held more
            raise InputError(f"{path}: written by a run with other settings; use another --out or delete it")


def each_user(out: Path, mine, targets, fingerprint: dict, methods, work: Callable) -> None:
    """`work(user, user_dir)` for each of `mine` (this process's target users) not done yet, with a
    line of progress and an ETA."""
    seconds = []  # of each user run here, for the ETA
    for i, user in enumerate(mine):
        user_dir = out / "users" / user.user_id
        user_dir.mkdir(parents=True, exist_ok=True)
        hub.write_atomic(user_dir / "settings.json", json.dumps(fingerprint))
        done = user_dir / "result.json"
        if done.is_file() and set(methods) <= set(json.loads(done.read_text())["predictions"]):
            print(f"user {i + 1}/{len(mine)} {user.user_id}: done earlier, reusing {done}")
            continue
        all_done = len(finished(out, targets, methods)[0])
        print(f"user {i + 1}/{len(mine)} {user.user_id}: {len(user.profile)} history items, {len(user.queries)} "
              f"queries ({progress(i, len(mine), len(seconds), sum(seconds), all_done, len(targets))})")
        t = time.time()
        work(user, user_dir)
        seconds.append(time.time() - t)


def finished(out: Path, targets, methods) -> tuple[list[dict], list[str]]:
    """The result.json of every target user done with every method (in the targets' order),
    and the ids of the users who are not: the merge of a run's shards, whichever wrote them."""
    results, missing = [], []
    for user in targets:
        path = out / "users" / user.user_id / "result.json"
        result = json.loads(path.read_text()) if path.is_file() else {"predictions": {}}
        if set(methods) <= set(result["predictions"]):
            results.append(result)
        else:
            missing.append(user.user_id)
    return results, missing


def progress(done_here: int, mine: int, trained: int, elapsed: float, done_all: int, total: int) -> str:
    """'3/10 users of this process done, 17/40 of the run, ETA 12 min': the ETA is its remaining
    users times the mean seconds of the users it trained."""
    eta = f", ETA {clock(elapsed / trained * (mine - done_here))}" if trained and done_here < mine else ""
    return f"{done_here}/{mine} users of this process done, {done_all}/{total} of the run{eta}"


def clock(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
