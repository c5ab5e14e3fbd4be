"""online/: EOE, DSS, IDD on hand-worked examples; the buffer's capacity, replacement
direction and determinism; reservoir sampling; the ROUGE-1 synthesis check; and the
last-token embedding of left-padded batches on a tiny random decoder; `python -m online --buffer`
end to end on it."""
import json
import math
import random

import pytest
import torch

import augment
import cdcda
import data
import qwen2
from online import __main__ as run_online, buffer as online, methods as online_methods
from online.buffer import GENERAL, OnlineBuffer, dss, eoe, idd, random_buffer, rouge1_filter

# -------------------------------------------------------------------- EOE

H_3_1 = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))  # 0.8113 bits: counts (3, 0, 0, 1)


@pytest.mark.parametrize("values, n_tokens, expected", [
    ([0.0, 1.0, 2.0, 3.0], 4, 2.0 / 2.0),  # one value per bin: 2 bits / log2(4)
    ([0.0, 1.0, 2.0, 3.0], 16, 2.0 / 4.0),
    ([0.0, 0.0, 0.0, 3.0], 8, H_3_1 / 3.0),  # bins [0,.75) [.75,1.5) [1.5,2.25) [2.25,3]
    ([0.0, 0.0, 0.0, 3.0], 1, H_3_1),  # one token: log2(1) = 0, divisor defined as 1
    ([0.0, 0.0, 0.0, 3.0], 2, H_3_1),  # log2(2) = 1
    ([0.0, 3.0], 4, 1.0 / 2.0),  # the maximum goes into the last bin: counts (1, 0, 0, 1)
    ([5.0, 5.0, 5.0, 5.0], 4, 0.0),  # constant vector: all mass in one bin
    ([-1.0, -0.9, 0.5, 0.6], 4, 1.0 / 2.0),  # counts (2, 0, 0, 2) over min..max [-1, 0.6]
])
def test_eoe_hand_worked(values, n_tokens, expected):
    assert eoe(torch.tensor(values), n_tokens, bins=4) == pytest.approx(expected, abs=1e-12)


def test_eoe_default_bins_and_errors():
    x = torch.arange(64.0)  # 64 distinct values, 64 bins: one per bin -> 6 bits
    assert online.EOE_BINS == 64
    assert eoe(x, 8) == pytest.approx(6.0 / 3.0)
    with pytest.raises(ValueError, match="n_tokens"):
        eoe(x, 0)
    with pytest.raises(ValueError, match="finite"):
        eoe(torch.tensor([0.0, float("nan")]), 4)


# -------------------------------------------------------------------- DSS

LEX = {"movies": {"film", "plot", "murder", "story"}, "science": {"model", "data", "story"}}


def test_dss_hand_worked():
    # 7 words: the film plot is a murder story; movies hits 4, science hits 1 (story)
    assert dss("The film plot is a murder story", LEX) == ("movies", pytest.approx(4 / 7))
    # repeated words count every time: model, data, data hit science (3 of 5 words)
    assert dss("Model data, DATA and more", LEX) == ("science", pytest.approx(3 / 5))
    # a tie goes to the first domain in lexicon order
    assert dss("story time", LEX) == ("movies", pytest.approx(1 / 2))
    assert dss("story time", {"science": LEX["science"], "movies": LEX["movies"]})[0] == "science"


@pytest.mark.parametrize("text", ["", "   ", "nothing here matches", "北京"])
def test_dss_no_hit_is_general(text):
    assert dss(text, LEX) == (GENERAL, 0.0)


def test_lamp_lexicons_are_disjoint_and_match_their_domain():
    domains = list(online.LAMP_LEXICONS)
    for i, a in enumerate(domains):
        for b in domains[i + 1:]:
            assert not online.LAMP_LEXICONS[a] & online.LAMP_LEXICONS[b], (a, b)
    assert dss("We propose a novel algorithm; experiments show efficient performance.")[0] == "science"
    assert dss("A detective discovers a haunted house in this horror film.")[0] == "movies"
    assert dss("Bought it for the price, battery broke, returned it.")[0] == "products"
    assert dss("The president said the senate will vote on the federal policy.")[0] == "news"
    assert dss("omg so tired lol, gonna sleep all weekend")[0] == "social"


# -------------------------------------------------------------------- IDD

@pytest.mark.parametrize("others, expected", [
    ([[1.0, 0.0], [0.0, 1.0]], 0.5),  # cos 1 and 0: 1 - 1/2
    ([[3.0, 0.0]], 0.0),  # same direction, any length
    ([[-1.0, 0.0]], 2.0),  # opposite direction
    ([[1.0, 1.0]], 1.0 - 1.0 / math.sqrt(2.0)),
    ([], 1.0),  # no buffer item of this domain: defined as 1
])
def test_idd_hand_worked(others, expected):
    e = torch.tensor([1.0, 0.0])
    assert idd(e, torch.tensor(others).reshape(-1, 2)) == pytest.approx(expected, abs=1e-6)


def test_rank01_ties_share_average_rank():
    r = online._rank01(torch.tensor([[1.0, 2.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0]]))
    assert r.tolist() == [[0.0, 0.5, 0.5, 1.0], [0.5, 0.5, 0.5, 0.5]]


# -------------------------------------------------------------------- the buffer

def random_stream(n, seed, dim=16):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    vocab = sorted(set().union(*online.LAMP_LEXICONS.values())) + ["the", "a", "of", "it"] * 20
    texts = [" ".join(rng.choices(vocab, k=rng.randint(1, 12))) for _ in range(n)]
    return texts, torch.randn(n, dim, generator=g), [rng.randint(1, 200) for _ in range(n)]


def test_buffer_never_exceeds_capacity_and_keeps_arrival_order():
    texts, embs, counts = random_stream(300, seed=1)
    buf = OnlineBuffer(capacity=8, seed=0)
    kept = 0
    for i in range(300):
        kept += buf.add(i, embs[i], counts[i], text=texts[i])
        assert len(buf) == min(i + 1, 8)
    assert buf.n_seen == 300 and buf.n_replaced == kept - 8 and buf.n_replaced > 0
    assert buf.items == sorted(buf.items) and len(set(buf.items)) == 8  # arrival order
    assert [s["domain"] for s in buf.scores()] == [dss(texts[i])[0] for i in buf.items]


def test_replacement_keeps_the_higher_scoring_item():
    # EOE only (weights 1, 0, 0): the same 2-bit vector, EOE = 2 / log2(n_tokens)
    e = torch.tensor([0.0, 1.0, 2.0, 3.0])
    buf = OnlineBuffer(capacity=2, lexicons=LEX, weights=(1.0, 0.0, 0.0), bins=4)
    assert buf.add("high", e, 2) and buf.add("low", e, 256)  # EOE 2.0, 0.25: not full, kept
    assert buf.add("mid", e, 16) is True  # EOE 0.5 > 0.25: replaces "low"
    assert buf.items == ["high", "mid"]
    assert buf.add("lowest", e, 1024) is False  # EOE 0.2 < 0.5: rejected (not the wrong way round)
    assert buf.add("tie", e, 16) is False  # equal to the lowest is not higher
    assert buf.items == ["high", "mid"] and buf.n_replaced == 1


def test_replacement_with_all_three_scores():
    lex = {"d": {"good"}}
    a, b = torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0, 0.0])
    buf = OnlineBuffer(capacity=2, lexicons=lex, bins=4)
    buf.add("good good", a, 2)  # A: EOE 2.0, DSS 1.0
    buf.add("good bad", b, 256)  # B: EOE 0.25, DSS 0.5; IDD of A and B: 1 - 4/14
    assert [s["idd"] for s in buf.scores()] == pytest.approx([1 - 4 / 14] * 2)
    # C: EOE 0.5, DSS 0.75, IDD 1 + (1 + 4/14)/2. Pool ranks: A 1 + 1 + .25, B 0 + 0 + .25,
    # C .5 + .5 + 1: C beats B (the lowest) and replaces it
    assert buf.add("good good good bad", -a, 16) is True
    assert buf.items == ["good good", "good good good bad"]
    assert buf.scores()[0]["idd"] == pytest.approx(2.0)  # IDD recomputed: A vs C is cos -1
    # D: A's direction (low IDD), no lexicon word, tiny EOE: lowest of the pool, rejected
    assert buf.add("nothing", a, 4096) is False
    assert buf.items == ["good good", "good good good bad"]


def test_same_stream_and_seed_give_the_same_buffer():
    texts, embs, counts = random_stream(200, seed=2)
    runs = []
    for _ in range(2):
        buf = OnlineBuffer(capacity=16, seed=7)
        verdicts = [buf.add(t, embs[i], counts[i]) for i, t in enumerate(texts)]
        runs.append((buf.items, verdicts, buf.scores()))
    assert runs[0] == runs[1]


def test_ties_for_lowest_are_broken_by_the_seed():
    # identical buffer items: every one ties for lowest; the seed picks the victim
    e = torch.tensor([0.0, 1.0, 2.0, 3.0])
    victims = set()
    for seed in range(20):
        buf = OnlineBuffer(capacity=4, lexicons=LEX, weights=(1.0, 0.0, 0.0), bins=4, seed=seed)
        for i in range(4):
            buf.add(f"item {i}", e, 256)
        assert buf.add("better", e, 2)
        victims.add(frozenset({"item 0", "item 1", "item 2", "item 3"} - set(buf.items)))
    assert len(victims) > 1


def test_add_errors_name_the_problem():
    buf = OnlineBuffer(capacity=2)
    with pytest.raises(ValueError, match="text="):
        buf.add({"id": 1}, torch.ones(4), 3)
    buf.add("first", torch.randn(4), 3)
    with pytest.raises(ValueError, match="shape"):
        buf.add("second", torch.randn(5), 3)
    with pytest.raises(ValueError, match="capacity"):
        OnlineBuffer(capacity=0)


# -------------------------------------------------------------------- the random baseline

def test_random_buffer_is_deterministic_and_uniform():
    items = list(range(20))
    assert random_buffer(items, 5, seed=3) == random_buffer(items, 5, seed=3)
    assert len({tuple(random_buffer(items, 5, seed=s)) for s in range(10)}) > 1
    assert random_buffer(items[:3], 5, seed=0) == [0, 1, 2]
    counts = [0] * 20
    n = 4000
    for seed in range(n):
        sample = random_buffer(items, 5, seed=seed)
        assert len(sample) == 5 and sample == sorted(sample)
        for i in sample:
            counts[i] += 1
    # each item is kept with probability 5/20; sd of the frequency is about 0.0068
    assert max(abs(c / n - 0.25) for c in counts) < 0.03


# -------------------------------------------------------------------- ROUGE-1 check

def test_rouge1_filter():
    scores, keep = rouge1_filter("a b c d", ["a b c d", "a b x y", "a x y z", "q r s t"], 0.25)
    assert scores == pytest.approx([1.0, 0.5, 0.25, 0.0])
    assert keep == [True, True, False, False]  # strictly above the threshold
    with pytest.raises(ValueError, match="threshold"):
        rouge1_filter("a", ["a"], 1.5)


def test_rouge1_select_compares_inputs_like_filters_select():
    pairs = [("a b c d", "y1"), ("e f", "y2")]
    candidates = data.Candidates([0, 0, 1], [("a b x y", "anything"), ("a x y z", "y1"), ("e f", "z")], {"unparsable": 2})
    sel = online.rouge1_select(pairs, candidates, threshold=0.25)
    # ROUGE-1 F of the inputs: 2/4 overlap -> 0.5 kept; 1/4 -> 0.25 not above 0.25; identical -> 1.0
    assert [r["rouge_1"] for r in sel.records] == pytest.approx([0.5, 0.25, 1.0])
    assert sel.kept == [("a b x y", "anything"), ("e f", "z")]  # the response is never checked
    assert sel.counts == {"candidates": 3, "kept": 2, "rejected": 1, "rejected_rouge1": 1, "unparsable": 2}
    assert set(sel.records[0]) >= {"input", "output", "syn_input", "syn_output", "kept"}
    assert (sel.records[2]["input"], sel.records[2]["output"]) == pairs[1]


# -------------------------------------------------------------------- embeddings

class CharTokenizer:
    """One token per character: enough to feed a random decoder."""
    pad_token_id = 0

    def encode(self, text):
        return [1 + ord(c) % 60 for c in text]


def tiny_decoder() -> qwen2.Qwen2:
    """A random 2-layer decoder (seeded) for the embedding tests."""
    torch.manual_seed(0)
    config = qwen2.Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                          attention_bias=True, max_position_embeddings=128)
    return qwen2.Qwen2(config).eval()


def test_embed_items_is_the_last_real_token_with_left_padding():
    model, tok = tiny_decoder(), CharTokenizer()
    texts = ["hi", "a longer text here", "mid size", "x", "another one of them"]
    embs = online.embed_items(model, tok, texts, batch_size=3)
    assert embs.shape == (5, 32) and embs.dtype == torch.float32
    with torch.no_grad():
        for i, t in enumerate(texts):
            alone = model.model(torch.tensor([tok.encode(t)]))[0, -1]  # (H,) unpadded
            torch.testing.assert_close(embs[i], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="text 1"):
        online.embed_items(model, tok, ["ok", ""])


def test_keep_history_streams_through_the_buffer_in_order():
    model, tok = tiny_decoder(), CharTokenizer()
    texts = [f"tweet number {i} " + "lol " * (i % 5) + "film plot " * (i % 3) for i in range(12)]
    kept, summary = online.keep_history(model, tok, texts, 5, "scores", seed=1)
    # the same decisions as feeding OnlineBuffer by hand, one item at a time
    buf = OnlineBuffer(5, seed=1)
    for i, t in enumerate(texts):
        buf.add(i, online.embed_items(model, tok, [t])[0], len(tok.encode(t)), text=t)
    assert kept == buf.items and len(kept) == 5 and kept == sorted(kept)
    assert summary["seen"] == 12 and summary["kept"] == 5 and summary["replaced"] == buf.n_replaced > 0
    assert len(summary["scores"]) == 5
    assert online.keep_history(model, tok, texts, 5, "scores", seed=1)[0] == kept  # same stream and seed
    with pytest.raises(ValueError, match="policy"):
        online.keep_history(model, tok, texts, 5, "best")


def test_keep_history_at_random_keeps_every_item_equally_often():
    """Reservoir sampling over the stream: 5 of 12 items, in arrival order, each kept in about
    5/12 of the seeds (a buffer that favoured the first or the last items would not be)."""
    tok, texts = CharTokenizer(), [f"tweet {i}" for i in range(12)]
    counts = [0] * 12
    for seed in range(1200):
        kept, summary = online.keep_history(None, tok, texts, 5, "random", seed=seed)
        assert len(kept) == 5 and kept == sorted(kept) and summary == {"policy": "random", "capacity": 5,
                                                                         "seen": 12, "kept": 5}
        for i in kept:
            counts[i] += 1
    assert all(abs(c / 1200 - 5 / 12) < 0.06 for c in counts), counts
    assert online.keep_history(None, tok, texts, 5, "random", seed=7) == online.keep_history(None, tok, texts, 5,
                                                                                             "random", seed=7)


def test_buffer_keeps_n_items_and_only_they_are_uploaded(tiny_model_dir, tmp_path, monkeypatch, fake_cloud, tiny_args):
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    uploaded, trained = [], []
    real_augment, real_personalize = augment.augment, cdcda.personalize
    monkeypatch.setattr(online_methods, "augment", lambda cloud, pairs, *a, **kw: uploaded.append(list(pairs))
                        or real_augment(cloud, pairs, *a, **kw))
    monkeypatch.setattr(online_methods, "personalize", lambda device, task, pairs, settings, seed: trained.append(
        list(pairs)) or real_personalize(device, task, pairs, settings, seed))
    out = tmp_path / "run"
    rep = run_online.main(tiny_args(tiny_model_dir, out) + ["--buffer", "4", "--synthesis-filter", "rouge1"])
    users = data.split_users(data.load_users("lamp7"), 2)[0]
    task = data.get_task("lamp7")
    assert len(uploaded) == len(users) and len(trained) == 2 * len(users)  # each user: direct-ft, cdcda
    for user, sent, (direct, augmented) in zip(users, uploaded, zip(trained[::2], trained[1::2])):
        buffer = json.loads((out / "users" / user.user_id / "buffer.json").read_text())
        history = cdcda.upload(task, user)
        assert len(sent) == 4 and buffer["kept"] == 4 and buffer["seen"] == len(history) > 4
        assert sent == [p for p in history if p in sent]  # a subsequence of the history, in order
        assert direct == sent
        records = [json.loads(line) for line in (out / "users" / user.user_id / "synthetic.jsonl").read_text().splitlines()]
        assert records and all("rouge_1" in r and (r["input"], r["output"]) in sent for r in records)
        kept = [(r["syn_input"], r["syn_output"]) for r in records if r["kept"]]
        assert augmented == sent + kept
    assert "4-item online buffer, scores" in rep["models"]["history"] and "ROUGE-1" in rep["models"]["synthesis filter"]


@pytest.mark.parametrize("bad, option", [(["--buffer", "-1"], "--buffer"), (["--buffer-policy", "best"], "--buffer-policy"),
                                         (["--synthesis-filter", "nli"], "--synthesis-filter"),
                                         (["--eps-rouge1", "2"], "--eps-rouge1"),
                                         (["--compare-buffers", "--buffer", "4"], "--compare-buffers"),
                                         (["--compare-buffers", "--buffer-sizes", "16,x"], "--buffer-sizes"),
                                         (["--compare-buffers", "--buffer-rows", "scores-99"], "--buffer-rows")])
def test_buffer_options_are_checked_before_any_work(bad, option, capsys, tmp_path):
    with pytest.raises(SystemExit):
        run_online.main(bad + ["--out", str(tmp_path / "run")])
    assert option in capsys.readouterr().err.strip().splitlines()[-1] and not (tmp_path / "run").exists()


def test_compare_buffers_trains_each_row_on_its_buffer(tiny_model_dir, tmp_path, monkeypatch, fake_cloud, tiny_args):
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    trained, real_personalize = [], cdcda.personalize

    def personalize(device, task, pairs, settings, seed):
        trained.append(list(pairs))
        return real_personalize(device, task, pairs, settings, seed)
    monkeypatch.setattr(cdcda, "personalize", personalize)
    monkeypatch.setattr(online_methods, "personalize", personalize)
    out = tmp_path / "run"
    rep = run_online.main(tiny_args(tiny_model_dir, out) + ["--compare-buffers", "--buffer-sizes", "4,8"])
    assert list(rep["rows"]) == ["base", "direct-ft", "cdcda"] + [f"{p}-{n}{a}" for n in (4, 8)
                                                                for p in ("scores", "random") for a in ("", "+aug")]
    assert rep["labels"]["random-8+aug"] == "8-item buffer, random + augmentation"
    assert all(row["gold_nll"] > 0 for row in rep["rows"].values())
    task = data.get_task("lamp7")
    rows = [r for r in rep["rows"] if r != "base"]  # each user's trained rows, in order
    users = data.split_users(data.load_users("lamp7"), 2)[0]
    assert len(trained) == len(rows) * len(users)
    for i, user in enumerate(users):
        sizes = dict(zip(rows, trained[i * len(rows):(i + 1) * len(rows)]))
        user_dir = out / "buffers" / "users" / user.user_id
        history = cdcda.upload(task, user)
        records = [json.loads(line) for line in (user_dir / "synthetic.jsonl").read_text().splitlines()]
        for n in (4, 8):
            for policy in ("scores", "random"):
                kept = [history[i] for i in json.loads((user_dir / f"buffer-{policy}-{n}.json").read_text())["kept_indices"]]
                assert sizes[f"{policy}-{n}"] == kept and len(kept) == n
                synthetic = [(r["syn_input"], r["syn_output"]) for r in records
                             if r["kept"] and (r["input"], r["output"]) in kept]
                assert synthetic and sizes[f"{policy}-{n}+aug"] == kept + synthetic
        assert sizes["direct-ft"] == history
        assert json.loads((user_dir / "buffer-scores-4.json").read_text()) != json.loads(
            (user_dir / "buffer-random-4.json").read_text())
    trained.clear()  # --buffer-rows: a subset of the rows, from the finished users' results
    rows = run_online.main(tiny_args(tiny_model_dir, out) + ["--compare-buffers", "--buffer-sizes", "4,8",
                                                              "--buffer-rows", "base,random-8+aug"])["rows"]
    assert list(rows) == ["base", "random-8+aug"] and rows["base"] == rep["rows"]["base"] and not trained
