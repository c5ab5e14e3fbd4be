"""The cloud's steps (augment.py): the paper's augmentation prompt (eq. 1) and the parser of its replies."""
import math

import pytest

import augment
import data
import filters
import generate
import options
import qwen2
from embedded import smollm2


def test_augment_prompt_is_the_papers():
    text = augment.AUGMENT_PROMPT.format(x="rain again", y="ugh rain again smh")
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
    assert augment.parse_pair(text) == expected


@pytest.mark.parametrize("text", [
    "", "I cannot help with that.", "Input: [snow in May]",  # partial: no response
    "Input: [], Response: [b]", "Response: [b]", "Input: [a], Response: []", "\x00\ufffd garbage ###",
])
def test_parse_pair_garbage_and_partial(text):
    assert augment.parse_pair(text) is None


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
    assert augment.parse_pair(text) == expected


@pytest.mark.parametrize("text", [
    "Input: [a], Response: [b",  # the response's bracket never closes: the generation was cut off
    "Input: [a], Response: [b\nInput: [c], Response: [d]",  # ... and a second pair starts
    "Input: [a], Response: Explanation: none",  # only commentary
    "Input: [a], Response: [] Input: [c], Response: [d]",
])
def test_parse_pair_rejects_cut_off_and_empty_responses(text):
    assert augment.parse_pair(text) is None


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
    assert data.get_task(task).valid_output(augment.parse_pair(reply)[1]) is valid


def test_augment_counts_unparsable_and_off_label_apart():
    """lamp3: of four replies one parses with a valid score, one is cut off, two are off-label."""
    replies = ["Input: [good], Response: [4]", "Input: [good], Response: [4", "Input: [good], Response: [4 stars]",
               "Input: [good], Response: [Four]"]
    tok = qwen2.Tokenizer.from_dir(smollm2.embedded_dir())
    chat = lambda model, tokenizer, conversations, *args, **kw: replies[:len(conversations)]
    task = data.get_task("lamp3")
    cloud, settings = augment.CloudLM(None, tok, chat), options.Settings(k=4, augment_decoding="free")
    out = augment.augment(cloud, [("good", "4")], settings, 0, task)
    assert (out.source, out.pairs) == ([0], [("good", "4")])
    assert out.counts == {"generated": 4, "unparsable": 1, "off_label": 2}
    out = augment.augment(cloud, [("good", "4")], settings, 0)
    assert (out.counts["unparsable"], out.counts["off_label"]) == (1, 0)  # no task: no label check


@pytest.mark.parametrize("ratio", [1.0, 2.0, 3.5])
def test_augment_budget_allows_the_length_filters_upper_bound(ratio):
    """max_new_tokens = ceil(ratio * longest) + AUGMENT_SLACK: a candidate ratio times the
    longest example still fits, so eq. 4 and not the budget decides about it."""
    tok = qwen2.Tokenizer.from_dir(smollm2.embedded_dir())
    pairs = [("short one", "short"), (" ".join(["word"] * 150), " ".join(["word"] * 150))]
    seen = {}

    def chat(model, tokenizer, conversations, max_new_tokens, **kw):
        seen["budget"] = max_new_tokens
        return ["nothing"] * len(conversations)
    settings = options.Settings(k=1, augment_decoding="free", eps_max_len=ratio)
    augment.augment(augment.CloudLM(None, tok, chat), pairs, settings, 0)
    longest = len(tok.encode(f"Input: [{pairs[1][0]}], Response: [{pairs[1][1]}]"))
    assert longest > 300  # past the old cap of 512 when doubled
    assert seen["budget"] == math.ceil(ratio * longest) + augment.AUGMENT_SLACK


def test_make_judge_names_the_option():
    with pytest.raises(ValueError, match="--judge"):
        filters.make_judge("minilm", "cpu")


def test_structured_augmentation_always_yields_the_pair_shape(tiny_model_dir, monkeypatch):
    """A random model writes prose; structured decoding still returns "Input: [x], Response: [y]"
    for every generation, in one pass: the input stops at its "]", the scaffold is written in its
    place and the response goes on from the same cache to its "]"."""
    model, tok = qwen2.load(str(tiny_model_dir))
    seen, texts, real = [], [], generate.chat
    monkeypatch.setattr(generate, "chat", lambda *a, **kw: seen.append(kw) or texts.extend(real(*a, **kw)) or texts)
    pairs = [("rain again", "ugh rain smh"), ("big game tonight", "LETS GO big game")]
    out = augment.augment(augment.CloudLM(model, tok), pairs, options.Settings(k=2, temperature=1.0), 0)
    assert len(seen) == 1 and seen[0]["stop"] == "]" and seen[0]["scaffold"] == augment.SCAFFOLD
    assert seen[0]["reply_prefix"] == augment.REPLY_PREFIX and len(texts) == 4
    assert all(t.startswith("Input: [") and t.count("], Response: [") == 1 and "]" not in t.split("Response: [")[1]
               for t in texts)
    assert out.counts["unparsable"] + len(out.pairs) == 4 and len(out.source) == len(out.pairs)
