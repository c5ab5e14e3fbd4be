"""Fixtures shared by the pipeline, cloud and experiments tests, and builders of tiny
checkpoints in a Hugging Face cache layout."""
import hashlib
from pathlib import Path

import pytest
import torch

import qwen2


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random decoder (2 layers of width 32) with SmolLM2's real tokenizer, saved
    hub-style. Untied: a tied random model echoes its last input token (always the same
    newline here), so every reply would come out empty."""
    tokenizer = qwen2.Tokenizer.from_dir(qwen2.embedded_dir())
    torch.manual_seed(0)
    config = qwen2.Config(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                          model_type="llama", rms_norm_eps=1e-5)
    directory = tmp_path_factory.mktemp("tiny")
    qwen2.save_pretrained(qwen2.Qwen2(config), tokenizer, directory)
    return directory


# ---- tiny checkpoints laid out as the Hugging Face cache holds them (tests/test_paper.py, test_metrics.py)

SENTENCES = ["the cat sat on the mat", "a dog ran fast in the park", "hello world, this is a tweet!",
             "I love my new phone", "rain again this weekend ugh", "great product, would buy again",
             "Generate a headline for the following article:", "With the given examples, paraphrase the tweet."]


def byte_level_tokenizer(special: list[str], vocab_size: int = 400, corpus=()):
    """A byte-level BPE `tokenizers.Tokenizer` (GPT-2 / RoBERTa / Qwen style, no prefix space)
    trained on SENTENCES and `corpus`, `special` first in the vocabulary (ids 0, 1, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((SENTENCES + list(corpus)) * 3, trainer)
    return tok


def tiny_roberta(directory, num_hidden_layers: int = 2, id2label: dict | None = None, seed: int = 0):
    """A random RoBERTa saved with transformers: RobertaModel, or RobertaForSequenceClassification
    with `id2label`; its tokenizer byte-level BPE with <s> <pad> </s> <unk> <mask> = 0..4, as
    roberta-large's. Returns the transformers model."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import processors
    tok = byte_level_tokenizer(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    fast = transformers.RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                             sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                                             mask_token="<mask>", add_prefix_space=False, model_max_length=512)
    fast.save_pretrained(directory)
    torch.manual_seed(seed)
    config = transformers.RobertaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_attention_heads=4,
                                        num_hidden_layers=num_hidden_layers, intermediate_size=37, type_vocab_size=1,
                                        max_position_embeddings=130, pad_token_id=1, layer_norm_eps=1e-5,
                                        attn_implementation="eager", **({"id2label": id2label} if id2label else {}))
    cls = transformers.RobertaForSequenceClassification if id2label else transformers.RobertaModel
    model = cls(config).eval()
    model.save_pretrained(directory)
    return model


def put_in_hub_cache(cache, repo_id: str, directory) -> Path:
    """Copy a model directory into a huggingface_hub cache as a download leaves it:
    cache/models--{owner--}name/snapshots/<commit>/<files> and refs/main holding <commit>."""
    import shutil
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    shutil.copytree(directory, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty, offline Hugging Face cache in tmp_path: HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE=1
    in the environment and in huggingface_hub.constants (which reads them once, at import)."""
    import huggingface_hub.constants as hf_constants
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    for name, value in (("HF_HOME", str(tmp_path / "hf")), ("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


# Qwen2.5's template, cut down to what cdcda uses: ChatML, and Qwen's own system text when none is given
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def tiny_qwen2(directory, corpus=(), seed: int = 0):
    """A random Qwen2ForCausalLM shaped like Qwen2.5-0.5B-Instruct in all but size (tied
    embeddings, q/k/v bias, rope_theta 1e6, rms_norm_eps 1e-6), saved with transformers, with a
    byte-level BPE tokenizer holding <|endoftext|> <|im_start|> <|im_end|> and Qwen's
    tokenizer_config.json keys (chat_template, eos_token <|im_end|>, pad_token <|endoftext|>)."""
    transformers = pytest.importorskip("transformers")
    import json
    tok = byte_level_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], vocab_size=600, corpus=corpus)
    Path(directory).mkdir(parents=True, exist_ok=True)
    tok.save(str(Path(directory) / "tokenizer.json"))
    (Path(directory) / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "chat_template": QWEN_CHAT_TEMPLATE, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "bos_token": None, "model_max_length": 131072}))
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
                                      max_position_embeddings=4096, bos_token_id=None, eos_token_id=2,
                                      attn_implementation="eager")
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.save_pretrained(directory)
    return model
