"""Many users at once: shards of the target users, one M_base for all of them, progress, a plan.

Shards. Shard i of n takes the target users targets[i::n] (`share`): round-robin over the
list `data.split_users` gives (most active first), so every shard gets long and short
histories alike, and the share depends only on (i, n) and the data, never on timing. (i, n)
comes from `--shard I/N`, else from the launcher the process runs under: torchrun's
RANK / WORLD_SIZE, Slurm's SLURM_PROCID / SLURM_NTASKS (`shard_of`). With `--device cuda`
each process takes the GPU of its launcher's local rank (LOCAL_RANK, SLURM_LOCALID):
cuda:LOCAL_RANK (`device_for`). No process talks to another (no torch.distributed process
group): they share only files.

Files. All shards write into one --out. A user's directory is written by the one shard that
owns it; run.json (the options `report` reads) is the same for every shard (the per-process
options, PER_PROCESS, are left out of it) and is replaced whole (`hub.atomic`). A shard that
finishes its users writes the table only if every target user is done (the last shard to
finish does); `python cdcda.py report --out DIR` does it at any time, or names who is missing.

M_base and the history rewrites are shared: the first process to take the task's lock
(`exclusive`) trains and caches them, the others wait and then find them in the cache.
"""
import fcntl
import math
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch

import augment
import data
import generate
import lora
import nf4
import qwen2
import rewrite
from errors import InputError

PER_PROCESS = ("shard", "plan", "cloud_concurrency")  # options that differ between shards and change no result
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


@contextmanager
def exclusive(path: Path, what: str):
    """Hold an exclusive lock on the file `path` for the block (fcntl.flock); wait if another
    process holds it.

    Why flock: the kernel attaches the lock to the open file, and closes every file of a
    process that ends, however it ends (exit, exception, SIGKILL, out of memory), so a crashed
    holder never leaves a stale lock behind: the next waiter gets it, finds no cached model,
    and trains it itself. A lock made by creating a file (O_EXCL) or writing a pid into it
    would outlive a killed holder and need a timeout or a human. Across machines the file must
    be on a file system whose flock is shared between hosts (NFS v4; Lustre mounted -o flock).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{what}: another process holds {path}; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def progress(done_here: int, mine: int, trained: int, elapsed: float, done_all: int, total: int) -> str:
    """'3/10 users of this shard done, 17/40 of the run, ETA 12 min': the ETA is this shard's
    remaining users times the mean seconds of the users it trained in this process."""
    eta = f", ETA {clock(elapsed / trained * (mine - done_here))}" if trained and done_here < mine else ""
    return f"{done_here}/{mine} users of this shard done, {done_all}/{total} of the run{eta}"


def clock(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------- --plan
def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def train_rate(model, tok, examples, training, seed: int = 0) -> float:
    """Seconds per training token (prompt + response) of LoRA fine-tuning `model` (changed in
    place): one batch to warm up, then two batches timed."""
    lora.add_lora(model, r=training.r, alpha=training.alpha)
    batch = (examples * (2 * training.batch_size))[:2 * training.batch_size]
    fit = dict(epochs=1, lr=training.lr, batch_size=training.batch_size, max_length=training.max_length, seed=seed)
    lora.finetune(model, tok, batch[:training.batch_size], desc="plan: warm-up", **fit)
    seconds = _timed(lambda: lora.finetune(model, tok, batch, desc="plan: timing", **fit))
    return seconds / sum(len(lora.encode_example(tok, m, y, training.max_length)[0]) for m, y in batch)


def decode_rate(model, tok, conversations, batch: int, steps: int = 8) -> tuple[float, float]:
    """(seconds of the prefill, seconds per decoding step) of `batch` conversations at once:
    1 and 1 + `steps` new tokens timed, never stopping at an end token; the difference is
    the steps."""
    prompts = [tok.encode(tok.apply_chat_template(c)) for c in (conversations * batch)[:batch]]
    ids, mask = generate.left_pad(prompts, tok.pad_token_id, next(model.parameters()).device)

    def run(n):
        return _timed(lambda: generate.generate(model, ids, n, 0.7, eos_token_id=None, attention_mask=mask))
    run(2)  # warm-up
    short, long = run(1), run(1 + steps)
    step = max(long - short, 0.0) / steps
    return max(short - step, 0.0), step


def generation_seconds(rate: tuple[float, float], rows: int, batch: int, budget: int) -> float:
    """`rows` conversations in batches of `batch`, each batch decoded to `budget` new tokens (a
    cap: a batch ends sooner when all its rows have ended)."""
    prefill, step = rate
    return math.ceil(rows / batch) * (prefill + budget * step)


def plan(args, task: data.Task, targets, others, methods: list[str], synthetic: bool, training, answer_tokens: int,
         shard: Shard, done: set) -> dict:
    """--plan: what the run will do and how long it will take, without training.

    Counts per target user u with h_u history items and q_u queries, m methods of which f
    fine-tune (all but "base"):
      cloud generations  h_u k (x2 with --augment-decoding structured: input, then response)
      candidate pairs    h_u k
      training tokens    epochs (f h_u + K) t_u, t_u the mean tokens of u's encoded history pairs,
                         K the kept candidates (the synthetic methods train on them): from 0 to h_u k
      answer tokens      m q_u answer_tokens
    Time: these counts times rates measured here (`train_rate`, `decode_rate`) on the device
    model: NF4 for the users' training and answers (8 rows a batch, as `generate.chat`), full
    precision for M_base and the history rewrites, the cloud model at augment.AUGMENT_BATCH rows;
    every generation decoded to its cap (as `augment.augment` and `rewrite` set it). Two totals:
    no candidate kept, every candidate kept; selection, gold NLL and scoring are left out, and
    M_base and the rewrites are counted as not cached."""
    device_model, tok = qwen2.load(args.device_model, "float32", args.device)
    sample = max(targets, key=lambda u: len(u.profile))
    pairs = [task.pair(item) for item in sample.profile]
    examples = [(task.messages(x), y) for x, y in pairs]
    prompts = [[{"role": "user", "content": augment.AUGMENT_PROMPT.format(x=x, y=y)}] for x, y in pairs]
    queries = [task.messages(q.input) for q in sample.queries] or [m for m, _ in examples]
    print("plan: calibrating on", args.device)
    rate = {"decode full": decode_rate(device_model, tok, prompts, augment.AUGMENT_BATCH)}
    nf4_model = nf4.quantize_model(qwen2.load(args.device_model, "float32", args.device)[0], torch.bfloat16)
    rate["decode nf4"] = decode_rate(nf4_model, tok, queries, 8)
    rate["train nf4"] = train_rate(nf4_model, tok, examples, training)
    rate["train full"] = train_rate(device_model, tok, examples, training)
    remote = bool(args.cloud or args.cloud_api)
    cloud_tok = tok
    if synthetic and not remote and args.cloud_model != args.device_model:
        cloud, cloud_tok = qwen2.load(args.cloud_model, "float32", args.device)
        rate["decode cloud"] = decode_rate(cloud, cloud_tok, prompts, augment.AUGMENT_BATCH)
    rate.setdefault("decode cloud", rate["decode full"])
    tuning = sum(m != "base" for m in methods)
    passes = 2 if args.augment_decoding == "structured" else 1

    def tokens(pairs) -> list[int]:
        return [len(lora.encode_example(tok, task.messages(x), y, args.max_length)[0]) for x, y in pairs]

    rows = {}
    for u in targets:
        h, q = len(u.profile), len(u.queries)
        pairs = [task.pair(item) for item in u.profile]
        mean = sum(tokens(pairs)) / max(h, 1)
        candidates = h * args.k * synthetic
        row = {"history": h, "queries": q, "generations": candidates * passes, "candidates": candidates,
               "training tokens, none kept": round(args.epochs * tuning * h * mean),
               "training tokens, all kept": round(args.epochs * (tuning * h + candidates) * mean),
               "answer tokens": len(methods) * q * answer_tokens}
        budget = (math.ceil(args.eps_max_len * max(len(cloud_tok.encode(f"Input: [{x}], Response: [{y}]"))
                                                   for x, y in pairs)) + augment.AUGMENT_SLACK) if h else 0
        rest = (len(methods) * generation_seconds(rate["decode nf4"], q, 8, answer_tokens)
                + (0.0 if remote else generation_seconds(rate["decode cloud"], candidates, augment.AUGMENT_BATCH,
                                                         budget)))  # structured: two passes, each about half
        row["seconds, none kept"] = rest + row["training tokens, none kept"] * rate["train nf4"]
        row["seconds, all kept"] = rest + row["training tokens, all kept"] * rate["train nf4"]
        rows[u.user_id] = row
    base_pairs = [task.pair(item) for u in others for item in u.profile] + [(q.input, q.gold) for u in others
                                                                            for q in u.queries]
    shared = {"M_base training tokens": args.base_epochs * sum(tokens(base_pairs))}
    shared["M_base seconds"] = shared["M_base training tokens"] * rate["train full"]
    if args.history_pairs == "rewrite" and rewrite.needs_rewrites(task):
        texts = sorted({task.pair(item)[1] for u in targets + others for item in u.profile})
        budget = max(len(tok.encode(t)) for t in texts) + 16
        shared["rewrite generations"] = len(texts) * (1 + rewrite.SAMPLES)
        shared["rewrite seconds"] = generation_seconds(rate["decode full"], len(texts) * (1 + rewrite.SAMPLES),
                                                       augment.AUGMENT_BATCH, budget)
    setup = shared["M_base seconds"] + shared.get("rewrite seconds", 0.0)
    totals = {key: sum(r[key] for r in rows.values()) for key in next(iter(rows.values()))}
    estimate = {}
    for case in ("none kept", "all kept"):
        todo = [r[f"seconds, {case}"] for uid, r in rows.items() if uid not in done]
        longest = max(sum(rows[u.user_id][f"seconds, {case}"] for u in share(targets, Shard(i, shard.count, None))
                          if u.user_id not in done) for i in range(shard.count))
        estimate[case] = {"per user": totals[f"seconds, {case}"] / len(rows), "one process": setup + sum(todo),
                          f"{shard.count} shard(s)": setup + longest}
    print(f"plan: {task.name}, {len(targets)} target users ({len(done)} done under --out), "
          f"methods {', '.join(methods)}, on {args.device}" + ("; the cloud is remote: its time is not counted"
                                                              if remote and synthetic else ""))
    for key, value in list(totals.items()) + list(shared.items()):
        if "seconds" not in key:
            print(f"  {key}: {value}")
    print("  measured: " + ", ".join(f"{k} {v * 1e3:.3g} ms/token" if isinstance(v, float) else
                                     f"{k} {v[0]:.3g} s prefill + {v[1] * 1e3:.3g} ms/step" for k, v in rate.items()))
    print(f"  estimated: M_base {clock(shared['M_base seconds'])}"
          + (f", history rewrites {clock(shared['rewrite seconds'])}" if "rewrite seconds" in shared else ""))
    for case, times in estimate.items():
        print(f"  estimated, {case}: " + ", ".join(f"{k} {clock(v)}" for k, v in times.items()))
    return {"plan": True, "users": rows, "totals": totals, "shared": shared, "rates": rate, "estimate": estimate,
            "shard_users": [u.user_id for u in share(targets, shard)]}
