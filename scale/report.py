"""`python -m scale.report --out DIR`: a run's report written again, from its users' result.json.

For a run whose shards have all finished (the last shard writes the table too, unless another
was still running), or to score a finished run again with another BERTScore backbone or layer
(`--bertscore-model`, `--bertscore-layer`, on its own `--device`); nothing is trained. The run's
settings come from run.json, or, for a sharded run no shard has reported yet, from the
run-pending.json that `python -m scale` writes before any work.
"""
import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import data
import options
import runner
from errors import InputError


def pending(out: Path):
    """(settings, labels) of a sharded run not reported yet, from OUT/run-pending.json."""
    path = out / "run-pending.json"
    if not path.is_file():
        raise InputError(f"{out / 'run.json'}: missing; --out must be the directory of a cdcda.py run")
    values = json.loads(path.read_text())
    known = {k: v for k, v in values.items() if k in options.Settings.__dataclass_fields__}
    return options.Settings(**known | {"methods": tuple(values["methods"])}), values["labels"]


def write_pending(settings: options.Settings, labels: dict) -> None:
    """What this command needs to report a sharded run, before any of its shards works."""
    out = Path(settings.out)
    if not (out / "run.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        values = runner.saved(settings) | {"labels": labels}
        runner.hub.write_atomic(out / "run-pending.json", json.dumps(values, indent=1))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m scale.report", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the run's output directory (holds users/)")
    p.add_argument("--bertscore-model", default=None, help="BERTScore backbone (default: the run's)")
    p.add_argument("--bertscore-layer", type=int, default=None, help="its layer (default: the run's)")
    p.add_argument("--device", default="cpu", help="where BERTScore runs: cpu, cuda or cuda:N (not the run's)")
    given = p.parse_args(argv)
    if problem := options.device_problem(given.device):
        p.error(problem)
    out = Path(given.out)
    settings, labels = runner.load_run(out) if (out / "run.json").is_file() else pending(out)
    for name in ("bertscore_model", "bertscore_layer"):
        if getattr(given, name) is not None:
            settings = replace(settings, **{name: getattr(given, name)})
    task = data.get_task(settings.task)
    users = data.load_users(task.name, settings.data)
    targets = data.split_users(users, min(settings.users, len(users)), settings.user_selection, settings.seed)[0]
    results, missing = runner.finished(out, targets, settings.methods)
    if missing:
        raise InputError(f"{out}: {len(missing)} of {len(targets)} users are not finished: {', '.join(missing)}; "
                         "run the same command again (the same shard, for a sharded run) to finish them")
    return runner.write_report(task, targets, results, settings, labels, out, given.device)


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"python -m scale.report: error: {e}")
