"""`python -m deployment --task lamp7`: cdcda.py's run, each fine-tuned row also deployed and
answering (methods.py), gold NLL included. Every other option is cdcda.py's.
"""
import sys
from dataclasses import replace

import cdcda
import options
import runner
from deployment import gridtune
from deployment.methods import METHODS, OPTIONS
from errors import InputError


def main(argv=None) -> dict:
    p = options.parser(METHODS)
    p.prog = "python -m deployment"
    p.description = "cdcda.py's run with each fine-tuned method's model also deployed (int4) and answering"
    p.add_argument("--deploy-rounding", choices=("nearest", "gptq"), default="nearest",
                   help="how the deployed int4 codes are chosen: each weight's nearest code, or GPTQ on the "
                   "inputs of the pairs the adapter was trained on, block after block (gptq.py; RESULTS.md compares them)")
    p.add_argument("--deploy-tune-epochs", type=int, default=gridtune.EPOCHS,
                   help="epochs of tuning the deployed int4 grids toward the personalized model on those inputs "
                   "(gridtune.py); 0: off")
    args = p.parse_args(argv)
    options.check_ranges(p, args, {"deploy_tune_epochs": (lambda v: v >= 0, "at least 0 (0: no tuning)")})
    settings = options.check(p, args, METHODS, extra=OPTIONS)
    methods = settings.methods
    if not any(m.endswith("-deployed") for m in methods):  # each fine-tuned method, then its deployed model
        methods = tuple(x for m in methods for x in (m, f"{m}-deployed") if x in METHODS)
    for i, m in enumerate(methods):  # a deployed model is made from its method's adapter
        if m.endswith("-deployed") and m.removesuffix("-deployed") not in methods[:i]:
            p.error(f"--methods: {m} needs {m.removesuffix('-deployed')} before it (its adapter)")
    return runner.run(replace(settings, methods=methods), METHODS, cdcda.prepare, cdcda.Family())


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"python -m deployment: error: {e}")
