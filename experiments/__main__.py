"""The paper's comparisons on top of cdcda.py's pipeline (sec. 5.2-5.6).

    python -m experiments --task lamp7 --methods all   Table 1: the eleven rows (methods.TABLE1)
    python -m experiments --task lamp7 --ablations     Table 2: RS, -DS, -LDA, -FT (methods.ABLATIONS)
    python -m experiments --task lamp7 --sweep-k       Figure 2: CDCDA-PLM at k = 1, 3, 5, and its plot
    python -m experiments --table4 lamp2,lamp7 --device-model google/flan-t5-base
                                                       Table 4: an encoder-decoder device model (t5.py),
                                                       +BM25 and CDCDA-PLM
    python -m experiments --table5 lamp2,lamp7         Table 5: the data's statistics, from OUT/<task> (run if
                                                       unfinished; appendix.py)
    python -m experiments --case-study [USER] --out DIR
                                                       Figure 3: one user's page of a finished run (appendix.py)
    python -m experiments.efficiency                   Table 3 (efficiency.py)
Every other option is cdcda.py's (one parser: cdcda's options plus these). The rows are in
methods.py; a T5 device model is loaded by t5.py, whose `t5.family` the run's `cdcda.prepare` takes.
"""
import functools
import json
import sys
from dataclasses import replace
from pathlib import Path

import matplotlib

import cdcda
import data
import hub
import options
import report
import runner
from errors import InputError
from experiments import appendix, baselines, methods, t5
from experiments.methods import ABLATIONS, GAMMA, METHODS, TABLE1

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


def run(settings: options.Settings, methods, family: cdcda.Family) -> dict:
    """The harness's run (runner.py) of these rows, the device model of `family`."""
    return runner.run(settings, methods, functools.partial(cdcda.prepare, family=family), family)


def sweep(settings: options.Settings, out: Path, family: cdcda.Family, ks=(1, 3, 5)) -> dict:
    """Figure 2: CDCDA-PLM at each k, each in its own directory (its own synthetic data)."""
    reps = {k: run(replace(settings, methods=("cdcda",), out=str(out / f"k{k}"), k=k), METHODS, family) for k in ks}
    if any("missing" in r for r in reps.values()):  # a shard: no figure yet
        return reps
    first = reps[ks[0]]
    rep = {**first, "labels": {f"k={k}": f"CDCDA-PLM, k = {k}" for k in ks},
           "rows": {f"k={k}": r["rows"]["cdcda"] for k, r in reps.items()},
           "counts": {f"kept (k={k})": r["counts"].get("kept", 0) for k, r in reps.items()},
           "seconds": {f"k={k}": sum(r["seconds"].values()) for k, r in reps.items()},
           "settings": {**first["settings"], "k": list(ks)}}
    names = [m for m in first["rows"]["cdcda"] if m not in ("bertscore_model", "bertscore_layer", "gold_nll")]
    plot(out / "sweep-k.png", list(ks), {m: [rep["rows"][f"k={k}"][m] for k in ks] for m in names}, settings.task)
    return report.write(rep, out, "sweep-k", note="![Figure 2](sweep-k.png)\n")


# ---------------------------------------------------------------- Table 4
TABLE4 = {"device+bm25": "+BM25", "cdcda": "CDCDA-PLM"}  # the device model's two columns
PAPER_TABLE4 = {  # task: (metric, as the paper names it, FlanT5-base +BM25, FlanT5-base CDCDA-PLM, Qwen2.5-0.5B
    # CDCDA-PLM), the paper's numbers as it prints them
    "lamp1": ("accuracy", "Acc", "0.6", "0.570", "0.530"), "lamp2": ("accuracy", "Acc", "0.3499", "0.283", "0.391"),
    "lamp3": ("mae", "MAE", "0.4632", "0.484", "0.400"), "lamp4": ("rouge1", "R-1", "0.0834", "0.115", "0.120"),
    "lamp5": ("rouge1", "R-1", "0.2867", "0.406", "0.382"), "lamp7": ("rouge1", "R-1", "0.2933", "0.362", "0.383")}


def table4(settings: options.Settings, tasks: list[str], root: Path, family: cdcda.Family) -> dict:
    """Table 4 (sec. 5.6): the device model (FlanT5-base in the paper; `t5.family` picks T5 from
    its config) with BM25 RAG and with CDCDA-PLM, one run per task in root/<task>; the table,
    tasks as rows, beside the paper's numbers, in root/table4.md. A task not run shows "-"."""
    reports = {t: run(replace(settings, task=t, methods=tuple(TABLE4), out=str(root / t)), METHODS, family)
               for t in tasks}
    name = settings.device_model
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


# ---------------------------------------------------------------- Table 5 and Figure 3 (the appendices)
def table5(settings: options.Settings, tasks: list[str], root: Path, family: cdcda.Family) -> dict:
    """Table 5 (appendix A): each task's target users' test data and kept synthetic data, from the
    run in root/<task> (Table 1's, or `python cdcda.py --task T --out root/T`). A task with no run
    there is run with CDCDA-PLM alone, an unfinished one is finished (its own methods); a task
    still unfinished after that (a shard's part) shows no row. The table in root/table5.md."""
    rows, tokenizers = {}, set()
    for task in tasks:
        out = root / task
        saved = appendix.run_settings(out)[0] if (out / "run.json").is_file() else None
        if saved is None or runner.finished(out, appendix.targets_of(saved)[1], saved.methods)[1]:
            chosen = tuple(m for m in saved.methods if m in METHODS) if saved else ("cdcda",)
            if "rows" not in run(replace(settings, task=task, methods=chosen, out=str(out)), METHODS, family):
                continue
        rows[task] = appendix.table5_of_run(out)[1]
        tokenizers.add(appendix.run_settings(out)[0].device_model)
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


DECODER_ONLY = ("speculative", "rkd-ft")  # rows that need a decoder-only device model


def main(argv=None) -> dict:
    p = options.parser(METHODS)
    p.prog = "python -m experiments"
    p.description = "cdcda.py's pipeline with the paper's baselines, ablations, k sweep and Table 4"
    p.set_defaults(methods=None)
    p.add_argument("--ablations", action="store_true", help=f"Table 2 ({','.join(ABLATIONS)}) in OUT/ablations")
    p.add_argument("--sweep-k", action="store_true", help="Figure 2: cdcda at k = 1, 3, 5 in OUT/sweep-k/k<k>")
    p.add_argument("--table4", nargs="?", const=",".join(PAPER_TABLE4), metavar="TASKS", help="Table 4: the "
                   "--device-model (a T5 such as google/flan-t5-base, or a decoder) +BM25 and CDCDA-PLM on TASKS "
                   "(default all six), in OUT/<task> (OUT default runs/table4), the table in OUT/table4.md")
    p.add_argument("--table5", nargs="?", const=",".join(PAPER_TABLE4), metavar="TASKS", help="Table 5: the "
                   "statistics of the runs in OUT/<task> (OUT default runs; a task not run is run with cdcda), "
                   "in OUT/table5.md")
    p.add_argument("--case-study", nargs="?", const="", metavar="USER_ID", help="Figure 3: OUT/case-study-USER_ID.md "
                   "of the finished run in --out (the user's history, kept synthetic pairs, every method's answers; "
                   "no USER_ID: the run's first target user)")
    args = p.parse_args(argv)
    if args.case_study is not None:  # a finished run's page: no run, no other option
        if not args.out:
            p.error("--case-study: name the run's directory with --out")
        return {"case_study": appendix.case_study(Path(args.out), args.case_study)}
    table1 = args.methods is not None or not (args.ablations or args.sweep_k or args.table4 or args.table5)
    args.methods = ",".join(TABLE1) if args.methods in (None, "all") else args.methods
    tables = {"table4": args.table4, "table5": args.table5}
    tasks = {name: [t.strip() for t in value.split(",")] for name, value in tables.items() if value}
    for name, names in tasks.items():  # before any work, not when that table's turn comes
        if unknown := [t for t in names if t not in data.TASKS]:
            p.error(f"--{name} {tables[name]}: unknown task {', '.join(unknown)}; valid tasks: {', '.join(data.TASKS)}")
    settings = options.check(p, args, METHODS)
    if table1 and "eda-ft" in settings.methods:  # before any work, not when Table 1 reaches its EDA-FT row
        baselines.check_wordnet(methods.WORDNET_DIR)
    family = t5.family(settings.device_model)  # a T5 device model: Table 4
    if table1 and family.chat is t5.chat and (refused := [m for m in settings.methods if m in DECODER_ONLY]):
        p.error(f"--device-model {settings.device_model} is a T5: {', '.join(refused)} need a decoder")
    out, reports = Path(settings.out), {}
    if table1:
        reports["table1"] = rep = run(settings, METHODS, family)
        if "speculative" in rep.get("rows", {}):  # not a shard's answer
            report.write(rep, out, note=acceptance(rep, out), show=False)
    if args.ablations:
        rows = {m: METHODS[m]._replace(label=label) for m, label in ABLATIONS.items()}
        reports["ablations"] = run(replace(settings, methods=tuple(rows), out=str(out / "ablations")), rows, family)
    if args.sweep_k:
        reports["sweep_k"] = sweep(settings, out / "sweep-k", family)
    if args.table4:
        reports["table4"] = table4(settings, tasks["table4"], Path(args.out or "runs/table4"), family)
    if args.table5:
        reports["table5"] = table5(settings, tasks["table5"], Path(args.out or "runs"), family)
    return reports


if __name__ == "__main__":
    try:
        main()
    except InputError as e:  # bad files, records, options: the message says which
        sys.exit(f"python -m experiments: error: {e}")
