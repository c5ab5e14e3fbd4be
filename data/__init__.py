"""LaMP data for cdcda: the six tasks, their appendix-B prompts, the two file formats, the demo.

Each task (sec. 5.1; LaMP-6 is private) is a `Task` in `TASKS`: profile fields, labels, metric
kind, and the appendix-B prompt as ChatML (`Task.messages`: a RAG row's retrieved block, then
LaMP's query input, which holds the instruction; appendix B's `<lim_start>` is an OCR of
`<|im_start|>`). `Task.pair`: a profile item as a training pair shaped like the task's queries;
`Candidates`: the synthetic pairs the cloud writes from them (step 2).

`load_users(task, data_dir)` reads every JSON file in `data_dir/<task>/` (None: the embedded
demo, `data/demo/`; `data/stream/` has longer lamp7 histories for the buffer comparison): LaMP's
official `X_questions.json` + `X_outputs.json` (questions with identical profiles are one user,
user_id the first one's id) or any other `*.json` in the per-user format of OPPU, `[{user_id,
profile, query: [{id, input, gold}]}]`; users of different files who share a profile item id are
one person (`merge_people`). A bad file is an `errors.InputError` naming the file, the record and
its id; a profile item missing a field, a user with no history or no query, a warning."""
import json
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from errors import InputError

DEMO_DIR = Path(__file__).parent / "demo"

LAMP1_LABELS = ("[1]", "[2]")
LAMP2_TAGS = ("sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia",
              "dark comedy", "classic", "psychology", "fantasy", "romance",
              "thought-provoking", "social commentary", "violence", "true story")
LAMP3_SCORES = ("1", "2", "3", "4", "5")


@dataclass
class Query:
    id: str
    input: str  # LaMP's query text, task instruction included
    gold: str


@dataclass
class User:
    user_id: str
    profile: list[dict]  # the user's history D_u, items with the task's profile fields
    queries: list[Query]
    # file name -> how many of the queries came from it
    files: dict = field(default_factory=dict, compare=False)


class Candidates(NamedTuple):
    """Step 2's synthetic pairs: pairs[i] = (x_syn, y_syn) was written from the user's pair
    source[i]; counts: how many replies there were ("generated"), held no pair ("unparsable"), or
    a response outside the task's labels ("off_label")."""
    source: list[int]
    pairs: list[tuple[str, str]]
    counts: dict


@dataclass(frozen=True)
class Task:
    name: str  # "lamp7"
    lamp_name: str  # "LaMP_7", the `task` field of official outputs files
    title: str
    profile_fields: tuple[str, ...]
    labels: tuple[str, ...] | None  # fixed label list (lamp1, lamp2) or None
    metric: str  # "classification" (accuracy, F1), "regression" (MAE, RMSE), "generation" (ROUGE)
    system: str  # appendix-B system text, verbatim
    user_end: str  # what appendix B prints between the query text and <|im_end|>
    pair_input: str  # str.format template over a profile item: the training input
    pair_output: str  # the profile field that is the training output
    # the outputs a training pair may have, None: free text
    pair_labels: tuple[str, ...] | None = None

    @property
    def instruction(self) -> str:
        """The instruction text of a training input, the part before the profile content."""
        return self.pair_input.split("{", 1)[0]

    def format_history(self, items) -> str:
        """The {RETRIEVED USER HISTORY} block: one line per item, newline-terminated."""
        lines = ["; ".join(f"{f}: {item[f]}" for f in self.profile_fields) for item in items]
        return "".join(line + "\n" for line in lines)

    def messages(self, query_input: str, retrieved=()) -> list[dict]:
        """Appendix-B prompt as ChatML messages (system, user) for one query."""
        user = self.format_history(retrieved) + query_input + self.user_end
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]

    def pair(self, item: dict) -> tuple[str, str]:
        """One profile item -> (x, y): x the user's content (the tweet, the article) without the
        task instruction, which `training_input` adds; y the output (module docstring)."""
        return self.pair_input[len(self.instruction):].format(**item), str(item[self.pair_output])

    def training_input(self, x: str) -> str:
        """A pair's content as a query of this task reads: the instruction, then x (the one place
        it is added back; the filters and the cloud see x alone)."""
        return self.instruction + x

    def valid_output(self, y: str) -> bool:
        """Whether `y` may be a training pair's output: exactly one of `pair_labels` after strip (as
        LaMP's metrics score: "Sci-Fi" is not "sci-fi"), any non-empty text for the free-text tasks
        (lamp1's pairs end in a title, not in "[1]"/"[2]")."""
        y = y.strip()
        return bool(y) and (self.pair_labels is None or y in self.pair_labels)


_TITLE_OF_ABSTRACT = "Generate a title for the following abstract of a paper: {abstract}"
_TITLE_SYSTEM = ("With the given examples, generate a title for the given article. "
                 "Only output the title and nothing else. ")

TASKS: dict[str, Task] = {t.name: t for t in [
    Task("lamp1", "LaMP_1", "Personalized Citation Identification", ("title", "abstract"),
         LAMP1_LABELS, "classification",
         "With the given examples, which reference is related?", "",
         _TITLE_OF_ABSTRACT, "title"),
    Task("lamp2", "LaMP_2", "Personalized Movie Tagging", ("description", "tag"),
         LAMP2_TAGS, "classification",
         "With the given examples, generate a tag for the given movie. ", " ",
         "Which tag does this movie relate to among the following tags? Just answer with the "
         "tag name without further explanation. tags: [" + ", ".join(LAMP2_TAGS) + "] "
         "description: {description}", "tag", LAMP2_TAGS),
    Task("lamp3", "LaMP_3", "Personalized Product Rating", ("text", "score"),
         None, "regression",
         "With the given examples, generate a score for the given review. ", " ",
         "What is the score of the following review on a scale of 1 to 5? just answer with "
         "1, 2, 3, 4, or 5 without further explanation. review: {text}", "score", LAMP3_SCORES),
    Task("lamp4", "LaMP_4", "Personalized News Headline Generation", ("text", "title"),
         None, "generation", _TITLE_SYSTEM, " ",
         "Generate a headline for the following article: {text}", "title"),
    Task("lamp5", "LaMP_5", "Personalized Scholarly Title Generation", ("title", "abstract"),
         None, "generation", _TITLE_SYSTEM, " ", _TITLE_OF_ABSTRACT, "title"),
    Task("lamp7", "LaMP_7", "Personalized Tweet Paraphrasing", ("text",),
         None, "generation",
         "With the given examples, paraphrase the following tweet without any explanation "
         "before or after it. ", " ",
         "Paraphrase the following tweet without any explanation before or after it: {text}",
         "text"),
]}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise InputError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


def split_users(users: list[User], n_target: int, selection: str = "most-active",
                seed: int = 0) -> tuple[list[User], list[User]]:
    """The `n_target` targets and the others, who train M_base: "most-active" (sec. 5.1, after
    OPPU) the longest histories, ties by user_id; "random" (appendix D) a seeded sample."""
    if not 1 <= n_target <= len(users):
        raise InputError(f"--users {n_target}: must be between 1 and the {len(users)} users")
    if selection == "random":
        ranked = random.Random(seed).sample(sorted(users, key=lambda u: u.user_id), len(users))
    else:
        ranked = sorted(users, key=lambda u: (-len(u.profile), u.user_id))
    return ranked[:n_target], ranked[n_target:]


def merge_people(users: list[User]) -> list[User]:
    """Users whose histories share a profile item id are one person (LaMP's train and dev files
    hold the same people under other ids): the first one's id, the histories' union, every query."""
    merged, owner = [], {}  # profile item id -> index in merged
    for user in users:
        ids = {str(item["id"]) for item in user.profile if isinstance(item, dict) and "id" in item}
        hits = sorted({owner[i] for i in ids if i in owner})
        if not hits:
            merged.append(user)
            index = len(merged) - 1
        else:
            index = hits[0]
            for other in [merged[h] for h in hits[1:]] + [user]:
                person = merged[index]
                known = {json.dumps(item, sort_keys=True) for item in person.profile}
                person.profile += [item for item in other.profile
                                   if json.dumps(item, sort_keys=True) not in known]
                person.queries += other.queries
                for name, n in other.files.items():
                    person.files[name] = person.files.get(name, 0) + n
            for h in hits[1:]:  # rare: this user joins two people seen apart so far
                merged[h] = None
                owner.update({i: index for i, o in owner.items() if o == h})
        owner.update({i: index for i in ids})
    return [u for u in merged if u is not None]


def load_users(task: str, data_dir=None) -> list[User]:
    """All usable users of `task` from `data_dir/<task>/` (None: the embedded demo), in file
    order (sorted names), then record order (the module docstring says which formats)."""
    spec = get_task(task)
    task_dir = (DEMO_DIR if data_dir is None else Path(data_dir)) / spec.name
    if not task_dir.is_dir():
        raise InputError(
            f"{task_dir}: no such directory (expected {spec.name}/ holding LaMP's "
            f"X_questions.json + X_outputs.json, or per-user JSON files)")
    files = sorted(task_dir.glob("*.json"))
    questions = [f for f in files if f.name.endswith("_questions.json")]
    outputs = [f for f in files if f.name.endswith("_outputs.json")]
    users = []
    for path in questions:
        gold_path = path.with_name(path.name[:-len("_questions.json")] + "_outputs.json")
        if gold_path not in outputs:
            raise InputError(f"{path}: its gold file {gold_path.name} is missing")
        users += _read_official(spec, path, gold_path)
    for path in outputs:
        if path.with_name(path.name[:-len("_outputs.json")] + "_questions.json") not in questions:
            raise InputError(f"{path}: its questions file is missing")
    for path in files:
        if path not in questions and path not in outputs:
            users += _read_per_user(spec, path)
    users = merge_people(users)
    seen = set()
    for u in users:
        if u.user_id in seen:
            raise InputError(f"{task_dir}: user id {u.user_id!r} appears twice")
        seen.add(u.user_id)
    if not users:
        raise InputError(f"{task_dir}: no usable user (no JSON files, or all users skipped)")
    return users


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON "
                         f"({e.msg} at line {e.lineno} column {e.colno})") from None


def _field(record, key: str, where: str, kind=None):
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise InputError(f"{where}: missing field {key!r}")
    if kind is not None and not isinstance(record[key], kind):
        raise InputError(f"{where}: field {key!r} must be a {kind.__name__}, "
                         f"got {type(record[key]).__name__}")
    return record[key]


def _where(path: Path, i: int, record, key: str) -> str:
    rid = record.get(key) if isinstance(record, dict) else None
    return f"{path} record {i}" + (f" ({key} {rid!r})" if rid is not None else "")


def _check_gold(spec: Task, gold, where: str) -> str:
    gold = str(gold)
    allowed = spec.labels or spec.pair_labels  # lamp1, lamp2: the labels; lamp3: the scores
    if allowed is not None and gold.strip() not in allowed:
        raise InputError(f"{where}: gold {gold!r} is not one of {', '.join(allowed)}")
    return gold


def _clean_profile(spec: Task, profile: list, where: str) -> list[dict]:
    """Profile items with every task field present and non-empty; others skipped with a warning."""
    items = []
    for j, item in enumerate(profile):
        missing = [f for f in spec.profile_fields
                   if not isinstance(item, dict) or str(item.get(f) or "").strip() == ""]
        if missing:
            warnings.warn(f"{where} profile item {j}: missing or empty {', '.join(missing)}; "
                          "item skipped")
        else:
            items.append(item)
    return items


def _keep(user: User, where: str) -> bool:
    if not user.profile:
        warnings.warn(f"{where}: user {user.user_id!r} has no history; user skipped")
    elif not user.queries:
        warnings.warn(f"{where}: user {user.user_id!r} has no query; user skipped")
    return bool(user.profile and user.queries)


def _read_official(spec: Task, q_path: Path, o_path: Path) -> list[User]:
    """LaMP's official pair of files; questions with identical profiles form one user."""
    outputs = _read_json(o_path)
    golds_list = _field(outputs, "golds", str(o_path), list)
    if "task" in outputs and outputs["task"] != spec.lamp_name:
        raise InputError(f"{o_path}: task {outputs['task']!r}, "
                         f"expected {spec.lamp_name!r} for {spec.name}")
    golds = {}
    for i, g in enumerate(golds_list):
        where = _where(o_path, i, g, "id")
        gid = str(_field(g, "id", where))
        if gid in golds:
            raise InputError(f"{where}: duplicate id {gid!r}")
        golds[gid] = _check_gold(spec, _field(g, "output", where), where)
    questions = _read_json(q_path)
    if not isinstance(questions, list):
        raise InputError(f"{q_path}: expected a JSON list of questions, "
                         f"got {type(questions).__name__}")
    users, wheres, used = {}, {}, set()
    for i, q in enumerate(questions):
        where = _where(q_path, i, q, "id")
        qid = str(_field(q, "id", where))
        query_input = _field(q, "input", where, str)
        profile = _field(q, "profile", where, list)
        if qid in used:
            raise InputError(f"{where}: duplicate id {qid!r}")
        if qid not in golds:
            raise InputError(f"{where}: no gold with id {qid!r} in {o_path}")
        used.add(qid)
        key = json.dumps(profile, sort_keys=True)
        if key not in users:
            users[key] = User(qid, _clean_profile(spec, profile, where), [])
            wheres[key] = where
        users[key].queries.append(Query(qid, query_input, golds[qid]))
        users[key].files[q_path.name] = users[key].files.get(q_path.name, 0) + 1
    extra = [gid for gid in golds if gid not in used]
    if extra:
        raise InputError(f"{o_path}: gold ids with no question in {q_path.name}: "
                         f"{', '.join(extra[:10])}")
    return [u for key, u in users.items() if _keep(u, wheres[key])]


def _read_per_user(spec: Task, path: Path) -> list[User]:
    """The per-user format: a list of {user_id, profile, query: [{id, input, gold}]}."""
    records = _read_json(path)
    if not isinstance(records, list):
        raise InputError(f"{path}: expected a JSON list of users, got {type(records).__name__}")
    users = []
    for i, r in enumerate(records):
        where = _where(path, i, r, "user_id")
        uid = str(_field(r, "user_id", where))
        profile = _clean_profile(spec, _field(r, "profile", where, list), where)
        queries = []
        for j, q in enumerate(_field(r, "query", where, list)):
            qwhere = f"{where} query {j}"
            gold = _check_gold(spec, _field(q, "gold", qwhere), qwhere)
            qid, text = str(_field(q, "id", qwhere)), _field(q, "input", qwhere, str)
            queries.append(Query(qid, text, gold))
        user = User(uid, profile, queries, {path.name: len(queries)})
        if _keep(user, where):
            users.append(user)
    return users
