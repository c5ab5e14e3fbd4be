"""Issue 30's table: free against constrained label decoding, over seeds, from finished runs.

Reads every ROOT/<mode>/<task>-s<seed>/results.json (`cdcda.py --out` of each run; mode: free or
constrained) and prints Markdown, per task and decoding mode: the augmentation counts (generated,
unparsable, off_label, kept) and each method's metrics (accuracy and macro F1, or MAE and RMSE)
and gold NLL, each as mean [min-max] over the seeds, with the seeds' values. A run's decoding mode
is its settings' `label_decoding` (runs from before the option have free decoding only); a
folder that says otherwise, or runs of one group whose settings differ beyond the seed, are errors.

    .venv/bin/python bench/bench_labels.py [--root runs/labels]
"""
import argparse
import json
import sys
from pathlib import Path

COUNTS = ("generated", "unparsable", "off_label", "kept")
METRICS = {"accuracy": "accuracy", "f1": "macro F1", "mae": "MAE", "rmse": "RMSE",
           "gold_nll": "gold NLL"}


def spread(values: list[float], digits: int) -> str:
    """'mean [min-max] (v0 / v1 / ...)', `digits` decimals (counts: whole, their mean to 0.1)."""
    whole = all(isinstance(v, int) for v in values)
    f = "{}" if whole else f"{{:.{digits}f}}"
    per = " / ".join(f.format(v) for v in values)
    mean = sum(values) / len(values)
    mean = f"{mean:.1f}" if whole else f.format(mean)
    return f"{mean} [{f.format(min(values))}-{f.format(max(values))}] ({per})"


def collect(root: Path) -> dict:
    """{(task, mode): [report, ...] in seed order} from ROOT/<mode>/<task>-s<seed>/results.json."""
    groups = {}
    for path in sorted(root.glob("*/*/results.json")):
        rep = json.loads(path.read_text())
        mode = rep["settings"].get("label_decoding", "free")
        if path.parent.parent.name in ("free", "constrained") and path.parent.parent.name != mode:
            sys.exit(f"{path}: label decoding {mode!r}, but it lies under "
                     f"{path.parent.parent.name}/")
        rep["path"] = str(path)
        groups.setdefault((rep["task"], mode), []).append(rep)
    for key, reps in groups.items():
        reps.sort(key=lambda r: r["settings"]["seed"])
        base = {k: v for k, v in reps[0]["settings"].items() if k != "seed"}
        for r in reps[1:]:
            other = {k: v for k, v in r["settings"].items() if k != "seed"}
            if other != base:
                diff = sorted(k for k in base.keys() | other.keys() if base.get(k) != other.get(k))
                sys.exit(f"{r['path']}: settings differ from {reps[0]['path']} in "
                         f"{', '.join(diff)}")
    return groups


def table(task: str, groups: dict) -> str:
    modes = [m for m in ("free", "constrained") if (task, m) in groups]
    first = groups[(task, modes[0])][0]
    lines = [f"### {task}", "", f"data: {first['models']['data']}; cloud: "
             f"{first['models']['cloud_model']}; device: {first['models']['device_model']}; "
             f"targets: {', '.join(first['users'])} ({first['queries']} queries)", ""]
    lines += ["| decoding | seeds | " + " | ".join(COUNTS) + " |", "|---" * (len(COUNTS) + 2) + "|"]
    for mode in modes:
        reps = groups[(task, mode)]
        seeds = ", ".join(str(r["settings"]["seed"]) for r in reps)
        cells = [spread([r["counts"].get(c, 0) for r in reps], 1) for c in COUNTS]
        lines.append(f"| {mode} | {seeds} | " + " | ".join(cells) + " |")
    keys = [k for k in METRICS if k in first["rows"][next(iter(first["rows"]))]]
    lines += ["", "| decoding | method | " + " | ".join(METRICS[k] for k in keys) + " |",
              "|---" * (len(keys) + 2) + "|"]
    for mode in modes:
        reps = groups[(task, mode)]
        for method, label in reps[0]["labels"].items():
            cells = [spread([r["rows"][method][k] for r in reps], 3) for k in keys]
            lines.append(f"| {mode} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path("runs/labels"),
                   help="the folder holding <mode>/<task>-s<seed>/results.json")
    root = p.parse_args(argv).root
    groups = collect(root)
    if not groups:
        sys.exit(f"{root}: no */*/results.json")
    print("Cells: mean [min-max] (seed by seed), over the seeds listed.\n")
    for task in sorted({t for t, _ in groups}):
        print(table(task, groups))


if __name__ == "__main__":
    main()
