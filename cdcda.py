"""CDCDA-PLM end to end: `python cdcda.py --task lamp7`.

The paper's five steps (sec. 4), each a function named after it, run for every target user:
  1. upload       the user's history D_u as (input, response) pairs
  2. augment      the cloud LM writes k similar pairs per pair (eq. 1), T = 0.7  (augment.py)
  3. select       SCF, TDF, LSF (eq. 2-4) keep D_filtered                      (augment.py, filters.py)
  4. download     D_u + D_filtered come back to the device
  5. personalize  LoRA on the NF4 task base model M_base, cross-entropy (eq. 5, 6) (lora.py, train.py)
then the device answers the user's queries offline and report.py scores them. M_base is trained
once per task on the users who are not targets (`base_model`); `run_user` takes one user through
every method of `METHODS`; `run` every target user (the loop: runner.py). The extras (README)
extend this from above with their own options, `METHODS` entries and `Steps`."""
import copy
import functools
import hashlib
import json
import re
import sys
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, NamedTuple

import torch

import augment
import data
import filters
import generate
import hub
import lora
import nf4
import options
import qwen2
import report
import rewrite
import runner
import train
from errors import InputError
from options import Settings

ANSWER_TOKENS = {"lamp1": 8, "lamp2": 12, "lamp3": 4, "lamp4": 32, "lamp5": 48, "lamp7": 48}


# ---------------------------------------------------------------- the five steps (sec. 4)
def upload(task: data.Task, user: data.User, rewrites: dict | None = None) -> list[tuple[str, str]]:
    """Step 1: the user's history D_u as (x, y) pairs, x the user's content without the task
    instruction (the tweet, the article: what augmentation and the filters compare)."""
    return [(x[len(task.instruction):], y) for x, y in history_pairs(task, user, rewrites)]


def history_pairs(task: data.Task, user: data.User, rewrites: dict | None) -> list[tuple[str, str]]:
    """A user's history items as training pairs (`task.pair`); LaMP-7 with `rewrites`: x the device's
    neutral rewrite of the tweet; a user none of whose tweets has one: the identity pairs. One rule
    for the target users and M_base's."""
    pairs = [p for p in (rewrite.history_pair(task, item, rewrites) for item in user.profile) if p]
    return pairs or [task.pair(item) for item in user.profile]


# steps 2 and 3: `augment.synthesize` (the cloud LM with the paper's prompt, then SCF, TDF, LSF)


def download(pairs, kept) -> list[tuple[str, str]]:
    """Step 4: D_u together with D_filtered, as the device trains on them."""
    return list(pairs) + list(kept)


def personalize(device_model, tokenizer, task: data.Task, pairs, training: train.Training, seed: int, desc: str):
    """Step 5 (eq. 5, 6): a fresh LoRA (r=16, alpha=8, all linear layers) on a copy of the NF4
    M_base, trained with cross-entropy on the responses. Returns (model, loss per epoch)."""
    model = lora.add_lora(copy.deepcopy(device_model), r=training.lora_r, alpha=training.lora_alpha, seed=seed)
    losses = train.finetune(model, tokenizer, training_examples(task, pairs), training, seed=seed, desc=desc)
    return model.eval(), losses


def training_examples(task: data.Task, pairs) -> list[tuple[list[dict], str]]:
    """(messages, response) for each (x, y) pair: x in the appendix-B prompt, as step 5 trains."""
    return [(task.messages(task.instruction + x), y) for x, y in pairs]


def answer(model, tokenizer, task: data.Task, queries, temperature: float, seed: int, max_length: int,
           desc: str) -> list[str]:
    """The device answers the queries offline with the appendix-B prompt, a long one shortened as in
    training (`train.fit_messages`)."""
    budget = max(max_length - ANSWER_TOKENS[task.name], max_length // 2)
    conversations = [train.fit_messages(tokenizer, task.messages(q.input), budget) for q in queries]
    return generate.chat(model, tokenizer, conversations, max_new_tokens=ANSWER_TOKENS[task.name],
                         temperature=temperature, seed=seed, desc=desc)


@torch.inference_mode()
def gold_nll(model, tokenizer, task: data.Task, queries, max_length: int) -> list[float]:
    """Per query: the mean cross-entropy (nats per token, lower is better) of its gold answer and end of
    turn after the appendix-B prompt, as eq. 6 scores a response: it tells apart models whose samples are alike."""
    device = next(model.parameters()).device
    nll = []
    for q in queries:
        example = train.encode_example(tokenizer, task.messages(q.input), q.gold, max_length)
        ids, labels = train.right_pad([example], tokenizer.pad_token_id, device)  # (1, T) each
        nll.append(train.response_loss(model, ids, labels).item())
    return nll


# ---------------------------------------------------------------- M_base
def base_pairs(task: data.Task, others, rewrites: dict | None) -> list[tuple[str, str]]:
    """M_base's training set (sec. 4: "fine-tune a general LM on a public, standard dataset"): the
    non-target users' history pairs and their queries with golds (LaMP's supervised examples)."""
    return ([p for u in others for p in history_pairs(task, u, rewrites)]
            + [(q.input, q.gold) for u in others for q in u.queries])


def base_model(task: data.Task, others, settings: Settings, device: str, family=qwen2,
               rewrites: dict | None = None) -> Path:
    """M_base: the device model LoRA-tuned on `base_pairs`, merged and cached (keyed by the model,
    the data and the settings); "on the cloud" in the paper, so at full precision."""
    pairs, source = base_pairs(task, others, rewrites), settings.models.device_model
    training = replace(settings.training, epochs=settings.base_epochs)
    key = hashlib.sha256(json.dumps([source, pairs, training.epochs, training.lr, training.lora_r,
                                     training.lora_alpha, settings.seed]).encode()).hexdigest()[:16]
    slug = re.sub(r"[^\w.-]", "_", source)
    directory = hub.cache_dir() / "base" / f"{task.name}-{slug}-{key}"
    with hub.exclusive(hub.cache_dir() / "locks" / f"base-{directory.name}.lock", "M_base"):
        if (directory / "model.safetensors").is_file():
            print(f"M_base: cached {directory}")
            return directory
        if not pairs:
            raise InputError(f"{task.name}: no non-target users to train M_base on; lower --users")
        model, tok = family.load(source, "float32", device)
        lora.add_lora(model, r=training.lora_r, alpha=training.lora_alpha, seed=settings.seed)
        print(f"M_base: training on {len(pairs)} pairs of {len(others)} non-target users")
        train.finetune(model, tok, [(task.messages(x), y) for x, y in pairs], training, seed=settings.seed,
                       desc="M_base")
        with hub.atomic(directory) as tmp:
            family.save_pretrained(lora.merge(model), tok, tmp)
    return directory


# ---------------------------------------------------------------- one user, every method
@dataclass(frozen=True)
class Steps:
    """What an extra may put in place of the method's own parts (README: the core and its extras)."""
    family: object = qwen2  # loads and saves the device model (Table 4: experiments/t5.py)
    history: Callable | None = None  # before step 1: (pairs, model, tokenizer, seed, user_dir) -> (pairs, counts)
    cloud: Callable | None = None  # () -> the augment.CloudLM of step 2 (default: in process)
    select: Callable | None = None  # step 3: (originals, candidates) -> filters.Selection
    synthesize: Callable | None = None  # steps 2-3 elsewhere: (task, pairs, augmentation, seed, times) -> result
    share: Callable | None = None  # the target users this process runs (scale/: a shard); default all


@dataclass
class Pipeline:
    """What every user of a run shares: the task, M_base on the device (NF4), the cloud LM, step
    3, the history pairs' rewrites, the settings and the methods."""
    task: data.Task
    device_model: torch.nn.Module
    tokenizer: qwen2.Tokenizer
    cloud: augment.CloudLM | None  # None: no method needs it, or steps 2-3 run elsewhere
    select: Callable | None
    rewrites: dict | None
    settings: Settings
    methods: dict
    steps: Steps
    device: str


@dataclass
class Run(Pipeline):
    """What a method sees of one user: the pipeline, the user's data, the seed, where to write."""
    user: data.User
    pairs: list  # D_u as (x, y)
    kept: list | None  # D_filtered, when a method needs synthetic data
    seed: int
    user_dir: Path
    losses: dict = field(default_factory=dict)  # method -> loss per epoch
    nll: dict = field(default_factory=dict)  # method -> gold_nll per query

    @property
    def training(self) -> train.Training:
        return self.settings.training

    def answer(self, model, method: str) -> list[str]:
        """The gold NLL of `model` (kept for the report), then its answers."""
        max_length = self.training.max_length
        self.nll[method] = gold_nll(model, self.tokenizer, self.task, self.user.queries, max_length)
        return answer(model, self.tokenizer, self.task, self.user.queries, self.settings.augmentation.temperature,
                      self.seed, max_length, f"answer {method}")

    def personalized(self, method: str, pairs) -> list[str]:
        """Step 5 on `pairs`, the adapter saved, then the device answers."""
        model, self.losses[method] = personalize(self.device_model, self.tokenizer, self.task, pairs, self.training,
                                                 self.seed, f"{method} {self.user.user_id}")
        lora.save_adapter(model, self.user_dir / f"{method}.adapter.safetensors")
        return self.answer(model, method)


class Method(NamedTuple):
    label: str  # the row's name in the report
    run: Callable[[Run], list[str]]  # one user's predictions, one per query
    synthetic: bool  # needs D_filtered (steps 2-4 run first)


METHODS = {
    "base": Method("M_device (M_base, non-personalized)", lambda run: run.answer(run.device_model, "base"), False),
    "direct-ft": Method("Direct-FT", lambda run: run.personalized("direct-ft", run.pairs), False),
    "cdcda": Method("CDCDA-PLM", lambda run: run.personalized("cdcda", download(run.pairs, run.kept)), True),
}


def synthetic_records(user_dir: Path) -> list[dict]:
    """The selection records `synthesize` cached for a user: one per parsed candidate."""
    return [json.loads(line) for line in (user_dir / "synthetic.jsonl").read_text().splitlines()]


def synthesize(p: Pipeline, pairs, seed: int, user_dir: Path, times: dict):
    """Steps 2-4 for one user, cached in user_dir: (selection records, counts)."""
    synthetic, counts_file = user_dir / "synthetic.jsonl", user_dir / "selection.json"
    if synthetic.is_file() and counts_file.is_file():  # a resumed run: augmentation and selection are done
        return synthetic_records(user_dir), json.loads(counts_file.read_text())
    if p.steps.synthesize:  # e.g. on the cloud service (cloud/): the device uploads D_u, downloads the selection
        records, counts = p.steps.synthesize(p.task, pairs, p.settings.augmentation, seed, times)
    else:
        records, counts = augment.synthesize(p.cloud, pairs, p.settings.augmentation, seed, p.task, p.select, times)
    hub.write_atomic(synthetic, "".join(json.dumps(r) + "\n" for r in records))
    hub.write_atomic(counts_file, json.dumps(counts))
    return records, counts


def run_user(p: Pipeline, user: data.User, user_dir: Path) -> dict:
    """All methods for one user; the result dict is also written to user_dir/result.json."""
    seed = p.settings.seed + zlib.crc32(user.user_id.encode()) % 10_000
    times, result, counts = {}, {"user_id": user.user_id, "predictions": {}}, {}
    pairs = upload(p.task, user, p.rewrites)
    if p.steps.history:  # e.g. Qin et al.'s buffer (online/): only what it keeps is uploaded
        t = time.time()
        pairs, counts = p.steps.history(pairs, p.device_model, p.tokenizer, seed, user_dir)
        times["history"] = time.time() - t
    kept = None
    if any(p.methods[m].synthetic for m in p.settings.methods):
        records, synthesis = synthesize(p, pairs, seed, user_dir, times)
        counts |= synthesis
        kept = [(r["syn_input"], r["syn_output"]) for r in records if r["kept"]]
    if counts:
        result["counts"] = counts
    run = Run(**vars(p), user=user, pairs=pairs, kept=kept, seed=seed, user_dir=user_dir)
    for method in p.settings.methods:
        t = time.time()
        result["predictions"][method] = p.methods[method].run(run)
        times[method] = time.time() - t
    result["losses"], result["gold_nll"], result["times"] = run.losses, run.nll, times
    hub.write_atomic(user_dir / "result.json", json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------- the run
def prepare(task: data.Task, users, others, settings: Settings, methods, steps: Steps, device: str) -> Pipeline:
    """What every user shares, made or loaded once: the rewrites, M_base in NF4 (bf16 compute), the cloud LM, step 3."""
    models, thresholds = settings.models, settings.augmentation.thresholds
    synthetic = any(methods[m].synthetic for m in settings.methods) and not steps.synthesize
    rewriting = settings.history_pairs == "rewrite" and rewrite.needs_rewrites(task)
    judge = (augment.make_judge(models.judge, device) if rewriting or synthetic and steps.select is None else None)
    rewrites = (rewrite.neutral_rewrites(task, users, models.device_model, judge, thresholds, device, steps.family)
                if rewriting else None)  # every method and M_base alike
    base = base_model(task, others, settings, device, steps.family, rewrites)
    device_model, tok = steps.family.load(base, "float32", device)
    device_model = nf4.quantize_model(device_model, torch.bfloat16)
    cloud = None
    if synthetic:
        cloud = steps.cloud() if steps.cloud else augment.CloudLM(*qwen2.load(models.cloud_model, models.cloud_dtype, device))
    select = steps.select or functools.partial(filters.select, judge=judge, thresholds=thresholds)
    return Pipeline(task, device_model, tok, cloud, select, rewrites, settings, methods, steps, device)


def run(settings: Settings, methods=METHODS, steps: Steps = Steps()) -> dict:
    """Every target user of the task (or this process's share: `steps.share`) through every
    method of settings.methods (runner.py), then the report once every target user is done."""
    task, out, device = data.get_task(settings.task), Path(settings.out), settings.device
    users = data.load_users(task.name, settings.data)
    report.announce(task, settings, users)
    targets, others = data.split_users(users, min(settings.users, len(users)), settings.user_selection, settings.seed)
    mine = steps.share(targets) if steps.share else targets
    print(f"  users: {len(targets)} targets ({settings.user_selection}), {len(others)} others train M_base"
          + (f"; this process runs {len(mine)} of them on {device}" if len(mine) < len(targets) else ""))
    options.check_models(settings, task, methods, steps.family, cloud_here=steps.synthesize is None)
    fingerprint, labels = options.fingerprint(settings), {m: methods[m].label for m in settings.methods}
    runner.check_settings(out, targets, fingerprint)
    out.mkdir(parents=True, exist_ok=True)
    hub.write_atomic(out / "run.json", json.dumps(options.flat(settings) | {"labels": labels}, indent=1))
    pipeline = prepare(task, users, others, settings, methods, steps, device)
    runner.each_user(out, mine, targets, fingerprint, settings.methods,
                     lambda user, user_dir: run_user(pipeline, user, user_dir))
    results, missing = runner.finished(out, targets, settings.methods)
    if missing:  # other processes' users: the last one to finish writes the table
        print(f"this process's {len(mine)} users are done; {len(missing)} of {len(targets)} are not yet "
              f"({', '.join(missing)}); `python cdcda.py report --out {out}` writes the table when they are")
        return {"missing": missing}
    rep = report.write(report.build(task, targets, results, settings, labels, device), out)
    report.lamp_files(task, targets, results, settings.methods, out)
    return rep


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return report.main(argv[1:])
    return run(options.parse(argv, METHODS))


if __name__ == "__main__":
    try:
        main()
    except InputError as e:  # bad files, records, options: the message says which; a bug shows its traceback
        sys.exit(f"cdcda: error: {e}")
