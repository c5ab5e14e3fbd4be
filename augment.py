"""The cloud's part of CDCDA-PLM (paper sec. 4): step 2, augment, and step 3, select.

The cloud LM gets the paper's prompt (eq. 1) for each of the user's (x, y) pairs and writes k
samples at T = 0.7 (`augment`); `parse_pair` reads the pair out of each reply; `filters.select`
keeps the candidates that pass SCF, TDF and LSF (eq. 2-4) with the judge `make_judge` builds; `synthesize` is the two steps together, in process or on the cloud service (cloud/)."""
import functools
import math
import re
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import data
import filters
import generate
from errors import InputError

AUGMENT_PROMPT = ("Generate an Input and Response pairs semantically similar to the following "
                  "example, no need to explain. Input: [{x}], Response: [{y}].")  # sec. 4, verbatim
REPLY_PREFIX = "Input: ["  # the start of the cloud's reply (see `augment`)
SCAFFOLD = "], Response: ["  # what structured decoding writes where the input stops
AUGMENT_SLACK = 32  # tokens beyond ceil(eps_max_len * longest): the closing "].", tokenization at the edges
AUGMENT_BATCH = 80  # generations per batch: batched decoding reads the weights once per step for all rows


@dataclass(frozen=True)
class Augmentation:
    """Steps 2 and 3's settings, named as cdcda.py's options (sec. 5.1: k = 5, T = 0.7)."""
    k: int = 5
    temperature: float = 0.7
    augment_decoding: str = "structured"  # or "free" (`augment`)
    thresholds: filters.Thresholds = filters.Thresholds()


class CloudLM(NamedTuple):
    """The cloud LM of step 2: `chat(model, tokenizer, conversations, ...)` is `generate.chat`
    in process (None), or `cloud.api_chat`'s over an OpenAI-compatible server (`model` None)."""
    model: object
    tokenizer: object
    chat: Callable | None = None


@dataclass
class Candidates:
    """Step 2's output: candidates[i] = (x_syn, y_syn) was generated from originals[i] = (x, y);
    `unparsable` generations held no pair, `off_label` ones a response outside the task's labels."""
    originals: list
    candidates: list
    unparsable: int
    off_label: int


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
    """The first "Input: ..., Response: ..." pair in a generation, or None. The input runs from
    "Input:" to "Response:" (its "[...]" dropped, nested brackets kept); the response ends at its
    closing bracket (unclosed: a cut-off reply, None), a second "Input:", its line's end when not
    bracketed, or commentary ("Explanation:", "Note:"). Bold, quotes and a trailing comma or period
    are dropped; an empty part gives None."""
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


def augment(cloud: CloudLM, pairs, settings: Augmentation, seed: int, task: data.Task | None = None) -> Candidates:
    """Step 2 (eq. 1): k samples per pair from the cloud LM with the paper's prompt.

    The reply is started with REPLY_PREFIX ("Input: ["): the 135M stand-in answers the bare prompt
    mostly in prose. Structured decoding samples the input up to its "]", writes SCAFFOLD ("],
    Response: [") and samples the response up to its "]", in one pass from the same cache, so the
    filters judge content, not format. `cloud.chat`: `generate.chat`, or `cloud.api_chat`'s over an
    API. A part may take `generation_budget` tokens: a candidate as long as eq. 4 allows is never cut
    off. Counted: replies with no parsable pair, responses `task.valid_output` rejects (off_label)."""
    k = settings.k
    prompts = [[{"role": "user", "content": AUGMENT_PROMPT.format(x=x, y=y)}] for x, y in pairs for _ in range(k)]

    def budget(texts):
        return generation_budget(cloud.tokenizer, texts, settings.thresholds.eps_max_len)
    reply = functools.partial(cloud.chat or generate.chat, cloud.model, cloud.tokenizer,
                              temperature=settings.temperature, batch_size=AUGMENT_BATCH)
    if settings.augment_decoding == "structured":  # one pass: the scaffold where the input stops
        texts = [text + "]" for text in reply(prompts, budget([x for x, _ in pairs]), seed=seed, stop="]",
                                              desc="augment (cloud)", reply_prefix=REPLY_PREFIX,
                                              scaffold=SCAFFOLD, scaffold_tokens=budget([y for _, y in pairs]))]
    else:
        texts = reply(prompts, budget([f"Input: [{x}], Response: [{y}]" for x, y in pairs]), seed=seed,
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
    return Candidates(originals, candidates, unparsable, off_label)


def generation_budget(tokenizer, texts: list[str], eps_max_len: float) -> int:
    """New tokens for a text up to eq. 4's upper bound times the longest of `texts`, and slack."""
    return math.ceil(eps_max_len * max(len(tokenizer.encode(t)) for t in texts)) + AUGMENT_SLACK


def synthesize(cloud: CloudLM, pairs, settings: Augmentation, seed: int, task: data.Task, select,
               times: dict | None = None):
    """Steps 2 and 3 for one upload D_u -> (a record per parsed candidate, its scores and verdict;
    the counts). `select(originals, candidates)` is step 3, the judge and thresholds bound by the
    caller (`functools.partial(filters.select, ...)`); `times` gets each step's seconds."""
    times = {} if times is None else times
    t = time.time()
    out = augment(cloud, pairs, settings, seed, task)
    t, times["augment"] = time.time(), time.time() - t
    sel = select(out.originals, out.candidates)
    times["select"] = time.time() - t
    return sel.records, {**sel.counts, "generated": len(pairs) * settings.k, "unparsable": out.unparsable,
                         "off_label": out.off_label}


def judge_source(spec: str) -> tuple[str, str]:
    """--judge's (kind, model): "nli:MODEL" (an NLI cross-encoder) or "embedding:MODEL" (a proxy)."""
    kind, _, source = spec.partition(":")
    if kind not in ("nli", "embedding") or not source:
        raise InputError(f"--judge {spec!r}: use nli:MODEL (the paper: nli:alisawuffles/roberta-large-wanli) "
                         "or embedding:MODEL")
    return kind, source


def make_judge(spec: str, device: str):
    """The eq. 2 judge named by --judge."""
    kind, source = judge_source(spec)
    return (filters.NLIJudge if kind == "nli" else filters.EmbeddingJudge)(source, device=device)
