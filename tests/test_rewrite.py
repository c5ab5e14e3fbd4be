"""rewrite.py: LaMP-7's history tweets paired with the device's neutral rewrites."""

import pytest

import cdcda
import data
import options
import qwen2
import rewrite
from embedded import smollm2


class FakeJudge:
    """M(premise => hypothesis) = 1 - (Jaccard distance of the word sets): copies score 1."""
    name, default_eps_scf = "fake", 0.3

    def __call__(self, premises, hypotheses):
        def score(a, b):
            a, b = set(a.lower().split()), set(b.lower().split())
            return len(a & b) / max(len(a | b), 1)
        return [score(p, h) for p, h in zip(premises, hypotheses)]


def test_only_lamp7_history_needs_rewrites():
    assert [t for t in data.TASKS if rewrite.needs_rewrites(data.get_task(t))] == ["lamp7"]


def test_history_pair_uses_the_rewrite_and_drops_rejected_items():
    task = data.get_task("lamp7")
    items = [{"text": "ngl lowkey tired fr"}, {"text": "lol rain"}]
    rewrites = {"ngl lowkey tired fr": "I am tired.", "lol rain": ""}
    assert rewrite.history_pair(task, items[0]) == task.pair(items[0])
    assert rewrite.history_pair(task, items[0], rewrites) == ("I am tired.", "ngl lowkey tired fr")
    assert rewrite.history_pair(task, items[1], rewrites) is None
    assert cdcda.upload(task, data.User("u", items, []), rewrites) == [("I am tired.", "ngl lowkey tired fr")]
    assert cdcda.upload(task, data.User("u", items[1:], []), rewrites) == [("lol rain", "lol rain")]  # none left
    others = [data.User("o1", items, [data.Query("q", "Paraphrase ...: hi", "hey")]), data.User("o2", items[1:], [])]
    assert cdcda.base_examples(task, others, rewrites) == [  # M_base's users: the same rule as the targets'
        (task.messages(task.instruction + "I am tired."), "ngl lowkey tired fr"),
        (task.messages(task.instruction + items[1]["text"]), items[1]["text"]),
        (task.messages("Paraphrase ...: hi"), "hey")]
    lamp2 = data.get_task("lamp2")
    movie = {"description": "a heist", "tag": "twist ending"}
    assert rewrite.history_pair(lamp2, movie, {}) == lamp2.pair(movie)  # a real input: left alone


def test_rewrite_all_keeps_the_closest_passing_rewrite():
    """Greedy and sampled rewrites by hand: a copy, a labelled good one, an unrelated one."""
    replies = {0.0: {"ngl the team won again fr": "The team won",  # passes, but further in meaning
                     "rain all day ugh": "rain all day ugh"},  # an exact copy: rejected
               0.7: {"ngl the team won again fr": "Rewrite: the team won again",  # labelled: label cut, closest
                     "rain all day ugh": "quantum chromodynamics"}}  # unrelated: rejected
    calls = []

    def chat(model, tok, conversations, max_new_tokens, temperature=0.7, **kw):
        calls.append(list(temperature))  # one call: each tweet's greedy and sampled rewrites, one prefill
        return [replies[t][c[-1]["content"].split("Text: ")[1]] for c, t in zip(conversations, temperature)]
    task = data.get_task("lamp7")
    users = [data.User("u", [{"text": "ngl the team won again fr"}, {"text": "rain all day ugh"}], [])]
    texts = rewrite.history_texts(task, users)
    tok = qwen2.Tokenizer.from_dir(smollm2.embedded_dir())
    got = rewrite.rewrite_all(None, tok, texts, FakeJudge(), options.Settings(eps_scf=0.3), samples=1, chat=chat)
    assert got == {"ngl the team won again fr": "the team won again", "rain all day ugh": ""}
    assert calls == [[0.0, 0.7, 0.0, 0.7]]


@pytest.mark.parametrize("text, expected", [("Rewrite: the team won", "the team won"),
                                            ("**Neutral text:** rain today", "rain today"),
                                            ("the home team won: 3-1", "the home team won: 3-1")])
def test_a_leading_label_is_cut(text, expected):
    assert rewrite.LABEL.sub("", text) == expected
