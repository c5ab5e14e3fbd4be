"""The deployed rows: after a method's adapter is trained (step 5), `deployed` merges it into
M_base and stores the model as the device would serve it (deploy.py: int4 groups of 32, int8
embedding), then lets that model answer; METHOD-deployed is reported beside METHOD. The int4 codes
are each weight's nearest (or GPTQ's on the inputs of the pairs the adapter was trained on:
--deploy-rounding gptq), then the grids are tuned on those inputs toward the adapter's
predictions (gridtune.py; off with --deploy-tune-epochs 0).
"""
import copy

import cdcda
import lora
import train
from cdcda import Method, Run, download
from deployment import deploy, gptq, gridtune

OPTIONS = ("deploy_rounding", "deploy_tune_epochs")  # Settings.extra: a re-run must share them
load_adapter = lora.load_adapter  # PEFT's layout (lora.py); callers move to lora.load_adapter


def deployed(run: Run, method: str, pairs) -> list[str]:
    """`method`'s saved adapter on M_base, deployed, saved under the user's directory, answering."""
    rounding, epochs = (run.settings.extra[name] for name in OPTIONS)
    model = lora.add_lora(copy.deepcopy(run.device_model), r=run.training.lora_r, alpha=run.training.lora_alpha,
                          seed=run.seed)
    load_adapter(model.eval(), run.user_dir / f"{method}.adapter.safetensors")
    calibration = [train.encode_example(run.tokenizer, messages, y, run.training.max_length)[0]
                   for messages, y in cdcda.training_examples(run.task, pairs)]
    rounded = gptq.gptq_blocks(model, calibration) if rounding == "gptq" else None
    state = deploy.portable_state(model, rounded=rounded)
    if epochs:
        state = gridtune.tune(model, state, calibration, epochs, seed=run.seed)
    model = deploy.from_portable(model.config, state, model.model.norm.weight.device)
    deploy.save(model, run.tokenizer, run.user_dir / f"{method}.deployed")
    return run.answer(model, f"{method}-deployed")


METHODS = {
    **cdcda.METHODS,
    "direct-ft-deployed": Method("Direct-FT, deployed (int4)", lambda run: deployed(run, "direct-ft", run.pairs),
                                 False),
    "cdcda-deployed": Method("CDCDA-PLM, deployed (int4)",
                             lambda run: deployed(run, "cdcda", download(run.pairs, run.kept)), True),
}
