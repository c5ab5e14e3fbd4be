"""CDCDA-PLM end to end: `python cdcda.py --task lamp7`.

The paper's five steps (sec. 4), each a function named after it, run for every target user:
  1. upload       the user's history D_u as (input, response) pairs
  2. augment      the cloud LM writes k similar pairs per pair (eq. 1), T = 0.7
  3. select       SCF, TDF, LSF (eq. 2-4) keep D_filtered
  4. download     D_u + D_filtered come back to the device
  5. personalize  LoRA on the NF4 task base model M_base, cross-entropy (eq. 5, 6)
then the device answers the user's queries offline and `metrics.evaluate` scores them.
`--buffer N` puts the second system (Qin et al., DAC'24, `online.py`) in front of step 1: the
device keeps only N items of the history, and only those are uploaded and trained on;
`--synthesis-filter rouge1` swaps step 3 for that paper's ROUGE-1 check.
M_base (sec. 4, "On-device LM personalization fine-tuning") is trained once per task on the
users who are not targets, merged and cached. Defaults are the embedded, offline stand-ins
(SmolLM2-135M-Instruct as cloud and device, MiniLM as judge); `--paper` names the paper's.
"""
import argparse
import copy
import hashlib
import json
import math
import os
import re
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

import cloud as cloud_service
import data
import encoder
import filters
import hub
import lora
import metrics
import nf4
import online
import qwen2

PAPER = {"cloud_model": "Qwen/Qwen2.5-3B-Instruct", "device_model": "Qwen/Qwen2.5-0.5B-Instruct",
         "judge": "nli:alisawuffles/roberta-large-wanli", "bertscore_model": "roberta-large"}
EMBEDDED = {"cloud_model": qwen2.EMBEDDED, "device_model": qwen2.EMBEDDED,
            "judge": f"embedding:{encoder.EMBEDDED}", "bertscore_model": encoder.EMBEDDED}
AUGMENT_PROMPT = ("Generate an Input and Response pairs semantically similar to the following "
                  "example, no need to explain. Input: [{x}], Response: [{y}].")  # sec. 4, verbatim
REPLY_PREFIX = "Input: ["  # the start of the cloud's reply (see `augment`)
AUGMENT_SLACK = 32  # augmentation tokens beyond ceil(eps_max_len * longest): the closing "].", tokenization at the edges
AUGMENT_BATCH = 32  # generations per batch: batched decoding reads the weights once per step for all rows
ANSWER_TOKENS = {"lamp1": 8, "lamp2": 12, "lamp3": 4, "lamp4": 32, "lamp5": 48, "lamp7": 48}


def instruction(task: data.Task) -> str:
    """The task's instruction text, the part of a training input before the profile content."""
    return task.pair_input.split("{", 1)[0]


# ---------------------------------------------------------------- the five steps (sec. 4)
def upload(task: data.Task, user: data.User) -> list[tuple[str, str]]:
    """Step 1: the user's history D_u as (x, y) pairs; x is the content the instruction wraps
    (the tweet, the article), so augmentation and the filters see the user's text, not the
    task instruction every pair shares."""
    prefix = instruction(task)
    return [(x[len(prefix):], y) for x, y in map(task.pair, user.profile)]


_INPUT = re.compile(r"\**\binput\s*\**\s*:\s*\**", re.I)  # "Input:", "**Input:**", "input :"
_RESPONSE = re.compile(r"[,;]?\s*\**\bresponse\s*\**\s*:\s*\**", re.I)
_COMMENTARY = re.compile(r"\**\b(explanation|note|reason|reasoning)\s*\**\s*:", re.I)
_QUOTES = '"\u201c\u201d\''


def _bracketed(s: str) -> str | None:
    """The text inside the "[...]" that `s` starts with, nested brackets kept; None if it never closes."""
    depth = 0
    for i, ch in enumerate(s):
        depth += (ch == "[") - (ch == "]")
        if depth == 0:
            return s[1:i]
    return None


def _clean(s: str) -> str:
    """Drop markdown bold, a trailing comma/period/semicolon, surrounding quotes and whitespace."""
    s = s.strip().strip("*").strip().rstrip(",.;").strip()
    return s[1:-1].strip() if len(s) > 1 and s[0] in _QUOTES and s[-1] in _QUOTES else s.strip(_QUOTES).strip()


def parse_pair(text: str) -> tuple[str, str] | None:
    """The first "Input: ..., Response: ..." pair in a generation, or None when there is none.

    The input runs from "Input:" to "Response:" ("[...]" around it dropped, nested brackets
    kept). The response ends at the first of: the bracket that closes its "[" (an unclosed one
    is a cut-off generation: None), a second "Input:" anywhere, the end of its line when it is
    not bracketed, or commentary ("Explanation:", "Note:", "Reason:"). Markdown bold, quotes
    and a trailing comma/period are dropped from both parts; either part empty gives None.
    """
    m = _INPUT.search(text)
    r = _RESPONSE.search(text, m.end()) if m else None
    if r is None:
        return None
    x, rest = _clean(text[m.end():r.start()]), text[r.end():]
    x = _bracketed(x) if x.startswith("[") and _bracketed(x) is not None else x.strip("[]")
    for stop in (_INPUT.search(rest), _COMMENTARY.search(rest)):
        rest = rest[:stop.start()] if stop else rest
    rest = rest.strip()
    if rest.startswith("["):
        y = _bracketed(rest)
        if y is None:
            return None
    else:
        y = rest.split("\n", 1)[0]
    x, y = _clean(x), _clean(y)
    return (x, y) if x and y else None


def augment(cloud, cloud_tok, pairs, k: int, temperature: float, seed: int, chat=None,
            task: data.Task | None = None, max_len_ratio: float = filters.EPS_MAX_LEN):
    """Step 2 (eq. 1): k samples per pair from the cloud LM with the paper's prompt.

    The cloud's reply is started with REPLY_PREFIX ("Input: ["): the 135M stand-in answers
    the bare prompt mostly in prose, which parses as nothing. Generation stops at
    ceil(max_len_ratio * longest) + AUGMENT_SLACK tokens, `longest` the tokens of the longest
    example's "Input: [x], Response: [y]": a candidate as long as eq. 4's upper bound
    (`max_len_ratio`, pass --eps-max-len) allows is never cut off.
    Returns (originals, candidates, n_unparsable, n_off_label): candidates[i] was generated
    from originals[i]; generations without a parsable pair are dropped and counted in
    n_unparsable, parsed ones whose response `task.valid_output` rejects (a lamp2 tag or lamp3
    score outside the task's labels) are dropped and counted in n_off_label (0 without `task`)."""
    prompts = [[{"role": "user", "content": AUGMENT_PROMPT.format(x=x, y=y)}] for x, y in pairs for _ in range(k)]
    longest = max(len(cloud_tok.encode(f"Input: [{x}], Response: [{y}]")) for x, y in pairs)
    budget = math.ceil(max_len_ratio * longest) + AUGMENT_SLACK
    texts = (chat or qwen2.chat)(cloud, cloud_tok, prompts, max_new_tokens=budget,
                                 temperature=temperature, seed=seed, batch_size=AUGMENT_BATCH,
                                 desc="augment (cloud)", reply_prefix=REPLY_PREFIX)
    originals, candidates, unparsable, off_label = [], [], 0, 0
    for i, text in enumerate(texts):
        pair = parse_pair(text)
        if pair is None:
            unparsable += 1
        elif task is not None and not task.valid_output(pair[1]):
            off_label += 1
        else:
            originals.append(pairs[i // k])
            candidates.append(pair)
    return originals, candidates, unparsable, off_label


def select(originals, candidates, judge, thresholds: dict) -> filters.Selection:
    """Step 3 (eq. 2-4): keep the candidates that pass SCF, TDF and LSF."""
    return filters.select(originals, candidates, judge, **thresholds)


def buffer_history(pairs, device_model, tokenizer, capacity: int, policy: str, seed: int):
    """--buffer N, before step 1 (Qin et al.): the device streams D_u, oldest first, through
    an N-item buffer (policy "scores": EOE + DSS + IDD on its own embeddings; "random") and
    keeps only what the buffer holds. Returns (the kept pairs in arrival order, a summary)."""
    if len(pairs) <= capacity:
        print(f"  buffer of {capacity}: the history has only {len(pairs)} items, so it keeps them all")
    kept, summary = online.keep_history(device_model, tokenizer, [x for x, _ in pairs], capacity, policy, seed)
    return [pairs[i] for i in kept], summary | {"kept_indices": kept}


def download(pairs, kept) -> list[tuple[str, str]]:
    """Step 4: D_u together with D_filtered, as the device trains on them."""
    return list(pairs) + list(kept)


def personalize(device_model, tokenizer, task: data.Task, pairs, args, seed: int, desc: str):
    """Step 5 (eq. 5, 6): a fresh LoRA (r=16, alpha=8, all linear layers) on a copy of the NF4
    M_base, trained with cross-entropy on the responses. Returns (model, loss per epoch)."""
    model = lora.add_lora(copy.deepcopy(device_model), r=args.lora_r, alpha=args.lora_alpha)
    prefix = instruction(task)
    examples = [(task.messages(prefix + x), y) for x, y in pairs]
    losses = lora.finetune(model, tokenizer, examples, epochs=args.epochs, lr=args.lr,
                           batch_size=args.batch_size, max_length=args.max_length, seed=seed, desc=desc)
    return model.eval(), losses


def answer(model, tokenizer, task: data.Task, queries, args, seed: int, desc: str) -> list[str]:
    """The device answers the user's queries offline with the appendix-B prompt."""
    return qwen2.chat(model, tokenizer, [task.messages(q.input) for q in queries],
                      max_new_tokens=ANSWER_TOKENS[task.name], temperature=args.temperature,
                      seed=seed, desc=desc)


@torch.inference_mode()
def gold_nll(model, tokenizer, task: data.Task, queries, args) -> list[float]:
    """Per query: the mean cross-entropy (nats per token) of its gold answer and <|im_end|>
    after the appendix-B prompt, teacher-forced, as eq. 6 scores a training response. It says
    how likely the model finds what the user actually wrote, so it tells models apart even
    when their sampled answers are the same. Lower is better."""
    device = next(model.parameters()).device
    nll = []
    for q in queries:
        example = lora.encode_example(tokenizer, task.messages(q.input), q.gold, args.max_length)
        ids, labels = lora.right_pad([example], tokenizer.pad_token_id, device)  # (1, T) each
        nll.append(lora.response_loss(model, ids, labels).item())
    return nll


# ---------------------------------------------------------------- M_base, files, the run
def base_model(task: data.Task, others, args) -> Path:
    """M_base: the device model LoRA-tuned on the non-target users' data, merged, cached.

    The task's training set (sec. 4: "fine-tune a general LM on a public, standard dataset"):
    the other users' queries with their golds (LaMP's supervised examples) and their history
    pairs. Done "on the cloud" in the paper (no data of the target users), so at full
    precision. The cache key covers the device model, the training data and the settings."""
    pairs = [task.pair(item) for u in others for item in u.profile]
    pairs += [(q.input, q.gold) for u in others for q in u.queries]
    settings = [args.device_model, pairs, args.base_epochs, args.lr, args.lora_r, args.lora_alpha, args.seed]
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
    slug = re.sub(r"[^\w.-]", "_", args.device_model)
    directory = hub.cache_dir() / "base" / f"{task.name}-{slug}-{key}"
    if (directory / "model.safetensors").is_file():
        print(f"M_base: cached {directory}")
        return directory
    if not pairs:
        raise ValueError(f"{task.name}: no non-target users to train M_base on; lower --users")
    model, tok = qwen2.load(args.device_model, "float32", args.device)
    lora.add_lora(model, r=args.lora_r, alpha=args.lora_alpha)
    print(f"M_base: training on {len(pairs)} pairs of {len(others)} non-target users")
    examples = [(task.messages(x), y) for x, y in pairs]
    lora.finetune(model, tok, examples, epochs=args.base_epochs, lr=args.lr, batch_size=args.batch_size,
                  max_length=args.max_length, seed=args.seed, desc="M_base")
    tmp = directory.with_name(directory.name + ".tmp")
    qwen2.save_pretrained(lora.merge(model), tok, tmp)
    os.replace(tmp, directory)
    return directory


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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

    def answer(self, model, method: str) -> list[str]:
        self.nll[method] = gold_nll(model, self.tokenizer, self.task, self.user.queries, self.args)
        return answer(model, self.tokenizer, self.task, self.user.queries, self.args, self.seed, f"answer {method}")

    def personalized(self, method: str, pairs) -> list[str]:
        """Step 5 on `pairs`, the adapter saved, then the device answers."""
        model, self.losses[method] = personalize(self.device_model, self.tokenizer, self.task, pairs, self.args,
                                                 self.seed, f"{method} {self.user.user_id}")
        tmp = self.user_dir / f"{method}.adapter.safetensors.tmp"
        lora.save_adapter(model, tmp)
        os.replace(tmp, self.user_dir / f"{method}.adapter.safetensors")
        return self.answer(model, method)


# name -> (label in the report, function of a Run returning the predictions, needs D_filtered)
METHODS = {
    "base": ("M_device (M_base, non-personalized)", lambda run: run.answer(run.device_model, "base"), False),
    "direct-ft": ("Direct-FT", lambda run: run.personalized("direct-ft", run.pairs), False),
    "cdcda": ("CDCDA-PLM", lambda run: run.personalized("cdcda", download(run.pairs, run.kept)), True),
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
        records, counts = cloud_service.remote_augment(args.cloud, task.name, pairs, args.k, args.temperature,
                                                       seed, thresholds(args))
        times["augment+select (remote)"] = time.time() - t
    else:
        chat = cloud_service.api_chat(args.cloud_api, args.cloud_model) if args.cloud_api else None
        originals, candidates, unparsable, off_label = augment(*cloud, pairs, args.k, args.temperature, seed, chat=chat,
                                                               task=task, max_len_ratio=args.eps_max_len)
        times["augment"] = time.time() - t
        t = time.time()
        sel = (online.rouge1_select(originals, candidates, args.eps_rouge1) if args.synthesis_filter == "rouge1"
               else select(originals, candidates, judge, thresholds(args)))
        times["select"] = time.time() - t
        records = sel.records
        counts = {**sel.counts, "generated": len(pairs) * args.k, "unparsable": unparsable, "off_label": off_label}
    write_atomic(synthetic, "".join(json.dumps(r) + "\n" for r in records))
    write_atomic(counts_file, json.dumps(counts))
    return records, counts


def run_user(user, task, cloud, judge, device_model, tok, args, user_dir: Path, methods=METHODS) -> dict:
    """All methods for one user; the result dict is also written to user_dir/result.json."""
    seed = args.seed + zlib.crc32(user.user_id.encode()) % 10_000
    times, result = {}, {"user_id": user.user_id, "predictions": {}}
    pairs, counts = upload(task, user), {}
    if args.buffer:
        t = time.time()
        pairs, summary = buffer_history(pairs, device_model, tok, args.buffer, args.buffer_policy, seed)
        times["buffer"] = time.time() - t
        write_atomic(user_dir / "buffer.json", json.dumps(summary, indent=1))
        counts = {"history": summary["seen"], "buffered": summary["kept"]}
    kept = None
    if any(methods[m][2] for m in args.methods):
        records, synthesis = synthesize(task, pairs, cloud, judge, args, seed, user_dir, times)
        counts |= synthesis
        kept = [(r["syn_input"], r["syn_output"]) for r in records if r["kept"]]
    if counts:
        result["counts"] = counts
    run = Run(task, user, pairs, kept, device_model, tok, cloud, args, seed, user_dir, losses={})
    for method in args.methods:
        t = time.time()
        result["predictions"][method] = methods[method][1](run)
        times[method] = time.time() - t
    result["losses"], result["gold_nll"], result["times"] = run.losses, run.nll, times
    write_atomic(user_dir / "result.json", json.dumps(result, indent=1))
    return result


def thresholds(args) -> dict:
    return {"eps_scf": args.eps_scf, "eps_tdf": args.eps_tdf,
            "eps_min_len": args.eps_min_len, "eps_max_len": args.eps_max_len}


def make_judge(spec: str, device: str):
    kind, _, source = spec.partition(":")
    if kind == "nli" and source:
        return filters.NLIJudge(source, device=device)
    if kind == "embedding" and source:
        return filters.EmbeddingJudge(source, device=device)
    raise ValueError(f"--judge {spec!r}: use nli:MODEL (the paper: {PAPER['judge']}) or embedding:MODEL")


def report(task, users, results, args, bert, methods=METHODS) -> dict:
    """Metrics over all queries of all target users (as LaMP averages), counts, times."""
    golds = [q.gold for u in users for q in u.queries]
    rows = {}
    for method in args.methods:
        preds = [p for r in results for p in r["predictions"][method]]
        rows[method] = metrics.evaluate(task.name, preds, golds, bertscore_model=bert)
        if all(method in r.get("gold_nll", {}) for r in results):  # the rows the device model answers
            nll = [x for r in results for x in r["gold_nll"][method]]
            rows[method]["gold_nll"] = sum(nll) / len(nll)
    counts, times = {}, {}  # summed over users
    for r in results:
        for total, part in ((counts, r.get("counts", {})), (times, r["times"])):
            for key, value in part.items():
                total[key] = total.get(key, 0) + value
    return {"task": task.name, "users": [u.user_id for u in users], "queries": len(golds),
            "models": models_used(args), "labels": {m: methods[m][0] for m in args.methods}, "rows": rows,
            "counts": counts, "seconds": times, "settings": {k: v for k, v in vars(args).items() if k != "out"}}


def models_used(args) -> dict:
    return {role: getattr(args, role) + ("" if getattr(args, role) == PAPER[role]
                                         else f"  (stand-in for the paper's {PAPER[role]})")
            for role in PAPER} | {"data": str(args.data or "embedded demo (data/demo/, written for cdcda)"),
                                  "cloud": f"{args.cloud} (`serve`: augmentation and filters there)" if args.cloud
                                  else f"{args.cloud_api} (augmentation there, filters here)" if args.cloud_api
                                  else "in process",
                                  "history": (f"{args.buffer}-item online buffer, {args.buffer_policy} (Qin et al.)"
                                              if args.buffer else "the whole history"),
                                  "synthesis filter": (f"ROUGE-1 > {args.eps_rouge1} (Qin et al.)"
                                                       if args.synthesis_filter == "rouge1" else "SCF, TDF, LSF")}


def markdown(rep: dict) -> str:
    keys = list(dict.fromkeys(k for row in rep["rows"].values() for k in row if k != "bertscore_model"))
    lines = [f"# {rep['task']}: {len(rep['users'])} target users, {rep['queries']} queries", ""]
    lines += [f"- {role}: {name}" for role, name in rep["models"].items()]
    lines += ["", "| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for method, row in rep["rows"].items():
        lines.append(f"| {rep['labels'][method]} | " + " | ".join(f"{row[k]:.4f}" if k in row else "-" for k in keys) + " |")
    if rep["counts"]:
        lines += ["", "augmentation and selection: " + ", ".join(f"{k} {v}" for k, v in rep["counts"].items())]
    lines += ["", "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in rep["seconds"].items()), ""]
    return "\n".join(lines)


def parse_args(argv=None, methods=METHODS):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="lamp7", choices=list(data.TASKS), help="LaMP task")
    p.add_argument("--users", type=int, default=3, help="number of target users (the most active)")
    p.add_argument("--data", default=None, help="directory with DIR/<task>/*.json (real LaMP); default: embedded demo")
    p.add_argument("--out", default=None, help="output directory (default runs/<task>)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(methods)}")
    p.add_argument("--paper", action="store_true", help="the paper's models (needs them downloaded): " +
                   ", ".join(PAPER.values()))
    p.add_argument("--cloud-model", default=None, help=f"cloud LM (default {EMBEDDED['cloud_model']})")
    p.add_argument("--device-model", default=None, help=f"on-device LM (default {EMBEDDED['device_model']})")
    p.add_argument("--judge", default=None, help=f"nli:MODEL or embedding:MODEL (default {EMBEDDED['judge']})")
    p.add_argument("--bertscore-model", default=None, help=f"BERTScore backbone (default {EMBEDDED['bertscore_model']})")
    p.add_argument("--cloud", default=None, metavar="URL", help="augment and select on a `cdcda.py serve` "
                   "at URL (bearer token from $CDCDA_TOKEN) instead of in process")
    p.add_argument("--cloud-api", default=None, metavar="URL", help="augment with --cloud-model on an "
                   "OpenAI-compatible server (vLLM; key from $OPENAI_API_KEY); the filters run here")
    p.add_argument("--k", type=int, default=5, help="synthetic samples per pair (eq. 1)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (sec. 5.1)")
    p.add_argument("--eps-scf", type=float, default=None, help="eq. 2 threshold (default: the judge's)")
    p.add_argument("--eps-tdf", type=float, default=filters.EPS_TDF, help="eq. 3 ROUGE-L upper bound")
    p.add_argument("--eps-min-len", type=float, default=filters.EPS_MIN_LEN, help="eq. 4 lower length ratio")
    p.add_argument("--eps-max-len", type=float, default=filters.EPS_MAX_LEN, help="eq. 4 upper length ratio")
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
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args(argv)
    for role in PAPER:
        if getattr(args, role) is None:
            setattr(args, role, (PAPER if args.paper else EMBEDDED)[role])
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in methods]
    if unknown or not args.methods:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(methods)}")
    if args.cloud and args.cloud_api:
        p.error("--cloud and --cloud-api: give one (--cloud: the server filters too)")
    if args.k < 1:
        p.error("--k must be at least 1")
    if args.buffer < 0:
        p.error("--buffer must be 0 (the whole history) or a positive number of items")
    if args.cloud and args.synthesis_filter != "cdcda":
        p.error("--synthesis-filter rouge1 and --cloud: the server applies the paper's filters; use --cloud-api")
    if not 0.0 <= args.eps_rouge1 <= 1.0:
        p.error("--eps-rouge1 must be in [0, 1]")
    return args


def main(argv=None, methods=METHODS) -> dict:
    args = parse_args(argv, methods)
    task = data.get_task(args.task)
    out = Path(args.out or Path("runs") / task.name)
    print(f"cdcda: {task.name} ({task.title})")
    for role, name in models_used(args).items():
        print(f"  {role}: {name}")
    users = data.load_users(task.name, args.data)
    targets, others = data.split_users(users, min(args.users, len(users)))
    print(f"  users: {len(targets)} targets (most active), {len(others)} others train M_base")
    device_model, tok = qwen2.load(base_model(task, others, args), "float32", args.device)
    device_model = nf4.quantize_model(device_model, torch.bfloat16)  # sec. 5.1: NF4 weights, bf16 compute
    cloud = judge = None
    if any(methods[m][2] for m in args.methods) and not args.cloud:  # with --cloud the server holds both
        cloud = ((None, cloud_service.load_tokenizer(args.cloud_model)) if args.cloud_api
                 else qwen2.load(args.cloud_model, "float32", args.device))
        judge = make_judge(args.judge, args.device) if args.synthesis_filter == "cdcda" else None
    fingerprint = {k: v for k, v in vars(args).items() if k not in ("out", "users", "methods")}
    results = []
    for i, user in enumerate(targets):
        user_dir = out / "users" / user.user_id
        user_dir.mkdir(parents=True, exist_ok=True)
        done = user_dir / "result.json"
        settings = user_dir / "settings.json"
        if settings.is_file() and json.loads(settings.read_text()) != fingerprint:
            raise SystemExit(f"{settings}: written by a run with other settings; use another --out or delete it")
        write_atomic(settings, json.dumps(fingerprint))
        if done.is_file() and set(args.methods) <= set(json.loads(done.read_text())["predictions"]):
            print(f"user {i + 1}/{len(targets)} {user.user_id}: done earlier, reusing {done}")
            results.append(json.loads(done.read_text()))
            continue
        print(f"user {i + 1}/{len(targets)} {user.user_id}: {len(user.profile)} history items, {len(user.queries)} queries")
        try:
            results.append(run_user(user, task, cloud, judge, device_model, tok, args, user_dir, methods))
        except cloud_service.CloudUnavailable as e:
            raise SystemExit(f"{e}\nfinished users are kept under {out / 'users'}; run again to resume") from None
    bert = encoder.load(args.bertscore_model, "float32", args.device) if task.metric == "generation" else None
    rep = report(task, targets, results, args, bert, methods)
    write_atomic(out / "results.json", json.dumps(rep, indent=1))
    write_atomic(out / "results.md", markdown(rep))
    print("\n" + markdown(rep) + f"\nwritten: {out / 'results.json'}, {out / 'results.md'}")
    return rep


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        cloud_service.main(sys.argv[2:])
    else:
        import experiments  # Tables 1-3 and Figure 2 (--methods all, --ablations, --sweep-k, --efficiency)
        try:
            experiments.main(sys.argv[1:])
        except (OSError, ValueError, KeyError) as e:  # bad files, records, options: the message says which
            sys.exit(f"cdcda: error: {e}")
