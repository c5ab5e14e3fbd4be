"""The paper's comparisons on top of cdcda.py's pipeline (sec. 5.2-5.4; Table 3 is efficiency.py).

    python experiments.py --task lamp7 --methods all   Table 1: the eleven rows (`TABLE1`)
    python experiments.py --task lamp7 --ablations     Table 2: RS, -DS, -LDA, -FT (`ABLATIONS`)
    python experiments.py --task lamp7 --sweep-k       Figure 2: CDCDA-PLM at k = 1, 3, 5, and its plot
    python experiments.py --task lamp7 --compare-buffers --data data/stream
                                                       Qin et al.'s online buffer against the whole history
    python experiments.py --table4 lamp2,lamp7 --device-model google/flan-t5-base
                                                       Table 4: an encoder-decoder device model, +BM25 and CDCDA-PLM
    python experiments.py --table5 lamp2,lamp7         Table 5: the data's statistics, from OUT/<task> (run if unfinished)
Every other option is cdcda.py's (one parser: cdcda's options plus these).

Each row is a function of a `cdcda.Run` (one target user) in `METHODS`; the pipeline runs,
caches and scores them like its own three:
- cloud: M_cloud answers the appendix-B prompt, not personalized ("base": M_base does).
- RAG (sec. 5.1, "one retriever item"): the user's profile item that ranks first for the
  query's content (the query input without the task instruction, as `cdcda.upload` cuts it
  from the pairs) goes into the prompt's {RETRIEVED USER HISTORY}. BM25: Okapi, k1 = 1.2,
  b = 0.75 (baselines.BM25). Dense: the embedded MiniLM, cosine; "+contriever" rows use
  facebook/contriever, unnormalised dot product (a hub download: not in `--methods all`).
- speculative: M_cloud drafts gamma = 4 tokens, the personalized device model (Direct-FT's
  adapter on M_base: the row sits among the on-device personalized ones) verifies by exact
  rejection sampling, so the output is distributed as Direct-FT's (baselines.py says why);
  the acceptance rate is reported.
- eda-ft: Direct-FT on D_u plus EDA variants of each pair's input (response kept): k variants
  per pair (the augmentation budget CDCDA-PLM gets), alpha = 0.1, WordNet 3.0 from Debian's
  wordnet-base.
- rkd-ft: LoRA on M_base trained with the token-level reverse KL to M_cloud on D_u's responses
  (needs one tokenizer for both models).
- buffers (`buffer_methods`): Direct-FT and CDCDA-PLM on what a 16- or 32-item buffer keeps of
  the history (chosen by EOE + DSS + IDD, or at random), against the whole history. The cloud
  augments the whole history once per user and a buffer row takes the synthetic pairs of its
  own items: the same prompts at the same temperature as uploading only those items would
  send, though not the same random draws (one seeded generator serves a whole upload, so a
  pair's draws depend on what else is in it).
- ablations: rs keeps as many random parsed candidates as the filters kept (seeded); no-ds
  trains on all parsed candidates; -LDA is Direct-FT and -FT is M_base (cdcda.METHODS).
"""
import argparse
import copy
import functools
import json
import random
import sys
from pathlib import Path

import matplotlib
import torch

import appendix
import baselines
import cdcda
import data
import encoder
import generate
import hub
import lora
import options
import qwen2
import report
from cdcda import Method
from errors import InputError

WORDNET_DIR = "/usr/share/wordnet"  # Debian's wordnet-base
CONTRIEVER = "facebook/contriever"
GAMMA = 4  # drafted tokens per verification
EDA_ALPHA = 0.1


# ---------------------------------------------------------------- models, loaded once per process
@functools.cache
def load_cloud(source: str, device: str):
    print(f"loading the cloud model {source} in process for the cloud baselines")
    return qwen2.load(source, "float32", device)


def cloud_lm(run: cdcda.Run):
    """(model, tokenizer) of M_cloud: the run's, or loaded here when the pipeline did not load it
    (no method needed synthetic data) or only has its tokenizer (--cloud-api)."""
    if run.cloud is not None and run.cloud[0] is not None:
        return run.cloud
    return load_cloud(run.args.cloud_model, run.args.device)


load_encoder = functools.cache(encoder.load)  # (source, dtype, device) -> (model, tokenizer)
wordnet = functools.cache(baselines.load_wordnet)  # directory -> {lemma: synonyms}


# ---------------------------------------------------------------- Table 1
def reply(model, tokenizer, run: cdcda.Run, conversations, method: str) -> list[str]:
    return generate.chat(model, tokenizer, conversations, max_new_tokens=cdcda.ANSWER_TOKENS[run.task.name],
                      temperature=run.args.temperature, seed=run.seed, desc=f"answer {method}")


def retrieve(run: cdcda.Run, retriever: str) -> list[dict]:
    """The one profile item each query retrieves: ranked by BM25 or by a dense encoder for the
    query's content, over each item's field values."""
    documents = [" ".join(str(item[f]) for f in run.task.profile_fields) for item in run.user.profile]
    prefix = run.task.instruction
    picked = []
    for q in run.user.queries:
        query = q.input.removeprefix(prefix)
        if retriever == "bm25":
            (i,) = baselines.retrieve_bm25(query, documents, k=1)
        else:
            model, tok = load_encoder(retriever, "float32", run.args.device)
            embed = functools.partial(encoder.sentence_embeddings, model, tok, normalize=retriever != CONTRIEVER)
            (i,) = baselines.retrieve_dense(query, documents, embed, k=1)
        picked.append(run.user.profile[i])
    return picked


def prompted(where: str, retriever: str | None = None):
    """A row where M_cloud or the device's M_base answers the appendix-B prompt as it is, or
    with one retrieved item in it (RAG) when a retriever is named."""
    def method(run: cdcda.Run) -> list[str]:
        model, tok = cloud_lm(run) if where == "cloud" else (run.device_model, run.tokenizer)
        items = retrieve(run, retriever) if retriever else [None] * len(run.user.queries)
        conversations = [run.task.messages(q.input, retrieved=[item] if item else [])
                         for q, item in zip(run.user.queries, items)]
        return reply(model, tok, run, conversations, where + (f"+{retriever}" if retriever else ""))
    return method


def direct_ft_model(run: cdcda.Run):
    """The Direct-FT personalized device model: its adapter from this user's directory when the
    direct-ft row already trained it (same settings: cdcda.main checks), else trained here."""
    path = run.user_dir / "direct-ft.adapter.safetensors"
    if path.is_file():
        model = lora.add_lora(copy.deepcopy(run.device_model), r=run.training.r, alpha=run.training.alpha)
        return lora.load_adapter(model, path).eval()
    model, run.losses["direct-ft"] = cdcda.personalize(run.device_model, run.tokenizer, run.task, run.pairs,
                                                       run.training, run.seed, f"direct-ft {run.user.user_id}")
    lora.save_adapter(model, path)
    return model


def speculative(run: cdcda.Run) -> list[str]:
    """Speculative decoding, one query at a time: M_cloud drafts, Direct-FT's model verifies."""
    target, tok = direct_ft_model(run), run.tokenizer
    draft, cloud_tok = cloud_lm(run)
    generate.check_shared_tokenizer(tok, cloud_tok, "cloud")
    same = target.config.vocab_size == draft.config.vocab_size
    generator = torch.Generator().manual_seed(run.seed)
    answers, totals = [], {"drafted": 0, "accepted": 0, "target_calls": 0, "new_tokens": 0}
    for q in run.user.queries:
        prompt = tok.encode(tok.apply_chat_template(run.task.messages(q.input)))
        ids, stats = generate.speculative_generate(
            target, draft, torch.tensor([prompt]), cdcda.ANSWER_TOKENS[run.task.name], gamma=GAMMA,
            temperature=run.args.temperature, eos_token_id=tok.eos_token_ids, generator=generator,
            vocab_size=None if same else tok.tokenizer.get_vocab_size())
        answers.append(tok.decode(ids[0, len(prompt):].tolist()).strip())  # up to the eos (special: dropped)
        totals = {key: totals[key] + stats[key] for key in totals}
    hub.write_atomic(run.user_dir / "speculative.json", json.dumps(totals))
    return answers


def eda_pairs(run: cdcda.Run) -> list[tuple[str, str]]:
    """D_u plus k EDA variants of each pair's input, each with the pair's response."""
    rng, wn = random.Random(run.seed), wordnet(WORDNET_DIR)
    return list(run.pairs) + [(variant, y) for x, y in run.pairs
                              for variant in baselines.eda(x, wn, alpha=EDA_ALPHA, n_aug=run.args.k, rng=rng)]


def rkd_ft(run: cdcda.Run) -> list[str]:
    """RKD-FT: a fresh LoRA on M_base distilled from M_cloud with reverse KL on D_u."""
    teacher, cloud_tok = cloud_lm(run)
    student = lora.add_lora(copy.deepcopy(run.device_model), r=run.training.r, alpha=run.training.alpha)
    prefix, a = run.task.instruction, run.training
    examples = [(run.task.messages(prefix + x), y) for x, y in run.pairs]
    run.losses["rkd-ft"] = baselines.rkd_finetune(
        student, teacher, run.tokenizer, examples, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
        max_length=a.max_length, seed=run.seed, desc=f"rkd-ft {run.user.user_id}", teacher_tokenizer=cloud_tok)
    lora.save_adapter(student, run.user_dir / "rkd-ft.adapter.safetensors")
    return run.answer(student.eval(), "rkd-ft")


# ---------------------------------------------------------------- Table 2
def candidates(run: cdcda.Run) -> list[tuple[str, str]]:
    """Every parsed candidate of this user (kept or not), from the synthesize step's cache."""
    return [(r["syn_input"], r["syn_output"]) for r in cdcda.synthetic_records(run.user_dir)]


def random_selection(run: cdcda.Run) -> list[tuple[str, str]]:
    """RS: as many parsed candidates as the filters kept, drawn at random (seeded per user)."""
    return random.Random(run.seed).sample(candidates(run), len(run.kept))


TABLE1 = ["cloud", "base", "cloud+bm25", "device+bm25", "cloud+dense", "device+dense", "direct-ft",
          "speculative", "eda-ft", "rkd-ft", "cdcda"]  # direct-ft first: speculative reuses its adapter
ABLATIONS = {"cdcda": "Full model (DS)", "rs": "Full model (RS)", "no-ds": "-DS",
             "direct-ft": "-DS -LDA", "base": "-DS -LDA -FT"}  # Table 2's rows, its labels
METHODS = {
    **cdcda.METHODS,
    "cloud": Method("M_cloud (non-personalized)", prompted("cloud"), False),
    "cloud+bm25": Method("M_cloud + BM25", prompted("cloud", "bm25"), False),
    "device+bm25": Method("M_device + BM25", prompted("device", "bm25"), False),
    "cloud+dense": Method(f"M_cloud + dense ({encoder.EMBEDDED})", prompted("cloud", encoder.EMBEDDED), False),
    "device+dense": Method(f"M_device + dense ({encoder.EMBEDDED})", prompted("device", encoder.EMBEDDED), False),
    "cloud+contriever": Method("M_cloud + Contriever", prompted("cloud", CONTRIEVER), False),
    "device+contriever": Method("M_device + Contriever", prompted("device", CONTRIEVER), False),
    "speculative": Method("Speculative (M_cloud drafts, Direct-FT verifies)", speculative, False),
    "eda-ft": Method("EDA-FT", lambda run: run.personalized("eda-ft", eda_pairs(run)), False),
    "rkd-ft": Method("RKD-FT", rkd_ft, False),
    "rs": Method("CDCDA-PLM, random selection (RS)", lambda run: run.personalized(
        "rs", cdcda.download(run.pairs, random_selection(run))), True),
    "no-ds": Method("CDCDA-PLM, no selection (-DS)", lambda run: run.personalized(
        "no-ds", cdcda.download(run.pairs, candidates(run))), True),
}


# ---------------------------------------------------------------- the second system: online buffers
def buffered(capacity: int, policy: str, augmented: bool):
    """A row trained on the `capacity` items a buffer keeps (see `cdcda.buffer_history`), plus,
    when `augmented`, the kept synthetic pairs generated from those items."""
    name = f"{policy}-{capacity}" + ("+aug" if augmented else "")

    def method(run: cdcda.Run) -> list[str]:
        pairs, summary = cdcda.buffer_history(run.pairs, run.device_model, run.tokenizer, capacity, policy, run.seed)
        hub.write_atomic(run.user_dir / f"buffer-{policy}-{capacity}.json", json.dumps(summary, indent=1))
        synthetic = []
        if augmented:
            sources = set(pairs)
            synthetic = [(r["syn_input"], r["syn_output"]) for r in cdcda.synthetic_records(run.user_dir)
                         if r["kept"] and (r["input"], r["output"]) in sources]
        return run.personalized(name, cdcda.download(pairs, synthetic))
    return name, method


BUFFER_SIZES = (16, 32)  # the buffer capacities (items)


def buffer_methods(capacities=BUFFER_SIZES) -> dict:
    """The comparison's rows: M_base, the whole history (Direct-FT, CDCDA-PLM), and for each
    capacity a buffer chosen by the scores or at random, without and with augmentation."""
    rows = {"base": "no personalization (M_base)", "direct-ft": "whole history",
            "cdcda": "whole history + augmentation"}
    methods = {m: cdcda.METHODS[m]._replace(label=label) for m, label in rows.items()}
    for capacity in capacities:
        for policy in ("scores", "random"):
            for augmented in (False, True):
                name, method = buffered(capacity, policy, augmented)
                label = f"{capacity}-item buffer, {'EOE+DSS+IDD' if policy == 'scores' else 'random'}"
                methods[name] = Method(label + (" + augmentation" if augmented else ""), method, augmented)
    return methods


# ---------------------------------------------------------------- Figure 2
PAPER_K5 = {"lamp2": {"accuracy": 0.391, "f1": 0.224}, "lamp7": {"rouge1": 0.383, "rougeL": 0.336}}  # Table 2, k = 5


def plot(path: Path, ks: list[int], series: dict[str, list[float]], task: str) -> None:
    """Figure 2: each metric against k, and the paper's value at k = 5 where it gives one (its
    figure prints no numbers; Table 2's full model is CDCDA-PLM at the default k = 5)."""
    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt  # after choosing the backend, as matplotlib asks
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for (metric, values), colour in zip(series.items(), ("C0", "C1", "C2", "C3")):
        ax.plot(ks, values, "o-", color=colour, label=f"{metric} (ours)")
        if metric in PAPER_K5.get(task, {}):
            ax.plot([5], [PAPER_K5[task][metric]], "x", color=colour, markersize=9, label=f"{metric} (paper, k = 5)")
    ax.set(xlabel="k, synthetic samples per pair", ylabel="score", xticks=ks, ylim=(0, 1),
           title=f"Figure 2 on {task}: CDCDA-PLM against k")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep(args, out: Path, ks=(1, 3, 5)) -> dict:
    """Figure 2: CDCDA-PLM at each k, each in its own directory (its own synthetic data)."""
    reps = {k: cdcda.run(variant(args, methods=["cdcda"], k=k, out=str(out / f"k{k}"))) for k in ks}
    if any("missing" in r or r.get("plan") for r in reps.values()):  # a shard, or --plan: no figure yet
        return reps
    first = reps[ks[0]]
    rep = {**first, "labels": {f"k={k}": f"CDCDA-PLM, k = {k}" for k in ks},
           "rows": {f"k={k}": r["rows"]["cdcda"] for k, r in reps.items()},
           "counts": {f"kept (k={k})": r["counts"].get("kept", 0) for k, r in reps.items()},
           "seconds": {f"k={k}": sum(r["seconds"].values()) for k, r in reps.items()},
           "settings": {**first["settings"], "k": list(ks)}}
    names = [m for m in first["rows"]["cdcda"] if m not in ("bertscore_model", "bertscore_layer", "gold_nll")]
    plot(out / "sweep-k.png", list(ks), {m: [rep["rows"][f"k={k}"][m] for k in ks] for m in names}, args.task)
    return report.write(rep, out, "sweep-k", note="![Figure 2](sweep-k.png)\n")


# ---------------------------------------------------------------- Table 4
TABLE4 = {"device+bm25": "+BM25", "cdcda": "CDCDA-PLM"}  # the device model's two columns
PAPER_TABLE4 = {  # task: (metric, as the paper names it, FlanT5-base +BM25, FlanT5-base CDCDA-PLM, Qwen2.5-0.5B
    # CDCDA-PLM), the paper's numbers as it prints them
    "lamp1": ("accuracy", "Acc", "0.6", "0.570", "0.530"), "lamp2": ("accuracy", "Acc", "0.3499", "0.283", "0.391"),
    "lamp3": ("mae", "MAE", "0.4632", "0.484", "0.400"), "lamp4": ("rouge1", "R-1", "0.0834", "0.115", "0.120"),
    "lamp5": ("rouge1", "R-1", "0.2867", "0.406", "0.382"), "lamp7": ("rouge1", "R-1", "0.2933", "0.362", "0.383")}


def table4(args, tasks: list[str], root: Path) -> dict:
    """Table 4 (sec. 5.6): the device model (FlanT5-base in the paper; `t5.family` picks T5 from
    its config) with BM25 RAG and with CDCDA-PLM, one run per task in root/<task>; the table,
    tasks as rows, beside the paper's numbers, in root/table4.md. A task not run shows "-"."""
    reports = {t: cdcda.run(variant(args, task=t, methods=list(TABLE4), out=str(root / t)), METHODS) for t in tasks}
    name = args.device_model
    lines = [f"Table 4 with `{name}` as the device model (paper: FlanT5-base; Qwen2.5-0.5B for comparison)", "",
             f"| task | ours {name} +BM25 | ours CDCDA-PLM | paper FlanT5-base +BM25 | paper FlanT5-base CDCDA-PLM "
             "| paper Qwen2.5-0.5B CDCDA-PLM |", "| --- | --- | --- | --- | --- | --- |"]
    for task, (metric, short, *paper) in PAPER_TABLE4.items():
        ours = [f"{reports[task]['rows'][m][metric]:.3f}" if task in reports else "-" for m in TABLE4]
        lines.append(f"| LaMP-{task[4:]} ({short}) | " + " | ".join(ours + paper) + " |")
    text = "\n".join(lines) + "\n"
    root.mkdir(parents=True, exist_ok=True)
    hub.write_atomic(root / "table4.md", text)
    print(text)
    return reports


# ---------------------------------------------------------------- Table 5
def table5(args, tasks: list[str], root: Path) -> dict:
    """Table 5 (appendix A): each task's target users' test data and kept synthetic data, from the
    run in root/<task> (Table 1's, or `python cdcda.py --task T --out root/T`). A task with no run
    there is run with CDCDA-PLM alone, an unfinished one is finished (its own methods); a task
    still unfinished after that (a shard's part, --plan) shows no row. The table in root/table5.md."""
    rows, tokenizers = {}, set()
    for task in tasks:
        out = root / task
        saved = appendix.run_args(out) if (out / "run.json").is_file() else None
        if saved is None or report.finished(out, appendix.targets_of(saved)[1], saved.methods)[1]:
            methods = [m for m in saved.methods if m in METHODS] if saved else ["cdcda"]
            if "rows" not in cdcda.run(variant(args, task=task, methods=methods, out=str(out)), METHODS):
                continue
        rows[task] = appendix.table5_of_run(out)[1]
        tokenizers.add(appendix.run_args(out).device_model)
    if rows:
        appendix.write_table5(rows, ", ".join(sorted(tokenizers)), root)
    return rows


# ---------------------------------------------------------------- the command
def acceptance(rep: dict, out: Path) -> str:
    """The speculative row's acceptance rate (accepted / drafted tokens, all target users), put
    in rep["speculative"]; returns the line for the Markdown."""
    totals = [json.loads((out / "users" / u / "speculative.json").read_text()) for u in rep["users"]]
    rep["speculative"] = {key: sum(t[key] for t in totals) for key in totals[0]}
    drafted, accepted = rep["speculative"]["drafted"], rep["speculative"]["accepted"]
    rep["speculative"]["acceptance_rate"] = accepted / drafted if drafted else float("nan")
    return (f"speculative decoding (M_cloud drafts {GAMMA} tokens, Direct-FT's model verifies): {accepted} of "
            f"{drafted} drafted tokens accepted, acceptance rate {rep['speculative']['acceptance_rate']:.3f}\n")


def variant(args, **changes) -> argparse.Namespace:
    """A copy of the checked options with some changed, for one of the experiment's runs."""
    return argparse.Namespace(**{**vars(args), **changes})


def main(argv=None) -> dict:
    p = options.parser(METHODS)
    p.description = "cdcda.py's pipeline with the paper's baselines, ablations, k sweep and buffer comparison"
    p.set_defaults(methods=None)
    p.add_argument("--ablations", action="store_true", help=f"Table 2 ({','.join(ABLATIONS)}) in OUT/ablations")
    p.add_argument("--sweep-k", action="store_true", help="Figure 2: cdcda at k = 1, 3, 5 in OUT/sweep-k/k<k>")
    p.add_argument("--compare-buffers", action="store_true", help="whole history vs 16/32-item online "
                   "buffers (scores, random), each with and without augmentation, in OUT/buffers")
    p.add_argument("--buffer-sizes", default=",".join(map(str, BUFFER_SIZES)), metavar="N,N",
                   help="--compare-buffers' capacities (items)")
    p.add_argument("--buffer-rows", default="all", metavar="ROW,ROW", help="--compare-buffers' rows (default all: "
                   "base, direct-ft, cdcda, then scores-N, random-N, each also +aug)")
    p.add_argument("--table4", nargs="?", const=",".join(PAPER_TABLE4), metavar="TASKS", help="Table 4: the "
                   "--device-model (a T5 such as google/flan-t5-base, or a decoder) +BM25 and CDCDA-PLM on TASKS "
                   "(default all six), in OUT/<task> (OUT default runs/table4), the table in OUT/table4.md")
    p.add_argument("--table5", nargs="?", const=",".join(PAPER_TABLE4), metavar="TASKS", help="Table 5: the "
                   "statistics of the runs in OUT/<task> (OUT default runs; a task not run is run with cdcda), "
                   "in OUT/table5.md")
    args = p.parse_args(argv)
    table1 = args.methods is not None or not (args.ablations or args.sweep_k or args.compare_buffers or args.table4
                                              or args.table5)
    args.methods = ",".join(TABLE1) if args.methods in (None, "all") else args.methods
    args = options.check_args(p, args, METHODS)
    if table1 and "eda-ft" in args.methods:  # before any work, not when Table 1 reaches its EDA-FT row
        baselines.check_wordnet(WORDNET_DIR)
    if args.compare_buffers and args.buffer:
        p.error("--compare-buffers streams every user through its own buffers; drop --buffer")
    sizes = args.buffer_sizes.split(",")
    if not all(n.isdigit() and int(n) > 0 for n in sizes):
        p.error(f"--buffer-sizes: {args.buffer_sizes!r} is not a comma-separated list of positive integers")
    out = Path(args.out or Path("runs") / args.task)
    buffers = buffer_methods([int(n) for n in sizes])
    if args.buffer_rows != "all":
        rows = args.buffer_rows.split(",")
        if unknown := [r for r in rows if r not in buffers]:
            p.error(f"--buffer-rows: no row {', '.join(unknown)}; the rows are {','.join(buffers)}")
        buffers = {r: buffers[r] for r in rows}
    experiment = {k: getattr(args, k) for k in ("ablations", "sweep_k", "compare_buffers", "buffer_sizes",
                                                 "buffer_rows", "table4", "table5")}
    for k in experiment:
        delattr(args, k)  # not pipeline settings: left out of the runs' settings fingerprints
    reports = {}
    if table1:
        reports["table1"] = rep = cdcda.run(variant(args, out=str(out)), METHODS)
        if "speculative" in rep.get("rows", {}):  # not a shard's or --plan's answer
            report.write(rep, out, note=acceptance(rep, out), show=False)
    if experiment["ablations"]:
        methods = {m: METHODS[m]._replace(label=label) for m, label in ABLATIONS.items()}
        reports["ablations"] = cdcda.run(variant(args, methods=list(methods), out=str(out / "ablations")), methods)
    if experiment["compare_buffers"]:
        reports["buffers"] = cdcda.run(variant(args, methods=list(buffers), out=str(out / "buffers")), buffers)
    if experiment["sweep_k"]:
        reports["sweep_k"] = sweep(args, out / "sweep-k")
    if experiment["table4"]:
        tasks = [data.get_task(t).name for t in experiment["table4"].split(",")]
        reports["table4"] = table4(args, tasks, Path(args.out or "runs/table4"))
    if experiment["table5"]:  # issue 23
        reports["table5"] = table5(args, [data.get_task(t).name for t in experiment["table5"].split(",")],
                                   Path(args.out or "runs"))
    return reports


if __name__ == "__main__":
    try:
        main()
    except InputError as e:  # bad files, records, options: the message says which
        sys.exit(f"experiments.py: error: {e}")
