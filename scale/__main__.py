"""`python -m scale`: cdcda.py's run over many processes, or its plan.

    python -m scale --shard I/N [options]   shard I of N of the target users (shards.py); under
                                            torchrun (`torchrun ... -m scale`) or Slurm, the
                                            launcher's rank; every shard writes into one --out
    python -m scale --plan [options]        the run's size and estimated time (plan.py)
    python -m scale.report --out DIR        the table of a run whose shards all finished, or a
                                            finished run scored again (report.py)
The options are cdcda.py's, with any row of Table 1 or a deployed row in --methods, and
--deploy (each fine-tuned row also deployed, as `python -m deployment`) and --buffer N (Qin et
al.'s online buffer, as `python -m online`).
"""
import sys
from dataclasses import replace

import cdcda
import options
import runner
from errors import InputError
from experiments import baselines, methods as experiments
from online import methods as online
from scale import plan, report, shards


def main(argv=None) -> dict:
    p = options.parser(plan.METHODS)
    p.prog = "python -m scale"
    p.description = "cdcda.py's run at scale: shards of its users over processes, or its plan"
    p.add_argument("--shard", default=None, metavar="I/N", help="run shard I of N of the target users into the "
                   "shared --out (default: torchrun's RANK/WORLD_SIZE or Slurm's SLURM_PROCID/SLURM_NTASKS, else all)")
    p.add_argument("--plan", action="store_true", help="print the run's size and estimated time; train nothing")
    p.add_argument("--buffer", type=int, default=0, metavar="N", help="as `python -m online --buffer N`")
    p.add_argument("--deploy", action="store_true", help="as `python -m deployment`: each fine-tuned row deployed")
    p.add_argument("--deploy-rounding", choices=("nearest", "gptq"), default="nearest", help="as `python -m deployment`")
    p.add_argument("--deploy-tune-epochs", type=int, default=3, help="as `python -m deployment`")
    args = p.parse_args(argv)
    options.check_ranges(p, args, {"buffer": (lambda v: v >= 0, "at least 0"),
                                   "deploy_tune_epochs": (lambda v: v >= 0, "at least 0")})
    try:
        shard = shards.shard_of(args.shard)
    except InputError as e:
        p.error(str(e))
    extra = ("buffer",) * bool(args.buffer) + ("deploy_rounding", "deploy_tune_epochs") * args.deploy
    settings = options.check(p, args, plan.METHODS, extra=extra)
    settings = replace(settings, torch_device=shards.device_for(settings.torch_device, shard))
    if args.deploy:
        settings = replace(settings, methods=tuple(x for m in settings.methods for x in (m, f"{m}-deployed")
                                                   if x in plan.METHODS))
    if "eda-ft" in settings.methods:  # before any work
        baselines.check_wordnet(experiments.WORDNET_DIR)
    if args.plan:
        return plan.plan(settings, shard)
    methods = plan.METHODS
    if args.buffer:  # Direct-FT and CDCDA-PLM on what the buffer keeps, as `python -m online --buffer N`
        methods = plan.METHODS | online.history_methods(args.buffer, "scores", "cdcda", 0.0)
        settings = replace(settings, roles={"history": f"{args.buffer}-item online buffer, scores (Qin et al.)"})
    report.write_pending(settings, {m: methods[m].label for m in settings.methods})
    return runner.run(settings, methods, cdcda.prepare, cdcda.Family(),
                      share=lambda targets: shards.share(targets, shard))


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"python -m scale: error: {e}")
