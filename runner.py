"""The loop over a run's target users (cdcda.py runs one): shards, resume, the settings check.

Shard i of n takes targets[i::n] (`share`, round-robin over the most active first); (i, n)
comes from `--shard I/N`, else torchrun's RANK / WORLD_SIZE or Slurm's SLURM_PROCID /
SLURM_NTASKS (`shard_of`), and `--device cuda` becomes the launcher's local GPU (`device_for`).
Processes share only files: all write into one --out, each user's directory by the shard that
owns it, settings.json first (the run's fingerprint), result.json when the user is done. A
re-run skips finished users and refuses other settings before any work (`check_settings`); the
table is written once every target user is done (`finished`), by the last shard or by
`python cdcda.py report`.
"""
import json
import os
import re
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch

import hub
from errors import InputError

LAUNCHERS = (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
SPEC = re.compile(r"(\d+)/(\d+)")


class Shard(NamedTuple):
    index: int  # i in 0..count-1
    count: int  # n
    local_rank: int | None  # the launcher's process index on this machine; None without a launcher


def shard_of(spec: str | None, environ=os.environ) -> Shard:
    """`--shard I/N`, else torchrun's or Slurm's variables, else the whole run (0/1)."""
    local = next((int(environ[v]) for _, _, v in LAUNCHERS if environ.get(v, "").isdigit()), None)
    if spec:
        m = SPEC.fullmatch(spec)
        if not m or not int(m[1]) < int(m[2]):
            raise InputError(f"--shard {spec!r}: use I/N with 0 <= I < N, e.g. 0/8")
        return Shard(int(m[1]), int(m[2]), local)
    for rank, size, _ in LAUNCHERS:
        if rank in environ and size in environ:
            if not (environ[rank].isdigit() and environ[size].isdigit() and int(environ[rank]) < int(environ[size])):
                raise InputError(f"{rank}={environ[rank]!r}, {size}={environ[size]!r}: not a shard of the run")
            return Shard(int(environ[rank]), int(environ[size]), local)
    return Shard(0, 1, local)


def device_for(device: str, shard: Shard, visible: int | None = None) -> str:
    """--device cuda under a launcher -> cuda:LOCAL_RANK, one GPU per process of a machine;
    cuda:0 when the launcher left this process one GPU to see (Slurm's --gpus-per-task,
    CUDA_VISIBLE_DEVICES per process). `visible`: torch.cuda.device_count() unless given.
    Any other --device as given."""
    if device != "cuda" or shard.local_rank is None:
        return device
    visible = torch.cuda.device_count() if visible is None else visible
    return "cuda:0" if visible == 1 else f"cuda:{shard.local_rank}"


def share(targets: list, shard: Shard) -> list:
    """This shard's target users: every n-th, starting at the i-th."""
    return targets[shard.index::shard.count]


def check_settings(out: Path, targets, fingerprint: dict, rows: dict) -> None:
    """Before any work: every target user already under `out` was made with these settings,
    and each of its finished rows with the values `rows` gives that row ({method: {option:
    value}}); a re-run with other settings would mix two runs' files in one table."""
    for user in targets:
        path = out / "users" / user.user_id / "settings.json"
        if path.is_file() and {k: v for k, v in json.loads(path.read_text()).items()
                               if k in fingerprint} != fingerprint:  # an older run's file held more
            raise InputError(f"{path}: written by a run with other settings; use another --out or delete it")
        done = path.with_name("result.json")
        made = json.loads(done.read_text()).get("settings", {}) if done.is_file() else {}
        for method, values in rows.items():
            if method in made and made[method] != values:
                raise InputError(f"{done}: its {method} row was made with {made[method]}, this run asks for "
                                 f"{values}; use another --out or delete the user's result.json")


def each_user(out: Path, targets, shard: Shard, fingerprint: dict, methods, work: Callable) -> None:
    """`work(user, user_dir)` for each of this shard's target users that is not done yet (its
    result.json lacks one of `methods`), with a line of progress and an ETA for each."""
    mine = share(targets, shard)
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
    """'3/10 users of this shard done, 17/40 of the run, ETA 12 min': the ETA is this shard's
    remaining users times the mean seconds of the users it trained in this process."""
    eta = f", ETA {clock(elapsed / trained * (mine - done_here))}" if trained and done_here < mine else ""
    return f"{done_here}/{mine} users of this shard done, {done_all}/{total} of the run{eta}"


def clock(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
