"""`python -m deployment --task lamp7`: cdcda.py's run, each fine-tuned row also deployed.

After a method's adapter is trained (step 5), `deployed` merges it into M_base and stores the
model as the device would serve it (deploy.py: int4 groups of 32, int8 embedding), then lets
that model answer: METHOD-deployed is reported beside METHOD, gold NLL included. The int4 codes
are each weight's nearest (or GPTQ's on the inputs of the pairs the adapter was trained on:
--deploy-rounding gptq), then the grids are tuned on those inputs toward the adapter's
predictions (gridtune.py; off with --deploy-tune-epochs 0). Every other option is cdcda.py's.
"""
import copy
import sys
from dataclasses import replace

import cdcda
import lora
import options
import train
from cdcda import Method, Run, download
from deployment import deploy, gridtune
from errors import InputError

OPTIONS = ("deploy_rounding", "deploy_tune_epochs")  # they change the deployed rows alone


def deployed(run: Run, method: str, pairs) -> list[str]:
    """`method`'s saved adapter on M_base, deployed, saved under the user's directory, answering."""
    rounding, epochs = (run.settings.extra[name] for name in OPTIONS)
    model = lora.add_lora(copy.deepcopy(run.device_model), r=run.training.lora_r, alpha=run.training.lora_alpha)
    lora.load_adapter(model.eval(), run.user_dir / f"{method}.adapter.safetensors")
    calibration = [train.encode_example(run.tokenizer, messages, y, run.training.max_length)[0]
                   for messages, y in cdcda.training_examples(run.task, pairs)]
    state = deploy.portable_state(model, calibration=calibration if rounding == "gptq" else None)
    if epochs:
        state = gridtune.tune(model, state, calibration, epochs, seed=run.seed)
    model = deploy.from_portable(model.config, state, model.model.norm.weight.device)
    deploy.save(model, run.tokenizer, run.user_dir / f"{method}.deployed")
    return run.answer(model, f"{method}-deployed")


METHODS = {
    **cdcda.METHODS,
    "direct-ft-deployed": Method("Direct-FT, deployed (int4)", lambda run: deployed(run, "direct-ft", run.pairs),
                                 False, OPTIONS),
    "cdcda-deployed": Method("CDCDA-PLM, deployed (int4)",
                             lambda run: deployed(run, "cdcda", download(run.pairs, run.kept)), True, OPTIONS),
}


def main(argv=None) -> dict:
    p = options.parser(METHODS)
    p.description = "cdcda.py's run with each fine-tuned method's model also deployed (int4) and answering"
    p.add_argument("--deploy-rounding", choices=("nearest", "gptq"), default="nearest",
                   help="how the deployed int4 codes are chosen: each weight's nearest code, or GPTQ on the "
                   "inputs of the pairs the adapter was trained on (gptq.py; better untuned, worse tuned: RESULTS.md)")
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
    return cdcda.run(replace(settings, methods=methods), METHODS)


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"python -m deployment: error: {e}")
