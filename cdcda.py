"""CDCDA-PLM end to end: `python cdcda.py --task lamp7`.

The paper's five steps (sec. 4), each a function named after it, run for every target user:
  1. upload       the user's history D_u as (input, response) pairs
  2. augment      the cloud LM writes k similar pairs per pair (eq. 1), T = 0.7  (augment.py)
  3. select       SCF, TDF, LSF (eq. 2-4) keep D_filtered                      (augment.py)
  4. download     D_u + D_filtered come back to the device
  5. personalize  LoRA on the NF4 task base model M_base, cross-entropy (eq. 5, 6)
then the device answers the user's queries offline and `report.py` scores them.
`--buffer N` puts the second system (Qin et al., DAC'24, `online.py`) in front of step 1: the
device keeps only N items of the history, and only those are uploaded and trained on;
`--synthesis-filter rouge1` swaps step 3 for that paper's ROUGE-1 check.
M_base (sec. 4, "On-device LM personalization fine-tuning") is trained once per task on the
users who are not targets, merged and cached. `python cdcda.py report --out DIR` scores a
finished run again without training (another BERTScore backbone or layer). Many processes
(`--shard I/N`, torchrun, Slurm) share the users of one run and its M_base (scale.py);
`--plan` prints the run's size and estimated time without training.
"""
import argparse
import copy
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
import cloud as cloud_client
import data
import deploy
import generate
import gridtune
import hub
import lora
import nf4
import online
import options
import qwen2
import report
import rewrite
import scale
import t5
from errors import InputError

ANSWER_TOKENS = {"lamp1": 8, "lamp2": 12, "lamp3": 4, "lamp4": 32, "lamp5": 48, "lamp7": 48}


@dataclass(frozen=True)
class Training:
    """Step 5's settings (eq. 5, 6); their defaults and ranges are the options' (options.py)."""
    r: int  # LoRA rank (sec. 5.1: 16)
    alpha: float  # LoRA alpha (sec. 5.1: 8)
    epochs: int
    lr: float  # AdamW
    batch_size: int
    max_length: int  # tokens of prompt + response

    @classmethod
    def from_args(cls, args) -> "Training":
        return cls(args.lora_r, args.lora_alpha, args.epochs, args.lr, args.batch_size, args.max_length)


# ---------------------------------------------------------------- the five steps (sec. 4)
def upload(task: data.Task, user: data.User, rewrites: dict | None = None) -> list[tuple[str, str]]:
    """Step 1: the user's history D_u as (x, y) pairs; x is the content the instruction wraps
    (the tweet, the article), so augmentation and the filters see the user's text, not the
    task instruction every pair shares. `rewrites` (--history-pairs rewrite, LaMP-7): x is the
    device's neutral rewrite of the tweet (`rewrite.history_pair`); a user none of whose items
    has one keeps the identity pairs."""
    pairs = [p for p in (rewrite.history_pair(task, item, rewrites) for item in user.profile) if p]
    if not pairs:
        print(f"  {user.user_id}: no history item has a rewrite; its identity pairs are used")
        pairs = [task.pair(item) for item in user.profile]
    return [(x[len(task.instruction):], y) for x, y in pairs]


def download(pairs, kept) -> list[tuple[str, str]]:
    """Step 4: D_u together with D_filtered, as the device trains on them."""
    return list(pairs) + list(kept)


def personalize(device_model, tokenizer, task: data.Task, pairs, training: Training, seed: int, desc: str):
    """Step 5 (eq. 5, 6): a fresh LoRA (r=16, alpha=8, all linear layers) on a copy of the NF4
    M_base, trained with cross-entropy on the responses. Returns (model, loss per epoch)."""
    model = lora.add_lora(copy.deepcopy(device_model), r=training.r, alpha=training.alpha)
    losses = lora.finetune(model, tokenizer, training_examples(task, pairs), epochs=training.epochs,
                           lr=training.lr, batch_size=training.batch_size, max_length=training.max_length, seed=seed,
                           desc=desc)
    return model.eval(), losses


def training_examples(task: data.Task, pairs) -> list[tuple[list[dict], str]]:
    """(messages, response) for each (x, y) pair: x in the appendix-B prompt, as step 5 trains."""
    return [(task.messages(task.instruction + x), y) for x, y in pairs]


def answer(model, tokenizer, task: data.Task, queries, temperature: float, seed: int, max_length: int,
           desc: str) -> list[str]:
    """The device answers the user's queries offline with the appendix-B prompt, a long one
    shortened as in training (`lora.fit_messages`: the user content's end goes, the template
    and the instruction stay; the prompt gets what `lora.encode_example` gives it)."""
    budget = max(max_length - ANSWER_TOKENS[task.name], max_length // 2)
    conversations = [lora.fit_messages(tokenizer, task.messages(q.input), budget) for q in queries]
    return generate.chat(model, tokenizer, conversations, max_new_tokens=ANSWER_TOKENS[task.name],
                         temperature=temperature, seed=seed, desc=desc)


@torch.inference_mode()
def gold_nll(model, tokenizer, task: data.Task, queries, max_length: int) -> list[float]:
    """Per query: the mean cross-entropy (nats per token) of its gold answer and <|im_end|>
    after the appendix-B prompt, teacher-forced, as eq. 6 scores a training response. It says
    how likely the model finds what the user actually wrote, so it tells models apart even
    when their sampled answers are the same. Lower is better."""
    device = next(model.parameters()).device
    nll = []
    for q in queries:
        example = lora.encode_example(tokenizer, task.messages(q.input), q.gold, max_length)
        ids, labels = lora.right_pad([example], tokenizer.pad_token_id, device)  # (1, T) each
        nll.append(lora.response_loss(model, ids, labels).item())
    return nll


def buffer_history(pairs, device_model, tokenizer, capacity: int, policy: str, seed: int):
    """--buffer N, before step 1 (Qin et al.): the device streams D_u, oldest first, through
    an N-item buffer (policy "scores": EOE + DSS + IDD on its own embeddings; "random") and
    keeps only what the buffer holds. Returns (the kept pairs in arrival order, a summary)."""
    if len(pairs) <= capacity:
        print(f"  buffer of {capacity}: the history has only {len(pairs)} items, so it keeps them all")
    kept, summary = online.keep_history(device_model, tokenizer, [x for x, _ in pairs], capacity, policy, seed)
    return [pairs[i] for i in kept], summary | {"kept_indices": kept}


# ---------------------------------------------------------------- M_base
def base_model(task: data.Task, others, device_model: str, training: Training, seed: int, device: str,
               rewrites: dict | None = None) -> Path:
    """M_base: the device model LoRA-tuned on the non-target users' data, merged, cached.

    The task's training set (sec. 4: "fine-tune a general LM on a public, standard dataset"):
    the other users' queries with their golds (LaMP's supervised examples) and their history
    pairs. Done "on the cloud" in the paper (no data of the target users), so at full
    precision. The cache key covers the device model, the training data and the settings."""
    pairs = [p for u in others for p in (rewrite.history_pair(task, item, rewrites) for item in u.profile) if p]
    pairs += [(q.input, q.gold) for u in others for q in u.queries]
    settings = [device_model, pairs, training.epochs, training.lr, training.r, training.alpha, seed]
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
    slug = re.sub(r"[^\w.-]", "_", device_model)
    directory = hub.cache_dir() / "base" / f"{task.name}-{slug}-{key}"
    if (directory / "model.safetensors").is_file():
        print(f"M_base: cached {directory}")
        return directory
    if not pairs:
        raise InputError(f"{task.name}: no non-target users to train M_base on; lower --users")
    family = t5.family(device_model)  # qwen2 (decoder-only) or t5 (encoder-decoder, Table 4)
    model, tok = family.load(device_model, "float32", device)
    torch.manual_seed(seed)  # LoRA's initial A: torch seeds itself at random in each process
    lora.add_lora(model, r=training.r, alpha=training.alpha)
    print(f"M_base: training on {len(pairs)} pairs of {len(others)} non-target users")
    lora.finetune(model, tok, [(task.messages(x), y) for x, y in pairs], epochs=training.epochs, lr=training.lr,
                  batch_size=training.batch_size, max_length=training.max_length, seed=seed, desc="M_base")
    with hub.atomic(directory) as tmp:
        family.save_pretrained(lora.merge(model), tok, tmp)
    return directory


# ---------------------------------------------------------------- one user, every method
@dataclass
class Run:
    """What a method sees of one user: the data, the models, the settings, where to write."""
    task: data.Task
    user: data.User
    pairs: list  # D_u as (x, y)
    kept: list | None  # D_filtered, when a method needs synthetic data
    device_model: torch.nn.Module  # NF4 M_base
    tokenizer: qwen2.Tokenizer
    cloud: tuple | None  # (model, tokenizer) of the cloud LM, in process
    args: argparse.Namespace
    seed: int
    user_dir: Path
    losses: dict
    nll: dict = field(default_factory=dict)  # method -> gold_nll per query

    @property
    def training(self) -> Training:
        return Training.from_args(self.args)

    def answer(self, model, method: str) -> list[str]:
        self.nll[method] = gold_nll(model, self.tokenizer, self.task, self.user.queries, self.args.max_length)
        return answer(model, self.tokenizer, self.task, self.user.queries, self.args.temperature, self.seed,
                      self.args.max_length, f"answer {method}")

    def personalized(self, method: str, pairs) -> list[str]:
        """Step 5 on `pairs`, the adapter saved, then the device answers."""
        model, self.losses[method] = personalize(self.device_model, self.tokenizer, self.task, pairs, self.training,
                                                 self.seed, f"{method} {self.user.user_id}")
        lora.save_adapter(model, self.user_dir / f"{method}.adapter.safetensors")
        return self.answer(model, method)

    def deployed(self, method: str, pairs) -> list[str]:
        """--deploy: `method`'s saved adapter on M_base, deployed (deploy.py: merged, int4), saved,
        answering. The int4 codes are each weight's nearest (or GPTQ's on the inputs of the pairs
        the adapter was trained on: --deploy-rounding gptq), then the grids are tuned on those
        inputs toward the adapter's predictions (gridtune.py; off with --deploy-tune-epochs 0)."""
        args = self.args
        model = lora.add_lora(copy.deepcopy(self.device_model), r=args.lora_r, alpha=args.lora_alpha).eval()
        lora.load_adapter(model, self.user_dir / f"{method}.adapter.safetensors")
        calibration = [lora.encode_example(self.tokenizer, messages, y, args.max_length)[0]
                       for messages, y in training_examples(self.task, pairs)]
        state = deploy.portable_state(model, calibration=calibration if args.deploy_rounding == "gptq" else None)
        if args.deploy_tune_epochs:
            state = gridtune.tune(model, state, calibration, args.deploy_tune_epochs, seed=self.seed)
        deployed = deploy.from_portable(model.config, state, model.model.norm.weight.device)
        deploy.save(deployed, self.tokenizer, self.user_dir / f"{method}.deployed")
        return self.answer(deployed, f"{method}-deployed")


class Method(NamedTuple):
    label: str  # the row's name in the report
    run: Callable[[Run], list[str]]  # one user's predictions, one per query
    synthetic: bool  # needs D_filtered (steps 2-4 run first)


METHODS = {
    "base": Method("M_device (M_base, non-personalized)", lambda run: run.answer(run.device_model, "base"), False),
    "direct-ft": Method("Direct-FT", lambda run: run.personalized("direct-ft", run.pairs), False),
    "cdcda": Method("CDCDA-PLM", lambda run: run.personalized("cdcda", download(run.pairs, run.kept)), True),
    "direct-ft-deployed": Method("Direct-FT, deployed (int4)", lambda run: run.deployed("direct-ft", run.pairs),
                                 False),
    "cdcda-deployed": Method("CDCDA-PLM, deployed (int4)",
                             lambda run: run.deployed("cdcda", download(run.pairs, run.kept)), True),
}


def synthetic_records(user_dir: Path) -> list[dict]:
    """The selection records `synthesize` cached for a user: one per parsed candidate."""
    return [json.loads(line) for line in (user_dir / "synthetic.jsonl").read_text().splitlines()]


def synthesize(task, pairs, cloud, judge, args, seed: int, user_dir: Path, times: dict):
    """Steps 2-4 for one user, cached in user_dir: (selection records, counts)."""
    synthetic, counts_file = user_dir / "synthetic.jsonl", user_dir / "selection.json"
    if synthetic.is_file() and counts_file.is_file():  # a resumed run: augmentation and selection are done
        return synthetic_records(user_dir), json.loads(counts_file.read_text())
    t = time.time()
    if args.cloud:  # steps 1-4 over HTTP: the server augments and selects
        records, counts = cloud_client.remote_augment(args.cloud, task.name, pairs, args.k, args.temperature,
                                                      seed, options.thresholds(args), args.augment_decoding)
        times["augment+select (remote)"] = time.time() - t
    else:
        chat = (cloud_client.api_chat(args.cloud_api, args.cloud_model, concurrency=args.cloud_concurrency)
                if args.cloud_api else None)
        originals, candidates, unparsable, off_label = augment.augment(
            *cloud, pairs, args.k, args.temperature, seed, chat=chat, task=task, max_len_ratio=args.eps_max_len,
            structured=args.augment_decoding == "structured")
        times["augment"] = time.time() - t
        t = time.time()
        sel = (online.rouge1_select(originals, candidates, args.eps_rouge1) if args.synthesis_filter == "rouge1"
               else augment.select(originals, candidates, judge, options.thresholds(args)))
        times["select"] = time.time() - t
        records = sel.records
        counts = {**sel.counts, "generated": len(pairs) * args.k, "unparsable": unparsable, "off_label": off_label}
    hub.write_atomic(synthetic, "".join(json.dumps(r) + "\n" for r in records))
    hub.write_atomic(counts_file, json.dumps(counts))
    return records, counts


def run_user(user, task, cloud, judge, device_model, tok, args, user_dir: Path, methods=METHODS,
             rewrites: dict | None = None) -> dict:
    """All methods for one user; the result dict is also written to user_dir/result.json."""
    seed = args.seed + zlib.crc32(user.user_id.encode()) % 10_000
    torch.manual_seed(seed)  # LoRA's initial A: the same in any process, whichever users ran before
    times, result = {}, {"user_id": user.user_id, "predictions": {}}
    pairs, counts = upload(task, user, rewrites), {}
    if args.buffer:
        t = time.time()
        pairs, summary = buffer_history(pairs, device_model, tok, args.buffer, args.buffer_policy, seed)
        times["buffer"] = time.time() - t
        hub.write_atomic(user_dir / "buffer.json", json.dumps(summary, indent=1))
        counts = {"history": summary["seen"], "buffered": summary["kept"]}
    kept = None
    if any(methods[m].synthetic for m in args.methods):
        records, synthesis = synthesize(task, pairs, cloud, judge, args, seed, user_dir, times)
        counts |= synthesis
        kept = [(r["syn_input"], r["syn_output"]) for r in records if r["kept"]]
    if counts:
        result["counts"] = counts
    run = Run(task, user, pairs, kept, device_model, tok, cloud, args, seed, user_dir, losses={})
    for method in args.methods:
        t = time.time()
        result["predictions"][method] = methods[method].run(run)
        times[method] = time.time() - t
    result["losses"], result["gold_nll"], result["times"] = run.losses, run.nll, times
    hub.write_atomic(user_dir / "result.json", json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------- the run
# not in the fingerprint: the evaluation-only options (--deploy adds rows), and where a shard runs (--device cuda:N)
UNCHECKED = ("out", "users", "methods", "deploy", "deploy_rounding", "deploy_tune_epochs", "bertscore_model",
             "bertscore_layer", "device")


def run(args, methods=METHODS) -> dict:
    """Every target user of args.task (this shard's: scale.py) through every method in
    args.methods, then the report once every target user is done."""
    task = data.get_task(args.task)
    out = Path(args.out or Path("runs") / task.name)
    shard = scale.shard_of(args.shard)
    common = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in scale.PER_PROCESS})  # all shards'
    args = argparse.Namespace(**vars(args) | {"device": scale.device_for(args.device, shard)})
    users = data.load_users(task.name, args.data)
    report.announce(task, args, users)
    targets, others = data.split_users(users, min(args.users, len(users)), args.user_selection, args.seed)
    mine = scale.share(targets, shard)
    print(f"  users: {len(targets)} targets ({args.user_selection}), {len(others)} others train M_base"
          + (f"; shard {shard.index}/{shard.count} runs {len(mine)} of them on {args.device}" if shard.count > 1 else ""))
    options.check_models(args, task, methods)
    labels, training = {m: methods[m].label for m in args.methods}, Training.from_args(args)
    synthetic = any(methods[m].synthetic for m in args.methods)
    if args.plan:
        return scale.plan(args, task, targets, others, args.methods, synthetic, training, ANSWER_TOKENS[task.name],
                          shard, {r["user_id"] for r in report.finished(out, targets, args.methods)[0]})
    fingerprint = {k: v for k, v in vars(common).items() if k not in UNCHECKED}
    for user in targets:  # before any work: a re-run with other settings would mix two runs' files
        settings = out / "users" / user.user_id / "settings.json"
        if settings.is_file() and {k: v for k, v in json.loads(settings.read_text()).items()
                                   if k not in UNCHECKED} != fingerprint:  # an older run's file held --device
            raise InputError(f"{settings}: written by a run with other settings; use another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    hub.write_atomic(out / "run.json", json.dumps(vars(common) | {"labels": labels}, indent=1))  # for `report`
    synthetic = synthetic and not args.cloud  # --cloud: the server's
    rewriting = args.history_pairs == "rewrite" and rewrite.needs_rewrites(task)
    judge = (augment.make_judge(args.judge, args.device)
             if rewriting or synthetic and args.synthesis_filter == "cdcda" else None)
    with scale.exclusive(hub.cache_dir() / "locks" / f"{task.name}.lock", "M_base"):  # trained once for all shards
        rewrites = (rewrite.neutral_rewrites(task, users, args.device_model, judge, options.thresholds(args),
                                             args.device) if rewriting else None)  # every method and M_base alike
        base = base_model(task, others, args.device_model, replace(training, epochs=args.base_epochs), args.seed,
                          args.device, rewrites)
    device_model, tok = t5.family(base).load(base, "float32", args.device)
    device_model = nf4.quantize_model(device_model, torch.bfloat16)  # sec. 5.1: NF4 weights, bf16 compute
    cloud = (None if not synthetic else (None, cloud_client.load_tokenizer(args.cloud_model)) if args.cloud_api
             else qwen2.load(args.cloud_model, "float32", args.device))
    seconds = []  # of each user trained here, for the ETA
    for i, user in enumerate(mine):
        user_dir = out / "users" / user.user_id
        user_dir.mkdir(parents=True, exist_ok=True)
        done = user_dir / "result.json"
        hub.write_atomic(user_dir / "settings.json", json.dumps(fingerprint))
        if done.is_file() and set(args.methods) <= set(json.loads(done.read_text())["predictions"]):
            print(f"user {i + 1}/{len(mine)} {user.user_id}: done earlier, reusing {done}")
            continue
        finished = len(report.finished(out, targets, args.methods)[0])
        print(f"user {i + 1}/{len(mine)} {user.user_id}: {len(user.profile)} history items, {len(user.queries)} "
              f"queries ({scale.progress(i, len(mine), len(seconds), sum(seconds), finished, len(targets))})")
        t = time.time()
        try:
            run_user(user, task, cloud, judge, device_model, tok, args, user_dir, methods, rewrites)
        except cloud_client.CloudUnavailable as e:
            raise InputError(f"{e}\nfinished users are kept under {out / 'users'}; run again to resume") from None
        seconds.append(time.time() - t)
    results, missing = report.finished(out, targets, args.methods)
    if missing:  # other shards' users: the last shard to finish writes the table
        print(f"shard {shard.index}/{shard.count}: its {len(mine)} users are done; {len(missing)} of {len(targets)} "
              f"are not yet ({', '.join(missing)}); `python cdcda.py report --out {out}` writes the table when they are")
        return {"shard": f"{shard.index}/{shard.count}", "missing": missing}
    rep = report.write(report.build(task, targets, results, common, labels), out)
    report.write_extras(task, targets, results, args.methods, out)  # issue 23: LaMP's files, Table 5
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
