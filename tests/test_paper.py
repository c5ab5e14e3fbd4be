"""`--paper` end to end, offline: `cdcda.main(["--task", "lamp7", "--paper", ...])` with random
tiny checkpoints saved under the paper's model ids in a Hugging Face cache (HF_HUB_OFFLINE=1)
and LaMP-7 in its official file format. Nothing here is the paper's weights; what is tested is
that every model the flag names resolves, loads and runs, and that the report comes out.

The cloud model really generates; its replies are then rewritten into parsable pairs (a random
model writes none), the way conftest.py's fake cloud does, so selection has candidates.
"""
import json
import os

import pytest

import augment
import cdcda
import data
import generate
from errors import InputError
from options import PAPER
from scale import report as scale_report

TWEETS = [["rain again this weekend ugh", "my new phone is great", "the cat sat on my laptop",
           "coffee first then the world", "park run done, legs gone"],
          ["hello world this is a tweet", "a dog ran fast in the park", "great product would buy again",
           "I love my new phone"],
          ["the council met on tuesday", "budget talks again lol", "headline of the day"],
          ["one more tweet from me", "and another one"]]


def write_lamp7(directory):
    """LaMP's official files: {split}_questions.json [{id, input, profile}], {split}_outputs.json
    {task, golds: [{id, output}]}; one question per user, users 0-2 in train, user 3 in dev."""
    task = data.get_task("lamp7")
    (directory / "lamp7").mkdir(parents=True)
    splits = {"train": range(3), "dev": range(3, 4)}
    for split, users in splits.items():
        questions, golds = [], []
        for u in users:
            qid = f"{7 if split == 'train' else 8}{u:02d}"
            profile = [{"id": f"{qid}{j}", "text": t, "date": "2020-01-01"} for j, t in enumerate(TWEETS[u])]
            questions.append({"id": qid, "input": task.pair_input.format(text=f"query tweet {u} from {split}"),
                              "profile": profile})
            golds.append({"id": qid, "output": f"query tweet {u} paraphrased"})
        (directory / "lamp7" / f"{split}_questions.json").write_text(json.dumps(questions))
        (directory / "lamp7" / f"{split}_outputs.json").write_text(json.dumps({"task": "LaMP_7", "golds": golds}))


def rewrite_cloud_replies(monkeypatch):
    """The cloud model generates for real; each augmentation reply then becomes the prompt's
    input with its words reversed, structured decoding's scaffold, and the prompt's response:
    parsable, and through the length filter."""
    real_chat = generate.chat

    def chat(model, tokenizer, conversations, *args, **kw):
        texts = real_chat(model, tokenizer, conversations, *args, **kw)
        if not (kw.get("desc") or "").startswith("augment"):
            return texts
        pairs = [c[-1]["content"].split("Input: [")[1].split("], Response: [") for c in conversations]
        assert len(texts) == len(pairs) and kw["scaffold"] == augment.SCAFFOLD
        return [kw["reply_prefix"] + " ".join(reversed(x.split())) + kw["scaffold"] + y[:-2] for x, y in pairs]
    monkeypatch.setattr(generate, "chat", chat)


@pytest.fixture
def paper_models(tmp_path, offline_hub, hub_checkpoints):
    """The four models `--paper` names, random and tiny, in the offline hub cache."""
    task = data.get_task("lamp7")
    corpus = [task.system, task.pair_input.split("{")[0], augment.AUGMENT_PROMPT.split("Input")[0]] + sum(TWEETS, [])
    for repo_id, seed in ((PAPER["cloud_model"], 1), (PAPER["device_model"], 2)):
        hub_checkpoints.qwen2(tmp_path / "src" / repo_id, corpus=corpus, seed=seed)
        hub_checkpoints.put(offline_hub, repo_id, tmp_path / "src" / repo_id)
    judge = PAPER["judge"].split(":", 1)[1]
    hub_checkpoints.roberta(tmp_path / "src" / judge, id2label={0: "contradiction", 1: "entailment", 2: "neutral"})
    hub_checkpoints.put(offline_hub, judge, tmp_path / "src" / judge)
    hub_checkpoints.roberta(tmp_path / "src" / "roberta-large", num_hidden_layers=24)
    hub_checkpoints.put(offline_hub, PAPER["bertscore_model"], tmp_path / "src" / "roberta-large")
    return offline_hub


def test_paper_configuration_end_to_end(tmp_path, monkeypatch, paper_models):
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cdcda-cache"))
    write_lamp7(tmp_path / "lamp")
    rewrite_cloud_replies(monkeypatch)
    out = tmp_path / "run"
    rep = cdcda.main(["--task", "lamp7", "--paper", "--data", str(tmp_path / "lamp"), "--users", "2",
                      "--out", str(out), "--k", "2", "--epochs", "1", "--base-epochs", "1", "--max-length", "128",
                      "--batch-size", "4", "--device", os.environ.get("CDCDA_TEST_DEVICE", "cpu")])
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rep["rows"]))
    assert set(rep["rows"]) == {"base", "direct-ft", "cdcda"} and rep["queries"] == 2
    for row in rep["rows"].values():
        assert row["bertscore_model"] == "roberta-large" and row["bertscore_layer"] == 17
        assert -1 <= row["bertscore_f1"] <= 1 and 0 <= row["rouge1"] <= 1
    assert rep["models"]["cloud_model"] == "Qwen/Qwen2.5-3B-Instruct"  # no "stand-in" note: the paper's names
    assert rep["models"]["judge"] == "nli:alisawuffles/roberta-large-wanli"
    assert rep["users"] == ["700", "701"]  # the two longest histories; users 702 and 803 trained M_base
    counts = rep["counts"]
    assert counts["generated"] == counts["candidates"] == 2 * (5 + 4)
    assert counts["unparsable"] == counts["off_label"] == 0 and counts["kept"] + counts["rejected"] == 18
    records = [json.loads(line) for line in (out / "users" / "700" / "synthetic.jsonl").read_text().splitlines()]
    assert len(records) == 10 and all(0 <= r["scf_forward"] <= 1 for r in records)  # the NLI judge's P(entailment)
    assert (out / "results.md").is_file() and len(list((tmp_path / "cdcda-cache" / "base").iterdir())) == 1
    again = scale_report.main(["--out", str(out), "--bertscore-layer", "5"])  # evaluation apart from training
    for method, row in again["rows"].items():
        assert row["bertscore_layer"] == 5 and row["rouge1"] == rep["rows"][method]["rouge1"]
        assert row["bertscore_f1"] != rep["rows"][method]["bertscore_f1"]


def test_a_missing_model_stops_the_run_before_any_training(tmp_path, monkeypatch, offline_hub, hub_checkpoints):
    """Only the two decoders are in the cache: the run ends in one line naming --judge, in
    seconds, before M_base is trained."""
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cdcda-cache"))
    write_lamp7(tmp_path / "lamp")
    for repo_id in (PAPER["cloud_model"], PAPER["device_model"]):
        hub_checkpoints.qwen2(tmp_path / "src" / repo_id)
        hub_checkpoints.put(offline_hub, repo_id, tmp_path / "src" / repo_id)
    with pytest.raises(InputError, match="--judge alisawuffles/roberta-large-wanli: model .* could not be fetched"):
        cdcda.main(["--task", "lamp7", "--paper", "--data", str(tmp_path / "lamp"), "--users", "2",
                    "--out", str(tmp_path / "run")])
    assert not (tmp_path / "cdcda-cache" / "base").exists()
