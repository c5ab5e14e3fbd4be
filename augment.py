"""The cloud's part of CDCDA-PLM (paper sec. 4): step 2, augment, and step 3, select.

The cloud LM gets the paper's prompt (eq. 1) for each of the user's (x, y) pairs and writes
k samples at T = 0.7 (`augment`); `parse_pair` reads the "Input: ..., Response: ..." pair out
of each generation; `select` keeps the candidates that pass SCF, TDF and LSF (eq. 2-4,
`filters.select`) with the judge `make_judge` builds. The pipeline (cdcda.py) runs these in
process or through an OpenAI-compatible server (`cloud.api_chat`); server.py serves them.
"""
import functools
import math
import re

import data
import filters
import generate
from errors import InputError

AUGMENT_PROMPT = ("Generate an Input and Response pairs semantically similar to the following "
                  "example, no need to explain. Input: [{x}], Response: [{y}].")  # sec. 4, verbatim
REPLY_PREFIX = "Input: ["  # the start of the cloud's reply (see `augment`)
AUGMENT_SLACK = 32  # tokens beyond ceil(eps_max_len * longest): the closing "].", tokenization at the edges
AUGMENT_BATCH = 32  # generations per batch: batched decoding reads the weights once per step for all rows


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
            task: data.Task | None = None, max_len_ratio: float = filters.EPS_MAX_LEN, structured: bool = False):
    """Step 2 (eq. 1): k samples per pair from the cloud LM with the paper's prompt.

    The cloud's reply is started with REPLY_PREFIX ("Input: ["): the 135M stand-in answers
    the bare prompt mostly in prose, which parses as nothing. `structured` (--augment-decoding
    structured) decodes the whole shape instead of hoping for it: the input is sampled up to
    its "]", then "], Response: [" is written for the model and the response sampled up to its
    "]" (same prompt, model and temperature; only the scaffolding is forced), so the filters
    judge content, not format. `chat` replaces `generate.chat` (`cloud.api_chat` for
    --cloud-api: the same priming and stops over the API). Generation stops at
    ceil(max_len_ratio * longest) + AUGMENT_SLACK tokens, `longest` the tokens of the longest
    example's "Input: [x], Response: [y]" (structured: of the longest x, then of the longest
    y): a candidate as long as eq. 4's upper bound (`max_len_ratio`, --eps-max-len) allows is
    never cut off.
    Returns (originals, candidates, n_unparsable, n_off_label): candidates[i] was generated
    from originals[i]; generations without a parsable pair are dropped and counted in
    n_unparsable, parsed ones whose response `task.valid_output` rejects (a lamp2 tag or lamp3
    score outside the task's labels) are dropped and counted in n_off_label (0 without `task`)."""
    prompts = [[{"role": "user", "content": AUGMENT_PROMPT.format(x=x, y=y)}] for x, y in pairs for _ in range(k)]

    def budget(texts):  # tokens for a text up to eq. 4's upper bound times the longest of `texts`
        return math.ceil(max_len_ratio * max(len(cloud_tok.encode(t)) for t in texts)) + AUGMENT_SLACK
    reply = functools.partial(chat or generate.chat, cloud, cloud_tok, temperature=temperature,
                              batch_size=AUGMENT_BATCH)
    if structured:
        inputs = reply(prompts, budget([x for x, _ in pairs]), seed=seed, desc="augment (cloud): inputs",
                       reply_prefix=REPLY_PREFIX, stop="]")
        texts = [text + "]" for text in reply(prompts, budget([y for _, y in pairs]), seed=seed + 1,
                                              desc="augment (cloud): responses", stop="]",
                                              reply_prefix=[x + "], Response: [" for x in inputs])]
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
    return originals, candidates, unparsable, off_label


def select(originals, candidates, judge, thresholds: dict) -> filters.Selection:
    """Step 3 (eq. 2-4): keep the candidates that pass SCF, TDF and LSF."""
    return filters.select(originals, candidates, judge, **thresholds)


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
