"""Constrained label decoding (labels.py, generate.Replies, augment, cloud.client.api_chat): only
labels come out, drawn from the renormalized softmax over the allowed ids; every label (shared
prefixes, LaMP-2's tags, LaMP-3's scores) is reachable; tasks without labels are untouched."""
import math

import pytest
import torch

import augment
import data
import generate
import labels
import options
import qwen2
from cloud import batcher, client
from errors import InputError


@pytest.fixture(scope="module")
def tokenizer(embedded_model):
    return qwen2.Tokenizer.from_dir(embedded_model)


@pytest.fixture(scope="module")
def ends(tokenizer):
    return labels.close_ids(tokenizer)


def spelled(trie: labels.LabelTrie, tokenizer) -> dict[str, list[int]]:
    """Every text a walk along `allowed` can spell before a closing id (the oracle: a plain DFS)."""
    found, stack = {}, [[]]
    while stack:
        prefix = stack.pop()
        for i in trie.allowed(prefix):
            if i in trie.end_ids:
                found[tokenizer.decode(prefix)] = prefix
            else:
                stack.append(prefix + [i])
    return found


def test_close_ids_end_a_label_and_add_no_text(tokenizer, ends):
    texts = [tokenizer.decode([i]) for i in ends]
    assert "]" in texts and "]." in texts and set(tokenizer.eos_token_ids) <= set(ends)
    assert all(t == "" or t.startswith("]") for t in texts)  # never "fi]": text before the stop


@pytest.mark.parametrize("task", ["lamp2", "lamp3"])
def test_a_random_model_constrained_writes_only_labels(tiny_model_dir, task):
    """A tiny random decoder, augmenting through the real path (augment -> generate.chat ->
    Replies), almost never writes a label free; constrained, every response is one."""
    model, tok = qwen2.load(str(tiny_model_dir))
    cloud, spec = augment.CloudLM(model, tok), data.get_task(task)
    pairs = [("A heist on a train.", spec.pair_labels[0]), ("Two friends.", spec.pair_labels[-1])]
    out = {mode: augment.augment(cloud, pairs, options.Settings(k=6, temperature=1.0, label_decoding=mode), 0, spec)
           for mode in ("free", "constrained")}
    assert out["free"].counts["off_label"] >= 10, out["free"].counts  # of 12
    assert out["constrained"].counts["off_label"] == 0 and len(out["constrained"].pairs) >= 10
    assert all(y in spec.pair_labels for _, y in out["constrained"].pairs)


def test_a_task_without_labels_decodes_as_free(tiny_model_dir):
    """lamp7 has no label set: --label-decoding constrained changes nothing, to the token."""
    model, tok = qwen2.load(str(tiny_model_dir))
    pairs, task = [("rain again", "ugh rain smh")], data.get_task("lamp7")
    out = [augment.augment(augment.CloudLM(model, tok), pairs, options.Settings(k=4, label_decoding=mode), 3, task)
           for mode in ("free", "constrained")]
    assert out[0] == out[1] and out[0].counts["generated"] == 4


class Stop(Exception):
    pass


def test_replies_step_draws_from_the_renormalized_softmax(tiny_model_dir, tokenizer, monkeypatch):
    """Replies.step on fixed logits: rows still writing their input or their scaffold sample from
    the logits as they are; a row past its scaffold from softmax(logits / T) restricted to the ids
    that go on spelling a label (a closing id once one is whole) and renormalized: recomputed in
    float64 from each label's own tokens, without labels.py."""
    model, _ = qwen2.load(str(tiny_model_dir))
    names = data.LAMP2_TAGS + ("dark",)  # "dark" is whole, and "dark comedy" goes on from it
    trie = augment.label_trie(tokenizer, names)
    scaffold = generate.scaffold_ids(tokenizer, "]", augment.SCAFFOLD)
    T, R, V = 0.7, 5, 49152
    ends = generate.end_ids(tokenizer, "]")
    r = generate.Replies(model, torch.tensor([tokenizer.encode("Input: [a heist")]), 8, T, eos_token_id=ends,
                         copies=[R], generator=[torch.Generator() for _ in range(R)], scaffold=scaffold,
                         scaffold_tokens=8, labels=trie)
    head = list(scaffold[None])
    written = [[], head[:1], head, head + tokenizer.encode("sci"), head + tokenizer.encode("dark")]
    for i, ids in enumerate(written):  # reply 0 writes its input, 1 its scaffold, 2-4 a label
        r.new[i], r.phase[i] = [7] + ids, int(i > 0)
        r.forced[i], r.resumed[i] = (head[1:], None) if i == 1 else ([], 1 + len(head) if i > 1 else None)
    logits = torch.randn(R, V, generator=torch.Generator().manual_seed(1)) * 3
    r.logits, seen = logits.clone(), []

    def spy(logits, *args):
        seen.append(logits)
        raise Stop
    monkeypatch.setattr(generate, "sample", spy)
    with pytest.raises(Stop):
        r.step()
    probs = torch.softmax(seen[0].double() / T, dim=-1)
    spellings = {name: [tokenizer.encode(name), tokenizer.encode(augment.SCAFFOLD + name)[len(head):]]
                 for name in names}
    closing = {i for i in ends if i in tokenizer.eos_token_ids or tokenizer.decode([i]).startswith("]")}
    for row in range(R):
        if row < 2:
            assert torch.equal(seen[0][row], logits[row])
            continue
        prefix = written[row][len(head):]
        allowed = {ids[len(prefix)] for seqs in spellings.values() for ids in seqs
                   if ids[:len(prefix)] == prefix and len(ids) > len(prefix)}
        allowed |= closing if any(prefix in seqs for seqs in spellings.values()) else set()
        weights = {i: math.exp(float(logits[row, i]) / T) for i in allowed}
        expected = torch.zeros(V, dtype=torch.float64)
        for i, w in weights.items():
            expected[i] = w / sum(weights.values())
        assert torch.allclose(probs[row], expected, atol=1e-9), prefix
    assert closing < set(torch.nonzero(probs[4]).flatten().tolist())  # "dark": a closing id or " comedy"


def test_mask_draws_from_the_renormalized_softmax(tokenizer, ends):
    """softmax(mask(logits) / T) == softmax(logits / T) restricted to the allowed ids and
    renormalized, recomputed in float64 id by id; sampling from it never leaves the allowed ids."""
    trie = labels.LabelTrie(tokenizer, data.LAMP2_TAGS, ends)
    prefixes = [[], tokenizer.encode("sci"), tokenizer.encode("action"), tokenizer.encode("dark")]
    T, V = 0.7, 49152
    logits = torch.randn(len(prefixes), V, generator=torch.Generator().manual_seed(1)) * 3
    probs = torch.softmax(trie.mask(logits, prefixes) / T, dim=-1)
    for row, prefix in enumerate(prefixes):
        allowed = trie.allowed(prefix)
        weights = {i: math.exp(float(logits[row, i]) / T) for i in allowed}
        z = sum(weights.values())
        expected = torch.zeros(V, dtype=torch.float64)
        for i, w in weights.items():
            expected[i] = w / z
        assert torch.allclose(probs[row].double(), expected, atol=1e-6), prefix
    masked = trie.mask(logits, prefixes)
    draws = generate.sample(masked.repeat(50, 1), T, generator=torch.Generator().manual_seed(2))
    for k, t in enumerate(draws.tolist()):
        assert t in trie.allowed(prefixes[k % len(prefixes)])


def test_shared_prefixes_are_all_reachable(tokenizer, ends):
    names = ("sci-fi", "science fiction", "based on a book", "based on a true story", "1", "5",
             "dark", "dark comedy")
    trie = labels.LabelTrie(tokenizer, names, ends, after=augment.SCAFFOLD)
    assert set(spelled(trie, tokenizer)) == set(names)
    fork = trie.allowed(tokenizer.encode("based on a"))  # " book" and " true", no closing id yet
    assert set(fork) == {tokenizer.encode(" book")[0], tokenizer.encode(" true")[0]}
    dark = trie.allowed(tokenizer.encode("dark"))  # a whole label that a longer one goes on from
    assert tokenizer.encode(" comedy")[0] in dark and set(ends) <= set(dark)


@pytest.mark.parametrize("names", [data.LAMP2_TAGS, data.LAMP3_SCORES])
def test_every_lamp_label_is_reachable_and_decodes_to_itself(tokenizer, ends, names):
    trie = labels.LabelTrie(tokenizer, names, ends, after=augment.SCAFFOLD)
    found = spelled(trie, tokenizer)
    assert set(found) == set(names)
    for name, ids in found.items():
        assert tokenizer.decode(ids) == name


def test_a_prefix_off_every_label_and_an_empty_label_are_errors(tokenizer, ends):
    trie = labels.LabelTrie(tokenizer, data.LAMP3_SCORES, ends)
    with pytest.raises(ValueError, match="start no label"):
        trie.allowed(tokenizer.encode("7"))
    with pytest.raises(InputError, match="label ''"):
        labels.LabelTrie(tokenizer, ("1", ""), ends)


def test_the_labels_go_to_an_api_as_vllms_choice_list_and_a_refusal_falls_back(tokenizer, capsys, json_server):
    """Over HTTP on the loopback: the response request (the second) carries
    structured_outputs.choice, the input request does not; a server that refuses the field with
    HTTP 400 naming it gets the free request instead, with one warning line for the run."""
    bodies, refuse = [], []

    def stub(body):
        bodies.append(body)
        if refuse and "structured_outputs" in body:
            return 400, {"error": {"message": "structured_outputs: not supported"}}
        choice = body.get("structured_outputs", {}).get("choice")
        return 200, {"choices": [{"message": {"content": choice[-1] if choice else "a film"}}]}
    api = client.Endpoint(json_server(stub), retries=0)
    cloud = augment.CloudLM(None, tokenizer, client.api_chat(api, "m"))
    task, pairs = data.get_task("lamp2"), [("A heist.", "action")]
    out = augment.augment(cloud, pairs, options.Settings(k=2, label_decoding="constrained"), 0, task)
    assert [y for _, y in out.pairs] == ["true story"] * 2 and out.counts["off_label"] == 0
    assert ["structured_outputs" in b for b in bodies] == [False, False, True, True]
    assert bodies[-1]["structured_outputs"] == {"choice": list(data.LAMP2_TAGS)}
    refuse.append(True)
    bodies.clear()
    for _ in range(2):
        out = augment.augment(cloud, pairs, options.Settings(k=2, label_decoding="constrained"), 0, task)
        assert out.counts["off_label"] == 2  # free: "a film"
    # refused in the first run's response batch (the pool may cancel its second request before it
    # is sent, so one or two went out), then never sent again
    sent = ["structured_outputs" in b for b in bodies]
    tried = sent.count(True)
    assert tried in (1, 2) and sent == [False, False] + [True] * tried + [False] * 6
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "HTTP 400" in warning[0] and "not enforced" in warning[0]


def test_the_cloud_services_batcher_constrains_as_generate_does(tiny_model_dir, tokenizer, one_thread):
    """cloud/batcher.py decodes a request with labels as `generate` does alone: the same replies,
    every response a label."""
    model, tok = qwen2.load(str(tiny_model_dir))
    decoder = batcher.Batcher(model, max_batch=16).start()  # its few-row layers for both
    trie = augment.label_trie(tok, data.LAMP3_SCORES)
    prompts = [[{"role": "user", "content": augment.AUGMENT_PROMPT.format(x="Dull.", y="2")}]] * 4
    kw = dict(max_new_tokens=6, temperature=1.0, stop="]", reply_prefix=augment.REPLY_PREFIX,
              scaffold=augment.SCAFFOLD, labels=trie)
    alone = generate.chat(model, tok, prompts, **kw)
    assert generate.chat(model, tok, prompts, decode=decoder.generate, **kw) == alone
    assert all(augment.parse_pair(t + "]")[1] in data.LAMP3_SCORES for t in alone), alone
