"""data/: appendix-B prompts, profile -> training pairs, the two LaMP formats, errors, the demo."""
import json
import re
import warnings
from pathlib import Path

import pytest

import data
from data import TASKS, Query, User, load_users, split_users
from errors import InputError


def chatml(messages):
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


# Appendix B, typed by hand from the paper (`<lim_start>` read as ChatML's `<|im_start|>`),
# with the query placeholders left in: the builder must reproduce them character for character.
APPENDIX_B = {
    "lamp1": "<|im_start|>system\nWith the given examples, which reference is related?<|im_end|>\n"
             "<|im_start|>user\n{RETRIEVED USER HISTORY}\nFor an author who has written the paper with "
             "the title {PAPER TITLE}, which reference is related? Just answer with [1] or [2] without "
             "explanation. [1]: {OPTION_1} [2]: {OPTION_2}<|im_end|>\n",
    "lamp2": "<|im_start|>system\nWith the given examples, generate a tag for the given movie. <|im_end|>\n"
             "<|im_start|>user\n{RETRIEVED USER HISTORY}\nWhich tag does this movie relate to among the "
             "following tags? Just answer with the tag name without further explanation. tags: [sci-fi, "
             "based on a book, comedy, action, twist ending, dystopia, dark comedy, classic, psychology, "
             "fantasy, romance, thought-provoking, social commentary, violence, true story] description: "
             "{MOVIE DESCRIPTION} <|im_end|>\n",
    "lamp3": "<|im_start|>system\nWith the given examples, generate a score for the given review. <|im_end|>\n"
             "<|im_start|>user\n{RETRIEVED USER HISTORY}\nWhat is the score of the following review on a "
             "scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 without further explanation. review: "
             "{REVIEW} <|im_end|>\n",
    "lamp4": "<|im_start|>system\nWith the given examples, generate a title for the given article. Only "
             "output the title and nothing else. <|im_end|>\n<|im_start|>user\n{RETRIEVED USER HISTORY}\n"
             "Generate a headline for the following article: {ARTICLE} <|im_end|>\n",
    "lamp5": "<|im_start|>system\nWith the given examples, generate a title for the given article. Only "
             "output the title and nothing else. <|im_end|>\n<|im_start|>user\n{RETRIEVED USER HISTORY}\n"
             "Generate a title for the following abstract of a paper: {PAPER} <|im_end|>\n",
    "lamp7": "<|im_start|>system\nWith the given examples, paraphrase the following tweet without any "
             "explanation before or after it. <|im_end|>\n<|im_start|>user\n{RETRIEVED USER HISTORY}\n"
             "Paraphrase the following tweet without any explanation before or after it: USER TWEET "
             "<|im_end|>\n",
}


def query_text(task):
    """The query line of appendix B (what LaMP's `input` field holds for that task)."""
    user = APPENDIX_B[task].split("{RETRIEVED USER HISTORY}\n")[1]
    return user[: -len("<|im_end|>\n")].rstrip(" ") if task != "lamp1" else user[: -len("<|im_end|>\n")]


@pytest.mark.parametrize("task", list(TASKS))
def test_prompt_is_appendix_b_without_history(task):
    got = chatml(TASKS[task].messages(query_text(task)))
    assert got == APPENDIX_B[task].replace("{RETRIEVED USER HISTORY}\n", "")


@pytest.mark.parametrize("task", list(TASKS))
def test_prompt_is_appendix_b_with_retrieved_history(task):
    spec = TASKS[task]
    items = [{f: f"{f} {k}" for f in spec.profile_fields} for k in (1, 2)]
    block = "".join("; ".join(f"{f}: {f} {k}" for f in spec.profile_fields) + "\n" for k in (1, 2))
    got = chatml(spec.messages(query_text(task), retrieved=items))
    assert got == APPENDIX_B[task].replace("{RETRIEVED USER HISTORY}\n", block)
    assert spec.messages("q", items)[1]["content"].startswith(block)


def test_lamp7_history_block_by_hand():
    got = TASKS["lamp7"].messages("Paraphrase the following tweet without any explanation before or "
                                  "after it: hi", [{"id": "1", "text": "a b"}, {"text": "c"}])
    assert got[1] == {"role": "user", "content": "text: a b\ntext: c\nParaphrase the following tweet "
                      "without any explanation before or after it: hi "}


PAIRS = {
    "lamp1": ({"id": "1", "title": "T", "abstract": "A"},
              ("Generate a title for the following abstract of a paper: A", "T")),
    "lamp2": ({"description": "D", "tag": "comedy"},
              ("Which tag does this movie relate to among the following tags? Just answer with the tag "
               "name without further explanation. tags: [sci-fi, based on a book, comedy, action, twist "
               "ending, dystopia, dark comedy, classic, psychology, fantasy, romance, thought-provoking, "
               "social commentary, violence, true story] description: D", "comedy")),
    "lamp3": ({"text": "R {not a field}", "score": 4},
              ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, "
               "3, 4, or 5 without further explanation. review: R {not a field}", "4")),
    "lamp4": ({"text": "Art", "title": "H", "date": "2020"},
              ("Generate a headline for the following article: Art", "H")),
    "lamp5": ({"title": "T", "abstract": "A"},
              ("Generate a title for the following abstract of a paper: A", "T")),
    "lamp7": ({"text": "my tweet"},
              ("Paraphrase the following tweet without any explanation before or after it: my tweet",
               "my tweet")),
}


@pytest.mark.parametrize("task", list(TASKS))
def test_profile_item_to_pair(task):
    """The pair holds the user's content; the instruction comes back in `training_input`, the one
    place that adds it, as the task's queries read."""
    item, (query_input, y) = PAIRS[task]
    x, output = TASKS[task].pair(item)
    assert output == y and not x.startswith(TASKS[task].instruction[:10])
    assert TASKS[task].training_input(x) == query_input


def test_pair_input_matches_query_format():
    """A pair's input starts with the same instruction as the task's demo queries."""
    for task in ["lamp2", "lamp3", "lamp4", "lamp5", "lamp7"]:
        user = load_users(task)[0]
        x = TASKS[task].training_input(TASKS[task].pair(user.profile[0])[0])
        prefix = x[: x.index(":", x.index("following")) + 1]
        assert user.queries[0].input.startswith(prefix), task


def test_task_registry():
    assert list(TASKS) == ["lamp1", "lamp2", "lamp3", "lamp4", "lamp5", "lamp7"]
    assert TASKS["lamp1"].labels == ("[1]", "[2]")
    assert len(TASKS["lamp2"].labels) == 15 and TASKS["lamp2"].labels[0] == "sci-fi"
    assert TASKS["lamp2"].labels[-1] == "true story"
    assert [TASKS[t].labels for t in ["lamp3", "lamp4", "lamp5", "lamp7"]] == [None] * 4
    assert {t: TASKS[t].metric for t in TASKS} == {
        "lamp1": "classification", "lamp2": "classification", "lamp3": "regression",
        "lamp4": "generation", "lamp5": "generation", "lamp7": "generation"}
    assert TASKS["lamp4"].profile_fields == ("text", "title")


# ---- files -------------------------------------------------------------------------------

def write_official(root, task="lamp7", questions=None, golds=None, lamp="LaMP_7", prefix="dev"):
    d = root / task
    d.mkdir(parents=True, exist_ok=True)
    if questions is None:
        prof_a = [{"id": "a1", "text": "one"}, {"id": "a2", "text": "two"}]
        questions = [{"id": "q1", "input": "in1", "profile": prof_a},
                     {"id": "q2", "input": "in2", "profile": [{"id": "b1", "text": "x"}]},
                     {"id": "q3", "input": "in3", "profile": prof_a}]
    if golds is None:
        golds = [{"id": q["id"], "output": "out-" + q["id"]} for q in questions]
    (d / f"{prefix}_questions.json").write_text(json.dumps(questions))
    (d / f"{prefix}_outputs.json").write_text(json.dumps({"task": lamp, "golds": golds}))
    return d


def test_load_official_groups_questions_by_profile(tmp_path):
    write_official(tmp_path)
    users = load_users("lamp7", tmp_path)
    assert [u.user_id for u in users] == ["q1", "q2"]
    assert users[0].profile == [{"id": "a1", "text": "one"}, {"id": "a2", "text": "two"}]
    assert users[0].queries == [Query("q1", "in1", "out-q1"), Query("q3", "in3", "out-q3")]
    assert users[1].queries == [Query("q2", "in2", "out-q2")]


def test_load_per_user_format_and_merge(tmp_path):
    d = write_official(tmp_path)
    records = [{"user_id": 7, "profile": [{"text": "p"}],
                "query": [{"id": 70, "input": "i", "gold": "g"}, {"id": "71", "input": "j", "gold": "h"}]}]
    (d / "users.json").write_text(json.dumps(records))
    users = load_users("lamp7", tmp_path)
    assert [u.user_id for u in users] == ["q1", "q2", "7"]
    assert users[2] == User("7", [{"text": "p"}], [Query("70", "i", "g"), Query("71", "j", "h")])


def expect_error(tmp_path, match, task="lamp7", error=ValueError):
    with pytest.raises(error, match=match):
        load_users(task, tmp_path)


def test_unknown_task_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'lamp6'; valid tasks: lamp1, lamp2, lamp3, lamp4, lamp5, lamp7"):
        load_users("lamp6", tmp_path)


def test_missing_task_directory(tmp_path):
    expect_error(tmp_path, r"lamp7: no such directory", error=InputError)


def test_malformed_json(tmp_path):
    d = write_official(tmp_path)
    (d / "dev_questions.json").write_text('[{"id": "q1", "input": ')
    expect_error(tmp_path, r"dev_questions.json: not valid JSON \(.* line 1 column")


def test_missing_field_names_file_record_and_field(tmp_path):
    write_official(tmp_path, questions=[{"id": "q1", "profile": [{"text": "a"}]}],
                   golds=[{"id": "q1", "output": "o"}])
    expect_error(tmp_path, r"dev_questions.json record 0 \(id 'q1'\): missing field 'input'")


def test_per_user_query_missing_gold(tmp_path):
    (tmp_path / "lamp7").mkdir()
    (tmp_path / "lamp7" / "users.json").write_text(json.dumps(
        [{"user_id": "u1", "profile": [{"text": "a"}], "query": [{"id": "1", "input": "x"}]}]))
    expect_error(tmp_path, r"users.json record 0 \(user_id 'u1'\) query 0: missing field 'gold'")


def test_question_without_gold(tmp_path):
    write_official(tmp_path, golds=[{"id": "q1", "output": "o"}, {"id": "q3", "output": "o"}])
    expect_error(tmp_path, r"record 1 \(id 'q2'\): no gold with id 'q2' in .*dev_outputs.json")


def test_gold_without_question(tmp_path):
    qs = [{"id": "q1", "input": "i", "profile": [{"text": "a"}]}]
    write_official(tmp_path, questions=qs, golds=[{"id": "q1", "output": "o"}, {"id": "zz", "output": "o"}])
    expect_error(tmp_path, r"dev_outputs.json: gold ids with no question in dev_questions.json: zz")


def test_missing_outputs_file(tmp_path):
    d = write_official(tmp_path)
    (d / "dev_outputs.json").unlink()
    expect_error(tmp_path, r"dev_questions.json: its gold file dev_outputs.json is missing", error=InputError)


def test_outputs_of_another_task(tmp_path):
    write_official(tmp_path, lamp="LaMP_4")
    expect_error(tmp_path, r"dev_outputs.json: task 'LaMP_4', expected 'LaMP_7' for lamp7")


def test_duplicate_question_id(tmp_path):
    qs = [{"id": "q1", "input": "i", "profile": [{"text": "a"}]}] * 2
    write_official(tmp_path, questions=qs, golds=[{"id": "q1", "output": "o"}])
    expect_error(tmp_path, r"record 1 \(id 'q1'\): duplicate id 'q1'")


@pytest.mark.parametrize("task,gold,allowed", [("lamp1", "1", r"\[1\], \[2\]"), ("lamp2", "horror", "sci-fi"),
                                               ("lamp3", "6", "1, 2, 3, 4, 5")])
def test_gold_outside_label_list(tmp_path, task, gold, allowed):
    fields = TASKS[task].profile_fields
    qs = [{"id": "q1", "input": "i", "profile": [{f: "3" for f in fields}]}]
    write_official(tmp_path, task, qs, [{"id": "q1", "output": gold}], TASKS[task].lamp_name)
    expect_error(tmp_path, rf"dev_outputs.json record 0 \(id 'q1'\): gold '{gold}' is not one of {allowed}", task)


def test_empty_profile_user_is_skipped_with_warning(tmp_path):
    qs = [{"id": "q1", "input": "i", "profile": []}, {"id": "q2", "input": "j", "profile": [{"text": "a"}]}]
    write_official(tmp_path, questions=qs)
    with pytest.warns(UserWarning, match=r"record 0 \(id 'q1'\): user 'q1' has no history; user skipped"):
        users = load_users("lamp7", tmp_path)
    assert [u.user_id for u in users] == ["q2"]


def test_profile_item_missing_field_is_skipped_with_warning(tmp_path):
    qs = [{"id": "q1", "input": "i", "profile": [{"text": "a"}, {"id": "p2", "date": "x"}, {"text": " "}]}]
    write_official(tmp_path, questions=qs)
    with pytest.warns(UserWarning) as record:
        users = load_users("lamp7", tmp_path)
    assert [str(w.message).split("json ")[1] for w in record] == [
        "record 0 (id 'q1') profile item 1: missing or empty text; item skipped",
        "record 0 (id 'q1') profile item 2: missing or empty text; item skipped"]
    assert users[0].profile == [{"text": "a"}]


def test_user_without_query_is_skipped_and_no_users_is_an_error(tmp_path):
    (tmp_path / "lamp7").mkdir()
    (tmp_path / "lamp7" / "users.json").write_text(json.dumps([{"user_id": "u1", "profile": [{"text": "a"}], "query": []}]))
    with pytest.warns(UserWarning, match=r"user 'u1' has no query; user skipped"):
        expect_error(tmp_path, r"lamp7: no usable user")


def test_wrong_top_level_type(tmp_path):
    (tmp_path / "lamp7").mkdir()
    (tmp_path / "lamp7" / "users.json").write_text(json.dumps({"user_id": "u1"}))
    expect_error(tmp_path, r"users.json: expected a JSON list of users, got dict")


# ---- split -------------------------------------------------------------------------------

def test_split_users_most_active_with_deterministic_ties():
    def u(uid, n):
        return User(uid, [{"text": str(k)} for k in range(n)], [Query("q", "i", "g")])
    users = [u("d", 3), u("b", 5), u("a", 2), u("c", 5), u("e", 9)]
    targets, others = split_users(users, 3)
    assert [x.user_id for x in targets] == ["e", "b", "c"]
    assert [x.user_id for x in others] == ["d", "a"]
    assert [x.user_id for x in split_users(list(reversed(users)), 3)[0]] == ["e", "b", "c"]
    with pytest.raises(InputError, match="--users 6"):
        split_users(users, 6)
    with pytest.raises(InputError, match="--users 0"):
        split_users(users, 0)
    drawn = [x.user_id for x in split_users(users, 3, "random", seed=1)[0]]
    assert drawn == [x.user_id for x in split_users(list(reversed(users)), 3, "random", seed=1)[0]]  # seeded
    assert len(set(drawn)) == 3 and any([x.user_id for x in split_users(users, 3, "random", seed=s)[0]] != drawn
                                        for s in range(2, 6))  # another seed, another sample


def test_train_and_dev_files_hold_one_person_once(tmp_path):
    """LaMP's time-based split: the same person answers a train and a dev question, with a
    longer history in dev. Shared profile item ids make them one user, with both queries;
    M_base can then never train on a target's other question."""
    early = [{"id": "a1", "text": "one"}, {"id": "a2", "text": "two"}]
    write_official(tmp_path, prefix="train", questions=[
        {"id": "t1", "input": "in1", "profile": early}, {"id": "t2", "input": "in2", "profile": [{"id": "b1", "text": "x"}]}])
    write_official(tmp_path, prefix="dev", questions=[
        {"id": "d1", "input": "in3", "profile": early + [{"id": "a3", "text": "three"}]},
        {"id": "d2", "input": "in4", "profile": [{"id": "c1", "text": "y"}]}])
    users = {u.user_id: u for u in load_users("lamp7", tmp_path)}
    assert set(users) == {"d1", "d2", "t2"}  # dev_* sorts before train_*: the person is d1
    person = users["d1"]
    assert [q.id for q in person.queries] == ["d1", "t1"] and [i["id"] for i in person.profile] == ["a1", "a2", "a3"]
    assert person.files == {"dev_questions.json": 1, "train_questions.json": 1}


# ---- the embedded demo -------------------------------------------------------------------

def words(text):  # rouge_score's tokenizer: lowercase, non-alphanumerics split
    return set(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


@pytest.mark.parametrize("task", list(TASKS))
def test_demo_parses_cleanly_and_has_targets_and_others(task):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        users = load_users(task)
    targets, others = split_users(users, 3)
    assert len(others) >= 6
    assert min(len(u.profile) for u in targets) > max(len(u.profile) for u in others)
    assert all(len(u.queries) >= (4 if task == "lamp7" else 3) for u in targets)
    assert all(4 <= len(u.profile) <= 8 for u in others)
    assert all(8 <= len(u.profile) <= (16 if task == "lamp7" else 10) for u in targets)
    for u in users:
        for item in u.profile:
            TASKS[task].pair(item)
        for q in u.queries:
            allowed = TASKS[task].labels or (data.LAMP3_SCORES if task == "lamp3" else None)
            assert allowed is None or q.gold in allowed


def test_demo_lamp7_styles_are_distinct_at_word_level():
    """Each target has words in all its golds and most of its history that no other user writes."""
    users = load_users("lamp7")
    targets, _ = split_users(users, 3)
    for t in targets:
        history = [words(p["text"]) for p in t.profile]
        mine = set.intersection(*[words(q.gold) for q in t.queries])
        mine = {w for w in mine if sum(w in h for h in history) >= 0.8 * len(history)}
        theirs = set().union(*[words(p["text"]) for u in users if u is not t for p in u.profile])
        assert mine - theirs, t.user_id
        assert all(len(words(q.gold)) <= 30 for q in t.queries)


def test_demo_is_small():
    size = sum(p.stat().st_size for p in data.DEMO_DIR.rglob("*") if p.is_file())
    assert size < 200_000


def test_stream_set_extends_only_the_targets_histories():
    """data/stream (the buffer comparison's data): the demo's lamp7 users, the three targets
    with 48-item histories that keep their demo items in order and never hold a query text."""
    stream = data.load_users("lamp7", Path(data.__file__).parent / "stream")
    demo = data.load_users("lamp7")
    targets, others = data.split_users(stream, 3)
    demo_targets, demo_others = data.split_users(demo, 3)
    assert [len(u.profile) for u in targets] == [48, 48, 48]
    assert others == demo_others
    assert {u.user_id for u in targets} == {u.user_id for u in demo_targets}
    for user in targets:
        before = next(u for u in demo_targets if u.user_id == user.user_id)
        assert user.queries == before.queries
        texts = [item["text"] for item in user.profile]
        old = [item["text"] for item in before.profile]
        assert [t for t in texts if t in old] == old and len(set(texts)) == 48
        query_texts = {q.gold for q in user.queries} | {q.input.split(": ", 1)[1] for q in user.queries}
        assert not query_texts & set(texts)


@pytest.mark.parametrize("task", ["lamp2", "lamp3"])
def test_heldout_sets_are_their_own_users_in_lamps_query_format(task):
    """data/heldout (issue 30's label-decoding measurement): 12 users of 8-14 items and 2-4
    queries, each query LaMP's instruction over a 25-60-word text, golds among the labels, no
    text or user of the demo, no query text in a history; --users 3 leaves 9 others for M_base."""
    spec, heldout = TASKS[task], load_users(task, Path(data.__file__).parent / "heldout")
    text = spec.profile_fields[0]
    assert len(heldout) == 12 and len(split_users(heldout, 3)[1]) == 9
    demo = load_users(task)
    demo_texts = ({p[text] for u in demo for p in u.profile}
                  | {q.input for u in demo for q in u.queries})
    assert not {u.user_id for u in demo} & {u.user_id for u in heldout}
    for u in heldout:
        assert 8 <= len(u.profile) <= 14 and 2 <= len(u.queries) <= 4, u.user_id
        items = [p[text] for p in u.profile]
        assert all(spec.valid_output(str(p[spec.pair_output])) for p in u.profile)
        for q in u.queries:
            body = q.input.removeprefix(spec.instruction)
            content, gold = spec.pair({text: body, spec.pair_output: q.gold})
            assert q.input == spec.training_input(content) and gold in spec.pair_labels
            items.append(body)
            assert body not in items[:-1] and q.input not in demo_texts
        assert all(25 <= len(t.split()) <= 60 and t not in demo_texts for t in items), u.user_id
