"""The paper's appendix from a run's files: Table 5 (app. A) and the case study (app. C, Figure 3).

Table 5 describes the data of a run, per task: the target users' test data (# Q queries in all,
# History items per user on average, L_in / L_out the mean tokens of a query's input and gold)
and the synthetic pairs the filters kept (# Q pairs in all, L_in / L_out). Tokens are the device
model's (its tokenizer, no special tokens). An input is counted as the device model reads it: a
query's LaMP input (the task instruction included) and a synthetic x behind that same
instruction (`cdcda.training_examples`); the chat template is not counted.
`table5` computes one task's row from the data; `table5_of_run` reads it from a run's directory.

The case study (`case_study`, `python -m experiments --case-study USER_ID --out DIR`) is one
user's page, as Figure 3 shows one LaMP-5 user: a few of the history items, the cloud's kept
synthetic pairs with their filter scores (eq. 2-4), and for each query every method's answer
beside the gold, with its score (ROUGE-1 as Figure 3; right or wrong for LaMP-1/2; the absolute
error for LaMP-3).
"""
import json
from pathlib import Path

import data
import filters
import hub
import metrics
import qwen2
import runner
from errors import InputError
from experiments import t5
from options import Settings

# The paper's Table 5 (its LaMP data, Qwen2.5's tokenizer): # Q, # History, L_in, L_out of the
# target users, then # Q, L_in, L_out of the filtered synthetic data, as it prints them.
PAPER_TABLE5 = {
    "lamp1": ("100", "317.57", "78.43", "3.0", "15928", "161.76", "19.15"),
    "lamp2": ("2752", "54.58", "129.55", "2.24", "8962", "121.21", "2.20"),
    "lamp3": ("100", "959.02", "244.79", "1.00", "15721", "193.19", "1.00"),
    "lamp4": ("955", "269.08", "31.49", "15.60", "12736", "27.40", "14.27"),
    "lamp5": ("100", "443.03", "222.60", "15.52", "23473", "156.92", "18.63"),
    "lamp7": ("100", "120.15", "40.90", "27.66", "16490", "39.56", "0.00")}
COLUMNS = ("queries", "history", "query_in", "query_out", "synthetic", "synthetic_in", "synthetic_out")
HISTORY_SHOWN, PAIRS_SHOWN, CELL = 5, 10, 300  # the case study: items, kept pairs, characters per text


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def table5(task: data.Task, users: list[data.User], kept: dict | None, tokenizer) -> dict:
    """One task's Table 5 row. `kept`: user id -> that user's kept (x_syn, y_syn) pairs (None: the
    run made no synthetic data, its columns are None). A mean over nothing is None."""
    def tokens(text: str) -> int:
        return len(tokenizer.encode(text))
    queries = [q for u in users for q in u.queries]
    row = {"queries": len(queries), "history": _mean([len(u.profile) for u in users]),
           "query_in": _mean([tokens(q.input) for q in queries]),
           "query_out": _mean([tokens(q.gold) for q in queries])}
    pairs = None if kept is None else [p for u in users for p in kept.get(u.user_id, [])]
    return row | {"synthetic": None if pairs is None else len(pairs),
                  "synthetic_in": None if pairs is None else _mean([tokens(task.instruction + x) for x, _ in pairs]),
                  "synthetic_out": None if pairs is None else _mean([tokens(y) for _, y in pairs])}


def table5_markdown(rows: dict, tokenizer_name: str) -> str:
    """Table 5 for {task name: table5 row}, each task beside the paper's row."""
    def cell(value):
        return "-" if value is None else str(value) if isinstance(value, int) else f"{value:.2f}"
    lines = [f"Table 5 (appendix A): target users' test data and the kept synthetic data; tokens of "
             f"`{tokenizer_name}`", "",
             "| task | # Q | # History | L_in | L_out | synthetic # Q | synthetic L_in | synthetic L_out |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in rows.items():
        lines.append(f"| LaMP-{name[4:]} (ours) | " + " | ".join(cell(row[c]) for c in COLUMNS) + " |")
        lines.append(f"| LaMP-{name[4:]} (paper) | " + " | ".join(PAPER_TABLE5[name]) + " |")
    return "\n".join(lines) + "\n"


def run_settings(out: Path) -> tuple[Settings, dict]:
    """The settings a run saved in OUT/run.json, and its rows' labels."""
    return runner.load_run(out)


def targets_of(settings: Settings) -> tuple[data.Task, list[data.User]]:
    """The run's task and its target users, as the run chose them."""
    task = data.get_task(settings.task)
    users = data.load_users(task.name, settings.data)
    return task, data.split_users(users, min(settings.users, len(users)), settings.user_selection, settings.seed)[0]


def records(out: Path, user_id: str) -> list[dict] | None:
    """A user's selection records (users/<id>/synthetic.jsonl), None when the run made none."""
    path = out / "users" / user_id / "synthetic.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else None


def device_tokenizer(source: str) -> qwen2.Tokenizer:
    """The device model's tokenizer alone (T5's or a decoder's, from its config.json), no weights."""
    directory = qwen2.model_dir(source)
    return (t5.Tokenizer if t5.family(source).chat is t5.chat else qwen2.Tokenizer).from_dir(directory)


def table5_of_run(out: Path) -> tuple[str, dict]:
    """(task name, Table 5 row) of the run in `out`, from its run.json, its data and every target's
    synthetic.jsonl (the synthetic columns None when no target has one)."""
    out = Path(out)
    settings = run_settings(out)[0]
    task, targets = targets_of(settings)
    found = {u.user_id: records(out, u.user_id) for u in targets}
    missing = [uid for uid, r in found.items() if r is None]
    if missing and len(missing) < len(found):
        raise InputError(f"{out}: users {', '.join(missing)} have no synthetic.jsonl yet; finish the run first")
    kept = None if missing else {uid: [(r["syn_input"], r["syn_output"]) for r in rs if r["kept"]]
                                 for uid, rs in found.items()}
    return task.name, table5(task, targets, kept, device_tokenizer(settings.device_model))


def write_table5(rows: dict, tokenizer_name: str, out: Path) -> str:
    """OUT/table5.md, printed."""
    text = table5_markdown(rows, tokenizer_name)
    out.mkdir(parents=True, exist_ok=True)
    hub.write_atomic(out / "table5.md", text)
    print(f"\n{text}written: {out / 'table5.md'}")
    return text


# ---------------------------------------------------------------- the case study (Figure 3)
def md_cell(value, limit: int = CELL) -> str:
    """One Markdown table cell: one line, pipes escaped, cut at `limit` characters."""
    text = " ".join(str(value).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def query_score(task: data.Task, prediction: str, gold: str) -> str:
    """One answer's score as Figure 3 prints it: ROUGE-1 F (LaMP-4/5/7), right or wrong after
    LaMP's strip-and-match (LaMP-1/2), the absolute error after LaMP's worst-case rule (LaMP-3)."""
    if task.metric == "classification":
        return "right" if metrics.accuracy([prediction], [gold], list(task.labels)) == 1 else "wrong"
    if task.metric == "regression":
        return f"|error| {metrics.mae([prediction], [gold]):.2f}"
    return f"R-1 {metrics.rouge_1(prediction.strip(), gold.strip()):.2f}"


def _scores(r: dict) -> str:
    """A selection record's filter scores: eq. 2 both ways, eq. 3's ROUGE-L, eq. 4's ratio (or
    Qin et al.'s ROUGE-1 for a --synthesis-filter rouge1 run)."""
    if "rouge_1" in r:
        return f"| {r['rouge_1']:.2f} |"
    ratio = "-" if r["length_ratio"] is None else f"{r['length_ratio']:.2f}"
    return f"| {r['scf_forward']:.2f} | {r['scf_backward']:.2f} | {r['rouge_l']:.2f} | {ratio} |"


def case_study(out: Path, user_id: str = "") -> Path:
    """OUT/case-study-<user>.md for one finished target user of the run in `out` (Figure 3);
    no user_id: the run's first target user."""
    out = Path(out)
    settings, labels = run_settings(out)
    task, targets = targets_of(settings)
    user_id = user_id or targets[0].user_id
    user = next((u for u in targets if u.user_id == user_id), None)
    if user is None:
        raise InputError(f"--case-study {user_id}: not a target user of the run in {out} "
                         f"(its targets: {', '.join(u.user_id for u in targets)})")
    path = out / "users" / user_id / "result.json"
    if not path.is_file():
        raise InputError(f"--case-study {user_id}: {path} is missing; the user is not finished")
    result = json.loads(path.read_text())
    lines = [f"# Case study (appendix C, Figure 3): user {user_id}, {task.name} ({task.title})", "",
             f"Run {out}: device model `{settings.device_model}`, cloud model "
             f"`{settings.cloud_model}`.", "",
             f"## History ({min(HISTORY_SHOWN, len(user.profile))} of its {len(user.profile)} items)", ""]
    lines += ["- " + md_cell("; ".join(f"{f}: {item[f]}" for f in task.profile_fields)) for item in
              user.profile[:HISTORY_SHOWN]]
    lines += ["", *synthetic_section(records(out, user_id), settings), "## Answers", ""]
    for i, q in enumerate(user.queries):
        lines += [f"### Query {q.id}", "", md_cell(q.input, 2 * CELL), "", "| method | answer | score |",
                  "| --- | --- | --- |", f"| gold | {md_cell(q.gold)} | |"]
        for method, label in labels.items():
            if method in result["predictions"]:
                answer = result["predictions"][method][i]
                lines.append(f"| {label} | {md_cell(answer)} | {query_score(task, answer, q.gold)} |")
        lines.append("")
    target = out / f"case-study-{user_id}.md"
    hub.write_atomic(target, "\n".join(lines))
    print(f"written: {target}")
    return target


def synthetic_section(recs: list[dict] | None, settings: Settings) -> list[str]:
    """The case study's kept synthetic pairs, with their filter scores and the run's thresholds."""
    if recs is None:
        return ["## Synthetic pairs", "", "This run made none (no method of it uses synthetic data).", ""]
    kept = [r for r in recs if r["kept"]]
    lines = [f"## Synthetic pairs the filters kept ({min(PAIRS_SHOWN, len(kept))} shown of {len(kept)} kept, "
             f"{len(recs)} parsed candidates)", ""]
    if recs and "rouge_1" in recs[0]:
        lines += [f"Kept when ROUGE-1 F(x_syn, x) > {settings.extra.get('eps_rouge1')} (Qin et al.).", "",
                  "| from x | x_syn | y_syn | ROUGE-1 |", "| --- | --- | --- | --- |"]
    else:
        t, judge = settings, settings.judge
        scf = t.eps_scf if t.eps_scf is not None else (
            filters.EPS_SCF_NLI if judge.startswith("nli:") else filters.EPS_SCF_EMBEDDING)  # the judge's
        lines += [f"Kept when SCF: M(x => x_syn) and M(x_syn => x) >= {scf} (eq. 2, judge `{judge}`), TDF: "
                  f"ROUGE-L F(x, x_syn) <= {t.eps_tdf} (eq. 3), LSF: len(x_syn) / len(x) in "
                  f"[{t.eps_min_len}, {t.eps_max_len}] (eq. 4).", "",
                  "| from x | x_syn | y_syn | SCF x => x_syn | SCF x_syn => x | TDF ROUGE-L | LSF ratio |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {md_cell(r['input'], 120)} | {md_cell(r['syn_input'])} | {md_cell(r['syn_output'], 120)} " + _scores(r)
              for r in kept[:PAIRS_SHOWN]]
    return lines + [""]
