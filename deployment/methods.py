"""The deployed rows: after a method's adapter is trained (step 5), `deployed` merges it into
M_base and stores the model as the device would serve it (deploy.py: int4 groups of 32, int8
embedding), then lets that model answer; METHOD-deployed is reported beside METHOD. The int4 codes
are each weight's nearest (or GPTQ's on the inputs of the pairs the adapter was trained on:
--deploy-rounding gptq), then the grids are tuned on those inputs toward the adapter's
predictions (gridtune.py; off with --deploy-tune-epochs 0).
"""
import copy
import json

from safetensors import safe_open
from torch import nn

import cdcda
import lora
import runner
import train
from augment import augment
from cdcda import Method, download, upload
from deployment import deploy, gptq, gridtune
from errors import InputError
from filters import select

OPTIONS = ("deploy_rounding", "deploy_tune_epochs")  # Settings.extra: a re-run must share them


def load_adapter(model: nn.Module, path) -> nn.Module:
    """An adapter `lora.save_adapter` wrote (step 5 saves each method's), into a model of the same
    `lora.add_lora(r, alpha, targets)` (else an error)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if not {"r", "alpha", "targets"} <= meta.keys():
        raise InputError(f"{path}: not a cdcda adapter (metadata lacks r, alpha, targets)")
    saved = {"r": int(meta["r"]), "alpha": float(meta["alpha"]), "targets": json.loads(meta["targets"])}
    ours = lora.lora_settings(model)
    if saved != {**ours, "alpha": float(ours["alpha"])}:
        raise InputError(f"{path}: adapter was trained with {saved}, the model has LoRA {ours}")
    own = lora.adapter_state_dict(model)
    if own.keys() != tensors.keys():
        extra, missing = sorted(tensors.keys() - own.keys()), sorted(own.keys() - tensors.keys())
        raise InputError(f"{path}: adapter keys differ from the model's: unexpected {extra[:3]}, missing {missing[:3]}")
    for key, value in tensors.items():
        if value.shape != own[key].shape:
            raise InputError(f"{path}: {key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}")
        own[key].copy_(value)  # state_dict tensors share storage with the parameters
    return model


def deployed(method: str):
    """The row METHOD-deployed: `method`'s adapter (its row, run before, saved it in the user's
    directory) on M_base, deployed and saved there too, answering; calibrated on the inputs of the
    pairs the adapter was trained on (the method's own, so its row runs again for them)."""
    def row(s: cdcda.Shared, user, seed: int) -> cdcda.Answers:
        rounding, epochs = (s.settings.extra[name] for name in OPTIONS)
        model = lora.add_lora(copy.deepcopy(s.device.model), r=s.settings.lora_r, alpha=s.settings.lora_alpha,
                              seed=seed)
        where = runner.user_dir(s.settings, user)
        load_adapter(model.eval(), where / f"{method}.adapter.safetensors")
        calibration = [train.encode_example(s.device.tokenizer, messages, y, s.settings.max_length)[0]
                       for messages, y in cdcda.examples(s.task, trained_on(s, user, seed, method))]
        rounded = gptq.gptq_blocks(model, calibration) if rounding == "gptq" else None
        state = deploy.portable_state(model, rounded=rounded)
        if epochs:
            state = gridtune.tune(model, state, calibration, epochs, seed=seed)
        model = deploy.from_portable(model.config, state, model.model.norm.weight.device)
        deploy.save(model, s.device.tokenizer, where / f"{method}.deployed")
        return cdcda.Answers(cdcda.answer(s.device, model, s.task, user.queries, s.settings, seed), model)
    return row


def trained_on(s: cdcda.Shared, user, seed: int, method: str) -> list[tuple[str, str]]:
    """The pairs `method`'s adapter was trained on: D_u (Direct-FT), or D_u and D_filtered (CDCDA-PLM:
    steps 1-4 again, the cloud's replies remembered by the harness)."""
    pairs = upload(s.task, user, s.rewrites)
    if method == "direct-ft":
        return pairs
    return download(pairs, select(pairs, augment(s.cloud, pairs, s.settings, seed, s.task), s.judge, s.settings).kept)


METHODS = {
    **cdcda.METHODS,
    "direct-ft-deployed": Method("Direct-FT, deployed (int4)", deployed("direct-ft"), False),
    "cdcda-deployed": Method("CDCDA-PLM, deployed (int4)", deployed("cdcda"), True),
}
