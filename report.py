"""The report of a run: LaMP's metrics over every query of every target user, and the gold NLL.

`build` scores the saved predictions (`metrics.evaluate`), sums the counts and seconds and names
the models and data that ran (`models_used`, a stand-in says whose place it takes); `write` puts
it in OUT/results.json and results.md; `lamp_files` writes LaMP's own files. `python cdcda.py
report --out DIR` scores a finished run again (another BERTScore backbone), or merges a sharded
one, or names the users not yet done."""
import argparse
import json
from collections import Counter
from pathlib import Path

import data
import encoder
import hub
import metrics
import options
import rewrite
import runner
from errors import InputError
from options import PAPER, PAPER_ALIASES, Settings


def models_used(settings: Settings) -> dict:
    """Which model, data and setting filled each role, as printed at the start and in the report
    (an extra adds its own: `Settings.roles`)."""
    def is_papers(role):
        name = getattr(settings.models, role)
        return PAPER_ALIASES.get(name, name) == PAPER[role]
    roles = {role: getattr(settings.models, role) + ("" if is_papers(role) else
                                                     f"  (stand-in for the paper's {PAPER[role]})") for role in PAPER}
    return roles | {
        "data": str(settings.data or "embedded demo (data/demo/, written for cdcda)"),
        "cloud": f"in process, {settings.models.cloud_dtype}", "history": "the whole history", "synthesis filter": "SCF, TDF, LSF",
        "augmentation decoding": settings.augmentation.augment_decoding,
        "history pairs": ("the task's own (its history items hold their inputs)"
                          if not rewrite.needs_rewrites(data.get_task(settings.task))
                          else "rewrite (a LaMP-7 tweet paired with the device's neutral rewrite of it)"
                          if settings.history_pairs == "rewrite" else "identity (a LaMP-7 tweet paired with itself)")
    } | settings.roles


def announce(task: data.Task, settings: Settings, users) -> None:
    """A run's first lines: the task, what fills each role (`models_used`), the data's files."""
    print(f"cdcda: {task.name} ({task.title})")
    for role, name in models_used(settings).items():
        print(f"  {role}: {name}")
    for name in sorted({name for u in users for name in u.files}):
        queries = sum(u.files.get(name, 0) for u in users)
        print(f"  {name}: {sum(name in u.files for u in users)} users, {queries} queries")


def build(task: data.Task, users, results, settings: Settings, labels: dict, device: str) -> dict:
    """Every method's metrics over all the targets' queries (BERTScore on `device`); counts, seconds summed."""
    golds = [q.gold for u in users for q in u.queries]
    models = settings.models
    bert = encoder.load(models.bertscore_model, "float32", device) if task.metric == "generation" else None
    rows = {}
    for method in labels:
        preds = [p for r in results for p in r["predictions"][method]]
        rows[method] = metrics.evaluate(task.name, preds, golds, bertscore_model=bert,
                                        bertscore_layer=models.bertscore_layer)
        if all(method in r.get("gold_nll", {}) for r in results):  # the rows the device model answers
            nll = [x for r in results for x in r["gold_nll"][method]]
            rows[method]["gold_nll"] = sum(nll) / len(nll)
    counts, times = {}, {}  # summed over users
    for r in results:
        for total, part in ((counts, r.get("counts", {})), (times, r["times"])):
            for key, value in part.items():
                total[key] = total.get(key, 0) + value
    return {"task": task.name, "users": [u.user_id for u in users], "queries": len(golds),
            "models": models_used(settings), "labels": labels, "rows": rows, "counts": counts, "seconds": times,
            "settings": {k: v for k, v in options.flat(settings).items() if k != "out"}}


def reading(rep: dict) -> str:
    """One line of what the table shows, from its own numbers: the rows ordered by the gold NLL and
    by the task's first metric (ROUGE-1, accuracy or MAE)."""
    parts = []
    for key in ("gold_nll", "rouge1", "accuracy", "mae"):
        lower = key in ("gold_nll", "mae")
        rows = sorted(((row[key], rep["labels"][m]) for m, row in rep["rows"].items() if key in row), reverse=not lower)
        if len(rows) > 1:
            parts.append(f"{'gold NLL' if key == 'gold_nll' else key} ({'lower' if lower else 'higher'} is better): "
                         + (" < " if lower else " > ").join(f"{label} {value:.3f}" for value, label in rows))
    return "reading: " + "; ".join(parts) if parts else ""


def markdown(rep: dict) -> str:
    keys = list(dict.fromkeys(k for row in rep["rows"].values() for k in row if not k.startswith("bertscore_")
                              or k == "bertscore_f1"))
    lines = [f"# {rep['task']}: {len(rep['users'])} target users, {rep['queries']} queries", ""]
    lines += [f"- {role}: {name}" for role, name in rep["models"].items()]
    lines += ["", "| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for method, row in rep["rows"].items():
        lines.append(f"| {rep['labels'][method]} | " + " | ".join(f"{row[k]:.4f}" if k in row else "-" for k in keys) + " |")
    if reading(rep):
        lines += ["", reading(rep)]
    if rep["counts"]:
        lines += ["", "augmentation and selection: " + ", ".join(f"{k} {v}" for k, v in rep["counts"].items())]
    lines += ["", "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in rep["seconds"].items()), ""]
    return "\n".join(lines)


def write(rep: dict, out: Path, name: str = "results", title: str | None = None, note: str = "",
          show: bool = True) -> dict:
    """OUT/name.json and OUT/name.md (`title` for its heading, `note` appended), the Markdown printed."""
    out.mkdir(parents=True, exist_ok=True)
    hub.write_atomic(out / f"{name}.json", json.dumps(rep, indent=1))
    md = markdown(rep) + note
    md = f"# {title}\n" + md.split("\n", 1)[1] if title else md
    hub.write_atomic(out / f"{name}.md", md)
    print(("\n" + md if show else note) + f"\nwritten: {out / name}.json, {out / name}.md")
    return rep


def main(argv=None) -> dict:
    """`python cdcda.py report --out DIR`: the report of a finished run, scored again."""
    p = argparse.ArgumentParser(prog="cdcda.py report", description=main.__doc__)
    p.add_argument("--out", required=True, help="the run's output directory (holds run.json and users/)")
    p.add_argument("--bertscore-model", default=None, help="BERTScore backbone (default: the run's)")
    p.add_argument("--bertscore-layer", type=int, default=None, help="its layer (default: the run's)")
    p.add_argument("--device", default="cpu", help="where BERTScore runs: cpu, cuda or cuda:N (not the run's)")
    given = p.parse_args(argv)
    if problem := options.device_problem(given.device):
        p.error(problem)
    out = Path(given.out)
    if not (out / "run.json").is_file():
        raise InputError(f"{out / 'run.json'}: missing; --out must be the directory of a cdcda.py run")
    saved = json.loads((out / "run.json").read_text())
    for name in ("bertscore_model", "bertscore_layer"):
        if getattr(given, name) is not None:
            saved[name] = getattr(given, name)
    settings = options.build(Settings, saved | {"methods": tuple(saved["methods"])})
    task = data.get_task(settings.task)
    users = data.load_users(task.name, settings.data)
    targets = data.split_users(users, min(settings.users, len(users)), settings.user_selection, settings.seed)[0]
    results, missing = runner.finished(out, targets, settings.methods)
    if missing:
        raise InputError(f"{out}: {len(missing)} of {len(targets)} users are not finished: {', '.join(missing)}; "
                         "run the same command again (the same shard, for a sharded run) to finish them")
    rep = write(build(task, targets, results, settings, saved["labels"], given.device), out)
    lamp_files(task, targets, results, settings.methods, out)
    return rep


def lamp_files(task: data.Task, targets, results, methods, out: Path) -> None:
    """LaMP's own files, for its `eval/evaluation.py`: OUT/lamp/<method>.json per method and
    OUT/lamp/golds.json, `{"task": "LaMP_7", "golds": [{"id": query id, "output": text}]}`; none
    when two queries share an id (the files key on it): a line says which."""
    queries = [q for u in targets for q in u.queries]
    ids = [q.id for q in queries]
    if twice := sorted(i for i, n in Counter(ids).items() if n > 1):
        print(f"LaMP's files not written: query ids {', '.join(twice[:5])} appear twice among the target users")
        return
    outputs = {"golds": [q.gold for q in queries]} | {m: [p for r in results for p in r["predictions"][m]]
                                                      for m in methods}
    (out / "lamp").mkdir(parents=True, exist_ok=True)
    for name, texts in outputs.items():
        hub.write_atomic(out / "lamp" / f"{name}.json", json.dumps(
            {"task": task.lamp_name, "golds": [{"id": i, "output": o} for i, o in zip(ids, texts)]}, indent=1))
    print(f"written: LaMP's files in {out / 'lamp'} ({', '.join(f'{n}.json' for n in outputs)})")
