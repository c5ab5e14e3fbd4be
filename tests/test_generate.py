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


def test_sample_draws_follow_the_softmax_each_row_from_its_own_generator():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = torch.log(probs)[None].expand(2, -1) * 2.0  # at T = 2 the softmax is probs again
    draws = torch.stack([generate.sample(logits, 2.0, generator=[g, h]) for g, h in zip(
        *[[torch.Generator().manual_seed(s) for s in range(base, base + 20_000)] for base in (0, 50_000)])])
    for row in range(2):
        freq = torch.bincount(draws[:, row], minlength=5).float() / len(draws)
        assert (freq - probs).abs().max() < 0.015 and freq[4] == 0  # 3 sigma of 20k draws; never p = 0
    alone = [int(generate.sample(logits[:1], 2.0, generator=[torch.Generator().manual_seed(s)])) for s in range(50)]
    paired = [int(generate.sample(logits, 2.0, generator=[torch.Generator().manual_seed(s),
                                                          torch.Generator().manual_seed(99)])[0]) for s in range(50)]
    assert alone == paired and len(set(alone)) > 1  # a row's draw ignores the other rows'


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


def test_shared_prefill_scaffold_and_leaving_rows_see_what_a_full_recompute_sees(tiny_model, monkeypatch):
    """Two prompts (left padded), three and two replies each from one prefill; a reply's first
    phase ends at an end id (9, 10) or after 3 tokens, its scaffold is written in the end id's
    place (or after the third token) and it goes on for up to 4 more; finished replies leave.
    Every distribution a reply samples from equals the model's on the reply's own tokens
    recomputed from scratch, and no forward runs a finished reply."""
    model = tiny_model(7, vocab=16)
    prompts, T = [[1, 2, 3, 4, 5], [6, 7]], 5
    ids, mask = generate.left_pad(prompts, pad_token_id=0)
    seen, widths, real_sample, real_forward = [], [], generate.sample, model.model.forward
    monkeypatch.setattr(generate, "sample", lambda logits, *a: seen.append(logits.clone()) or real_sample(logits, *a))
    monkeypatch.setattr(model.model, "forward", lambda x, *a: widths.append(x.shape[0]) or real_forward(x, *a))
    scaffold = {None: [14, 15], 10: [14, 15], 9: [13, 14, 15]}  # id 9 keeps "its own text" 13
    generators = [torch.Generator().manual_seed(s) for s in range(5)]
    out, resumed = generate.generate(model, ids, 3, temperature=1.5, eos_token_id=[9, 10], attention_mask=mask,
                                     generator=generators, copies=[3, 2], scaffold=scaffold, scaffold_tokens=4)
    assert out[:3, :T].tolist() == [ids[0].tolist()] * 3 and out[3:, :T].tolist() == [ids[1].tolist()] * 2
    assert len({tuple(row) for row in out[:, T:].tolist()}) > 2  # each reply its own draws
    prompt_of, length = [0, 0, 0, 1, 1], []
    for r in range(5):
        new, start = out[r, T:].tolist(), resumed[r]
        assert 2 <= start <= 3 + 3 and new[start - 2:start] == [14, 15]  # the scaffold, then the second phase
        last = next((j for j in range(start, start + 4) if new[j] in (9, 10)), start + 3)
        length.append(last + 1)  # the steps it sampled at, the prefill's included
        assert all(t == 9 for t in new[last + 1:])  # a finished reply is filled with the first end id
    assert len(seen) == max(length)
    assert widths == [2] + [sum(step < n for n in length) for step in range(1, len(seen))]  # one prefill per prompt
    for step, logits in enumerate(seen):
        sampling = [r for r in range(5) if step < length[r]]
        assert logits.shape[0] == len(sampling)  # finished replies have left the batch
        for j, r in enumerate(sampling):
            with torch.no_grad():
                full = model(torch.tensor([prompts[prompt_of[r]] + out[r, T:T + step].tolist()]))[0, -1]
            assert torch.allclose(logits[j], full, atol=1e-5), (r, step)


@pytest.mark.parametrize("logits, top_p, message", [
    ([[0.0, 1.0]], 0.0, "top_p"), ([[0.0, 1.0]], 1.5, "top_p"), ([[0.0, 1.0]], -0.1, "top_p"),
    ([[0.0, 1.0], [float("nan"), 1.0]], 1.0, "row 1's logits hold a NaN"),
    ([[float("-inf")] * 2, [0.0, 1.0]], 1.0, "row 0's logits hold only -inf"),
    ([[0.0, float("inf")]], 1.0, r"row 0's logits hold \+inf")])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_sample_refuses_logits_it_cannot_sample(logits, top_p, message, temperature):
    with pytest.raises(ValueError, match=message):
        generate.sample(torch.tensor(logits), temperature, top_p, torch.Generator().manual_seed(0))


def test_sample_top_p_per_row_equals_each_row_alone():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    for s in range(30):
        together = generate.sample(logits, 1.0, [0.7, 1.0, 0.9], [torch.Generator().manual_seed(s + i)
                                                                 for i in range(3)]).tolist()
        alone = [int(generate.sample(logits[:1], 1.0, p, [torch.Generator().manual_seed(s + i)]))
                 for i, p in enumerate((0.7, 1.0, 0.9))]
        assert together == alone
