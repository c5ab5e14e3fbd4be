"""Issue 30, steps 2-3 alone: off-label and kept counts, free against constrained label decoding.

For each task, seed and decoding mode, each target user (`--users`, most active, as a run picks
them) is augmented (step 2, `augment.augment`, the embedded cloud LM, structured decoding) and
selected (step 3, `filters.select`, the embedded judge) with the same per-user seed as
`python cdcda.py --seed S` gives it (`runner.user_seed`); no M_base, no training, no answers. Each
(task, seed, mode) is written to OUT/<mode>/<task>-s<seed>.json when done (a re-run skips it);
then a Markdown table: per task and mode, the counts summed over the users, as mean [min-max]
over the seeds with each seed's value.

    .venv/bin/python bench/label_counts.py --data data/heldout --tasks lamp2,lamp3 --seeds 0,1,2
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


def measure(cloud, judge, settings: options.Settings) -> dict:
    """{user id: step 2-3's counts} for the run's target users."""
    task = data.get_task(settings.task)
    users = data.load_users(task.name, settings.data)
    targets, _ = data.split_users(users, settings.users, settings.user_selection, settings.seed)
    out = {}
    for user in targets:
        pairs = cdcda.upload(task, user)
        seed = runner.user_seed(settings, user)
        candidates = augment.augment(cloud, pairs, settings, seed, task)
        selection = filters.select(pairs, candidates, judge, settings)
        out[user.user_id] = selection.counts | {"kept": len(selection.kept)}
    return out


def cell(values: list[int]) -> str:
    return (f"{sum(values) / len(values):.1f} [{min(values)}-{max(values)}] "
            f"({' / '.join(map(str, values))})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/heldout")
    p.add_argument("--tasks", default="lamp2,lamp3")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--users", type=int, default=3)
    p.add_argument("--out", default="runs/labels/counts")
    args = p.parse_args()
    tasks, seeds = args.tasks.split(","), [int(s) for s in args.seeds.split(",")]
    base = options.Settings(data=args.data, users=args.users)
    model, tok = qwen2.load(base.cloud_model, base.cloud_dtype, "cpu")
    cloud, judge = augment.CloudLM(model, tok), filters.make_judge(base.judge, "cpu")
    for task in tasks:
        for seed in seeds:
            for mode in MODES:
                path = Path(args.out) / mode / f"{task}-s{seed}.json"
                if path.exists():
                    continue
                settings = replace(base, task=task, seed=seed, label_decoding=mode)
                t = time.time()
                users = measure(cloud, judge, settings)
                record = {"task": task, "seed": seed, "mode": mode, "users": users,
                          "seconds": round(time.time() - t, 1),
                          "settings": options.fingerprint(settings)}
                path.parent.mkdir(parents=True, exist_ok=True)
                hub.write_atomic(path, json.dumps(record, indent=1))
                print(f"{task} seed {seed} {mode}: {record['seconds']} s", file=sys.stderr)
    print("| task | decoding | seeds | " + " | ".join(COUNTS) + " |")
    print("|---|---|---|" + "---|" * len(COUNTS))
    for task in tasks:
        for mode in MODES:
            records = [json.loads(p.read_text()) for p in
                       sorted((Path(args.out) / mode).glob(f"{task}-s*.json"))]
            if not records:
                continue
            sums = {c: [sum(u.get(c, 0) for u in r["users"].values()) for r in records]
                    for c in COUNTS}
            seeds_run = ",".join(str(r["seed"]) for r in records)
            print(f"| {task} | {mode} | {seeds_run} | "
                  + " | ".join(cell(sums[c]) for c in COUNTS) + " |")


if __name__ == "__main__":
    main()
