"""train.py: eq. 6 (finetune), the examples it trains on (encode_example, fit_messages), and the
adapter files a trained model is saved to and loaded from (lora.save_adapter, load_adapter)."""
import pytest
import torch
from safetensors import safe_open

import hub
import lora
import nf4
import options
import qwen2
import train
from deployment.methods import load_adapter


def test_response_only_masking_by_hand(words):
    tok = words.tokenizer()
    messages, response = words.examples[1]
    ids, n_prompt = train.encode_example(tok, messages, response, max_length=64)
    # <|im_start|> user \n what is a dog <|im_end|> \n <|im_start|> assistant \n | a dog ran fast <|im_end|>
    # (the whitespace pre-tokenizer drops the newlines)
    assert ids == [20, 1, 18, 19, 10, 12, 21, 20, 2, 10, 12, 13, 14, 21] and n_prompt == 9
    short = ([9, 9], 1)  # a second, shorter example: padded on the right
    batch_ids, labels = train.right_pad([(ids, n_prompt), short], pad_token_id=21)
    assert labels[0].tolist() == [-100] * 9 + [10, 12, 13, 14, 21]
    assert batch_ids[1].tolist() == [9, 9] + [21] * 12 and labels[1].tolist() == [-100, 9] + [-100] * 12
    # the loss is the cross-entropy of the full logits at the positions before each response token
    model = lora.add_lora(words.model())
    words.randomize_b(model)
    with torch.no_grad():
        loss = train.response_loss(model, batch_ids, labels)
        logits = model(batch_ids)
    picked = [logits[0, t - 1].log_softmax(-1)[ids[t]] for t in range(9, 14)] + [logits[1, 0].log_softmax(-1)[9]]
    assert loss.item() == pytest.approx(-torch.stack(picked).mean().item(), abs=1e-5)


def test_truncation_keeps_the_response(words):
    tok = words.tokenizer()
    messages = [{"role": "user", "content": "the cat sat on a mat " * 4}]
    ids, n_prompt = train.encode_example(tok, messages, "a dog ran fast", max_length=16)
    assert len(ids) == 16 and ids[n_prompt:] == [10, 12, 13, 14, 21]
    assert ids[n_prompt - 3:n_prompt] == [21, 20, 2]  # the prompt keeps its end: im_end, im_start, assistant
    long_response = " ".join(["dog"] * 30)
    ids, n_prompt = train.encode_example(tok, messages, long_response, max_length=16)
    assert len(ids) == 16 and n_prompt == 8 and ids[n_prompt:] == [12] * 8  # half the budget each, no im_end


def test_finetune_loss_falls_and_the_adapter_reloads(tmp_path, words):
    tok = words.tokenizer()
    model = lora.add_lora(words.model(), r=4, alpha=8)
    losses = train.finetune(model, tok, words.examples, options.Settings(epochs=4, lr=1e-2, batch_size=3), seed=0)
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0]
    assert not model.training  # left as it was (eval)
    path = tmp_path / "adapter.safetensors"
    lora.save_adapter(model, path)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["r"] == "4" and f.metadata()["alpha"] == "8"
        assert len(list(f.keys())) == 2 * 2 * 7 and all(".lora_" in k and ".base." not in k for k in f.keys())
    fresh = lora.add_lora(words.model(), r=4, alpha=8)  # same base weights (same seed), new adapter
    ids = torch.randint(0, 22, (2, 8))
    with torch.no_grad():
        assert not torch.allclose(fresh(ids), model(ids))
        load_adapter(fresh, path)
        assert torch.equal(fresh(ids), model(ids))
    with pytest.raises(ValueError, match="trained with"):
        load_adapter(lora.add_lora(words.model(), r=8, alpha=8), path)
    with pytest.raises(ValueError, match="trained with"):
        load_adapter(lora.add_lora(words.model(), r=4, alpha=8, targets=("q_proj", "v_proj")), path)


def test_finetune_is_seeded(words):
    runs = [train.finetune(lora.add_lora(words.model(), r=4, alpha=8, dropout=0.1), words.tokenizer(), words.examples,
                           options.Settings(epochs=1, lr=1e-3, batch_size=2), seed=3) for _ in range(2)]
    assert runs[0] == runs[1]


def test_finetune_on_nf4_base_keeps_fp32_adapters(words):
    model = lora.add_lora(nf4.quantize_model(words.model()), r=4, alpha=8)
    losses = train.finetune(model, words.tokenizer(), words.examples, options.Settings(epochs=3, lr=1e-2, batch_size=3))
    assert losses[-1] < 0.5 * losses[0]
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_finetune_raises_on_nan(words):
    model = lora.add_lora(words.model(), r=4, alpha=8)
    model.model.layers[1].mlp.down_proj.lora_B.data.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN"):
        train.finetune(model, words.tokenizer(), words.examples, options.Settings(epochs=1, lr=1e-3))


def test_finetune_needs_adapters(words):
    with pytest.raises(ValueError, match="add_lora"):
        train.finetune(words.model().requires_grad_(False), words.tokenizer(), words.examples, options.Settings())


def test_real_chatml_tokenizer_masks_the_response():
    """With the embedded SmolLM2 tokenizer (when its converted copy is already in the cache)."""
    directory = hub.cache_dir() / qwen2.EMBEDDED
    if not (directory / "tokenizer.json").is_file():
        pytest.skip(f"{directory} not converted yet (qwen2.load() does it once)")
    tok = qwen2.Tokenizer.from_dir(directory)
    ids, n_prompt = train.encode_example(tok, [{"role": "user", "content": "Hi there"}], "Hello!", max_length=64)
    assert tok.decode(ids[n_prompt:]) == "Hello!" and ids[-1] == tok.encode("<|im_end|>")[0]
    assert tok.tokenizer.decode(ids[:n_prompt], skip_special_tokens=False).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("task_name", ["lamp3", "lamp4", "lamp5"])
def test_long_prompt_keeps_template_system_text_and_instruction(task_name):
    """A LaMP prompt twice the limit: the user content is cut at its end; the rendered prompt
    fits, starts with the system text, keeps the instruction and ends in the answer cue."""
    import data
    directory = hub.cache_dir() / qwen2.EMBEDDED
    if not (directory / "tokenizer.json").is_file():
        pytest.skip(f"{directory} not converted yet (qwen2.load() does it once)")
    tok, task, limit = qwen2.Tokenizer.from_dir(directory), data.get_task(task_name), 384
    item = {"text": " ".join(["The council met on Tuesday to debate the budget."] * 90),
            "abstract": " ".join(["We study things."] * 200),
            "title": "t", "score": "4"}
    messages = task.messages(task.training_input(task.pair(item)[0]))
    full = tok.apply_chat_template(messages)
    assert len(tok.encode(full)) >= 2 * limit
    fitted = train.fit_messages(tok, messages, limit)
    text = tok.apply_chat_template(fitted)
    assert len(tok.encode(text)) <= limit and len(tok.encode(text)) > limit - 8  # fits, nothing more cut than needed
    assert text.startswith(f"<|im_start|>system\n{task.system}<|im_end|>\n<|im_start|>user\n")
    instruction = task.pair_input.split("{", 1)[0]
    assert fitted[1]["content"].startswith(instruction) and fitted[1]["content"].endswith(task.user_end)
    assert full.startswith(text[:-len(task.user_end + "<|im_end|>\n<|im_start|>assistant\n")])  # a prefix of it
    assert text.endswith(task.user_end + "<|im_end|>\n<|im_start|>assistant\n")  # the answer cue
    assert train.fit_messages(tok, fitted, limit) == fitted  # what fits stays as it is
    # training encodes the same prompt, the response whole after it
    ids, n_prompt = train.encode_example(tok, messages, "Council Passes Budget", limit)
    assert len(ids) <= limit and tok.decode(ids[n_prompt:]) == "Council Passes Budget"
    assert tok.tokenizer.decode(ids[:n_prompt], skip_special_tokens=False) == tok.apply_chat_template(
        train.fit_messages(tok, messages, limit - (len(ids) - n_prompt)))


def test_fit_messages_errors_when_the_template_alone_is_too_long(words):
    tok = words.tokenizer()
    messages = [{"role": "system", "content": "hello world " * 10}, {"role": "user", "content": "the cat"}]
    with pytest.raises(ValueError, match="raise --max-length"):
        train.fit_messages(tok, messages, 12)
