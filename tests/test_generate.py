"""generate.py: sampling, batched decoding against transformers' greedy output, chat and its
end-of-turn cut."""
import pytest
import torch

import generate
import qwen2

pytestmark = pytest.mark.usefixtures("one_thread")


def test_greedy_generation_matches_transformers(tmp_path, tiny_hf):
    hf, directory = tiny_hf.model("qwen2", tmp_path)
    model, _ = qwen2.load(str(directory))
    ids, mask = tiny_hf.padded_batch()
    ours = generate.generate(model, ids, 8, temperature=0, eos_token_id=None, attention_mask=mask)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_batched_left_padded_generation_equals_one_by_one(tmp_path, tiny_hf):
    _, directory = tiny_hf.model("qwen2", tmp_path, tied=True)
    model, _ = qwen2.load(str(directory))
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    ids, mask = generate.left_pad(prompts, pad_token_id=0)
    batched = generate.generate(model, ids, 10, temperature=0, eos_token_id=None, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone = generate.generate(model, torch.tensor([prompt]), 10, temperature=0, eos_token_id=None)
        assert batched[row, -10:].tolist() == alone[0, -10:].tolist()


def test_sampling_seeded_and_stops_at_eos(tmp_path, tiny_hf):
    _, directory = tiny_hf.model("qwen2", tmp_path)
    model, _ = qwen2.load(str(directory))
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    runs = [generate.generate(model, ids, 12, temperature=1.0, eos_token_id=None,
                           generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert runs[0].shape == (2, 15)
    # top_p tiny keeps only the most likely token: sampling becomes greedy
    greedy = generate.generate(model, ids, 12, temperature=0, eos_token_id=None)
    nucleus = generate.generate(model, ids, 12, temperature=1.0, top_p=1e-6, eos_token_id=None,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, nucleus)
    # make the 3rd greedy token of row 0 an eos: row 0 stops there and is filled with eos after it
    eos = int(greedy[0, 5])
    out = generate.generate(model, ids, 12, temperature=0, eos_token_id=[eos])
    first = (greedy[1, 3:] == eos).nonzero()
    end = 3 + (int(first[0]) + 1 if len(first) else 12)
    assert out.shape[1] == max(6, end)
    assert out[0, 5:].eq(eos).all() and out[0, :5].tolist() == greedy[0, :5].tolist()


def test_sample_top_p_formula():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(generate.sample(logits, 1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3: the nucleus is the first two tokens
    assert int(generate.sample(logits, 0.0)) == 0


def test_chat_reply_prefix_starts_the_assistant_turn(tiny_model_dir):
    model, tok = qwen2.load(str(tiny_model_dir))
    conv = [[{"role": "user", "content": "hi"}]]
    primed = generate.chat(model, tok, conv, max_new_tokens=4, temperature=0, reply_prefix="Input: [")
    assert primed[0].startswith("Input: [")
    # the prefix is part of the prompt: the same as generating after a template that ends in it
    ids = tok.encode(tok.apply_chat_template(conv[0]) + "Input: [")
    out = generate.generate(model, torch.tensor([ids]), 4, temperature=0, eos_token_id=tok.eos_token_ids)
    new = out[0, len(ids):].tolist()
    new = new[:[t in tok.eos_token_ids for t in new].index(True)] if any(t in tok.eos_token_ids for t in new) else new
    assert primed[0] == ("Input: [" + tok.decode(new)).strip()


def test_chat_stop_ends_each_reply_before_the_stop_text(tiny_model_dir):
    model, tok = qwen2.load(str(tiny_model_dir))
    stops = generate.stop_token_ids(tok, "]")
    assert tok.encode("]")[0] in stops and all("]" in tok.decode([i]) for i in stops)
    convs = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a longer question"}]]
    replies = generate.chat(model, tok, convs, max_new_tokens=16, temperature=1.0, seed=3,
                            reply_prefix=["Input: [", "Input: [x], Response: ["], stop="]")
    assert replies[0].startswith("Input: [") and replies[1].startswith("Input: [x], Response: [")
    assert "]" not in replies[0] and replies[1].count("]") == 1  # the prefix's own "]" only
    free = generate.chat(model, tok, convs, max_new_tokens=16, temperature=1.0, seed=3,
                         reply_prefix=["Input: [", "Input: [x], Response: ["])
    assert free[0].startswith(replies[0])  # the same draws; the stopped reply is the free one cut at "]"


def test_reply_text_cuts_at_the_end_of_turn_or_the_stop_text(tiny_model_dir):
    tok = qwen2.Tokenizer.from_dir(tiny_model_dir)
    ids = tok.encode("ab] cd")
    assert generate.reply_text(tok, ids) == ("ab] cd", None)
    end = tok.eos_token_ids[0]
    assert generate.reply_text(tok, tok.encode("ab") + [end] + tok.encode("cd")) == ("ab", len(tok.encode("ab")))
    text, index = generate.reply_text(tok, ids, stop="]")
    assert text == "ab" and "]" in tok.decode([ids[index]])
