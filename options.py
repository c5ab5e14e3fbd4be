"""The settings of a run, in plain names, and the command line that fills them.

`Settings` holds every option of `python cdcda.py` under the option's own name (`--eps-tdf` is
`settings.eps_tdf`), grouped by the step of the paper that reads it; its defaults are the paper's
where the paper gives one (sec. 5.1). The method's functions read the fields they need from it,
as nanoGPT's train.py reads its config. `parser` builds the command line (an extra adds its own
options to it), `check` refuses what cannot make sense before any work, each error one line
naming the option.
"""
import argparse
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

import data
import encoder
import qwen2

PAPER = {"cloud_model": "Qwen/Qwen2.5-3B-Instruct", "device_model": "Qwen/Qwen2.5-0.5B-Instruct",
         "judge": "nli:alisawuffles/roberta-large-wanli", "bertscore_model": "roberta-large"}
# the Hub's current name of a legacy id
PAPER_ALIASES = {"FacebookAI/roberta-large": "roberta-large"}
EMBEDDED = {"cloud_model": qwen2.EMBEDDED, "device_model": qwen2.EMBEDDED,
            "judge": f"embedding:{encoder.EMBEDDED}", "bertscore_model": encoder.EMBEDDED}
TORCH_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def option(default, help: str, **argparse_arguments):
    """A field of `Settings` that is also an option of the command line, defined once: its default,
    its help, argparse's other arguments (`flag` names it when it is not the field's name)."""
    return field(default=default, metadata={"help": help, **argparse_arguments})


@dataclass(frozen=True)
class Settings:
    """A run's settings, checked; each field is the option of the same name (`parser`)."""
    # what runs
    task: str = option("lamp7", "LaMP task", choices=list(data.TASKS))
    data: str | None = option(None, "a directory with DIR/<task>/*.json (real LaMP); default: the "
                              "embedded demo")
    users: int = option(3, "number of target users")
    user_selection: str = option("most-active", "targets: the longest histories (sec. 5.1) or a "
                                 "seeded random sample (appendix D)",
                                 choices=["most-active", "random"])
    methods: tuple[str, ...] = option(("base", "direct-ft", "cdcda"), "the table's rows, "
                                      "comma-separated")
    seed: int = option(0, "the run's seed (each user's is derived from it)")
    out: str = option("runs/lamp7", "output directory (default runs/<task>)")
    torch_device: str = option("cpu", "cpu, cuda or cuda:N", flag="--device")
    # the models of sec. 5.1: the embedded stand-ins by default, the paper's with --paper
    cloud_model: str = option(qwen2.EMBEDDED, "M_cloud: an embedded name, a hub id or a directory")
    cloud_dtype: str = option("float32", "the cloud LM's weights and compute (RESULTS.md: "
                              "bfloat16's speed and effect)", choices=["float32", "bfloat16"])
    device_model: str = option(qwen2.EMBEDDED, "M_device, from which M_base is trained")
    judge: str = option(f"embedding:{encoder.EMBEDDED}", "eq. 2's M: nli:MODEL, or embedding:MODEL "
                        "(a proxy)")
    bertscore_model: str = option(encoder.EMBEDDED, "BERTScore's backbone")
    bertscore_layer: int | None = option(None, "its hidden layer (default: bert_score's choice "
                                         "for known backbones, else the last)", type=int)
    # step 1: LaMP-7's history tweets as pairs (rewrite.py)
    history_pairs: str = option("rewrite", "LaMP-7's history tweets as training pairs: tweet -> "
                                "the same tweet, or the device model's neutral rewrite -> tweet "
                                "(rewrite.py), for every row and M_base alike",
                                choices=["identity", "rewrite"])
    # step 2, eq. 1: k samples per pair at temperature T
    k: int = option(5, "synthetic samples per pair (eq. 1)")
    temperature: float = option(0.7, "the cloud's sampling temperature in step 2 (sec. 5.1)")
    augment_decoding: str = option("structured", "step 2: sample the reply after 'Input: [' and "
                                   "parse it, or force its 'Input: [...], Response: [...]' shape "
                                   "(augment.py)", choices=["free", "structured"])
    label_decoding: str = option("constrained", "step 2, structured decoding, a task with labels "
                                 "(lamp2, lamp3): the response may only spell one of them, or is "
                                 "free (free augment decoding is never constrained; README)",
                                 choices=["constrained", "free"])
    # step 3, eq. 2-4: the filters' thresholds (the paper gives none; README)
    eps_scf: float | None = option(None, "eq. 2's threshold (default: the judge's own, filters.py)",
                                   type=float)
    eps_tdf: float = option(0.75, "eq. 3's ROUGE-L upper bound")
    eps_min_len: float = option(0.5, "eq. 4's lower length ratio")
    eps_max_len: float = option(2.0, "eq. 4's upper length ratio")
    # step 5, eq. 5-6: LoRA on M_base (the paper: r 16, alpha 8), and M_base's own training
    lora_r: int = option(16, "LoRA's rank r")
    lora_alpha: float = option(8.0, "LoRA's alpha (scaling alpha / r)")
    epochs: int = option(3, "personalization epochs")
    base_epochs: int = option(2, "M_base's epochs on the non-target users")
    lr: float = option(5e-4, "AdamW's learning rate (no weight decay)")
    batch_size: int = option(4, "training batch size")
    max_length: int = option(384, "tokens of prompt + response, in training and answering")
    # the device answers offline
    answer_temperature: float = option(0.7, "the device's sampling temperature when it answers "
                                       "(sec. 5.1)")
    # what an extra adds: its own options (by name), its lines in the report's list of what ran
    extra: dict = field(default_factory=dict)
    roles: dict = field(default_factory=dict)


# not in the settings check of a re-run: evaluation-only (`report` changes them), per process
UNCHECKED = ("out", "users", "methods", "bertscore_model", "bertscore_layer", "torch_device",
             "roles")
# the cloud service's options (cloud/server.py)
FILTER_OPTIONS = ("judge", "eps_scf", "eps_tdf", "eps_min_len", "eps_max_len", "torch_device")


def fingerprint(settings: Settings) -> dict:
    """What a re-run into the same --out must share with the run that made its files: the
    settings but UNCHECKED, an extra's own options included (a deployed row's rounding too)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()
            if k not in UNCHECKED}


def judge_source(spec: str) -> tuple[str, str]:
    """--judge's (kind, model): "nli:MODEL" (an NLI cross-encoder) or "embedding:MODEL" (a
    proxy)."""
    kind, _, source = spec.partition(":")
    if kind not in ("nli", "embedding") or not source:
        raise ValueError(f"--judge {spec!r}: use nli:MODEL (the paper: "
                         "nli:alisawuffles/roberta-large-wanli) or embedding:MODEL")
    return kind, source


def add_options(p: argparse.ArgumentParser, names=None) -> None:
    """The options of `Settings` (or those `names`) on a command line, as each field defines it;
    the models' default None, so that --paper can name the paper's."""
    for f in fields(Settings):
        if "help" in f.metadata and (names is None or f.name in names):
            meta = dict(f.metadata)
            flag = meta.pop("flag", "--" + f.name.replace("_", "-"))
            default = f.default
            if f.name == "methods":  # a comma-separated list on the command line
                default, meta["type"] = ",".join(default), str
            meta.setdefault("type", str if default is None else type(default))
            p.add_argument(flag, dest=f.name, default=None if f.name in PAPER else default, **meta)


def parser(methods) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="CDCDA-PLM end to end on LaMP (`python -m scale.report "
                                "--out DIR` scores a finished run again)")
    add_options(p)
    p.add_argument("--paper", action="store_true", help="the paper's models (downloaded first): "
                   + ", ".join(PAPER.values()))
    p.set_defaults(out=None)
    return p


# option -> (is it valid, the range the message states)
RANGES = {
    "users": (lambda v: v >= 1, "at least 1"), "k": (lambda v: v >= 1, "at least 1"),
    "temperature": (lambda v: 0 <= v <= 2, "between 0 (greedy) and 2"),
    "answer_temperature": (lambda v: 0 <= v <= 2, "between 0 (greedy) and 2"),
    "eps_scf": (lambda v: v is None or -1 <= v <= 1, "between -1 and 1 (a cosine or a "
                "probability)"),
    "eps_tdf": (lambda v: 0 <= v < 1, "in [0, 1): ROUGE-L is at most 1, so 1 or more filters "
                "nothing"),
    "eps_min_len": (lambda v: v >= 0, "at least 0"), "eps_max_len": (lambda v: v > 0, "above 0"),
    "epochs": (lambda v: v >= 1, "at least 1"), "base_epochs": (lambda v: v >= 1, "at least 1"),
    "lr": (lambda v: v > 0, "above 0"), "batch_size": (lambda v: v >= 1, "at least 1"),
    "max_length": (lambda v: v >= 64, "at least 64 tokens: the appendix-B template alone takes "
                   "about 40"),
    "lora_r": (lambda v: v >= 1, "at least 1"), "lora_alpha": (lambda v: v > 0, "above 0"),
    "seed": (lambda v: v >= 0, "at least 0"),
    "bertscore_layer": (lambda v: v is None or v >= 0, "at least 0 (0: the embeddings)"),
}


def device_problem(device: str) -> str | None:
    """What is wrong with --device on this machine (one line naming the option), or None."""
    if not TORCH_DEVICE.fullmatch(device):
        return f"--device {device!r}: use cpu, cuda or cuda:N"
    if device != "cpu" and not torch.cuda.is_available():
        return (f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU; use "
                "--device cpu")
    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count() if device != "cpu" else 0
    if device != "cpu" and index >= count:
        return (f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to "
                f"cuda:{count - 1}")
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
    check_ranges(p, args, {name: rule for name, rule in RANGES.items() if hasattr(args, name)})
    if args.eps_min_len > args.eps_max_len:
        p.error(f"--eps-min-len {args.eps_min_len} above --eps-max-len {args.eps_max_len}: "
                "eq. 4 would keep nothing")
    if problem := device_problem(args.torch_device):
        p.error(problem)
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out}: a file, not a directory; name a directory (new or a run's)")
    for role in PAPER:
        if getattr(args, role) is None:
            setattr(args, role, (PAPER if args.paper else EMBEDDED)[role])
    try:
        judge_source(args.judge)
    except ValueError as e:
        p.error(str(e))
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in methods]
    if unknown or not names:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(methods)}")
    given = vars(args) | {"methods": tuple(names), "out": args.out or str(Path("runs") / args.task),
                          "extra": {name: getattr(args, name) for name in extra}}
    return Settings(**{f.name: given[f.name] for f in fields(Settings) if f.name in given})
