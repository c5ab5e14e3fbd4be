"""`python -m scale --plan`: what a run will do and how long it will take, before it runs.

Running the paper's experiments at scale (100 users on each of six tasks) starts here. It takes
the run's own options, those that change the cost (`--buffer N`, `--deploy` with its
`--deploy-tune-epochs`) and any row of Table 1 or a deployed row, and counts with the
functions the run calls: the history pairs of `cdcda.upload` (LaMP-7: on the
cached history rewrites, `rewrite.texts_and_cache`), M_base's `cdcda.base_pairs`, the cloud's
`augment.generation_budget`, the tokens of `train.encode_example`. Per target user:

    history         the pairs uploaded (with --buffer N: at most N)
    cloud replies   history x k, each decoded to at most `generation_budget` tokens
    candidates      at most the cloud replies (the parsable ones)
    training tokens epochs x (tokens of the pairs each fine-tuned row trains on); a row that
                    also trains on the kept candidates (CDCDA-PLM, RS) adds from none of them
                    to all of them (-DS: all), so two totals: "none kept" and "all kept"
    tuning tokens   a deployed row: --deploy-tune-epochs x its method's training tokens
    answer tokens   rows x queries x the task's answer budget

Times are these counts times rates measured here on --device with the run's models (a few
LoRA steps and decoding steps, `train_rate`, `decode_rate`); a deployed row costs DEPLOY_COST
times its tuning tokens at the training rate. It trains nothing and writes nothing.
"""
import functools
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

import augment
import cdcda
import data
import filters
import generate
import lora
import nf4
import options
import qwen2
import rewrite
import runner
import train
from deployment import methods as deployment
from experiments import methods as experiments, t5
from scale import shards

METHODS = {**experiments.METHODS, **deployment.METHODS}
ANSWER_ONLY = {"base", "cloud", "cloud+bm25", "device+bm25", "cloud+dense", "device+dense", "cloud+contriever",
               "device+contriever", "speculative"}  # rows that train nothing (speculative: Direct-FT's adapter)
ON_KEPT = {"cdcda", "rs"}  # rows that train on D_u and the kept candidates; -DS ("no-ds") on every candidate
DEPLOY_COST = 2.3  # a deployed row's seconds per tuning token over a fine-tuning's per training token (RESULTS.md)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def train_rate(model, tok, examples, training: options.Settings, seed: int = 0) -> float:
    """Seconds per training token (prompt + response) of LoRA fine-tuning `model` (changed in
    place): one batch to warm up, then two batches timed."""
    lora.add_lora(model, r=training.lora_r, alpha=training.lora_alpha, seed=seed)
    batch = (examples * (2 * training.batch_size))[:2 * training.batch_size]
    one = replace(training, epochs=1)
    train.finetune(model, tok, batch[:training.batch_size], one, seed=seed, desc="plan: warm-up")
    seconds = _timed(lambda: train.finetune(model, tok, batch, one, seed=seed, desc="plan: timing"))
    return seconds / sum(len(train.encode_example(tok, m, y, training.max_length)[0]) for m, y in batch)


def decode_rate(model, tok, conversations, batch: int, steps: int = 8) -> tuple[float, float]:
    """(seconds of the prefill, seconds per decoding step) of `batch` conversations at once:
    1 and 1 + `steps` new tokens timed, never stopping at an end token; the difference is
    the steps. A T5 decodes its own way (`t5.generate_ids`)."""
    prompts = [tok.encode(tok.apply_chat_template(c)) for c in (conversations * batch)[:batch]]
    ids, mask = generate.left_pad(prompts, tok.pad_token_id, next(model.parameters()).device)
    decode = functools.partial(t5.generate_ids if isinstance(model, t5.T5) else generate.generate, model)

    def run(n):
        return _timed(lambda: decode(ids, n, 0.7, eos_token_id=None, attention_mask=mask))
    run(2)  # warm-up
    short, long = run(1), run(1 + steps)
    step = max(long - short, 0.0) / steps
    return max(short - step, 0.0), step


def generation_seconds(rate: tuple[float, float], rows: int, batch: int, budget: int) -> float:
    """`rows` generations in batches of `batch`, each batch decoded to `budget` new tokens."""
    prefill, step = rate
    return math.ceil(rows / batch) * (prefill + budget * step)


def counts(settings: options.Settings, task: data.Task, user: data.User, rewrites, tok, cloud_tok) -> dict:
    """What the run does for one user (the module's docstring), in pairs and tokens."""
    training, aug, methods = settings, settings, settings.methods
    pairs = cdcda.upload(task, user, rewrites)
    buffer = settings.extra.get("buffer") or len(pairs)
    h = min(buffer, len(pairs))
    tokens = [len(train.encode_example(tok, m, y, training.max_length)[0])
              for m, y in cdcda.examples(task, pairs)]
    mean = sum(tokens) / max(len(tokens), 1)
    d_u = round(mean * h) if h < len(pairs) else sum(tokens)  # a buffer's items: the history's mean each
    replies = h * aug.k if any(METHODS[m].cloud for m in methods) else 0
    texts = ([x for x, _ in pairs], [y for _, y in pairs]) if aug.augment_decoding == "structured" else (
        [f"Input: [{x}], Response: [{y}]" for x, y in pairs],)
    budget = sum(augment.generation_budget(cloud_tok, t, aug.eps_max_len) for t in texts) if pairs else 0
    fine_tuned = {m.removesuffix("-deployed") for m in methods if m not in ANSWER_ONLY}
    fine_tuned |= {"direct-ft"} if "speculative" in methods else set()  # its adapter verifies
    candidates = round(mean * replies)  # tokens of every candidate, were each as long as a pair
    none = {m: training.epochs * (d_u * (1 + aug.k) if m == "eda-ft" else d_u + candidates * (m == "no-ds"))
            for m in fine_tuned}
    every = {m: none[m] + training.epochs * candidates * (m in ON_KEPT) for m in fine_tuned}
    tune = settings.extra.get("deploy_tune_epochs", 0) / training.epochs
    deployed = [m.removesuffix("-deployed") for m in methods if m.endswith("-deployed")]
    return {"history": h, "queries": len(user.queries), "cloud replies": replies, "reply budget": budget,
            "candidates, at most": replies, "training tokens, none kept": sum(none.values()),
            "training tokens, all kept": sum(every.values()),
            "tuning tokens, none kept": round(tune * sum(none[m] for m in deployed)),
            "tuning tokens, all kept": round(tune * sum(every[m] for m in deployed)),
            "answer tokens": len(methods) * len(user.queries) * cdcda.ANSWER_TOKENS[task.name]}


def plan(settings: options.Settings, shard: shards.Shard) -> dict:
    """The counts of every target user, M_base's and the rewrites', and the estimated times."""
    task = data.get_task(settings.task)
    users = data.load_users(task.name, settings.data)
    targets, others = data.split_users(users, min(settings.users, len(users)), settings.user_selection, settings.seed)
    done = {r["user_id"] for r in runner.finished(Path(settings.out), targets, settings.methods)[0]}
    models, device = settings, settings.torch_device
    family = t5.family(models.device_model)
    device_model, tok = family.load(models.device_model, "float32", device)
    rewrites, todo = None, []
    if settings.history_pairs == "rewrite" and rewrite.needs_rewrites(task):
        judge = filters.make_judge(models.judge, device)
        texts = rewrite.history_texts(task, users)
        path = cdcda.rewrites_path(task, texts, settings, judge.name)
        rewrites = json.loads(path.read_text()) if path.is_file() else None
        todo = [] if rewrites else texts
        if not rewrites:
            print(f"plan: the history rewrites are not made yet ({path}): each tweet counts as its own rewrite")
    synthetic = any(METHODS[m].cloud for m in settings.methods)
    cloud, cloud_tok = (qwen2.load(models.cloud_model, "float32", device) if synthetic
                        and models.cloud_model != models.device_model else (device_model, tok))
    rows = {u.user_id: counts(settings, task, u, rewrites, tok, cloud_tok) for u in targets}
    base = cdcda.base_examples(task, others, rewrites)
    shared = {"M_base training tokens": settings.base_epochs * sum(
        len(train.encode_example(tok, m, y, settings.max_length)[0]) for m, y in base)}
    if todo:
        shared["rewrite replies"] = len(todo) * (1 + rewrite.SAMPLES)

    sample = max(targets, key=lambda u: len(u.profile))
    pairs = cdcda.upload(task, sample, rewrites)
    examples = cdcda.examples(task, pairs)
    prompts = [[{"role": "user", "content": augment.AUGMENT_PROMPT.format(x=x, y=y)}] for x, y in pairs]
    print("plan: calibrating on", device)
    rate = {"decode full": decode_rate(device_model, tok, prompts, generate.BATCH),
            "decode cloud": decode_rate(cloud, cloud_tok, prompts, generate.BATCH)}
    nf4_model = nf4.quantize_model(family.load(models.device_model, "float32", device)[0], torch.bfloat16)
    rate["decode nf4"] = decode_rate(nf4_model, tok, [task.messages(q.input) for q in sample.queries] or
                                     [m for m, _ in examples], 8)
    rate["train nf4"] = train_rate(nf4_model, tok, examples, settings)
    rate["train full"] = train_rate(device_model, tok, examples, settings)

    def seconds(row: dict, case: str) -> float:
        answers = len(settings.methods) * generation_seconds(rate["decode nf4"], row["queries"], 8,
                                                               cdcda.ANSWER_TOKENS[task.name])
        cloud_side = generation_seconds(rate["decode cloud"], row["cloud replies"], generate.BATCH,
                                        row["reply budget"])
        return (answers + cloud_side + row[f"training tokens, {case}"] * rate["train nf4"]
                + DEPLOY_COST * row[f"tuning tokens, {case}"] * rate["train nf4"])
    setup = shared["M_base training tokens"] * rate["train full"] + (generation_seconds(
        rate["decode full"], shared["rewrite replies"], generate.BATCH,
        max(len(tok.encode(t)) for t in todo) + 16) if todo else 0.0)
    totals = {key: sum(r[key] for r in rows.values()) for key in next(iter(rows.values()))}
    estimate = {}
    for case in ("none kept", "all kept"):
        per_shard = [sum(seconds(rows[u.user_id], case) for u in shards.share(targets, shards.Shard(i, shard.count, None))
                         if u.user_id not in done) for i in range(shard.count)]
        estimate[case] = {"per user": sum(seconds(r, case) for r in rows.values()) / len(rows),
                          "one process": setup + sum(per_shard), f"{shard.count} shard(s)": setup + max(per_shard)}
    print(f"plan: {task.name}, {len(targets)} target users ({len(done)} done under {settings.out}), "
          f"methods {', '.join(settings.methods)}, on {device}")
    for key, value in list(totals.items()) + list(shared.items()):
        print(f"  {key}: {value}")
    print("  measured: " + ", ".join(f"{k} {v * 1e3:.3g} ms/token" if isinstance(v, float) else
                                     f"{k} {v[0]:.3g} s prefill + {v[1] * 1e3:.3g} ms/step" for k, v in rate.items()))
    print(f"  estimated: M_base and the rewrites {runner.clock(setup)}")
    for case, times in estimate.items():
        print(f"  estimated, {case}: " + ", ".join(f"{k} {runner.clock(v)}" for k, v in times.items()))
    return {"users": rows, "totals": totals, "shared": shared, "rates": rate, "estimate": estimate,
            "shard_users": [u.user_id for u in shards.share(targets, shard)]}
