"""lora.py: eq. 5 (LoRALinear, add_lora, merge, adapter files) and eq. 6 (finetune)."""
import pytest
import tokenizers
import torch
from safetensors import safe_open
from tokenizers import models, pre_tokenizers
from torch import nn

import hub
import lora
import nf4
import qwen2

WORDS = "user assistant system hello world the cat sat on a mat dog ran fast tell me about what is".split()


def word_tokenizer() -> qwen2.Tokenizer:
    """A word-level tokenizer with the ChatML special tokens, wrapped like the real one."""
    vocab = {w: i for i, w in enumerate(["[UNK]"] + WORDS)}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])  # ids 20, 21
    return qwen2.Tokenizer(tok, {})


def tiny_model(seed=0, vocab_size=22, **kw) -> qwen2.Qwen2:
    config = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = qwen2.Qwen2(qwen2.Config(**{**config, **kw}))
    nn.init.normal_(model.model.embed_tokens.weight, std=0.25)  # logits of order 1 through the tied head
    return model.eval()


def randomize_b(model, seed=1):
    """A trained-looking adapter: B != 0 (a fresh one is zero and would hide any error)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, lora.LoRALinear):
            m.lora_B.data = torch.randn(m.lora_B.shape, generator=g) * 0.1


EXAMPLES = [
    ([{"role": "user", "content": "tell me about the cat"}], "the cat sat on a mat"),
    ([{"role": "user", "content": "what is a dog"}], "a dog ran fast"),
    ([{"role": "system", "content": "hello"}, {"role": "user", "content": "hello world"}], "hello"),
] * 3


@pytest.mark.parametrize("quantized", [False, True])
def test_zero_b_leaves_outputs_unchanged(quantized):
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    if quantized:
        base = nf4.NF4Linear(base)
    layer = lora.LoRALinear(base, r=4, alpha=8)
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (24, 4) and layer.scaling == 2.0
    assert layer.lora_A.dtype == torch.float32 and layer.lora_A.abs().sum() > 0 and layer.lora_B.abs().sum() == 0
    x = torch.randn(3, 32)
    assert torch.equal(layer(x), base(x))


def test_forward_is_eq5_by_hand():
    """y = W x + b + (alpha / r) B A x with A, B set by hand: r = 1, alpha = 3."""
    base = nn.Linear(2, 2)
    base.weight.data, base.bias.data = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0.5, -0.5])
    layer = lora.LoRALinear(base, r=1, alpha=3)
    layer.lora_A.data, layer.lora_B.data = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [-1.0]])
    # x = (1, 1): W x + b = (1.5, 0.5); A x = 3; B A x = (3, -3); times 3 -> (9, -9)
    assert layer(torch.tensor([[1.0, 1.0]])).tolist() == [[10.5, -8.5]]


def test_add_lora_wraps_every_block_linear_and_freezes_the_rest():
    model = lora.add_lora(tiny_model(), r=4, alpha=8)
    wrapped = [name for name, m in model.named_modules() if isinstance(m, lora.LoRALinear)]
    assert len(wrapped) == 2 * 7
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.lora_{ab}" for name in wrapped for ab in "AB"}
    assert "model.layers.0.self_attn.q_proj.base.weight" in model.state_dict()
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.add_lora(model)
    with pytest.raises(ValueError, match="match no layer"):
        lora.add_lora(tiny_model(), targets=("q_proj", "qkv_proj"))


def test_only_lora_parameters_get_gradients():
    model = lora.add_lora(tiny_model(), r=4, alpha=8)
    randomize_b(model)
    model(torch.randint(0, 22, (2, 6))).sum().backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {name for name, p in model.named_parameters() if "lora_" in name}
    assert all(model.get_parameter(name).grad.abs().sum() > 0 for name in with_grad)


@pytest.mark.parametrize("quantized", [False, True])
def test_merged_equals_unmerged(quantized):
    model = tiny_model()
    keys = set(model.state_dict())
    if quantized:
        nf4.quantize_model(model, compute_dtype=torch.float32)  # fp32 compute: merge exactness is visible
    lora.add_lora(model, r=4, alpha=8)
    randomize_b(model)
    ids = torch.randint(0, 22, (2, 7))
    with torch.no_grad():
        before = model(ids)
        lora.merge(model)
        after = model(ids)
    assert not any(isinstance(m, (lora.LoRALinear, nf4.NF4Linear)) for m in model.modules())
    assert set(model.state_dict()) == keys  # the checkpoint's own keys again
    assert torch.allclose(before, after, atol=1e-5, rtol=0)


def test_outputs_equal_peft_with_the_same_a_and_b():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = tiny_model(vocab_size=96)
    config = transformers.Qwen2Config(**{k: v for k, v in model.config.to_dict().items() if v is not None})
    reference = transformers.Qwen2ForCausalLM(config)
    reference.load_state_dict(model.state_dict(), strict=True)
    reference = peft.get_peft_model(reference.eval(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(lora.TARGETS)))
    lora.add_lora(model, r=4, alpha=8)
    randomize_b(model)
    for name, m in model.named_modules():
        if isinstance(m, lora.LoRALinear):
            theirs = reference.get_submodule("base_model.model." + name)
            theirs.lora_A["default"].weight.data.copy_(m.lora_A)
            theirs.lora_B["default"].weight.data.copy_(m.lora_B)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        ours, ref = model(ids), reference(ids).logits
    assert ours.abs().max() > 0.5  # the adapters matter at this scale
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)


def test_response_only_masking_by_hand():
    tok = word_tokenizer()
    messages, response = EXAMPLES[1]
    ids, n_prompt = lora.encode_example(tok, messages, response, max_length=64)
    # <|im_start|> user \n what is a dog <|im_end|> \n <|im_start|> assistant \n | a dog ran fast <|im_end|>
    # (the whitespace pre-tokenizer drops the newlines)
    assert ids == [20, 1, 18, 19, 10, 12, 21, 20, 2, 10, 12, 13, 14, 21] and n_prompt == 9
    short = ([9, 9], 1)  # a second, shorter example: padded on the right
    batch_ids, labels = lora.right_pad([(ids, n_prompt), short], pad_token_id=21)
    assert labels[0].tolist() == [-100] * 9 + [10, 12, 13, 14, 21]
    assert batch_ids[1].tolist() == [9, 9] + [21] * 12 and labels[1].tolist() == [-100, 9] + [-100] * 12
    # the loss is the cross-entropy of the full logits at the positions before each response token
    model = lora.add_lora(tiny_model())
    randomize_b(model)
    with torch.no_grad():
        loss = lora.response_loss(model, batch_ids, labels)
        logits = model(batch_ids)
    picked = [logits[0, t - 1].log_softmax(-1)[ids[t]] for t in range(9, 14)] + [logits[1, 0].log_softmax(-1)[9]]
    assert loss.item() == pytest.approx(-torch.stack(picked).mean().item(), abs=1e-5)


def test_truncation_keeps_the_response():
    tok = word_tokenizer()
    messages = [{"role": "user", "content": "the cat sat on a mat " * 4}]
    ids, n_prompt = lora.encode_example(tok, messages, "a dog ran fast", max_length=16)
    assert len(ids) == 16 and ids[n_prompt:] == [10, 12, 13, 14, 21]
    assert ids[n_prompt - 3:n_prompt] == [21, 20, 2]  # the prompt keeps its end: im_end, im_start, assistant
    long_response = " ".join(["dog"] * 30)
    ids, n_prompt = lora.encode_example(tok, messages, long_response, max_length=16)
    assert len(ids) == 16 and n_prompt == 8 and ids[n_prompt:] == [12] * 8  # half the budget each, no im_end


def test_finetune_loss_falls_and_the_adapter_reloads(tmp_path):
    tok = word_tokenizer()
    model = lora.add_lora(tiny_model(), r=4, alpha=8)
    losses = lora.finetune(model, tok, EXAMPLES, epochs=4, lr=1e-2, batch_size=3, seed=0)
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0]
    assert not model.training  # left as it was (eval)
    path = tmp_path / "adapter.safetensors"
    lora.save_adapter(model, path)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["r"] == "4" and f.metadata()["alpha"] == "8"
        assert len(list(f.keys())) == 2 * 2 * 7 and all(".lora_" in k and ".base." not in k for k in f.keys())
    fresh = lora.add_lora(tiny_model(), r=4, alpha=8)  # same base weights (same seed), new adapter
    ids = torch.randint(0, 22, (2, 8))
    with torch.no_grad():
        assert not torch.allclose(fresh(ids), model(ids))
        lora.load_adapter(fresh, path)
        assert torch.equal(fresh(ids), model(ids))
    with pytest.raises(ValueError, match="trained with"):
        lora.load_adapter(lora.add_lora(tiny_model(), r=8, alpha=8), path)
    with pytest.raises(ValueError, match="trained with"):
        lora.load_adapter(lora.add_lora(tiny_model(), r=4, alpha=8, targets=("q_proj", "v_proj")), path)


def test_finetune_is_seeded():
    runs = [lora.finetune(lora.add_lora(tiny_model(), r=4, alpha=8, dropout=0.1), word_tokenizer(), EXAMPLES,
                          epochs=1, lr=1e-3, batch_size=2, seed=3) for _ in range(2)]
    assert runs[0] == runs[1]


def test_finetune_on_nf4_base_keeps_fp32_adapters():
    model = lora.add_lora(nf4.quantize_model(tiny_model()), r=4, alpha=8)
    losses = lora.finetune(model, word_tokenizer(), EXAMPLES, epochs=3, lr=1e-2, batch_size=3, grad_accum=2)
    assert losses[-1] < 0.5 * losses[0]
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_finetune_raises_on_nan():
    model = lora.add_lora(tiny_model(), r=4, alpha=8)
    model.model.layers[1].mlp.down_proj.lora_B.data.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN"):
        lora.finetune(model, word_tokenizer(), EXAMPLES, epochs=1, lr=1e-3)


def test_finetune_needs_adapters():
    with pytest.raises(ValueError, match="add_lora"):
        lora.finetune(tiny_model().requires_grad_(False), word_tokenizer(), EXAMPLES)


def test_real_chatml_tokenizer_masks_the_response():
    """With the embedded SmolLM2 tokenizer (when its converted copy is already in the cache)."""
    directory = hub.cache_dir() / qwen2.EMBEDDED
    if not (directory / "tokenizer.json").is_file():
        pytest.skip(f"{directory} not converted yet (qwen2.load() does it once)")
    tok = qwen2.Tokenizer.from_dir(directory)
    ids, n_prompt = lora.encode_example(tok, [{"role": "user", "content": "Hi there"}], "Hello!", max_length=64)
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
    messages = task.messages(task.pair(item)[0])
    full = tok.apply_chat_template(messages)
    assert len(tok.encode(full)) >= 2 * limit
    fitted = lora.fit_messages(tok, messages, limit)
    text = tok.apply_chat_template(fitted)
    assert len(tok.encode(text)) <= limit and len(tok.encode(text)) > limit - 8  # fits, nothing more cut than needed
    assert text.startswith(f"<|im_start|>system\n{task.system}<|im_end|>\n<|im_start|>user\n")
    instruction = task.pair_input.split("{", 1)[0]
    assert fitted[1]["content"].startswith(instruction) and fitted[1]["content"].endswith(task.user_end)
    assert full.startswith(text[:-len(task.user_end + "<|im_end|>\n<|im_start|>assistant\n")])  # a prefix of it
    assert text.endswith(task.user_end + "<|im_end|>\n<|im_start|>assistant\n")  # the answer cue
    assert lora.fit_messages(tok, fitted, limit) == fitted  # what fits stays as it is
    # training encodes the same prompt, the response whole after it
    ids, n_prompt = lora.encode_example(tok, messages, "Council Passes Budget", limit)
    assert len(ids) <= limit and tok.decode(ids[n_prompt:]) == "Council Passes Budget"
    assert tok.tokenizer.decode(ids[:n_prompt], skip_special_tokens=False) == tok.apply_chat_template(
        lora.fit_messages(tok, messages, limit - (len(ids) - n_prompt)))


def test_fit_messages_errors_when_the_template_alone_is_too_long():
    tok = word_tokenizer()
    messages = [{"role": "system", "content": "hello world " * 10}, {"role": "user", "content": "the cat"}]
    with pytest.raises(ValueError, match="raise --max-length"):
        lora.fit_messages(tok, messages, 12)
