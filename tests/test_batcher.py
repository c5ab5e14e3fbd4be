"""cloud/batcher.py: replies joining a running batch (`join`, the decoding thread) get exactly the
replies `generate.generate` gives them alone; the few-row linear equals nn.Linear."""
import threading
import time

import pytest
import torch

import generate
from cloud import batcher

pytestmark = pytest.mark.usefixtures("one_thread")

SCAFFOLD = {None: [14, 15], 10: [14, 15], 9: [13, 14, 15]}  # id 9 keeps "its own text" 13
KW = dict(temperature=1.5, eos_token_id=[9, 10], scaffold=SCAFFOLD, scaffold_tokens=4)


def alone(model, prompt, seed, budget=3):
    """(new ids, where the second phase starts) of one reply decoded by itself."""
    out, resumed = generate.generate(model, torch.tensor([list(prompt)]), budget,
                                     generator=[torch.Generator().manual_seed(seed)], **KW)
    return out[0, len(prompt):].tolist(), resumed[0]


def replies(model, prompts, seeds, copies):
    ids, mask = generate.left_pad(prompts, pad_token_id=0)
    return generate.Replies(model, ids, 3, attention_mask=mask, copies=copies,
                            generator=[torch.Generator().manual_seed(s) for s in seeds], **KW)


@torch.inference_mode()
def test_replies_joining_a_running_batch_get_what_they_get_alone(tiny_model):
    """Two left-padded prompts decode two steps; a prompt longer than their rows so far joins with
    two replies (the running rows padded on the left); later a one-token prompt joins (its row
    padded) and the state of the replies that have ended is dropped. Each reply, sampled at T = 1.5
    with a scaffold, is the one it gets alone, ended ones filled with the first end id."""
    model = tiny_model(3, vocab=16)
    long, short = (8, 7, 6, 5, 4, 3, 2, 1, 8, 7, 6, 5), (6,)
    a = replies(model, [[1, 2, 3], [4, 5, 6, 7]], [0, 1], [1, 1])
    names = [((1, 2, 3), 0), ((4, 5, 6, 7), 1)]  # each reply's (prompt, seed), in a's numbering
    got = {}
    for _ in range(2):
        a.step()
    assert a.cache.seq_len < len(long)
    b = replies(model, [list(long)], [2, 3], [2])
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
        assert reply == alone(model, prompt, seed)
    filled = a.new_ids(range(len(names)))
    assert all(row[len(a.new[i]):] == [9] * (filled.shape[1] - len(a.new[i])) for i, row in enumerate(filled.tolist()))


def test_a_request_joins_the_running_batch_and_returns_when_its_replies_end(tiny_model):
    """Request A (300 tokens) is decoding when request B (3 tokens) arrives: B joins A's batch at
    the next step and gets its replies back while A goes on; each gets what it gets alone. A request
    that cannot join (another scaffold), arriving first, makes the batch drain before others join."""
    model = tiny_model(4, vocab=16)
    decoder = batcher.Batcher(model, max_batch=8)
    prompts = {"A": [1, 2, 3], "B": [4, 5, 6, 7, 8, 9, 1, 2], "C": [3, 4], "D": [5]}
    budgets, seeds = {"A": 300, "B": 3, "C": 3, "D": 3}, {"A": 0, "B": 1, "C": 2, "D": 3}
    kwargs = {name: dict(eos_token_id=None, temperature=1.5) for name in "ABD"} | {"C": dict(KW, temperature=1.0)}
    ended, got, takes, real_take = [], {}, [], decoder.take

    def ask(name):
        got[name] = decoder.generate(torch.tensor([prompts[name]]), budgets[name],
                                     generator=[torch.Generator().manual_seed(seeds[name])], **kwargs[name])
        ended.append(name)

    def take(batch, key):  # on the decoding thread, before a step: B comes after A's second step, C and D later
        takes.append(batch is not None)
        arriving = {3: "B", 20: "C", 21: "D"}.get(len(takes))
        if arriving:
            threading.Thread(target=ask, args=(arriving,)).start()
            while all(j.generator[0].initial_seed() != seeds[arriving] for j in decoder.waiting):
                time.sleep(0.001)
        return real_take(batch, key)
    decoder.take = take
    first = threading.Thread(target=ask, args=("A",))
    first.start()
    decoder.start()
    deadline = time.time() + 60
    while len(ended) < 4 and time.time() < deadline:
        time.sleep(0.01)
    assert ended == ["B", "A", "C", "D"]  # B joined and left; C (another scaffold) waited for A, D for C
    assert decoder.most == 2
    for name, out in got.items():
        expected = generate.generate(model, torch.tensor([prompts[name]]), budgets[name],
                                     generator=[torch.Generator().manual_seed(seeds[name])], **kwargs[name])
        if name == "C":
            out, expected = (out[0], out[1]), (expected[0], expected[1])
            assert out[1] == expected[1]
            out, expected = out[0], expected[0]
        assert out.tolist() == expected.tolist()


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17])
@pytest.mark.parametrize("bias", [True, False])
def test_few_row_linear_equals_nn_linear(rows, bias, monkeypatch):
    torch.manual_seed(rows)
    plain = torch.nn.Linear(24, 40, bias=bias)
    few = torch.nn.Linear(24, 40, bias=bias)
    few.load_state_dict(plain.state_dict())
    few.__class__ = batcher.FewRowLinear
    x = torch.randn(rows, 1, 24)
    calls = []
    real = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: calls.append(a.shape) or real(a, b))
    torch.testing.assert_close(few(x), plain(x), rtol=1e-5, atol=1e-5)
    assert calls == ([(40, 24)] if 1 < rows <= 16 else [])  # the weight on the left, for a few rows only
