"""The cloud's steps (augment.py): the paper's augmentation prompt (eq. 1) and the parser of its replies."""
import pytest

import augment


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


def test_make_judge_names_the_option():
    with pytest.raises(ValueError, match="--judge"):
        augment.make_judge("minilm", "cpu")
