"""The report of a run: LaMP's metrics over every query of every target user, and the gold NLL.

`build` scores the saved predictions (`metrics.evaluate`), sums the counts and seconds and names
the models and data that ran (a stand-in says whose place it takes); `write` puts it in
OUT/results.json and results.md; `lamp_files` writes LaMP's own files (runner.py calls them)."""
import json
from collections import Counter
from pathlib import Path

import data
import hub
import metrics


def build(task: data.Task, users, results, labels: dict, models: dict, settings: dict, bert=None,
          bertscore_layer: int | None = None) -> dict:
    """Every row's metrics over all the targets' queries (`bert`: BERTScore's encoder, for the
    generation tasks), the gold NLL of the rows the device model answers; counts, seconds summed."""
    golds = [q.gold for u in users for q in u.queries]
    rows = {}
    for method in labels:
        preds = [p for r in results for p in r["predictions"][method]]
        rows[method] = metrics.evaluate(task.name, preds, golds, bertscore_model=bert,
                                        bertscore_layer=bertscore_layer)
        if all(method in r.get("gold_nll", {}) for r in results):
            nll = [x for r in results for x in r["gold_nll"][method]]
            rows[method]["gold_nll"] = sum(nll) / len(nll)
    counts, times = {}, {}  # summed over users
    for r in results:
        for total, part in ((counts, r.get("counts", {})), (times, r["times"])):
            for key, value in part.items():
                total[key] = total.get(key, 0) + value
    return {"task": task.name, "users": [u.user_id for u in users], "queries": len(golds),
            "models": models, "labels": labels, "rows": rows, "counts": counts, "seconds": times,
            "settings": settings}


def reading(rep: dict) -> str:
    """One line of what the table shows, from its own numbers: the rows ordered by the gold NLL and
    by the task's first metric (ROUGE-1, accuracy or MAE)."""
    parts = []
    for key in ("gold_nll", "rouge1", "accuracy", "mae"):
        lower = key in ("gold_nll", "mae")
        rows = sorted(((row[key], rep["labels"][m]) for m, row in rep["rows"].items()
                       if key in row), reverse=not lower)
        if len(rows) > 1:
            name, better = "gold NLL" if key == "gold_nll" else key, "lower" if lower else "higher"
            order = (" < " if lower else " > ").join(f"{label} {value:.3f}"
                                                     for value, label in rows)
            parts.append(f"{name} ({better} is better): {order}")
    return "reading: " + "; ".join(parts) if parts else ""


def markdown(rep: dict) -> str:
    keys = list(dict.fromkeys(k for row in rep["rows"].values() for k in row
                              if not k.startswith("bertscore_") or k == "bertscore_f1"))
    lines = [f"# {rep['task']}: {len(rep['users'])} target users, {rep['queries']} queries", ""]
    lines += [f"- {role}: {name}" for role, name in rep["models"].items()]
    lines += ["", "| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for method, row in rep["rows"].items():
        cells = [f"{row[k]:.4f}" if k in row else "-" for k in keys]
        lines.append(f"| {rep['labels'][method]} | " + " | ".join(cells) + " |")
    if reading(rep):
        lines += ["", reading(rep)]
    if rep["counts"]:
        counts = ", ".join(f"{k} {v}" for k, v in rep["counts"].items())
        lines += ["", "augmentation and selection: " + counts]
    lines += ["", "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in rep["seconds"].items()), ""]
    return "\n".join(lines)


def write(rep: dict, out: Path, name: str = "results", title: str | None = None, note: str = "",
          show: bool = True) -> dict:
    """OUT/name.json and OUT/name.md (`title` for its heading, `note` appended), the Markdown
    printed."""
    out.mkdir(parents=True, exist_ok=True)
    hub.write_atomic(out / f"{name}.json", json.dumps(rep, indent=1))
    md = markdown(rep) + note
    md = f"# {title}\n" + md.split("\n", 1)[1] if title else md
    hub.write_atomic(out / f"{name}.md", md)
    print(("\n" + md if show else note) + f"\nwritten: {out / name}.json, {out / name}.md")
    return rep


def lamp_files(task: data.Task, targets, results, methods, out: Path) -> None:
    """LaMP's own files, for its `eval/evaluation.py`: OUT/lamp/<method>.json per method and
    OUT/lamp/golds.json, `{"task": "LaMP_7", "golds": [{"id": query id, "output": text}]}`; none
    when two queries share an id (the files key on it): a line says which."""
    queries = [q for u in targets for q in u.queries]
    ids = [q.id for q in queries]
    if twice := sorted(i for i, n in Counter(ids).items() if n > 1):
        print(f"LaMP's files not written: query ids {', '.join(twice[:5])} appear twice among the "
              "target users")
        return
    outputs = {"golds": [q.gold for q in queries]}
    outputs |= {m: [p for r in results for p in r["predictions"][m]] for m in methods}
    (out / "lamp").mkdir(parents=True, exist_ok=True)
    for name, texts in outputs.items():
        golds = [{"id": i, "output": o} for i, o in zip(ids, texts)]
        hub.write_atomic(out / "lamp" / f"{name}.json",
                         json.dumps({"task": task.lamp_name, "golds": golds}, indent=1))
    print(f"written: LaMP's files in {out / 'lamp'} ({', '.join(f'{n}.json' for n in outputs)})")
