"""The harness around the method: a run of every target user through every row of the table.

`main` reads the options (options.py); `run` checks the models, the data and --out before any
work, has the method's `prepare` make what the users share, then for each target user not done
yet calls each row (the method's functions: `cdcda.METHODS`) and keeps what the report needs:
the answers, each answering model's gold NLL, each adapter (PEFT's files), step 3's verdicts,
the seconds. It owns the run's files under --out:

  users/<id>/settings.json   the run's fingerprint, written before the user's first work
  users/<id>/result.json     the user's answers, once every row is done (a re-run skips the user)
  run.json                   what has finished: written with the table, never before
  results.{json,md}, lamp/   the report (report.py)

A re-run with other settings is refused before any work, naming the setting; a finished run is
final (other rows or users go to another --out), so a failed second invocation changes nothing.
Several processes may share one --out, each with its share of the users (scale/); the last one
to finish writes the table, or `python -m scale.report --out DIR` does.
"""
import json
import time
import zlib
from pathlib import Path

import data
import encoder
import hub
import lora
import options
import qwen2
import report
import train
from errors import InputError
from options import PAPER, PAPER_ALIASES, Settings


def main(argv, methods, prepare, family) -> dict:
    return run(options.parse(argv, methods), methods, prepare, family)


def run(settings: Settings, methods, prepare, family, share=None, cloud_here: bool = True) -> dict:
    """Every target user (or this process's `share(targets)`) through every row of settings.methods,
    `prepare(settings, users, others, methods)` making what they share; then the report, once every
    target user is done. `cloud_here` False: steps 2-3 run elsewhere, on the cloud's own models."""
    task, out = data.get_task(settings.task), Path(settings.out)
    users = data.load_users(task.name, settings.data)
    announce(task, settings, users)
    targets, others = data.split_users(users, min(settings.users, len(users)),
                                       settings.user_selection, settings.seed)
    mine = share(targets) if share else targets
    print(f"  users: {len(targets)} targets ({settings.user_selection}), {len(others)} others "
          "train M_base" + (f"; this process runs {len(mine)}" if len(mine) < len(targets) else ""))
    check_models(settings, task, methods, family, cloud_here)
    fingerprint = options.fingerprint(settings)
    labels = {m: methods[m].label for m in settings.methods}
    check_finished(out, settings, targets)
    check_settings(out, targets, fingerprint)
    todo = [u for u in mine if not done(out, u, settings.methods)]
    if todo:
        shared = prepare(settings, users, others, methods)
    seconds = []
    for i, user in enumerate(mine):
        if user not in todo:
            print(f"user {i + 1}/{len(mine)} {user.user_id}: done earlier, reusing its result.json")
            continue
        done_all = len(finished(out, targets, settings.methods)[0])
        where = progress(i, len(mine), len(seconds), sum(seconds), done_all, len(targets))
        print(f"user {i + 1}/{len(mine)} {user.user_id}: {len(user.profile)} history items, "
              f"{len(user.queries)} queries ({where})")
        t = time.time()
        run_user(shared, methods, user, user_dir(settings, user), fingerprint)
        seconds.append(time.time() - t)
    results, missing = finished(out, targets, settings.methods)
    if missing:  # other processes' users: the last one to finish writes the table
        print(f"this process's {len(mine)} users are done; {len(missing)} of {len(targets)} are "
              f"not yet ({', '.join(missing)}); `python -m scale.report --out {out}` writes the "
              "table when they are")
        return {"missing": missing}
    return write_report(task, targets, results, settings, labels, out)


def user_dir(settings: Settings, user: data.User) -> Path:
    """Where a user's files go: OUT/users/<id>/."""
    return Path(settings.out) / "users" / user.user_id


def user_seed(settings: Settings, user: data.User) -> int:
    """Each user's own seed, from the run's seed and the user's id: no other user changes it."""
    return settings.seed + zlib.crc32(user.user_id.encode()) % 10_000


def run_user(shared, methods, user: data.User, user_dir: Path, fingerprint: dict) -> dict:
    """Each row for one user, and its bookkeeping; user_dir/result.json when all are done."""
    user_dir.mkdir(parents=True, exist_ok=True)
    hub.write_atomic(user_dir / "settings.json", json.dumps(fingerprint))
    settings, seed, task = shared.settings, user_seed(shared.settings, user), shared.task
    if shared.cloud is not None:  # rows that ask M_cloud the same thing hear the same reply
        shared = shared._replace(cloud=shared.cloud._replace(chat=Remembered(shared.cloud.chat)))
    result = {"user_id": user.user_id, "predictions": {}, "gold_nll": {}, "losses": {}, "times": {}}
    golds = [(task.messages(q.input), q.gold) for q in user.queries]
    for name in settings.methods:
        print(f"  {name}: {methods[name].label}")
        t = time.time()
        answers = methods[name].answers(shared, user, seed)
        result["predictions"][name], result["times"][name] = answers.texts, time.time() - t
        if answers.model is not None:
            result["gold_nll"][name] = train.nll(answers.model, shared.device.tokenizer, golds,
                                                 settings.max_length, shared.device.family.loss)
            if any(isinstance(m, lora.LoRALinear) for m in answers.model.modules()):
                lora.save_adapter(answers.model, user_dir / f"{name}.adapter",
                                  str(shared.device.base))
        if answers.losses is not None:
            result["losses"][name] = answers.losses
        # step 3's verdicts: the first row's (every row of a user asks the same)
        if answers.selection is not None and "counts" not in result:
            records = "".join(json.dumps(r) + "\n" for r in answers.selection.records)
            hub.write_atomic(user_dir / "synthetic.jsonl", records)
            result["counts"] = answers.selection.counts
    if shared.cloud is not None and shared.cloud.chat.seconds:
        result["times"]["augment (cloud)"] = shared.cloud.chat.seconds
    hub.write_atomic(user_dir / "result.json", json.dumps(result, indent=1))
    return result


class Remembered:
    """A chat function that answers a call it has seen with the same replies (rows of one user ask
    M_cloud the same prompts with the same seed), and counts the seconds it spent asking."""
    def __init__(self, chat):
        self.chat, self.replies, self.seconds = chat, {}, 0.0

    def __call__(self, model, tokenizer, conversations, *args, **kwargs):
        kwargs_seen = {k: v for k, v in kwargs.items() if k != "desc"}
        key = json.dumps([conversations, args, kwargs_seen], default=str)
        if key not in self.replies:
            t = time.time()
            self.replies[key] = self.chat(model, tokenizer, conversations, *args, **kwargs)
            self.seconds += time.time() - t
        return list(self.replies[key])


# ---------------------------------------------------------------- before any work
def announce(task: data.Task, settings: Settings, users) -> None:
    """A run's first lines: the task, what fills each role (`models_used`), the data's files."""
    print(f"cdcda: {task.name} ({task.title})")
    for role, name in models_used(settings).items():
        print(f"  {role}: {name}")
    for name in sorted({name for u in users for name in u.files}):
        queries = sum(u.files.get(name, 0) for u in users)
        print(f"  {name}: {sum(name in u.files for u in users)} users, {queries} queries")


def models_used(settings: Settings) -> dict:
    """Which model, data and setting filled each role, as printed at the start and in the report
    (a stand-in says whose place it takes; an extra adds its own: `Settings.roles`)."""
    def named(role):
        name = getattr(settings, role)
        papers = PAPER_ALIASES.get(name, name) == PAPER[role]
        return name if papers else f"{name}  (stand-in for the paper's {PAPER[role]})"
    task = data.get_task(settings.task)
    own = "{" + task.pair_output + "}" not in task.pair_input  # LaMP-7's items are their own output
    pairs = ("the task's own (its history items hold their inputs)" if own else
             "rewrite (a LaMP-7 tweet paired with the device's neutral rewrite of it)"
             if settings.history_pairs == "rewrite" else
             "identity (a LaMP-7 tweet paired with itself)")
    return {role: named(role) for role in PAPER} | {
        "data": str(settings.data or "embedded demo (data/demo/, written for cdcda)"),
        "cloud": f"in process, {settings.cloud_dtype}", "history": "the whole history",
        "synthesis filter": "SCF, TDF, LSF", "augmentation decoding": settings.augment_decoding,
        "history pairs": pairs} | settings.roles


def check_models(settings: Settings, task: data.Task, methods, family,
                 cloud_here: bool = True) -> None:
    """Every model the run loads is found and its config.json and tokenizer.json read, else one line
    naming the option; the device model must be one `family` loads. `cloud_here` False: steps 2-3
    run elsewhere, on the cloud's own models."""
    roles = {"--device-model": settings.device_model}
    if any(methods[m].cloud for m in settings.methods) and cloud_here:
        roles["--cloud-model"] = settings.cloud_model
        roles["--judge"] = options.judge_source(settings.judge)[1]
    if settings.history_pairs == "rewrite" and "{" + task.pair_output + "}" in task.pair_input:
        roles["--judge"] = options.judge_source(settings.judge)[1]
    if task.metric == "generation":
        roles["--bertscore-model"] = settings.bertscore_model
    for option, source in roles.items():
        try:
            embedded = source == encoder.EMBEDDED
            directory = encoder.embedded_dir() if embedded else qwen2.model_dir(source)
            hub.load_config(directory)
            if option == "--device-model":
                family.config(directory)
            if not (directory / "tokenizer.json").is_file():
                raise InputError(f"{directory / 'tokenizer.json'}: missing")
        except InputError as e:
            raise InputError(f"{option} {source}: {e}") from None


def check_finished(out: Path, settings: Settings, targets) -> None:
    """A finished run's directory is final: a re-run with its rows (or some of them) and its users
    only reports again (evaluation-only options may differ); other rows or users are refused
    before any work."""
    path = out / "run.json"
    if not path.is_file():
        return
    before = json.loads(path.read_text())
    if "user_ids" not in before:  # an earlier version wrote run.json at the start: not finished
        return
    ids = [u.user_id for u in targets]
    if not set(settings.methods) <= set(before.get("methods", [])) or before.get("user_ids") != ids:
        raise InputError(f"{path}: a finished run of {', '.join(before.get('methods', []))} for "
                         f"{len(before.get('user_ids', []))} users; its files are final. Run "
                         f"--methods {','.join(settings.methods)} for these {len(ids)} users into "
                         "another --out (M_base and the history rewrites are cached)")


def check_settings(out: Path, targets, fingerprint: dict) -> None:
    """Before any work: every target user already under `out` was made with these settings (a re-run
    with other settings would mix two runs' files in one table). A setting a file of an earlier
    version lacks counts as its default, which is what that version did."""
    defaults = options.fingerprint(Settings())
    for user in targets:
        path = out / "users" / user.user_id / "settings.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            for key, value in fingerprint.items():
                before = saved.get(key, defaults.get(key))
                if before != value:
                    raise InputError(f"{path}: written by a run with {key} = {before!r}, this "
                                     f"one has {value!r}; use another --out, or the same settings")


def done(out: Path, user: data.User, methods) -> bool:
    path = out / "users" / user.user_id / "result.json"
    return path.is_file() and set(methods) <= set(json.loads(path.read_text())["predictions"])


def finished(out: Path, targets, methods) -> tuple[list[dict], list[str]]:
    """The result.json of every target user done with every method (in the targets' order),
    and the ids of the users who are not: the merge of a run's shards, whichever wrote them."""
    results, missing = [], []
    for user in targets:
        if done(out, user, methods):
            results.append(json.loads((out / "users" / user.user_id / "result.json").read_text()))
        else:
            missing.append(user.user_id)
    return results, missing


def progress(done_here: int, mine: int, trained: int, elapsed: float, done_all: int,
             total: int) -> str:
    """'3/10 users of this process done, 17/40 of the run, ETA 12 min': the ETA is its remaining
    users times the mean seconds of the users it trained."""
    eta = ""
    if trained and done_here < mine:
        eta = f", ETA {clock(elapsed / trained * (mine - done_here))}"
    return f"{done_here}/{mine} users of this process done, {done_all}/{total} of the run{eta}"


def clock(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------- the report
def write_report(task: data.Task, targets, results, settings: Settings, labels: dict, out: Path,
                 device: str | None = None) -> dict:
    """The table (report.py), LaMP's own files, then run.json: the run that finished."""
    bert = (encoder.load(settings.bertscore_model, "float32", device or settings.torch_device)
            if task.metric == "generation" else None)
    about = options.fingerprint(settings) | {"methods": list(settings.methods)}
    rep = report.build(task, targets, results, labels, models_used(settings), about, bert,
                       settings.bertscore_layer)
    report.write(rep, out)
    report.lamp_files(task, targets, results, settings.methods, out)
    # a report of some of a finished run's rows keeps the run.json of the whole
    if not (out / "run.json").is_file() or set(load_run(out)[0].methods) <= set(settings.methods):
        about = saved(settings) | {"labels": labels, "user_ids": rep["users"]}
        hub.write_atomic(out / "run.json", json.dumps(about, indent=1))
    return rep


def saved(settings: Settings) -> dict:
    """The settings as JSON values (run.json)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(settings).items()}


def load_run(out: Path) -> tuple[Settings, dict]:
    """A finished run's settings and row labels, from its run.json."""
    path = out / "run.json"
    if not path.is_file():
        raise InputError(f"{path}: missing; --out must be the directory of a finished cdcda.py run")
    values = json.loads(path.read_text())
    known = {k: v for k, v in values.items() if k in Settings.__dataclass_fields__}
    return Settings(**known | {"methods": tuple(values["methods"])}), values["labels"]
