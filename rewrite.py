"""The input a LaMP-7 history item lacks, written on the device (--history-pairs rewrite).

LaMP-7's history holds only the user's tweets, so `data.Task.pair` makes (instruction + tweet ->
the same tweet), an identity pair that teaches copying, while a query pairs a neutral text with
the user's styled tweet. `neutral_rewrites` has the pretrained device model (not the cloud: the
data stays on the device, and every method and M_base get the same pairs) rewrite each tweet
zero-shot into plain text; `history_pair` makes (instruction + rewrite -> tweet). A rewrite must
pass the project's own filters against its tweet (eq. 2, eq. 4, not a copy); of a greedy and
`samples` sampled ones (T = 0.7, seed 0: the pairs are data), the one the judge scores closest in
meaning is kept; a tweet with none keeps no pair. Other tasks' items hold their own input."""
import hashlib
import json
import re
from dataclasses import asdict, replace
from pathlib import Path

import augment
import data
import filters
import generate
import hub
import qwen2

REWRITE_PROMPT = ("Rewrite the following text as plain, neutral English with the same facts: no slang, no "
                  "hashtags, no emojis, no exclamations. Only output the rewritten text.\nText: {text}")
SAMPLES = 4  # sampled rewrites per tweet, besides the greedy one
LABEL = re.compile(r"^\W*(\w+\s+){0,2}\w+\W*:\W*")  # "Rewrite:", "**Text:**": a leading label the model adds


def needs_rewrites(task: data.Task) -> bool:
    """Whether the task's history items are their own output (LaMP-7: the tweet is both)."""
    return "{" + task.pair_output + "}" in task.pair_input


def history_pair(task: data.Task, item: dict, rewrites: dict | None = None) -> tuple[str, str] | None:
    """One history item as a training pair: `task.pair`, or (instruction + its rewrite -> the
    item's text) when `rewrites` are given; None when its rewrite was rejected (no pair)."""
    x, y = task.pair(item)
    if rewrites is None or not needs_rewrites(task):
        return x, y
    return (task.instruction + rewrites[y], y) if rewrites.get(y) else None


def neutral_rewrites(task: data.Task, users, device_model: str, judge, thresholds: filters.Thresholds,
                     device: str, family=qwen2, samples: int = SAMPLES) -> dict[str, str]:
    """{text: its neutral rewrite, or "" when none passed} for every history item of `users`,
    cached (`texts_and_cache`) and made once by processes sharing the cache (its lock). `family`
    loads the device model (Table 4's T5 takes the prompt as plain text)."""
    texts, path = texts_and_cache(task, users, device_model, judge.name, thresholds, samples)
    with hub.exclusive(hub.cache_dir() / "locks" / f"rewrites-{path.stem}.lock", "history rewrites"):
        if not path.is_file():
            model, tok = family.load(device_model, "float32", device)
            rewrites = rewrite_all(model, tok, texts, judge, thresholds, samples)
            path.parent.mkdir(parents=True, exist_ok=True)
            hub.write_atomic(path, json.dumps(rewrites, indent=1))
    return json.loads(path.read_text())


def texts_and_cache(task: data.Task, users, device_model: str, judge_name: str, thresholds: filters.Thresholds,
                    samples: int = SAMPLES) -> tuple[list[str], Path]:
    """The texts to rewrite, and where their rewrites are cached (the key covers the model, the
    prompt, the judge, the thresholds and the texts)."""
    texts = sorted({task.pair(item)[1] for u in users for item in u.profile})
    key = hashlib.sha256(json.dumps([device_model, REWRITE_PROMPT, samples, judge_name, asdict(thresholds),
                                     texts]).encode()).hexdigest()[:16]
    return texts, hub.cache_dir() / "rewrites" / f"{task.name}-{key}.json"


def rewrite_all(model, tok, texts: list[str], judge, thresholds: filters.Thresholds, samples: int) -> dict:
    """{text: the rewrite the judge scores closest in meaning among those that pass, or ""}."""
    prompts = [[{"role": "user", "content": REWRITE_PROMPT.format(text=t)}] for t in texts]
    budget = max(len(tok.encode(t)) for t in texts) + 16
    outs = generate.chat(model, tok, [p for p in prompts for _ in range(1 + samples)], budget,  # one prefill each
                         temperature=[0.0, *[0.7] * samples] * len(texts), seed=0, batch_size=augment.AUGMENT_BATCH,
                         desc="rewrite history (device)")
    outs = [LABEL.sub("", o.split("\n")[0]).strip().strip('"') for o in outs]
    sources = [t for t in texts for _ in range(1 + samples)]
    sel = filters.select([(t, t) for t in sources], [(o, t) for o, t in zip(outs, sources)], judge,
                         replace(thresholds, eps_tdf=1.0 - 1e-6))  # TDF here only rejects exact copies
    rewrites, best = {t: "" for t in texts}, {}
    for r in sel.records:
        score = min(r["scf_forward"], r["scf_backward"])
        if r["kept"] and score > best.get(r["output"], -2.0):
            rewrites[r["output"]], best[r["output"]] = r["syn_input"], score
    print(f"history rewrites: {len(best)} of {len(texts)} texts have one")
    return rewrites
