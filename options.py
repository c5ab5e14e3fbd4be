"""The command line of cdcda.py, defined once: every option, its default, its valid range.

`parser()` builds cdcda.py's parser; experiments.py adds its own flags to the same parser, and
server.py takes `add_filter_options` (the judge and the thresholds of eq. 2-4), so a default
lives in one place. `check_args` checks every value and every combination that cannot make
sense before any work starts, and fills in the models: the embedded stand-ins by default, the
paper's with --paper; `check_models` finds every model a run will load before it trains anything.
"""
import argparse
import math
import re

import augment
import data
import encoder
import filters
import gridtune
import hub
import online
import qwen2
import rewrite
import scale
import smollm2
import t5
from errors import InputError

PAPER = {"cloud_model": "Qwen/Qwen2.5-3B-Instruct", "device_model": "Qwen/Qwen2.5-0.5B-Instruct",
         "judge": "nli:alisawuffles/roberta-large-wanli", "bertscore_model": "roberta-large"}
PAPER_ALIASES = {"FacebookAI/roberta-large": "roberta-large"}  # the Hub's current name of a legacy id
EMBEDDED = {"cloud_model": qwen2.EMBEDDED, "device_model": qwen2.EMBEDDED,
            "judge": f"embedding:{encoder.EMBEDDED}", "bertscore_model": encoder.EMBEDDED}
DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def add_filter_options(p: argparse.ArgumentParser) -> None:
    """Step 3's judge and thresholds (eq. 2-4), for the pipeline and the cloud server alike."""
    p.add_argument("--judge", default=None, help=f"nli:MODEL or embedding:MODEL (default {EMBEDDED['judge']})")
    p.add_argument("--eps-scf", type=float, default=None, help="eq. 2 threshold (default: the judge's)")
    p.add_argument("--eps-tdf", type=float, default=filters.EPS_TDF, help="eq. 3 ROUGE-L upper bound")
    p.add_argument("--eps-min-len", type=float, default=filters.EPS_MIN_LEN, help="eq. 4 lower length ratio")
    p.add_argument("--eps-max-len", type=float, default=filters.EPS_MAX_LEN, help="eq. 4 upper length ratio")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def parser(methods) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="CDCDA-PLM end to end on LaMP (`python cdcda.py report --out DIR` "
                                "scores a finished run again)")
    p.add_argument("--task", default="lamp7", choices=list(data.TASKS), help="LaMP task")
    p.add_argument("--users", type=int, default=3, help="number of target users")
    p.add_argument("--user-selection", default="most-active", choices=["most-active", "random"],
                   help="targets: the longest histories (sec. 5.1) or a seeded random sample (appendix D)")
    p.add_argument("--data", default=None, help="directory with DIR/<task>/*.json (real LaMP); default: embedded demo")
    p.add_argument("--out", default=None, help="output directory (default runs/<task>)")
    p.add_argument("--methods", default="base,direct-ft,cdcda", help=f"comma-separated subset of {','.join(methods)}")
    p.add_argument("--deploy", action="store_true", help="also answer with each fine-tuned method's model "
                   "deployed (deploy.py: LoRA merged, int4 groups of 32): adds METHOD-deployed after METHOD")
    p.add_argument("--deploy-rounding", choices=("nearest", "gptq"), default="nearest",
                   help="how the deployed int4 codes are chosen: each weight's nearest code, or GPTQ on the "
                   "inputs of the pairs the adapter was trained on (gptq.py; better untuned, worse tuned: RESULTS.md)")
    p.add_argument("--deploy-tune-epochs", type=int, default=gridtune.EPOCHS,
                   help="epochs of tuning the deployed int4 grids toward the personalized model on those inputs "
                   "(gridtune.py); 0: off")
    p.add_argument("--paper", action="store_true", help="the paper's models (needs them downloaded): " +
                   ", ".join(PAPER.values()))
    p.add_argument("--cloud-model", default=None, help=f"cloud LM (default {EMBEDDED['cloud_model']})")
    p.add_argument("--device-model", default=None, help=f"on-device LM (default {EMBEDDED['device_model']})")
    p.add_argument("--bertscore-model", default=None, help=f"BERTScore backbone (default {EMBEDDED['bertscore_model']})")
    p.add_argument("--bertscore-layer", type=int, default=None, help="its hidden layer (default: bert_score's "
                   "choice for known backbones, else the last)")
    p.add_argument("--cloud", default=None, metavar="URL", help="augment and select on a `python server.py` "
                   "at URL (bearer token from $CDCDA_TOKEN) instead of in process")
    p.add_argument("--cloud-api", default=None, metavar="URL", help="augment with --cloud-model on an "
                   "OpenAI-compatible server (vLLM; key from $OPENAI_API_KEY); the filters run here")
    p.add_argument("--k", type=int, default=5, help="synthetic samples per pair (eq. 1)")
    p.add_argument("--history-pairs", default="rewrite", choices=["identity", "rewrite"],
                   help="LaMP-7's history tweets as training pairs: tweet -> the same tweet, or the device "
                   "model's neutral rewrite -> tweet (rewrite.py), for every method and M_base alike")
    p.add_argument("--augment-decoding", default="structured", choices=["free", "structured"],
                   help="step 2: sample the reply after 'Input: [' and parse it, or force its "
                   "'Input: [...], Response: [...]' shape (in process, on server.py and over --cloud-api alike)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (sec. 5.1)")
    add_filter_options(p)
    p.add_argument("--buffer", type=int, default=0, metavar="N", help="keep only N history items, chosen "
                   "online on the device (Qin et al., DAC'24; default 0: the whole history)")
    p.add_argument("--buffer-policy", default="scores", choices=["scores", "random"],
                   help="how --buffer chooses: EOE + DSS + IDD, or reservoir sampling")
    p.add_argument("--synthesis-filter", default="cdcda", choices=["cdcda", "rouge1"],
                   help="step 3: the paper's SCF + TDF + LSF, or Qin et al.'s ROUGE-1 check")
    p.add_argument("--eps-rouge1", type=float, default=online.EPS_ROUGE1, help="--synthesis-filter rouge1's threshold")
    p.add_argument("--epochs", type=int, default=3, help="personalization epochs")
    p.add_argument("--base-epochs", type=int, default=2, help="M_base epochs on the non-target users")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=384, help="training sequence length (tokens)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard", default=None, metavar="I/N", help="run shard I of N of the target users into the "
                   "shared --out (default: from torchrun's RANK/WORLD_SIZE or Slurm's SLURM_PROCID/SLURM_NTASKS, "
                   "else all users); scale.py")
    p.add_argument("--plan", action="store_true", help="print the run's size and its time estimated from a short "
                   "calibration on --device, and train nothing")
    p.add_argument("--cloud-concurrency", type=int, default=4, help="--cloud-api: requests in flight at once")
    return p


# option -> (is it valid, the range the message states)
RANGES = {
    "users": (lambda v: v >= 1, "at least 1"), "k": (lambda v: v >= 1, "at least 1"),
    "temperature": (lambda v: 0 <= v <= 2, "between 0 (greedy) and 2"),
    "eps_scf": (lambda v: v is None or -1 <= v <= 1, "between -1 and 1 (a cosine or a probability)"),
    "eps_tdf": (lambda v: 0 <= v < 1, "in [0, 1): ROUGE-L is at most 1, so 1 or more filters nothing"),
    "eps_min_len": (lambda v: v >= 0, "at least 0"), "eps_max_len": (lambda v: v > 0, "above 0"),
    "buffer": (lambda v: v >= 0, "0 (the whole history) or a positive number of items"),
    "eps_rouge1": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "epochs": (lambda v: v >= 1, "at least 1"), "base_epochs": (lambda v: v >= 1, "at least 1"),
    "lr": (lambda v: v > 0, "above 0"), "batch_size": (lambda v: v >= 1, "at least 1"),
    "max_length": (lambda v: v >= 64, "at least 64 tokens: the appendix-B template alone takes about 40"),
    "lora_r": (lambda v: v >= 1, "at least 1"), "lora_alpha": (lambda v: v > 0, "above 0"),
    "seed": (lambda v: v >= 0, "at least 0"), "cloud_concurrency": (lambda v: v >= 1, "at least 1"),
    "bertscore_layer": (lambda v: v is None or v >= 0, "at least 0 (0: the embeddings)"),
    "deploy_tune_epochs": (lambda v: v >= 0, "at least 0 (0: no tuning)"),
}


def parse(argv, methods) -> argparse.Namespace:
    """cdcda.py's options from a command line, checked."""
    p = parser(methods)
    return check_args(p, p.parse_args(argv), methods)


def check_args(p: argparse.ArgumentParser, args, methods) -> argparse.Namespace:
    """Every value and combination checked, or one line naming the option (p.error exits);
    the model roles filled in (embedded stand-ins, or the paper's with --paper)."""
    for name, (ok, rule) in RANGES.items():
        value = getattr(args, name)
        if isinstance(value, float) and not math.isfinite(value) or not ok(value):
            p.error(f"--{name.replace('_', '-')} {value}: must be {rule}")
    if args.eps_min_len > args.eps_max_len:
        p.error(f"--eps-min-len {args.eps_min_len} above --eps-max-len {args.eps_max_len}: eq. 4 would keep nothing")
    try:
        scale.shard_of(args.shard)
    except InputError as e:
        p.error(str(e))
    if not DEVICE.fullmatch(args.device):
        p.error(f"--device {args.device!r}: use cpu, cuda or cuda:N")
    for role in PAPER:
        if getattr(args, role) is None:
            setattr(args, role, (PAPER if args.paper else EMBEDDED)[role])
    try:
        augment.judge_source(args.judge)
    except InputError as e:
        p.error(str(e))
    if isinstance(args.methods, str):
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in methods]
    if unknown or not args.methods:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(methods)}")
    if args.deploy:
        args.methods = list(dict.fromkeys(x for m in args.methods for x in (m, f"{m}-deployed")
                                          if x in methods))
    for i, m in enumerate(args.methods):  # a deployed model is made from its method's adapter
        if m.endswith("-deployed") and m.removesuffix("-deployed") not in args.methods[:i]:
            p.error(f"--methods: {m} needs {m.removesuffix('-deployed')} before it (its adapter)")
    if args.cloud and args.cloud_api:
        p.error("--cloud and --cloud-api: give one (--cloud: the server filters too)")
    if args.cloud and args.synthesis_filter != "cdcda":
        p.error("--synthesis-filter rouge1 and --cloud: the server applies the paper's filters; use --cloud-api")
    return args


def thresholds(args) -> dict:
    """The eq. 2-4 thresholds as `filters.select` takes them."""
    return {"eps_scf": args.eps_scf, "eps_tdf": args.eps_tdf,
            "eps_min_len": args.eps_min_len, "eps_max_len": args.eps_max_len}


def check_models(args, task: data.Task, methods) -> None:
    """Fail before the work: every model this run will load is found, and its config.json and
    tokenizer.json read, before M_base or any user is trained; else one line naming the option."""
    roles = {"--device-model": args.device_model}
    if any(methods[m].synthetic for m in args.methods) and not args.cloud:  # with --cloud the server has them
        roles["--cloud-model"] = args.cloud_model
        if args.synthesis_filter == "cdcda":
            roles["--judge"] = augment.judge_source(args.judge)[1]
    if args.history_pairs == "rewrite" and rewrite.needs_rewrites(task):
        roles["--judge"] = augment.judge_source(args.judge)[1]
    if task.metric == "generation":
        roles["--bertscore-model"] = args.bertscore_model
    for option, source in roles.items():
        try:
            directory = (smollm2.embedded_dir() if source == qwen2.EMBEDDED else
                         encoder.embedded_dir() if source == encoder.EMBEDDED else hub.snapshot(source))
            hub.load_config(directory)
            if not (directory / "tokenizer.json").is_file():
                raise InputError(f"{directory / 'tokenizer.json'}: missing")
        except InputError as e:
            raise InputError(f"{option} {source}: {e}") from None
    decoder_only = {"speculative", "rkd-ft"} | {m for m in args.methods if m.startswith(("scores-", "random-"))
                                                 or m.endswith("-deployed")}
    if t5.family(args.device_model) is t5 and (args.buffer or decoder_only & set(args.methods)):
        raise InputError(f"--device-model {args.device_model} is a T5: --buffer, buffers, speculative, rkd-ft, "
                         "--deploy need a decoder")
