"""The command line of cdcda.py, defined once: every option, its default, its valid range.

`parser()` builds it (an extra adds its own options to it; the cloud service takes
`add_filter_options`), `check` refuses what cannot make sense before any work, fills in the
models (the embedded stand-ins, or the paper's with --paper) and returns the settings as frozen
dataclasses whose field names are the options' (`Settings`); `check_models` finds every model a
run will load before it trains anything.
"""
import argparse
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import torch

import augment
import data
import encoder
import filters
import hub
import qwen2
import rewrite
import smollm2
import train
from errors import InputError

PAPER = {"cloud_model": "Qwen/Qwen2.5-3B-Instruct", "device_model": "Qwen/Qwen2.5-0.5B-Instruct",
         "judge": "nli:alisawuffles/roberta-large-wanli", "bertscore_model": "roberta-large"}
PAPER_ALIASES = {"FacebookAI/roberta-large": "roberta-large"}  # the Hub's current name of a legacy id
EMBEDDED = {"cloud_model": qwen2.EMBEDDED, "device_model": qwen2.EMBEDDED,
            "judge": f"embedding:{encoder.EMBEDDED}", "bertscore_model": encoder.EMBEDDED}
DEVICE = re.compile(r"cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class Models:
    """Which model fills each role (sec. 5.1); a hub id, a local directory or an embedded name."""
    cloud_model: str
    device_model: str
    judge: str  # nli:MODEL (eq. 2 as the paper) or embedding:MODEL (a proxy)
    bertscore_model: str
    bertscore_layer: int | None = None  # None: bert_score's choice for the backbone
    cloud_dtype: str = "float32"  # the cloud LM's weights and compute


@dataclass(frozen=True)
class Settings:
    """A run's settings, checked. Nested settings are built from the same flat options (`build`)."""
    task: str
    data: str | None  # a directory of LaMP files; None: the embedded demo
    users: int  # target users
    user_selection: str
    seed: int
    methods: tuple[str, ...]
    history_pairs: str
    base_epochs: int
    models: Models
    augmentation: augment.Augmentation
    training: train.Training
    out: str
    device: str
    extra: dict = field(default_factory=dict)  # an extra's own options (online/, deployment/), by name
    roles: dict = field(default_factory=dict)  # what an extra adds to the report's list of what ran


# not in the settings check of a re-run: evaluation-only (`report` changes them), per process
UNCHECKED = ("out", "users", "methods", "bertscore_model", "bertscore_layer", "device", "roles")


def build(cls, values: dict):
    """An instance of the settings dataclass `cls` from flat option values: a field that is
    itself a dataclass is built from the same values (its field names are options too)."""
    return cls(**{f.name: build(f.type, values) if is_dataclass(f.type) else values[f.name]
                  for f in fields(cls) if is_dataclass(f.type) or f.name in values})


def flat(settings) -> dict:
    """The settings as flat option values (run.json; the inverse of `build`)."""
    out = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        out |= flat(value) if is_dataclass(value) else {f.name: list(value) if isinstance(value, tuple) else value}
    return out


def fingerprint(settings: Settings) -> dict:
    """What a re-run into the same --out must share with the run that made its files: the
    settings but UNCHECKED, an extra's own options included (a deployed row's rounding too)."""
    return {k: v for k, v in flat(settings).items() if k not in UNCHECKED}


def add_filter_options(p: argparse.ArgumentParser) -> None:
    """Step 3's judge and thresholds (eq. 2-4), for the pipeline and the cloud service alike."""
    p.add_argument("--judge", default=None, help=f"nli:MODEL or embedding:MODEL (default {EMBEDDED['judge']})")
    p.add_argument("--eps-scf", type=float, default=None, help="eq. 2 threshold (default: the judge's)")
    p.add_argument("--eps-tdf", type=float, default=filters.EPS_TDF, help="eq. 3 ROUGE-L upper bound")
    p.add_argument("--eps-min-len", type=float, default=filters.EPS_MIN_LEN, help="eq. 4 lower length ratio")
    p.add_argument("--eps-max-len", type=float, default=filters.EPS_MAX_LEN, help="eq. 4 upper length ratio")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def parser(methods) -> argparse.ArgumentParser:
    training, augmentation = train.Training(), augment.Augmentation()
    p = argparse.ArgumentParser(description="CDCDA-PLM end to end on LaMP (`python cdcda.py report --out DIR` "
                                "scores a finished run again)")
    p.add_argument("--task", default="lamp7", choices=list(data.TASKS), help="LaMP task")
    p.add_argument("--users", type=int, default=3, help="number of target users")
    p.add_argument("--user-selection", default="most-active", choices=["most-active", "random"],
                   help="targets: the longest histories (sec. 5.1) or a seeded random sample (appendix D)")
    p.add_argument("--data", default=None, help="directory with DIR/<task>/*.json (real LaMP); default: embedded demo")
    p.add_argument("--out", default=None, help="output directory (default runs/<task>)")
    p.add_argument("--methods", default="base,direct-ft,cdcda", help=f"comma-separated subset of {','.join(methods)}")
    p.add_argument("--paper", action="store_true", help="the paper's models (needs them downloaded): " +
                   ", ".join(PAPER.values()))
    p.add_argument("--cloud-model", default=None, help=f"cloud LM (default {EMBEDDED['cloud_model']})")
    p.add_argument("--cloud-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the cloud LM's weights and compute (RESULTS.md: bfloat16's speed and effect)")
    p.add_argument("--device-model", default=None, help=f"on-device LM (default {EMBEDDED['device_model']})")
    p.add_argument("--bertscore-model", default=None, help=f"BERTScore backbone (default {EMBEDDED['bertscore_model']})")
    p.add_argument("--bertscore-layer", type=int, default=None, help="its hidden layer (default: bert_score's "
                   "choice for known backbones, else the last)")
    p.add_argument("--k", type=int, default=augmentation.k, help="synthetic samples per pair (eq. 1)")
    p.add_argument("--history-pairs", default="rewrite", choices=["identity", "rewrite"],
                   help="LaMP-7's history tweets as training pairs: tweet -> the same tweet, or the device "
                   "model's neutral rewrite -> tweet (rewrite.py), for every method and M_base alike")
    p.add_argument("--augment-decoding", default=augmentation.augment_decoding, choices=["free", "structured"],
                   help="step 2: sample the reply after 'Input: [' and parse it, or force its "
                   "'Input: [...], Response: [...]' shape (in process, on the cloud service and over --cloud-api)")
    p.add_argument("--temperature", type=float, default=augmentation.temperature,
                   help="sampling temperature (sec. 5.1)")
    add_filter_options(p)
    p.add_argument("--epochs", type=int, default=training.epochs, help="personalization epochs")
    p.add_argument("--base-epochs", type=int, default=2, help="M_base epochs on the non-target users")
    p.add_argument("--lr", type=float, default=training.lr, help="AdamW learning rate")
    p.add_argument("--batch-size", type=int, default=training.batch_size)
    p.add_argument("--max-length", type=int, default=training.max_length, help="training sequence length (tokens)")
    p.add_argument("--lora-r", type=int, default=training.lora_r)
    p.add_argument("--lora-alpha", type=float, default=training.lora_alpha)
    p.add_argument("--seed", type=int, default=0)
    return p


# option -> (is it valid, the range the message states)
RANGES = {
    "users": (lambda v: v >= 1, "at least 1"), "k": (lambda v: v >= 1, "at least 1"),
    "temperature": (lambda v: 0 <= v <= 2, "between 0 (greedy) and 2"),
    "eps_scf": (lambda v: v is None or -1 <= v <= 1, "between -1 and 1 (a cosine or a probability)"),
    "eps_tdf": (lambda v: 0 <= v < 1, "in [0, 1): ROUGE-L is at most 1, so 1 or more filters nothing"),
    "eps_min_len": (lambda v: v >= 0, "at least 0"), "eps_max_len": (lambda v: v > 0, "above 0"),
    "epochs": (lambda v: v >= 1, "at least 1"), "base_epochs": (lambda v: v >= 1, "at least 1"),
    "lr": (lambda v: v > 0, "above 0"), "batch_size": (lambda v: v >= 1, "at least 1"),
    "max_length": (lambda v: v >= 64, "at least 64 tokens: the appendix-B template alone takes about 40"),
    "lora_r": (lambda v: v >= 1, "at least 1"), "lora_alpha": (lambda v: v > 0, "above 0"),
    "seed": (lambda v: v >= 0, "at least 0"),
    "bertscore_layer": (lambda v: v is None or v >= 0, "at least 0 (0: the embeddings)"),
}


def device_problem(device: str) -> str | None:
    """What is wrong with --device on this machine (one line naming the option), or None."""
    if not DEVICE.fullmatch(device):
        return f"--device {device!r}: use cpu, cuda or cuda:N"
    if device != "cpu" and not torch.cuda.is_available():
        return f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu"
    index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count() if device != "cpu" else 0
    if device != "cpu" and index >= count:
        return f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
    return None


def parse(argv, methods) -> Settings:
    """cdcda.py's options from a command line, checked."""
    p = parser(methods)
    return check(p, p.parse_args(argv), methods)


def check_ranges(p: argparse.ArgumentParser, args, ranges: dict) -> None:
    """Each option named in `ranges` within its range, or one line naming it (p.error exits)."""
    for name, (ok, rule) in ranges.items():
        value = getattr(args, name)
        if isinstance(value, float) and not math.isfinite(value) or not ok(value):
            p.error(f"--{name.replace('_', '-')} {value}: must be {rule}")


def check(p: argparse.ArgumentParser, args, methods, extra: tuple[str, ...] = ()) -> Settings:
    """Every value and combination checked, or one line naming the option (p.error exits); the
    models filled in (the stand-ins, or the paper's with --paper); `extra`: an extra's options."""
    check_ranges(p, args, RANGES)
    if args.eps_min_len > args.eps_max_len:
        p.error(f"--eps-min-len {args.eps_min_len} above --eps-max-len {args.eps_max_len}: eq. 4 would keep nothing")
    if problem := device_problem(args.device):
        p.error(problem)
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out}: a file, not a directory; name a directory (new or a run's)")
    for role in PAPER:
        if getattr(args, role) is None:
            setattr(args, role, (PAPER if args.paper else EMBEDDED)[role])
    try:
        augment.judge_source(args.judge)
    except InputError as e:
        p.error(str(e))
    names = [m.strip() for m in args.methods.split(",") if m.strip()] if isinstance(args.methods, str) else args.methods
    unknown = [m for m in names if m not in methods]
    if unknown or not names:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(methods)}")
    values = vars(args) | {"methods": tuple(names), "out": args.out or str(Path("runs") / args.task),
                           "extra": {name: getattr(args, name) for name in extra}}
    return build(Settings, values)


def check_models(settings: Settings, task: data.Task, methods, family=qwen2, cloud_here: bool = True) -> None:
    """Before any work: every model the run loads is found and its config.json and tokenizer.json
    read, else one line naming the option; the device model must be one `family` loads (a T5 runs
    from experiments/). `cloud_here` False: steps 2-3 run elsewhere, on the cloud's own models."""
    models = settings.models
    roles = {"--device-model": models.device_model}
    if any(methods[m].synthetic for m in settings.methods) and cloud_here:
        roles["--cloud-model"] = models.cloud_model
        roles["--judge"] = augment.judge_source(models.judge)[1]
    if settings.history_pairs == "rewrite" and rewrite.needs_rewrites(task):
        roles["--judge"] = augment.judge_source(models.judge)[1]
    if task.metric == "generation":
        roles["--bertscore-model"] = models.bertscore_model
    for option, source in roles.items():
        try:
            directory = (smollm2.embedded_dir() if source == qwen2.EMBEDDED else
                         encoder.embedded_dir() if source == encoder.EMBEDDED else hub.snapshot(source))
            hub.load_config(directory)
            if option == "--device-model":
                family.Config.from_json(directory)
            if not (directory / "tokenizer.json").is_file():
                raise InputError(f"{directory / 'tokenizer.json'}: missing")
        except InputError as e:
            raise InputError(f"{option} {source}: {e}") from None
