"""Shards of a run's target users, for many processes at once (torchrun, Slurm, by hand).

Shard i of n takes the target users targets[i::n] (`share`): round-robin over the list
`data.split_users` gives (most active first), so every shard gets long and short histories
alike, and the share depends only on (i, n) and the data, never on timing. (i, n) comes from
`--shard I/N`, else from the launcher the process runs under: torchrun's RANK / WORLD_SIZE,
Slurm's SLURM_PROCID / SLURM_NTASKS (`shard_of`). With `--device cuda` each process takes the
GPU of its launcher's local rank (LOCAL_RANK, SLURM_LOCALID): cuda:LOCAL_RANK (`device_for`).
No process talks to another (no torch.distributed process group): they share only files
(runner.py); M_base and the history rewrites are made once, under the cache's lock.
"""
import os
import re
from typing import NamedTuple

import torch

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
