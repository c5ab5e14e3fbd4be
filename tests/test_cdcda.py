"""The pipeline: the augmentation prompt and parser, and a tiny end-to-end run of all five steps.

The end-to-end tests use a tiny random decoder (conftest.py: SmolLM2's tokenizer, 2 layers) as
cloud and device model and the embedded MiniLM as judge, so they take seconds, not minutes.
"""
import json
import math

import pytest
import torch

import cdcda
import data
import qwen2


def test_augment_prompt_is_the_papers():
    text = cdcda.AUGMENT_PROMPT.format(x="rain again", y="ugh rain again smh")
    assert text == ("Generate an Input and Response pairs semantically similar to the following example, "
                    "no need to explain. Input: [rain again], Response: [ugh rain again smh].")


@pytest.mark.parametrize("text, expected", [
    ("Input: [snow in May], Response: [ugh snow in May smh].", ("snow in May", "ugh snow in May smh")),
    ("Input: snow in May\nResponse: ugh snow", ("snow in May", "ugh snow")),
    ("**Input:** \"snow in May\"\n**Response:** ugh snow", ("snow in May", "ugh snow")),
    ("Sure! Input: [a], Response: [b]\nInput: [c], Response: [d]", ("a", "b")),  # first pair only
    ("input: a; response: b", ("a", "b")),
    ("Input: [a], Response: [b, with a comma]", ("a", "b, with a comma")),
])
def test_parse_pair_well_formed(text, expected):
    assert cdcda.parse_pair(text) == expected


@pytest.mark.parametrize("text", [
    "", "I cannot help with that.", "Input: [snow in May]",  # partial: no response
    "Input: [], Response: [b]", "Response: [b]", "Input: [a], Response: []", "\x00\ufffd garbage ###",
])
def test_parse_pair_garbage_and_partial(text):
    assert cdcda.parse_pair(text) is None


@pytest.mark.parametrize("text, expected", [
    ("Input: [great phone], Response: [5]\n\nExplanation: the review is positive.", ("great phone", "5")),
    ("Input: [great phone], Response: 5\nNote: I kept the tone.", ("great phone", "5")),
    ("Input: [a], Response: b Explanation: same words", ("a", "b")),  # commentary on the same line
    ("Input: [a], Response: [b] Input: [c], Response: [d]", ("a", "b")),  # two pairs on one line
    ("Input: a, Response: b Input: c, Response: d", ("a", "b")),  # ... unbracketed
    ("Input: [my [new] phone] rocks], Response: [5]", ("my [new] phone", "5")),  # nested: the matching bracket
    ("Input: [my [new] phone], Response: [[1]]", ("my [new] phone", "[1]")),  # LaMP-1's label inside brackets
    ("Input: [a], Response: [b] and then some words", ("a", "b")),  # stops at the closing bracket
    ("Input: [a], Response: [b]\n\nI hope this helps!", ("a", "b")),
    ("**Input:** [a]\n**Response:** **5**", ("a", "5")),  # markdown bold
    ("Input: \u201ca\u201d, Response: \"b\".", ("a", "b")),  # quotes
    ("Input: [great phone, Response: [5]", ("great phone", "5")),  # input's bracket unclosed: tolerated
    ("Input: [a], Response: first line\nsecond line", ("a", "first line")),  # unbracketed: one line
])
def test_parse_pair_strict_about_what_follows(text, expected):
    assert cdcda.parse_pair(text) == expected


@pytest.mark.parametrize("text", [
    "Input: [a], Response: [b",  # the response's bracket never closes: the generation was cut off
    "Input: [a], Response: [b\nInput: [c], Response: [d]",  # ... and a second pair starts
    "Input: [a], Response: Explanation: none",  # only commentary
    "Input: [a], Response: [] Input: [c], Response: [d]",
])
def test_parse_pair_rejects_cut_off_and_empty_responses(text):
    assert cdcda.parse_pair(text) is None


@pytest.mark.parametrize("task, reply, valid", [
    ("lamp3", "Input: [great phone], Response: [5]", True),
    ("lamp3", "Input: [great phone], Response: [5 stars]", False),
    ("lamp3", "Input: [great phone], Response: [4.5]", False),
    ("lamp3", "Input: [great phone], Response: [6]", False),
    ("lamp2", "Input: [a heist film], Response: [twist ending]", True),
    ("lamp2", "Input: [a heist film], Response: [Twist Ending]", False),  # LaMP's metric is exact
    ("lamp2", "Input: [a heist film], Response: [heist]", False),
    ("lamp1", "Input: [an abstract], Response: [A Title]", True),  # lamp1 pairs end in a title
    ("lamp7", "Input: [a tweet], Response: [5 stars]", True),
])
def test_response_outside_the_labels_is_rejected(task, reply, valid):
    assert data.get_task(task).valid_output(cdcda.parse_pair(reply)[1]) is valid


def test_augment_counts_unparsable_and_off_label_apart():
    """lamp3: of four replies one parses with a valid score, one is cut off, two are off-label."""
    replies = ["Input: [good], Response: [4]", "Input: [good], Response: [4", "Input: [good], Response: [4 stars]",
               "Input: [good], Response: [Four]"]
    tok = qwen2.Tokenizer.from_dir(qwen2.embedded_dir())
    chat = lambda model, tokenizer, conversations, **kw: replies[:len(conversations)]
    task = data.get_task("lamp3")
    originals, candidates, unparsable, off_label = cdcda.augment(None, tok, [("good", "4")], 4, 0.7, 0, chat=chat,
                                                                 task=task)
    assert (originals, candidates, unparsable, off_label) == ([("good", "4")], [("good", "4")], 1, 2)
    assert cdcda.augment(None, tok, [("good", "4")], 4, 0.7, 0, chat=chat)[2:] == (1, 0)  # no task: no label check


@pytest.mark.parametrize("ratio", [1.0, 2.0, 3.5])
def test_augment_budget_allows_the_length_filters_upper_bound(ratio):
    """max_new_tokens = ceil(ratio * longest) + AUGMENT_SLACK: a candidate ratio times the
    longest example still fits, so eq. 4 and not the budget decides about it."""
    tok = qwen2.Tokenizer.from_dir(qwen2.embedded_dir())
    pairs = [("short one", "short"), (" ".join(["word"] * 150), " ".join(["word"] * 150))]
    seen = {}

    def chat(model, tokenizer, conversations, max_new_tokens, **kw):
        seen["budget"] = max_new_tokens
        return ["nothing"] * len(conversations)
    cdcda.augment(None, tok, pairs, 1, 0.7, 0, chat=chat, max_len_ratio=ratio)
    longest = len(tok.encode(f"Input: [{pairs[1][0]}], Response: [{pairs[1][1]}]"))
    assert longest > 300  # past the old cap of 512 when doubled
    assert seen["budget"] == math.ceil(ratio * longest) + cdcda.AUGMENT_SLACK


def test_upload_cuts_the_instruction():
    task = data.get_task("lamp7")
    user = data.User("u", [{"text": "ngl lowkey tired fr"}], [])
    assert cdcda.upload(task, user) == [("ngl lowkey tired fr", "ngl lowkey tired fr")]
    task = data.get_task("lamp4")
    user = data.User("u", [{"text": "The council met.", "title": "Council Meets"}], [])
    assert cdcda.upload(task, user) == [("The council met.", "Council Meets")]


def test_parse_args_defaults_and_errors(capsys):
    args = cdcda.parse_args([])
    assert (args.task, args.k, args.temperature, args.lora_r, args.lora_alpha) == ("lamp7", 5, 0.7, 16, 8)
    assert args.cloud_model == args.device_model == qwen2.EMBEDDED
    paper = cdcda.parse_args(["--paper"])
    assert paper.device_model == "Qwen/Qwen2.5-0.5B-Instruct" and paper.judge.startswith("nli:")
    with pytest.raises(SystemExit):
        cdcda.parse_args(["--methods", "base,magic"])
    assert "--methods" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--judge"):
        cdcda.make_judge("minilm", "cpu")


def test_chat_reply_prefix_starts_the_assistant_turn(tiny_model_dir):
    model, tok = qwen2.load(str(tiny_model_dir))
    conv = [[{"role": "user", "content": "hi"}]]
    primed = qwen2.chat(model, tok, conv, max_new_tokens=4, temperature=0, reply_prefix="Input: [")
    assert primed[0].startswith("Input: [")
    # the prefix is part of the prompt: the same as generating after a template that ends in it
    ids = tok.encode(tok.apply_chat_template(conv[0]) + "Input: [")
    out = qwen2.generate(model, torch.tensor([ids]), 4, temperature=0, eos_token_id=tok.eos_token_ids)
    new = out[0, len(ids):].tolist()
    new = new[:[t in tok.eos_token_ids for t in new].index(True)] if any(t in tok.eos_token_ids for t in new) else new
    assert primed[0] == ("Input: [" + tok.decode(new)).strip()


def fake_cloud(monkeypatch):
    """The cloud LM's replies: a tiny random model writes no parsable pairs, so the cloud
    step's generations are replaced by a fixed mix of good (the words reversed: same words,
    little ROUGE-L overlap), off-topic and unparsable ones; every other step runs for real."""
    real_chat = qwen2.chat
    replies = ["Input: [{rx}], Response: [{y}]", "Input: [quantum chromodynamics lattice "
               "gauge theory], Response: [no]", "no pair here"]

    def chat(model, tokenizer, conversations, **kw):
        if kw.get("desc", "").startswith("augment"):
            assert kw["reply_prefix"] == cdcda.REPLY_PREFIX
            out = []
            for i, conv in enumerate(conversations):
                x, y = conv[-1]["content"].split("Input: [")[1].split("], Response: [")
                rx = " ".join(reversed(x.split()))
                out.append(replies[i % 3].format(rx=rx, y=y[:-2]))
            return out
        return real_chat(model, tokenizer, conversations, **kw)
    monkeypatch.setattr(qwen2, "chat", chat)


def tiny_args(tiny_model_dir, out):
    return ["--task", "lamp7", "--users", "2", "--k", "3", "--epochs", "1", "--base-epochs", "1",
            "--max-length", "96", "--cloud-model", str(tiny_model_dir), "--device-model", str(tiny_model_dir),
            "--out", str(out)]


def test_end_to_end_tiny(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    fake_cloud(monkeypatch)
    rep = cdcda.main(tiny_args(tiny_model_dir, tmp_path / "run"))
    assert set(rep["rows"]) == {"base", "direct-ft", "cdcda"}
    for row in rep["rows"].values():
        assert set(row) == {"rouge1", "rougeL", "bertscore_f1", "bertscore_model", "bertscore_layer", "gold_nll"}
        assert row["gold_nll"] > 0
    counts = rep["counts"]
    users = data.split_users(data.load_users("lamp7"), 2)[0]
    history = sum(len(u.profile) for u in users)
    assert counts["generated"] == 3 * history and counts["unparsable"] == history  # every third reply
    assert counts["candidates"] == 2 * history
    assert counts["rejected_scf"] >= history  # the off-topic one is never kept
    assert counts["kept"] == history  # every reversed input passes all three filters
    assert "stand-in" in rep["models"]["judge"] and "embedded demo" in rep["models"]["data"]
    for user in users:
        user_dir = tmp_path / "run" / "users" / user.user_id
        records = [json.loads(line) for line in (user_dir / "synthetic.jsonl").read_text().splitlines()]
        assert len(records) == 2 * len(user.profile) and all("scf_forward" in r for r in records)
        assert (user_dir / "cdcda.adapter.safetensors").is_file()
        result = json.loads((user_dir / "result.json").read_text())
        assert len(result["predictions"]["cdcda"]) == len(user.queries)
    md = (tmp_path / "run" / "results.md").read_text()
    assert "| CDCDA-PLM |" in md and "| Direct-FT |" in md
    assert len(list((tmp_path / "cache" / "base").iterdir())) == 1  # M_base trained once, cached


def test_interrupted_run_resumes(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    fake_cloud(monkeypatch)
    real_personalize, calls = cdcda.personalize, []

    def dies_on_second_user(*a, **kw):
        calls.append(kw.get("desc") or a[-1])
        if len({c.split()[-1] for c in calls}) == 2:
            raise KeyboardInterrupt  # the run is stopped during the second user
        return real_personalize(*a, **kw)
    monkeypatch.setattr(cdcda, "personalize", dies_on_second_user)
    with pytest.raises(KeyboardInterrupt):
        cdcda.main(tiny_args(tiny_model_dir, tmp_path / "run"))
    done = list((tmp_path / "run" / "users").glob("*/result.json"))
    assert len(done) == 1  # the first user is finished and kept
    first = done[0].read_text()

    monkeypatch.setattr(cdcda, "personalize", real_personalize)
    augmented = []
    monkeypatch.setattr(cdcda, "augment", lambda *a, **kw: augmented.append(1) or pytest.fail("re-augmented"))
    rep = cdcda.main(tiny_args(tiny_model_dir, tmp_path / "run"))  # the second user's synthetic data is reused
    assert done[0].read_text() == first and not augmented
    assert len(rep["users"]) == 2
    with pytest.raises(SystemExit, match="other settings"):
        cdcda.main(tiny_args(tiny_model_dir, tmp_path / "run") + ["--k", "2"])


def test_buffer_keeps_n_items_and_only_they_are_uploaded(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    fake_cloud(monkeypatch)
    uploaded, trained = [], []
    real_augment, real_personalize = cdcda.augment, cdcda.personalize
    monkeypatch.setattr(cdcda, "augment", lambda cloud, tok, pairs, *a, **kw: uploaded.append(list(pairs))
                        or real_augment(cloud, tok, pairs, *a, **kw))
    monkeypatch.setattr(cdcda, "personalize", lambda model, tok, task, pairs, args, seed, desc: trained.append(
        (desc, list(pairs))) or real_personalize(model, tok, task, pairs, args, seed, desc))
    out = tmp_path / "run"
    rep = cdcda.main(tiny_args(tiny_model_dir, out) + ["--buffer", "4", "--synthesis-filter", "rouge1"])
    users = data.split_users(data.load_users("lamp7"), 2)[0]
    task = data.get_task("lamp7")
    for user, sent in zip(users, uploaded):
        buffer = json.loads((out / "users" / user.user_id / "buffer.json").read_text())
        history = cdcda.upload(task, user)
        assert len(sent) == 4 and buffer["kept"] == 4 and buffer["seen"] == len(history) > 4
        assert sent == [p for p in history if p in sent]  # a subsequence of the history, in order
        assert dict(trained)[f"direct-ft {user.user_id}"] == sent
        records = [json.loads(line) for line in (out / "users" / user.user_id / "synthetic.jsonl").read_text().splitlines()]
        assert records and all("rouge_1" in r and (r["input"], r["output"]) in sent for r in records)
        assert dict(trained)[f"cdcda {user.user_id}"] == sent + [(r["syn_input"], r["syn_output"]) for r in records if r["kept"]]
    assert rep["counts"]["history"] == sum(len(u.profile) for u in users) and rep["counts"]["buffered"] == 8
    assert "4-item online buffer, scores" in rep["models"]["history"] and "ROUGE-1" in rep["models"]["synthesis filter"]


def test_buffer_and_filter_options_are_checked(capsys):
    assert cdcda.parse_args([]).buffer == 0 and cdcda.parse_args([]).synthesis_filter == "cdcda"
    for bad in (["--buffer", "-1"], ["--buffer-policy", "best"], ["--synthesis-filter", "nli"],
                ["--eps-rouge1", "2"], ["--synthesis-filter", "rouge1", "--cloud", "http://x"]):
        with pytest.raises(SystemExit):
            cdcda.parse_args(bad)
    assert "--cloud-api" in capsys.readouterr().err


def test_gold_nll_is_the_cross_entropy_of_the_gold_tokens(tiny_model_dir):
    model, tok = qwen2.load(str(tiny_model_dir))
    task = data.get_task("lamp7")
    queries = [data.Query("a", task.pair_input.format(text="rain again"), "ugh rain again lol"),
               data.Query("b", task.pair_input.format(text="big game"), "LETS GO")]
    args = cdcda.parse_args([])
    nll = cdcda.gold_nll(model, tok, task, queries, args)
    for q, value in zip(queries, nll):  # by hand: full logits, the gold's tokens and <|im_end|>
        prompt = tok.encode(tok.apply_chat_template(task.messages(q.input), add_generation_prompt=True))
        gold = tok.encode(q.gold) + tok.encode("<|im_end|>")
        with torch.no_grad():
            logits = model(torch.tensor([prompt + gold]))[0]  # (T, V)
        expected = torch.nn.functional.cross_entropy(logits[len(prompt) - 1:-1].float(), torch.tensor(gold))
        assert value == pytest.approx(expected.item(), rel=1e-5)
    assert nll[0] != nll[1]
