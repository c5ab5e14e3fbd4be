"""labels.py: constrained label decoding yields only labels, draws from the renormalized softmax
over the allowed ids, and reaches every label (shared prefixes, LaMP-2's tags, LaMP-3's scores)."""
import math

import pytest
import torch

import augment
import data
import generate
import labels
import qwen2
import smollm2
from errors import InputError


@pytest.fixture(scope="module")
def tokenizer():
    return qwen2.Tokenizer.from_dir(smollm2.embedded_dir())


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


def test_constrained_samples_of_a_random_model_are_labels(tiny_model_dir, tokenizer, ends):
    """A tiny random decoder almost never writes a tag; masked, every reply is one."""
    model, _ = qwen2.load(str(tiny_model_dir))
    trie = labels.LabelTrie(tokenizer, data.LAMP2_TAGS, ends, after=augment.SCAFFOLD)
    prompt = tokenizer.encode("Input: [A heist on a train.") + tokenizer.encode(augment.SCAFFOLD)
    R, gen = 16, torch.Generator().manual_seed(0)

    def decode(constrained: bool) -> list[str]:
        replies, live = [[] for _ in range(R)], list(range(R))
        for _ in range(8):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + replies[r] for r in live]))[:, -1]
            if constrained:
                logits = trie.mask(logits, [replies[r] for r in live])
            for r, t in zip(list(live), generate.sample(logits, 0.7, generator=gen).tolist()):
                replies[r].append(t)
                if t in ends:
                    live.remove(r)
            if not live:
                break
        return [generate.reply_text(tokenizer, ids, "]")[0].strip() for ids in replies]

    free = decode(constrained=False)
    assert sum(y in data.LAMP2_TAGS for y in free) <= 1, free
    constrained = decode(constrained=True)
    assert all(y in data.LAMP2_TAGS for y in constrained), constrained


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
        assert tokenizer.decode(ids) == name and trie.label(ids + [ends[0]]) == name
    assert trie.label(tokenizer.encode("sci-fi movie")) is None


def test_a_prefix_off_every_label_and_an_empty_label_are_errors(tokenizer, ends):
    trie = labels.LabelTrie(tokenizer, data.LAMP3_SCORES, ends)
    with pytest.raises(ValueError, match="start no label"):
        trie.allowed(tokenizer.encode("7"))
    with pytest.raises(InputError, match="label ''"):
        labels.LabelTrie(tokenizer, ("1", ""), ends)
