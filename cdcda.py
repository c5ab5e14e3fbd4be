"""CDCDA-PLM, one user on one screen: `python cdcda.py --task lamp7`.

The method of "Towards On-Device Personalization: Cloud-device Collaborative Data Augmentation for
Efficient On-device Language Model" (arXiv 2508.21313, sec. 4), in five steps:

  1. upload       the user's history D_u goes to the cloud as (x, y) pairs
  2. augment      the cloud LM writes k pairs like each one, at T = 0.7 (eq. 1)      augment.py
  3. select       SCF, TDF and LSF keep D_filtered (eq. 2-4)                        filters.py
  4. download     D_u and D_filtered come back to the device
  5. personalize  LoRA on the 4-bit M_base, cross-entropy on the responses (eq. 5, 6)  train.py

then the device answers the user's queries offline (`answer`). `cdcda_plm` is the method for one
user: those calls, in that order. The table's other rows (`METHODS`) are built from the same steps;
so are the extras' (README). M_base, the task's base model, is trained once on the users who are
not targets (`train_base`); `prepare` makes or loads what every user shares. Everything around
that (the options, resume, the settings check, progress, the report) is the harness, runner.py.
"""
import copy
import hashlib
import json
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn

import data
import filters
import generate
import hub
import lora
import nf4
import options
import qwen2
import rewrite
import runner
import train
from augment import CloudLM, augment
from errors import InputError
from filters import select

ANSWER_TOKENS = {"lamp1": 8, "lamp2": 12, "lamp3": 4, "lamp4": 32, "lamp5": 48, "lamp7": 48}


class Family(NamedTuple):
    """How the device model's architecture is loaded, saved, asked and trained: qwen2.py's decoder,
    `generate.chat` and `train.response_loss` (None); Table 4's T5 brings its own
    (experiments/t5.py)."""
    load: Callable = qwen2.load
    save: Callable = qwen2.save_pretrained
    config: Callable = qwen2.Config.from_json
    chat: Callable | None = None
    loss: Callable | None = None


class Device(NamedTuple):
    """The device's side: M_base in NF4 (bf16 compute), its tokenizer, its family, and where M_base
    is stored (an adapter names it as its base model)."""
    model: nn.Module
    tokenizer: qwen2.Tokenizer
    family: Family
    base: Path


class Shared(NamedTuple):
    """What every user of a run shares (`prepare`)."""
    task: data.Task
    settings: options.Settings
    device: Device
    cloud: CloudLM | None  # M_cloud; None when no row asks it
    judge: object  # eq. 2's M (filters.make_judge); None when nothing is selected
    rewrites: dict | None  # LaMP-7's history rewrites (rewrite.py); None: the items' own inputs


class Answers(NamedTuple):
    """A row's answers for one user, and what the report reads of how they came about."""
    texts: list[str]  # one per query
    # the model that answered: its gold NLL is reported, its adapter saved if it has one
    model: nn.Module | None = None
    losses: list[float] | None = None  # step 5's loss per epoch
    selection: filters.Selection | None = None  # step 3's verdicts


# ---------------------------------------------------------------- CDCDA-PLM for one user
def cdcda_plm(s: Shared, user: data.User, seed: int) -> Answers:
    """CDCDA-PLM for one user (sec. 4): the five steps in order, then the device answers offline."""
    pairs = upload(s.task, user, s.rewrites)                          # 1: D_u as (x, y)
    candidates = augment(s.cloud, pairs, s.settings, seed, s.task)    # 2: k per pair (eq. 1)
    selection = select(pairs, candidates, s.judge, s.settings)       # 3: SCF, TDF, LSF (eq. 2-4)
    training_data = download(pairs, selection.kept)                   # 4: D_u + D_filtered
    model, losses = personalize(s.device, s.task, training_data, s.settings, seed)  # 5 (eq. 5, 6)
    texts = answer(s.device, model, s.task, user.queries, s.settings, seed)  # offline
    return Answers(texts, model, losses, selection)


# ---------------------------------------------------------------- the steps (sec. 4)
def upload(task: data.Task, user: data.User, rewrites: dict | None = None) -> list[tuple[str, str]]:
    """Step 1: the user's history D_u as (x, y) pairs, x the user's content without the task's
    instruction (`data.Task.pair`); LaMP-7 with `rewrites`: x the device's rewrite of the tweet.
    A user none of whose tweets has a rewrite keeps the identity pairs."""
    pairs = [p for p in (rewrite.history_pair(task, item, rewrites) for item in user.profile) if p]
    return pairs or [task.pair(item) for item in user.profile]


# step 2 is `augment.augment` (augment.py); step 3 is `filters.select` (filters.py)


def download(pairs, kept) -> list[tuple[str, str]]:
    """Step 4: D_u together with D_filtered, as the device trains on them."""
    return list(pairs) + list(kept)


def personalize(device: Device, task: data.Task, pairs, settings: options.Settings, seed: int):
    """Step 5 (eq. 5, 6): a fresh LoRA (r = 16, alpha = 8, every linear layer of the blocks) on a
    copy of M_base, trained with cross-entropy on the responses. Returns (model, loss per epoch).
    The adapter's A is drawn from a generator of its own (`seed`), whatever ran before."""
    model = lora.add_lora(copy.deepcopy(device.model), r=settings.lora_r, alpha=settings.lora_alpha,
                          seed=seed)
    losses = train.finetune(model, device.tokenizer, examples(task, pairs), settings, seed,
                            loss=device.family.loss)
    return model.eval(), losses


def examples(task: data.Task, pairs) -> list[tuple[list[dict], str]]:
    """(messages, y) for each (x, y) pair: x in the appendix-B prompt, the instruction put back."""
    return [(task.messages(task.training_input(x)), y) for x, y in pairs]


def answer(device: Device, model: nn.Module, task: data.Task, queries, settings: options.Settings,
           seed: int) -> list[str]:
    """The device answers the queries offline: the appendix-B prompt, a long one shortened as in
    training (`train.fit_messages`), sampled at --answer-temperature, reply i from its own seed."""
    budget = max(settings.max_length - ANSWER_TOKENS[task.name], settings.max_length // 2)
    prompts = [train.fit_messages(device.tokenizer, task.messages(q.input), budget)
               for q in queries]
    chat = device.family.chat or generate.chat
    return chat(model, device.tokenizer, prompts, max_new_tokens=ANSWER_TOKENS[task.name],
                temperature=settings.answer_temperature, seed=seed, desc="answer")


# ---------------------------------------------------------------- the table's other rows
def m_base(s: Shared, user: data.User, seed: int) -> Answers:
    """M_base answers as it is: on the device, not personalized (Table 1's M_device)."""
    model = s.device.model
    return Answers(answer(s.device, model, s.task, user.queries, s.settings, seed), model)


def direct_ft(s: Shared, user: data.User, seed: int) -> Answers:
    """Direct-FT: step 5 on D_u alone, no cloud (Table 1)."""
    pairs = upload(s.task, user, s.rewrites)
    model, losses = personalize(s.device, s.task, pairs, s.settings, seed)
    return Answers(answer(s.device, model, s.task, user.queries, s.settings, seed), model, losses)


class Method(NamedTuple):
    label: str  # the row's name in the report
    answers: Callable[[Shared, data.User, int], Answers]  # one user's answers (a seed per user)
    cloud: bool  # whether it asks M_cloud (steps 2-3), so `prepare` loads it


METHODS = {
    "base": Method("M_device (M_base, non-personalized)", m_base, False),
    "direct-ft": Method("Direct-FT", direct_ft, False),
    "cdcda": Method("CDCDA-PLM", cdcda_plm, True),
}


# ---------------------------------------------------------------- M_base and what users share
def base_examples(task: data.Task, others, rewrites: dict | None) -> list[tuple[list[dict], str]]:
    """M_base's training set (sec. 4: "fine-tune a general LM on a public, standard dataset"): the
    non-target users' history pairs, as step 1 makes them, and their queries with golds."""
    return (examples(task, [p for u in others for p in upload(task, u, rewrites)])
            + [(task.messages(q.input), q.gold) for u in others for q in u.queries])


def train_base(task: data.Task, others, settings: options.Settings, rewrites, family: Family):
    """M_base: the device model LoRA-tuned on `base_examples`, merged ("on the cloud" in the paper,
    so at full precision). Returns (model, tokenizer)."""
    model, tok = family.load(settings.device_model, "float32", settings.torch_device)
    lora.add_lora(model, r=settings.lora_r, alpha=settings.lora_alpha, seed=settings.seed)
    training = base_examples(task, others, rewrites)
    print(f"M_base: training on {len(training)} pairs of {len(others)} non-target users")
    train.finetune(model, tok, training, replace(settings, epochs=settings.base_epochs),
                   seed=settings.seed, desc="M_base", loss=family.loss)
    return lora.merge(model), tok


def prepare(settings: options.Settings, users, others, methods, family: Family = Family(),
            cloud: CloudLM | None = None) -> Shared:
    """What every user shares, made or loaded once: LaMP-7's history rewrites and M_base (made once
    and cached), M_base in NF4 on the device, the cloud LM (or `cloud`, an extra's), the judge."""
    task, where = data.get_task(settings.task), settings.torch_device
    asks_cloud = any(methods[m].cloud for m in settings.methods)
    rewriting = settings.history_pairs == "rewrite" and rewrite.needs_rewrites(task)
    judge = filters.make_judge(settings.judge, where) if rewriting or asks_cloud else None
    rewrites = history_rewrites(task, users, settings, judge, family) if rewriting else None
    base = m_base_dir(task, others, settings, rewrites, family)
    model, tok = family.load(str(base), "float32", where)
    device = Device(nf4.quantize_model(model, torch.bfloat16), tok, family, base)
    if asks_cloud and cloud is None:
        model, tok = qwen2.load(settings.cloud_model, settings.cloud_dtype, where)
        cloud = CloudLM(model, tok, generate.chat)
    return Shared(task, settings, device, cloud if asks_cloud else None, judge, rewrites)


def history_rewrites(task: data.Task, users, settings: options.Settings, judge, family: Family):
    """{tweet: its rewrite} for every history tweet (rewrite.py), by the pretrained device model;
    made once and cached, keyed by the model, the prompt, the judge, the thresholds, the texts."""
    texts = rewrite.history_texts(task, users)

    def make(tmp):
        model, tok = family.load(settings.device_model, "float32", settings.torch_device)
        chat = family.chat or generate.chat
        made = rewrite.rewrite_all(model, tok, texts, judge, settings, chat=chat)
        tmp.write_text(json.dumps(made, indent=1))
    path = rewrites_path(task, texts, settings, judge.name)
    return json.loads(hub.made_once(path, "history rewrites", make).read_text())


def rewrites_path(task: data.Task, texts: list[str], settings: options.Settings,
                  judge_name: str) -> Path:
    """Where the history rewrites of `texts` are cached."""
    thresholds = [settings.eps_scf, settings.eps_tdf, settings.eps_min_len, settings.eps_max_len]
    key = digest([settings.device_model, rewrite.REWRITE_PROMPT, rewrite.SAMPLES, judge_name,
                  thresholds, texts])
    return hub.cache_dir() / "rewrites" / f"{task.name}-{key}.json"


def m_base_dir(task: data.Task, others, settings: options.Settings, rewrites,
               family: Family) -> Path:
    """Where M_base is stored: trained once (`train_base`) and cached, keyed by the device model,
    its training set and every setting that changes it."""
    training = base_examples(task, others, rewrites)
    if not training:
        raise InputError(f"{task.name}: no non-target users to train M_base on; lower --users")
    key = digest([settings.device_model, training, settings.base_epochs, settings.lr,
                  settings.lora_r, settings.lora_alpha, settings.batch_size, settings.max_length,
                  settings.seed])
    slug = re.sub(r"[^\w.-]", "_", settings.device_model)

    def make(tmp):
        family.save(*train_base(task, others, settings, rewrites, family), tmp)
    return hub.made_once(hub.cache_dir() / "base" / f"{task.name}-{slug}-{key}", "M_base", make)


def digest(value) -> str:
    """A short key for a cache: the hash of the JSON of everything that makes the cached thing."""
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def main(argv=None) -> dict:
    """`python cdcda.py [options]`: the run of every target user through every row (runner.py)."""
    return runner.main(sys.argv[1:] if argv is None else argv, METHODS, prepare, Family())


if __name__ == "__main__":
    try:
        main()
    # bad files, records, options: the message says which; a bug shows its traceback
    except InputError as e:
        sys.exit(f"cdcda: error: {e}")
