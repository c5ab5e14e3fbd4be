"""The input a LaMP-7 history item lacks, written on the device (--history-pairs rewrite).

LaMP-7's history holds only the user's tweets, so `data.Task.pair` makes (tweet -> the same
tweet), an identity pair that teaches copying, while a query pairs a neutral text with the
user's styled tweet. `rewrite_all` has the pretrained device model (not the cloud: the data stays
on the device, and every method and M_base get the same pairs) rewrite each tweet zero-shot into
plain text; `history_pair` makes (rewrite -> tweet). A rewrite must pass the project's own
filters against its tweet (eq. 2, eq. 4, not a copy); of a greedy and `samples` sampled ones
(T = 0.7, seed 0: the pairs are data), the one the judge scores closest in meaning is kept; a
tweet with none keeps no pair. Other tasks' items hold their own input."""
import re
from dataclasses import replace

import data
import filters
import generate

REWRITE_PROMPT = ("Rewrite the following text as plain, neutral English with the same facts: no "
                  "slang, no hashtags, no emojis, no exclamations. Only output the rewritten text."
                  "\nText: {text}")
SAMPLES = 4  # sampled rewrites per tweet, besides the greedy one
# "Rewrite:", "**Text:**": a leading label the model adds
LABEL = re.compile(r"^\W*(\w+\s+){0,2}\w+\W*:\W*")


def needs_rewrites(task: data.Task) -> bool:
    """Whether the task's history items are their own output (LaMP-7: the tweet is both)."""
    return "{" + task.pair_output + "}" in task.pair_input


def history_pair(task: data.Task, item: dict,
                 rewrites: dict | None = None) -> tuple[str, str] | None:
    """One history item as a training pair: `task.pair`, or (its rewrite -> the item's text) when
    `rewrites` are given; None when its rewrite was rejected (no pair)."""
    x, y = task.pair(item)
    if rewrites is None or not needs_rewrites(task):
        return x, y
    return (rewrites[y], y) if rewrites.get(y) else None


def history_texts(task: data.Task, users) -> list[str]:
    """The history texts of `users` to rewrite, each once, sorted."""
    return sorted({task.pair(item)[1] for u in users for item in u.profile})


def rewrite_all(model, tok, texts: list[str], judge, settings, samples: int = SAMPLES,
                chat=generate.chat) -> dict:
    """{text: the rewrite the judge scores closest in meaning among those that pass, or ""}; the
    filters' thresholds from `settings` (options.Settings); `chat`: how the device model replies."""
    prompts = [[{"role": "user", "content": REWRITE_PROMPT.format(text=t)}] for t in texts]
    budget = max(len(tok.encode(t)) for t in texts) + 16
    # each text's greedy and sampled rewrites, from one prefill
    outs = chat(model, tok, [p for p in prompts for _ in range(1 + samples)], budget,
                temperature=[0.0, *[0.7] * samples] * len(texts), seed=0,
                batch_size=generate.BATCH, desc="rewrite history (device)")
    outs = [LABEL.sub("", o.split("\n")[0]).strip().strip('"') for o in outs]
    sources = [t for t in texts for _ in range(1 + samples)]
    candidates = data.Candidates(list(range(len(sources))), list(zip(outs, sources)), {})
    # TDF here only rejects exact copies
    sel = filters.select([(t, t) for t in sources], candidates, judge,
                         replace(settings, eps_tdf=1.0 - 1e-6))
    rewrites, best = {t: "" for t in texts}, {}
    for r in sel.records:
        score = min(r["scf_forward"], r["scf_backward"])
        if r["kept"] and score > best.get(r["output"], -2.0):
            rewrites[r["output"]], best[r["output"]] = r["syn_input"], score
    print(f"history rewrites: {len(best)} of {len(texts)} texts have one")
    return rewrites
