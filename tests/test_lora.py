"""lora.py: eq. 5 (LoRALinear, add_lora, merge) and its adapter directories (PEFT's layout), against peft."""
import pytest
import torch
from torch import nn

import lora
import nf4
import qwen2
from errors import InputError


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


def test_add_lora_wraps_every_block_linear_and_freezes_the_rest(words):
    model = lora.add_lora(words.model(), r=4, alpha=8)
    wrapped = [name for name, m in model.named_modules() if isinstance(m, lora.LoRALinear)]
    assert len(wrapped) == 2 * 7
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.lora_{ab}" for name in wrapped for ab in "AB"}
    assert "model.layers.0.self_attn.q_proj.base.weight" in model.state_dict()
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.add_lora(model)
    with pytest.raises(ValueError, match="match no layer"):
        lora.add_lora(words.model(), targets=("q_proj", "qkv_proj"))


def test_only_lora_parameters_get_gradients(words):
    model = lora.add_lora(words.model(), r=4, alpha=8)
    words.randomize_b(model)
    model(torch.randint(0, 22, (2, 6))).sum().backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {name for name, p in model.named_parameters() if "lora_" in name}
    assert all(model.get_parameter(name).grad.abs().sum() > 0 for name in with_grad)


@pytest.mark.parametrize("quantized", [False, True])
def test_merged_equals_unmerged(quantized, words):
    model = words.model()
    keys = set(model.state_dict())
    if quantized:
        nf4.quantize_model(model, compute_dtype=torch.float32)  # fp32 compute: merge exactness is visible
    lora.add_lora(model, r=4, alpha=8)
    words.randomize_b(model)
    ids = torch.randint(0, 22, (2, 7))
    with torch.no_grad():
        before = model(ids)
        lora.merge(model)
        after = model(ids)
    assert not any(isinstance(m, (lora.LoRALinear, nf4.NF4Linear)) for m in model.modules())
    assert set(model.state_dict()) == keys  # the checkpoint's own keys again
    assert torch.allclose(before, after, atol=1e-5, rtol=0)


def test_outputs_equal_peft_with_the_same_a_and_b(words):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = words.model(vocab_size=96)
    config = transformers.Qwen2Config(**{k: v for k, v in model.config.to_dict().items() if v is not None})
    reference = transformers.Qwen2ForCausalLM(config)
    reference.load_state_dict(model.state_dict(), strict=True)
    reference = peft.get_peft_model(reference.eval(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(lora.TARGETS)))
    lora.add_lora(model, r=4, alpha=8)
    words.randomize_b(model)
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


def test_a_seed_gives_the_same_adapter_whatever_drew_before(words):
    def adapter(seed, draws):
        model = words.model()
        torch.rand(draws)  # torch's global generator, moved on by anything that ran before
        model = lora.add_lora(model, r=4, alpha=8, seed=seed)
        return torch.cat([m.lora_A.flatten() for m in model.modules() if isinstance(m, lora.LoRALinear)])
    assert torch.equal(adapter(5, 1), adapter(5, 1000))
    assert not torch.equal(adapter(5, 1), adapter(6, 1))
    assert not torch.equal(adapter(None, 1), adapter(None, 1000))  # the global generator: what ran before shows


def llama_with_lora(tiny_hf, directory, seed=0):
    """transformers' tiny random Llama saved in `directory`, and ours loaded from it with an adapter
    made to look trained: (hf model, our model)."""
    hf, directory = tiny_hf.model("llama", directory)
    ours = lora.add_lora(qwen2.load(str(directory))[0], r=4, alpha=8, seed=seed)
    for i, m in enumerate(m for m in ours.modules() if isinstance(m, lora.LoRALinear)):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        m.lora_B.data = torch.randn(m.lora_B.shape, generator=g) * 0.1
    return hf, ours


def test_a_saved_adapter_gives_our_logits_in_peft_on_transformers(tiny_hf, tmp_path):
    peft = pytest.importorskip("peft")
    hf, ours = llama_with_lora(tiny_hf, tmp_path / "base")
    path = lora.save_adapter(ours, tmp_path / "user.adapter", base_model=str(tmp_path / "base"))
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    ids, mask = tiny_hf.padded_batch()
    with torch.no_grad():
        plain = hf(ids, attention_mask=mask).logits
        reference = peft.PeftModel.from_pretrained(hf, path).eval()
        assert reference.peft_config["default"].base_model_name_or_path == str(tmp_path / "base")
        theirs, mine = reference(ids, attention_mask=mask).logits, ours(ids, mask)
    real = mask.bool()  # left padding: the padded positions' logits are nobody's business
    assert (theirs - plain)[real].abs().max() > 0.05  # peft really applied the adapter
    assert torch.allclose(mine[real], theirs[real], atol=1e-5, rtol=0)


def test_an_adapter_reads_back_and_a_mismatch_names_the_file(words, tmp_path):
    model = lora.add_lora(words.model(), r=4, alpha=8, seed=1)
    words.randomize_b(model)
    path = lora.save_adapter(model, tmp_path / "a", base_model="words")
    lora.save_adapter(model, path, base_model="words")  # a second save replaces the directory
    fresh = lora.load_adapter(lora.add_lora(words.model(), r=4, alpha=8, seed=2), path)
    saved, loaded = lora.adapter_state_dict(model), lora.adapter_state_dict(fresh)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    with pytest.raises(InputError, match=r"a/adapter_config.json: the adapter has .*'r': 4"):
        lora.load_adapter(lora.add_lora(words.model(), r=8, alpha=8), path)
    with pytest.raises(InputError, match="adapter_config.json"):
        lora.load_adapter(lora.add_lora(words.model(), r=4, alpha=8, targets=("q_proj",)), path)
    with pytest.raises(InputError, match=r"adapter_model.safetensors: tensors differ .*q_proj"):
        lora.load_adapter(lora.add_lora(words.model(hidden_size=32), r=4, alpha=8), path)
    with pytest.raises(InputError, match="not a PEFT LoRA adapter"):
        lora.load_adapter(fresh, tmp_path / "missing")


def test_an_adapter_peft_wrote_reads_into_our_model(tiny_hf, tmp_path):
    peft = pytest.importorskip("peft")
    hf, directory = tiny_hf.model("llama", tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(lora.TARGETS))
    reference = peft.get_peft_model(hf, config).eval()
    g = torch.Generator().manual_seed(3)
    for name, p in reference.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    reference.save_pretrained(tmp_path / "peft")
    ours = lora.add_lora(qwen2.load(str(directory))[0], r=4, alpha=8)
    lora.load_adapter(ours, tmp_path / "peft")
    ids, mask = tiny_hf.padded_batch()
    real = mask.bool()
    with torch.no_grad():
        assert torch.allclose(ours(ids, mask)[real], reference(ids, attention_mask=mask).logits[real],
                              atol=1e-5, rtol=0)
