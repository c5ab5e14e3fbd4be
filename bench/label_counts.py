"""Issue 30, steps 2-3 alone: off-label and kept counts, free against constrained label decoding.

For each task, seed and decoding mode, each target user (`--users`, most active, as a run picks
them) is augmented (step 2, `augment.augment`, the embedded cloud LM, structured decoding) and
selected (step 3, `filters.select`, the embedded judge) with the same per-user seed as
`python cdcda.py --seed S` gives it (`runner.user_seed`); no M_base, no training, no answers. Each
user is written to OUT/<mode>/<task>-s<seed>/<user>.json when done (a re-run skips it); then a
Markdown table: per task, mode and seed, the counts summed over the users done, and how many.

    .venv/bin/python bench/label_counts.py --data data/heldout --tasks lamp2,lamp3 --seeds 0,1,2
    .venv/bin/python bench/label_counts.py --table   # the table of what is written, nothing run
"""
import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import augment  # noqa: E402
import cdcda  # noqa: E402
import data  # noqa: E402
import filters  # noqa: E402
import hub  # noqa: E402
import options  # noqa: E402
import qwen2  # noqa: E402
import runner  # noqa: E402

COUNTS = ("generated", "unparsable", "off_label", "kept")
MODES = ("free", "constrained")


def measure(cloud, judge, settings: options.Settings, out: Path) -> None:
    """Step 2-3's counts for each of the run's target users, each to out/<user>.json."""
    task = data.get_task(settings.task)
    users = data.load_users(task.name, settings.data)
    targets, _ = data.split_users(users, settings.users, settings.user_selection, settings.seed)
    for user in targets:
        path = out / f"{user.user_id}.json"
        if path.exists():
            continue
        t, pairs = time.time(), cdcda.upload(task, user)
        seed = runner.user_seed(settings, user)
        candidates = augment.augment(cloud, pairs, settings, seed, task)
        selection = filters.select(pairs, candidates, judge, settings)
        record = {"user": user.user_id, "seed": seed, "seconds": round(time.time() - t, 1),
                  "counts": selection.counts | {"kept": len(selection.kept)},
                  "responses": sorted({y for _, y in candidates.pairs}),
                  "settings": options.fingerprint(settings)}
        path.parent.mkdir(parents=True, exist_ok=True)
        hub.write_atomic(path, json.dumps(record, indent=1))
        print(f"{settings.task} seed {settings.seed} {settings.label_decoding} {user.user_id}: "
              f"{record['seconds']} s", file=sys.stderr)


def table(root: Path, tasks, seeds) -> None:
    print("| task | decoding | seed | users done | " + " | ".join(COUNTS) + " |")
    print("|---|---|---|---|" + "---|" * len(COUNTS))
    for task in tasks:
        for mode in MODES:
            for seed in seeds:
                users = [json.loads(p.read_text())["counts"]
                         for p in sorted((root / mode / f"{task}-s{seed}").glob("*.json"))]
                if users:
                    print(f"| {task} | {mode} | {seed} | {len(users)} | "
                          + " | ".join(str(sum(u.get(c, 0) for u in users)) for c in COUNTS) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/heldout")
    p.add_argument("--tasks", default="lamp2,lamp3")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--users", type=int, default=3)
    p.add_argument("--out", default="runs/labels/counts")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--table", action="store_true", help="print the table of what is written")
    args = p.parse_args()
    tasks, seeds = args.tasks.split(","), [int(s) for s in args.seeds.split(",")]
    if not args.table:
        base = options.Settings(data=args.data, users=args.users)
        model, tok = qwen2.load(base.cloud_model, base.cloud_dtype, "cpu")
        cloud, judge = augment.CloudLM(model, tok), filters.make_judge(base.judge, "cpu")
        for task in tasks:
            for seed in seeds:
                for mode in args.modes.split(","):
                    settings = replace(base, task=task, seed=seed, label_decoding=mode)
                    measure(cloud, judge, settings, Path(args.out) / mode / f"{task}-s{seed}")
    table(Path(args.out), tasks, seeds)

if __name__ == "__main__":
    main()
