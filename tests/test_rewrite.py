"""rewrite.py: LaMP-7's history tweets paired with the device's neutral rewrites."""
import json

import pytest

import cdcda
import data
import filters
import generate
import rewrite


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
    assert rewrite.history_pair(task, items[0], rewrites) == (task.instruction + "I am tired.", "ngl lowkey tired fr")
    assert rewrite.history_pair(task, items[1], rewrites) is None
    assert cdcda.upload(task, data.User("u", items, []), rewrites) == [("I am tired.", "ngl lowkey tired fr")]
    assert cdcda.upload(task, data.User("u", items[1:], []), rewrites) == [("lol rain", "lol rain")]  # none left
    others = [data.User("o1", items, [data.Query("q", "Paraphrase ...: hi", "hey")]), data.User("o2", items[1:], [])]
    assert cdcda.base_pairs(task, others, rewrites) == [  # M_base's users: the same rule as the targets'
        (task.instruction + "I am tired.", "ngl lowkey tired fr"), task.pair(items[1]), ("Paraphrase ...: hi", "hey")]
    lamp2 = data.get_task("lamp2")
    movie = {"description": "a heist", "tag": "twist ending"}
    assert rewrite.history_pair(lamp2, movie, {}) == lamp2.pair(movie)  # a real input: left alone


def test_neutral_rewrites_keeps_the_closest_passing_rewrite(tiny_model_dir, tmp_path, monkeypatch):
    """Greedy and sampled rewrites by hand: a copy, a labelled good one, an unrelated one."""
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path))
    replies = {0.0: {"ngl the team won again fr": "The team won",  # passes, but further in meaning
                     "rain all day ugh": "rain all day ugh"},  # an exact copy: rejected
               0.7: {"ngl the team won again fr": "Rewrite: the team won again",  # labelled: label cut, closest
                     "rain all day ugh": "quantum chromodynamics"}}  # unrelated: rejected
    calls = []

    def chat(model, tok, conversations, max_new_tokens, temperature=0.7, **kw):
        calls.append(list(temperature))  # one call: each tweet's greedy and sampled rewrites, one prefill
        return [replies[t][c[-1]["content"].split("Text: ")[1]] for c, t in zip(conversations, temperature)]
    monkeypatch.setattr(generate, "chat", chat)
    task = data.get_task("lamp7")
    users = [data.User("u", [{"text": "ngl the team won again fr"}, {"text": "rain all day ugh"}], [])]
    thresholds = filters.Thresholds(eps_scf=0.3)
    got = rewrite.neutral_rewrites(task, users, str(tiny_model_dir), FakeJudge(), thresholds, "cpu", samples=1)
    assert got == {"ngl the team won again fr": "the team won again", "rain all day ugh": ""}
    assert calls == [[0.0, 0.7, 0.0, 0.7]]
    cached = list((tmp_path / "rewrites").glob("lamp7-*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text()) == got
    assert rewrite.neutral_rewrites(task, users, str(tiny_model_dir), FakeJudge(), thresholds, "cpu",
                                    samples=1) == got and len(calls) == 1  # from the cache


@pytest.mark.parametrize("text, expected", [("Rewrite: the team won", "the team won"),
                                            ("**Neutral text:** rain today", "rain today"),
                                            ("the home team won: 3-1", "the home team won: 3-1")])
def test_a_leading_label_is_cut(text, expected):
    assert rewrite.LABEL.sub("", text) == expected
