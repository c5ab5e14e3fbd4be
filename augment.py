"""Step 2 of CDCDA-PLM (paper sec. 4, eq. 1): the cloud LM writes k pairs like each of the user's.

The cloud LM gets the paper's prompt for each of the user's (x, y) pairs and writes k samples at
T = 0.7 (`augment`); `parse_pair` reads the pair out of each reply. Step 3 (filters.select) then
keeps the candidates that pass SCF, TDF and LSF."""
import functools
import math
import re
from typing import Callable, NamedTuple

import data
import generate
import labels

AUGMENT_PROMPT = ("Generate an Input and Response pairs semantically similar to the following "
                  "example, no need to explain. Input: [{x}], Response: [{y}].")  # sec. 4, verbatim
REPLY_PREFIX = "Input: ["  # the start of the cloud's reply (see `augment`)
SCAFFOLD = "], Response: ["  # what structured decoding writes where the input stops
# tokens beyond ceil(eps_max_len * longest): the closing "].", tokenization at the edges
AUGMENT_SLACK = 32


class CloudLM(NamedTuple):
    """The cloud LM of step 2: `chat(model, tokenizer, conversations, ...)` is `generate.chat`
    in process (None), or another with its arguments: the cloud service decodes with its batcher,
    `cloud.client.api_chat` asks an OpenAI-compatible server (`model` None)."""
    model: object
    tokenizer: object
    chat: Callable | None = None


_INPUT = re.compile(r"\**\binput\s*\**\s*:\s*\**", re.I)  # "Input:", "**Input:**", "input :"
_RESPONSE = re.compile(r"[,;]?\s*\**\bresponse\s*\**\s*:\s*\**", re.I)
_COMMENTARY = re.compile(r"\**\b(explanation|note|reason|reasoning)\s*\**\s*:", re.I)
_QUOTES = '"\u201c\u201d\''


def _bracketed(s: str) -> str | None:
    """The text inside the "[...]" that `s` starts with, nested brackets kept; None if it never
    closes."""
    depth = 0
    for i, ch in enumerate(s):
        depth += (ch == "[") - (ch == "]")
        if depth == 0:
            return s[1:i]
    return None


def _clean(s: str) -> str:
    """Drop markdown bold, a trailing comma/period/semicolon, surrounding quotes and whitespace."""
    s = s.strip().strip("*").strip().rstrip(",.;").strip()
    if len(s) > 1 and s[0] in _QUOTES and s[-1] in _QUOTES:
        return s[1:-1].strip()
    return s.strip(_QUOTES).strip()


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


def augment(cloud: CloudLM, pairs, settings, seed: int,
            task: data.Task | None = None) -> data.Candidates:
    """Step 2 (eq. 1): k samples per pair from the cloud LM with the paper's prompt, at temperature
    T (`settings`: options.Settings' k, temperature, augment_decoding, eps_max_len).

    The reply is started with REPLY_PREFIX ("Input: ["): the 135M stand-in answers the bare prompt
    mostly in prose. Structured decoding samples the input up to its "]", writes SCAFFOLD ("],
    Response: [") and samples the response up to its "]", in one pass from the same cache, so the
    filters judge content, not format. A part may take `generation_budget` tokens: a candidate as
    long as eq. 4 allows is never cut off. Counted: replies with no parsable pair (unparsable), and
    responses `task.valid_output` rejects (off_label). With --label-decoding constrained, a
    task's response in structured decoding may only spell one of its pair_labels (labels.py)."""
    k = settings.k
    prompts = [[{"role": "user", "content": AUGMENT_PROMPT.format(x=x, y=y)}]
               for x, y in pairs for _ in range(k)]

    def budget(texts):
        return generation_budget(cloud.tokenizer, texts, settings.eps_max_len)
    reply = functools.partial(cloud.chat or generate.chat, cloud.model, cloud.tokenizer,
                              temperature=settings.temperature, batch_size=generate.BATCH)
    if settings.augment_decoding == "structured":  # one pass: the scaffold where the input stops
        constrained = settings.label_decoding == "constrained" and task and task.pair_labels
        texts = reply(prompts, budget([x for x, _ in pairs]), seed=seed, stop="]",
                      desc="augment (cloud)", reply_prefix=REPLY_PREFIX, scaffold=SCAFFOLD,
                      scaffold_tokens=budget([y for _, y in pairs]),
                      labels=label_trie(cloud.tokenizer, task.pair_labels) if constrained else None)
        texts = [text + "]" for text in texts]
    else:
        texts = reply(prompts, budget([f"Input: [{x}], Response: [{y}]" for x, y in pairs]),
                      seed=seed, desc="augment (cloud)", reply_prefix=REPLY_PREFIX)
    source, candidates, unparsable, off_label = [], [], 0, 0
    for i, text in enumerate(texts):
        pair = parse_pair(text)
        if pair is None:
            unparsable += 1
        elif task is not None and not task.valid_output(pair[1]):
            off_label += 1
        else:
            source.append(i // k)
            candidates.append(pair)
    counts = {"generated": len(texts), "unparsable": unparsable, "off_label": off_label}
    return data.Candidates(source, candidates, counts)


@functools.lru_cache(maxsize=4)
def label_trie(tokenizer, names: tuple[str, ...]) -> labels.LabelTrie:
    """The labels as structured decoding's response spells them, after SCAFFOLD, up to a "]"."""
    return labels.LabelTrie(tokenizer, names, labels.close_ids(tokenizer, "]"), after=SCAFFOLD)


def generation_budget(tokenizer, texts: list[str], eps_max_len: float) -> int:
    """New tokens for a text up to eq. 4's upper bound times the longest of `texts`, and slack."""
    return math.ceil(eps_max_len * max(len(tokenizer.encode(t)) for t in texts)) + AUGMENT_SLACK
