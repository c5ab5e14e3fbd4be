"""cloud/batcher.py: replies joining a running batch (`join`, the decoding thread) get exactly the
replies `generate.generate` gives them alone; the few-row linear equals nn.Linear."""
import copy
import threading
import time

import pytest
import torch

import generate
import qwen2
from cloud import batcher

pytestmark = pytest.mark.usefixtures("one_thread")

SCAFFOLD = {None: [14, 15], 10: [14, 15], 9: [13, 14, 15]}  # id 9 keeps "its own text" 13
KW = dict(temperature=1.5, eos_token_id=[9, 10], scaffold=SCAFFOLD, scaffold_tokens=4)


def alone(model, prompt, seed, budget=3, **kw):
    """(new ids, where the second phase starts) of one reply decoded by itself."""
    kw = KW | kw
    out = generate.generate(model, torch.tensor([list(prompt)]), budget,
                            generator=[torch.Generator().manual_seed(seed)], **kw)
    out, resumed = out if kw["scaffold"] else (out, [None])
    return out[0, len(prompt):].tolist(), resumed[0]


def replies(model, prompts, seeds, copies, **kw):
    ids, mask = generate.left_pad(prompts, pad_token_id=0)
    return generate.Replies(model, ids, 3, attention_mask=mask, copies=copies,
                            generator=[torch.Generator().manual_seed(s) for s in seeds], **(KW | kw))


OTHER = dict(temperature=2.0, eos_token_id=[11], scaffold=None, top_p=0.9)  # another request's kind


@torch.inference_mode()
def test_replies_joining_a_running_batch_get_what_they_get_alone(tiny_model):
    """Two left-padded prompts decode two steps; a prompt longer than their rows so far joins with
    two replies (the running rows padded on the left), with other end ids, no scaffold, top-p 0.8;
    later a one-token prompt joins (its row padded) and the state of the replies that have ended
    is dropped. Each reply, sampled with its own settings, is the one it gets alone, ended ones
    filled with their own first end id."""
    model = tiny_model(3, vocab=16)
    long, short = (8, 7, 6, 5, 4, 3, 2, 1, 8, 7, 6, 5), (6,)
    a = replies(model, [[1, 2, 3], [4, 5, 6, 7]], [0, 1], [1, 1])
    names = [((1, 2, 3), 0), ((4, 5, 6, 7), 1)]  # each reply's (prompt, seed), in a's numbering
    got = {}
    for _ in range(2):
        a.step()
    assert a.cache.seq_len < len(long)
    b = replies(model, [list(long)], [2, 3], [2], **OTHER)
    batcher.join(a, b, keep=list(range(len(names))))
    names += [(long, 2), (long, 3)]
    while len(a.live) == len(names):
        a.step()
    assert a.cache.seq_len > len(short)
    for i in set(range(len(names))) - set(a.live):  # ended: taken now, dropped from the state
        got[names[i]] = (a.new[i], a.resumed[i])
    keep = sorted(a.live)
    batcher.join(a, replies(model, [list(short)], [4], [1]), keep=keep)
    names = [names[i] for i in keep] + [(short, 4)]
    while a.live:
        a.step()
    got |= {name: (a.new[i], a.resumed[i]) for i, name in enumerate(names)}
    assert len(got) == 5 and len({tuple(new) for new, _ in got.values()}) == 5
    for (prompt, seed), reply in got.items():
        assert reply == alone(model, prompt, seed, **(OTHER if prompt == long else {}))
    filled = a.new_ids(range(len(names)))
    for i, row in enumerate(filled.tolist()):
        fill = 11 if names[i][0] == long else 9
        assert row[len(a.new[i]):] == [fill] * (filled.shape[1] - len(a.new[i]))


def test_join_carries_every_per_reply_list_of_replies(tiny_model):
    """`batcher.PER_REPLY` names every per-reply list `generate.Replies` holds (a list as long as
    its replies, but `live`, which `join` renumbers): a list it did not name would keep a's old
    entries after a join."""
    model = tiny_model(3, vocab=16)
    r = replies(model, [[1, 2, 3], [4, 5]], range(7), [4, 3])
    per_reply = {name for name, value in vars(r).items() if isinstance(value, list) and len(value) == 7}
    assert per_reply - {"live"} == set(batcher.PER_REPLY)


@torch.inference_mode()
def test_forward_together_equals_each_batch_alone(tiny_model):
    """One pass over a decoding batch (left-padded, its cache 5 positions in) and two prompts' chunks
    (one with a cache 3 positions in) gives each the hidden states and the cache its own
    `model.model` pass gives (Block.forward per batch, rows summed in another order: to ~1e-6); a
    single batch's pass is `model.model`'s bit for bit."""
    model = tiny_model(6, vocab=16)
    c = model.config

    def batch(prompts, past):  # (ids of the next pass, its mask, a cache `past` positions in)
        ids, mask = generate.left_pad(prompts, pad_token_id=0)
        cache = qwen2.KVCache(c, len(prompts), 16)
        if past:
            model.model(ids[:, :past], mask[:, :past], cache)
        return ids[:, past:], mask, cache
    parts = [batch([[1, 2, 3, 4, 5, 6], [7, 8, 9]], 5), batch([[3, 1, 4, 1, 5]], 0), batch([[2, 7, 1, 8, 2, 8]], 3)]
    copies = [(ids, mask, copy.deepcopy(cache)) for ids, mask, cache in parts]
    together = batcher.forward_together(model, parts)
    for (ids, mask, cache), (_, _, alone_cache), hidden in zip(parts, copies, together):
        expected = model.model(ids, mask, alone_cache)
        torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
        assert cache.seq_len == alone_cache.seq_len
        torch.testing.assert_close(cache.k[:, :, :, :cache.seq_len], alone_cache.k[:, :, :, :cache.seq_len])
    ids, mask, cache = batch([[1, 2, 3, 4]], 2)
    one = batcher.forward_together(model, [(ids, mask, copy.deepcopy(cache))])[0]
    assert torch.equal(one, model.model(ids, mask, cache))


@torch.inference_mode()
def test_prefix_cache_starts_a_prompt_from_the_longest_prefix_it_shares(tiny_model):
    """A prompt starts from the longest prefix it shares with a prompt prefilled before (all but
    its last token when it is one of them), and its cache and logits are those of its whole
    prefill (to ~1e-6); padded batches neither load nor store; past `tokens` positions the
    least recently used prompts go. Through the decoding loop, each reply is the one it gets alone."""
    model = tiny_model(7, vocab=16)
    prefixes = batcher.PrefixCache(tokens=20)
    a, b, d = list(range(1, 11)), list(range(1, 7)) + [9, 9, 9], [3] * 12

    def prefilled(prompts, cached=True):
        ids, mask = generate.left_pad(prompts, pad_token_id=0)
        r = generate.Replies(model, ids, 3, attention_mask=mask, prefill=False)
        loaded = prefixes.load(r) if cached else 0
        while not r.prefill(4):
            pass
        if cached:
            prefixes.store(r)
        return r, loaded
    assert prefilled([a])[1] == 0
    for prompt, shared in ((b, 6), (a, 9)):
        r, loaded = prefilled([prompt])
        whole, _ = prefilled([prompt], cached=False)
        assert loaded == shared
        torch.testing.assert_close(r.logits, whole.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r.cache.k[:, :, :, :len(prompt)], whole.cache.k[:, :, :, :len(prompt)])
    assert prefilled([a[:5], a])[1] == 0 and len(prefixes.entries) == 2  # padded: not stored either
    prefilled([d])  # 10 + 9 + 12 positions: b (the least recently used), then a, go
    assert list(prefixes.entries) == [tuple(d)]
    decoder = batcher.Batcher(model, max_batch=8, chunk=4).start()
    for prompt, seed in ((a, 1), (b, 2), (a, 3)):
        gen = [torch.Generator().manual_seed(seed)]
        got = decoder.generate(torch.tensor([prompt]), 5, 1.5, eos_token_id=None, generator=gen)
        gen = [torch.Generator().manual_seed(seed)]
        assert got.tolist() == generate.generate(model, torch.tensor([prompt]), 5, 1.5, eos_token_id=None,
                                                 generator=gen).tolist()
    assert [len(ids) for ids, _, _ in decoder.prefixes.entries.values()] == [9, 10]


def test_requests_join_oldest_first_long_prompts_in_chunks(tiny_model, monkeypatch):
    """Request A (300 tokens) is decoding when B (3 tokens) arrives: B joins A's batch at the next
    step and gets its replies back while A goes on; so does C, another kind of request (a scaffold,
    other end ids). L's 40-token prompt is prefilled 8 tokens a step (--prefill-chunk 8) while the
    batch decodes, so S, a short one sent after it, ends first. D (4 replies) does not fit beside A
    (--max-batch 4) and waits for A's end; E, sent after D, fits beside A but does not pass D.
    Each gets what it gets alone."""
    model = tiny_model(4, vocab=16)
    decoder = batcher.Batcher(model, max_batch=4, chunk=8)
    long = [1 + i % 13 for i in range(40)]
    prompts = {"A": [1, 2, 3], "B": [4, 5, 6, 7, 8, 9, 1, 2], "C": [3, 4], "L": long, "S": [5, 6, 7],
               "D": [5], "E": [6, 7]}
    budgets = dict.fromkeys(prompts, 3) | {"A": 300}
    copies = dict.fromkeys(prompts, 1) | {"D": 4}
    kwargs = {name: dict(eos_token_id=None, temperature=1.5) for name in prompts} | {"C": dict(KW, temperature=1.0)}
    arrivals = {3: "B", 5: "C", 8: "L", 9: "S", 30: "D", 31: "E"}  # at these steps of the loop
    seeds = {name: i for i, name in enumerate(prompts)}
    ended, got, takes, real_take = [], {}, [], decoder.take
    chunks, real_inputs = [], generate.Replies.inputs

    def gens(name):
        return [torch.Generator().manual_seed(seeds[name] * 10 + i) for i in range(copies[name])]

    def ask(name):
        got[name] = decoder.generate(torch.tensor([prompts[name]]), budgets[name], generator=gens(name),
                                     copies=[copies[name]], **kwargs[name])
        ended.append(name)

    def take(rows):  # on the decoding thread, before a step: a request arrives
        takes.append(rows)
        if arriving := arrivals.get(len(takes)):
            threading.Thread(target=ask, args=(arriving,)).start()
            while all(j.generator[0].initial_seed() != seeds[arriving] * 10 for j in decoder.waiting):
                time.sleep(0.001)
        return real_take(rows)
    monkeypatch.setattr(decoder, "take", take)
    passes, mlp = [], model.model.layers[0].mlp
    monkeypatch.setattr(mlp, "forward", lambda x, real=mlp.forward: passes.append(x.shape) or real(x))
    monkeypatch.setattr(generate.Replies, "inputs", lambda self, n=1: chunks.append(
        (self.input_ids.shape[1], n, self.logits is None)) or real_inputs(self, n))
    threading.Thread(target=ask, args=("A",)).start()
    decoder.start()
    deadline = time.time() + 60
    while len(ended) < len(prompts) and time.time() < deadline:
        time.sleep(0.01)
    assert set(ended) == set(prompts)
    assert ended.index("B") < ended.index("A") and ended.index("C") < ended.index("A")  # joined A's batch
    assert ended.index("S") < ended.index("L") < ended.index("A") < ended.index("D") < ended.index("E")
    assert [n for T, n, prompt in chunks if T == len(long) and prompt] == [8] * 5  # L: five chunks of 8
    assert len(passes) <= len(takes)  # a pass a step: the chunks ride on the batch's steps
    assert any(len(shape) == 2 and shape[0] == 8 + 1 for shape in passes)  # L's chunk beside A
    assert decoder.counts == {"answered": len(prompts), "failed": 0, "cancelled": 0}
    for name, out in got.items():
        expected = generate.generate(model, torch.tensor([prompts[name]]), budgets[name], generator=gens(name),
                                     copies=[copies[name]], **kwargs[name])
        if name == "C":
            assert out[1] == expected[1]
            out, expected = out[0], expected[0]
        assert out.tolist() == expected.tolist(), name


def test_a_failing_or_cancelled_request_leaves_the_others_untouched(tiny_model):
    """Five requests decoded together: one whose prompt holds an id the model lacks (its prefill
    raises), one whose prompt makes NaN logits (a NaN embedding row), one whose client goes away
    while it decodes; each fails or is cancelled alone and leaves the batch at the next step,
    and the other two get what they get alone."""
    model = tiny_model(5, vocab=16)
    with torch.no_grad():
        model.model.embed_tokens.weight[15] = float("nan")
    decoder = batcher.Batcher(model, max_batch=16, chunk=4, poll=0.05)
    left = threading.Event()
    asks = {"good": ([1, 2, 3], 20, None), "no such id": ([4, 99, 5], 5, None),
            "NaN": ([4, 15, 5], 5, None), "gone": ([6, 7], 300, left.is_set), "good too": ([8, 9, 10, 11, 12], 30, None)}
    got, live_rows = {}, []

    def ask(name, seed):
        prompt, budget, gone = asks[name]
        try:
            got[name] = decoder.generate(torch.tensor([prompt]), budget, 1.5, eos_token_id=[15], gone=gone,
                                         generator=[torch.Generator().manual_seed(seed)])
        except Exception as e:
            got[name] = e
    threads = [threading.Thread(target=ask, args=(name, i)) for i, name in enumerate(asks)]
    for t in threads:
        t.start()
    while len(decoder.waiting) < len(asks):
        time.sleep(0.01)
    real_draw = generate.Replies.draw

    def draw(self):  # the client goes away at the 5th step; the next comes after its next poll
        live_rows.append(len(self.live))
        if len(live_rows) == 5:
            left.set()
            time.sleep(0.3)
        real_draw(self)
    generate.Replies.draw = draw
    try:
        decoder.start()
        for t in threads:
            t.join(60)
    finally:
        generate.Replies.draw = real_draw
    assert isinstance(got["no such id"], RuntimeError) and "index" in str(got["no such id"])
    assert isinstance(got["NaN"], RuntimeError) and "NaN" in str(got["NaN"])
    assert isinstance(got["gone"], batcher.Cancelled)
    assert decoder.counts == {"answered": 2, "failed": 2, "cancelled": 1}
    assert max(live_rows) == 3 and live_rows[-1] == 1  # "gone" left: "good too" decodes alone at the end
    for seed, name in ((0, "good"), (4, "good too")):
        prompt, budget, _ = asks[name]
        expected = generate.generate(model, torch.tensor([prompt]), budget, 1.5, eos_token_id=[15],
                                     generator=[torch.Generator().manual_seed(seed)])
        assert got[name].tolist() == expected.tolist()


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("column_major", [False, True])
def test_few_row_linear_equals_nn_linear(rows, bias, column_major, monkeypatch):
    """The same outputs as nn.Linear; for a few rows, the weight on the left and x^T a transposed
    view of a row-major x (MKL's fast kernel), even for a column-major x (what (W @ x^T)^T is
    before a copy), and the output row-major, so that the next layer's x is too."""
    torch.manual_seed(rows)
    plain = torch.nn.Linear(24, 40, bias=bias)
    few = torch.nn.Linear(24, 40, bias=bias)
    few.load_state_dict(plain.state_dict())
    few.__class__ = batcher.FewRowLinear
    x = torch.randn(24, rows).T.reshape(rows, 1, 24) if column_major else torch.randn(rows, 1, 24)
    calls = []
    real = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__",
                        lambda a, b: calls.append((a.shape, b.stride())) or real(a, b))
    y = few(x)
    torch.testing.assert_close(y, plain(x), rtol=1e-5, atol=1e-5)
    assert y.is_contiguous()
    assert calls == ([((40, 24), (1, 24))] if 1 < rows <= 16 else [])
