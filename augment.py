"""The cloud's part of CDCDA-PLM (paper sec. 4): step 2, augment, and step 3, select.

The cloud LM gets the paper's prompt (eq. 1) for each of the user's (x, y) pairs and writes
k samples at T = 0.7 (`augment`); `parse_pair` reads the "Input: ..., Response: ..." pair out
of each generation; `select` keeps the candidates that pass SCF, TDF and LSF (eq. 2-4,
`filters.select`) with the judge `make_judge` builds. The pipeline (cdcda.py) runs these in
process or through an OpenAI-compatible server (`cloud.api_chat`); server.py serves them.
"""
import re

import filters
import generate
from errors import InputError

AUGMENT_PROMPT = ("Generate an Input and Response pairs semantically similar to the following "
                  "example, no need to explain. Input: [{x}], Response: [{y}].")  # sec. 4, verbatim
REPLY_PREFIX = "Input: ["  # the start of the cloud's reply (see `augment`)
AUGMENT_BATCH = 32  # generations per batch: batched decoding reads the weights once per step for all rows


def parse_pair(text: str) -> tuple[str, str] | None:
    """The first "Input: ..., Response: ..." pair in a generation, or None when there is none.

    Brackets, quotes, markdown bold and a trailing comma/period around either part are
    dropped; a second "Input:" ends the response."""
    m = re.search(r"input\s*\**\s*:\s*(.+?)\s*[,;]?\s*\**response\s*\**\s*:\s*(.+)", text, re.I | re.S)
    if not m:
        return None
    x, y = m.group(1), re.split(r"\n\s*\**\s*input\s*\**\s*:", m.group(2), flags=re.I)[0]
    x, y = (s.strip().strip("*").strip().rstrip(",.;").strip() for s in (x, y))
    x, y = (s[1:-1].strip() if s[:1] == "[" and s[-1:] == "]" else s.strip("[]").strip() for s in (x, y))
    x, y = (s.strip('"“”\'').strip() for s in (x, y))
    return (x, y) if x and y else None


def augment(cloud, cloud_tok, pairs, k: int, temperature: float, seed: int, chat=None):
    """Step 2 (eq. 1): k samples per pair from the cloud LM with the paper's prompt.

    The cloud's reply is started with REPLY_PREFIX ("Input: ["): the 135M stand-in answers
    the bare prompt mostly in prose, which parses as nothing. Generation stops at
    `longest + 32` tokens, the longest example's "Input: [x], Response: [y]" plus slack.
    `chat` replaces `generate.chat` (the --cloud-api client). Returns (originals, candidates,
    n_unparsable): candidates[i] was generated from originals[i]; generations without a
    parsable pair are dropped and counted."""
    prompts = [[{"role": "user", "content": AUGMENT_PROMPT.format(x=x, y=y)}] for x, y in pairs for _ in range(k)]
    longest = max(len(cloud_tok.encode(f"Input: [{x}], Response: [{y}]")) for x, y in pairs)
    texts = (chat or generate.chat)(cloud, cloud_tok, prompts, max_new_tokens=min(512, longest + 32),
                                    temperature=temperature, seed=seed, batch_size=AUGMENT_BATCH,
                                    desc="augment (cloud)", reply_prefix=REPLY_PREFIX)
    originals, candidates = [], []
    for i, text in enumerate(texts):
        pair = parse_pair(text)
        if pair is not None:
            originals.append(pairs[i // k])
            candidates.append(pair)
    return originals, candidates, len(texts) - len(candidates)


def select(originals, candidates, judge, thresholds: dict) -> filters.Selection:
    """Step 3 (eq. 2-4): keep the candidates that pass SCF, TDF and LSF."""
    return filters.select(originals, candidates, judge, **thresholds)


def make_judge(spec: str, device: str):
    """The eq. 2 judge named by --judge: nli:MODEL (an NLI cross-encoder) or embedding:MODEL (a proxy)."""
    kind, _, source = spec.partition(":")
    if kind == "nli" and source:
        return filters.NLIJudge(source, device=device)
    if kind == "embedding" and source:
        return filters.EmbeddingJudge(source, device=device)
    raise InputError(f"--judge {spec!r}: use nli:MODEL (the paper: nli:alisawuffles/roberta-large-wanli) or embedding:MODEL")
