"""The report of a run: LaMP's metrics over every query of every target user, and the gold NLL.

`build` scores the saved predictions (`metrics.evaluate`, as LaMP averages: over all queries
of all target users), sums the augmentation counts and the seconds, and names the models and
data that actually ran (`models_used`: a stand-in says which of the paper's models it replaces).
`write` puts it in OUT/results.json and OUT/results.md. Evaluation is apart from training:
`python cdcda.py report --out DIR [--bertscore-model M] [--bertscore-layer L]` reads the
run's options (OUT/run.json) and its users' result.json files and scores them again; it is
also the merge of a sharded run (scale.py): the table of every user, or the users not yet done.
Beside the table a finished run gets LaMP's own files and its Table 5 (`write_extras`);
`--case-study USER_ID` writes one user's page instead (appendix.py, the paper's Figure 3).
"""
import argparse
import json
from pathlib import Path

import appendix
import data
import encoder
import hub
import metrics
import rewrite
from errors import InputError
from options import PAPER, PAPER_ALIASES


def models_used(args) -> dict:
    """Which model, data and setting filled each role, as printed at the start and in the report."""
    def is_papers(role):
        name = getattr(args, role)
        return PAPER_ALIASES.get(name, name) == PAPER[role]
    roles = {role: getattr(args, role) + ("" if is_papers(role) else f"  (stand-in for the paper's {PAPER[role]})")
             for role in PAPER}
    return roles | {
        "data": str(args.data or "embedded demo (data/demo/, written for cdcda)"),
        "cloud": (f"{args.cloud} (`server.py`: augmentation and filters there)" if args.cloud
                  else f"{args.cloud_api} (augmentation there, filters here)" if args.cloud_api else "in process"),
        "history": (f"{args.buffer}-item online buffer, {args.buffer_policy} (Qin et al.)" if args.buffer
                    else "the whole history"),
        "synthesis filter": (f"ROUGE-1 > {args.eps_rouge1} (Qin et al.)" if args.synthesis_filter == "rouge1"
                             else "SCF, TDF, LSF"),
        "augmentation decoding": args.augment_decoding,
        "history pairs": ("the task's own (its history items hold their inputs)"
                          if not rewrite.needs_rewrites(data.get_task(args.task))
                          else "rewrite (a LaMP-7 tweet paired with the device's neutral rewrite of it)"
                          if args.history_pairs == "rewrite" else "identity (a LaMP-7 tweet paired with itself)")}


def announce(task: data.Task, args, users) -> None:
    """A run's first lines: the task, what fills each role (`models_used`), the data's files."""
    print(f"cdcda: {task.name} ({task.title})")
    for role, name in models_used(args).items():
        print(f"  {role}: {name}")
    for name in sorted({name for u in users for name in u.files}):
        queries = sum(u.files.get(name, 0) for u in users)
        print(f"  {name}: {sum(name in u.files for u in users)} users, {queries} queries")


def build(task: data.Task, users, results, args, labels: dict) -> dict:
    """Metrics of every method over all queries of all target users, counts and seconds summed."""
    golds = [q.gold for u in users for q in u.queries]
    bert = (encoder.load(args.bertscore_model, "float32", args.device) if task.metric == "generation" else None)
    rows = {}
    for method in labels:
        preds = [p for r in results for p in r["predictions"][method]]
        rows[method] = metrics.evaluate(task.name, preds, golds, bertscore_model=bert,
                                        bertscore_layer=args.bertscore_layer)
        if all(method in r.get("gold_nll", {}) for r in results):  # the rows the device model answers
            nll = [x for r in results for x in r["gold_nll"][method]]
            rows[method]["gold_nll"] = sum(nll) / len(nll)
    counts, times = {}, {}  # summed over users
    for r in results:
        for total, part in ((counts, r.get("counts", {})), (times, r["times"])):
            for key, value in part.items():
                total[key] = total.get(key, 0) + value
    return {"task": task.name, "users": [u.user_id for u in users], "queries": len(golds),
            "models": models_used(args), "labels": labels, "rows": rows, "counts": counts, "seconds": times,
            "settings": {k: v for k, v in vars(args).items() if k != "out"}}


def reading(rep: dict) -> str:
    """One line saying what the table shows, from its own numbers: the rows ordered by the gold
    NLL and by the task's first metric (none for efficiency.py's table, which prints its ratios)."""
    if rep["task"] == "efficiency":
        return ""
    first = next(iter(next(iter(rep["rows"].values()))))  # rouge1, accuracy or mae
    lower = first == "mae"
    orders = [("gold NLL", True, "gold_nll"), (first, lower, first)]
    parts = []
    for name, ascending, key in orders:
        rows = [(row[key], rep["labels"][m]) for m, row in rep["rows"].items() if key in row]
        if len(rows) > 1:
            rows.sort(reverse=not ascending)
            sign = " < " if ascending else " > "
            parts.append(f"{name} ({'lower' if ascending else 'higher'} is better): "
                         + sign.join(f"{label} {value:.3f}" for value, label in rows))
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
    """OUT/name.json and OUT/name.md (`title` replacing the Markdown's heading, `note` appended),
    the Markdown printed."""
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
    p.add_argument("--case-study", metavar="USER_ID", help="instead of the report, OUT/case-study-USER_ID.md: "
                   "the user's history, kept synthetic pairs and every method's answers (the paper's Figure 3)")
    given = p.parse_args(argv)
    out = Path(given.out)
    if given.case_study:  # issue 23: the case study, before any scoring
        return {"case_study": str(appendix.case_study(out, given.case_study))}
    if not (out / "run.json").is_file():
        raise InputError(f"{out / 'run.json'}: missing; --out must be the directory of a cdcda.py run")
    args = argparse.Namespace(**json.loads((out / "run.json").read_text()))
    for name in ("bertscore_model", "bertscore_layer"):
        if getattr(given, name) is not None:
            setattr(args, name, getattr(given, name))
    task = data.get_task(args.task)
    users = data.load_users(task.name, args.data)
    targets = data.split_users(users, min(args.users, len(users)), args.user_selection, args.seed)[0]
    results, missing = finished(out, targets, args.methods)
    if missing:
        raise InputError(f"{out}: {len(missing)} of {len(targets)} users are not finished: {', '.join(missing)}; "
                         "run the same command again (the same shard, for a sharded run) to finish them")
    rep = write(build(task, targets, results, args, args.labels), out)
    write_extras(task, targets, results, args.methods, out)  # issue 23: LaMP's files, Table 5
    return rep


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


def lamp_files(task: data.Task, targets, results, methods, out: Path) -> list[Path]:
    """LaMP's own files of a finished run, for its `eval/evaluation.py`: OUT/lamp/<method>.json per
    method, `{"task": "LaMP_7", "golds": [{"id": query id, "output": prediction}]}`, and the golds
    in the same form (OUT/lamp/golds.json), every target user's queries in order. None is written
    when two queries share an id (LaMP's files key on it): the line says which."""
    queries = [q for u in targets for q in u.queries]
    ids = [q.id for q in queries]
    if len(set(ids)) < len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        print(f"LaMP's files not written: query ids {', '.join(twice[:5])} appear twice among the target users")
        return []
    def file(outputs) -> str:
        return json.dumps({"task": task.lamp_name, "golds": [{"id": i, "output": o} for i, o in zip(ids, outputs)]},
                          indent=1)
    paths = {"golds": out / "lamp" / "golds.json"} | {m: out / "lamp" / f"{m}.json" for m in methods}
    paths["golds"].parent.mkdir(parents=True, exist_ok=True)
    hub.write_atomic(paths.pop("golds"), file([q.gold for q in queries]))
    for method, path in paths.items():
        hub.write_atomic(path, file([p for r in results for p in r["predictions"][method]]))
    print(f"written: LaMP's files in {out / 'lamp'} (golds.json, " + ", ".join(p.name for p in paths.values()) + ")")
    return list(paths.values())


def write_extras(task: data.Task, targets, results, methods, out: Path) -> None:
    """What a finished run's report writes beside results.md: LaMP's own files (`lamp_files`) and
    the run's Table 5 (appendix.py, OUT/table5.md)."""
    lamp_files(task, targets, results, methods, out)
    appendix.write_table5(dict([appendix.table5_of_run(out)]), appendix.run_args(out).device_model, out)
