"""Fixtures shared by the tests: tiny random models, the tiny pipeline's options, a fake cloud.

Tests take these as fixtures; no test file imports another.
"""
import json
import socket
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
import tokenizers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import augment
import encoder
import generate
import qwen2
import smollm2


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random decoder (2 layers of width 32) with SmolLM2's real tokenizer, saved
    hub-style. Untied: a tied random model echoes its last input token (always the same
    newline here), so every reply would come out empty."""
    tokenizer = qwen2.Tokenizer.from_dir(smollm2.embedded_dir())
    torch.manual_seed(0)
    config = qwen2.Config(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                          model_type="llama", rms_norm_eps=1e-5)
    directory = tmp_path_factory.mktemp("tiny")
    qwen2.save_pretrained(qwen2.Qwen2(config), tokenizer, directory)
    return directory


@pytest.fixture(scope="session")
def free_port():
    """free_port() -> a TCP port on 127.0.0.1 that nothing listens on right now."""
    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    return port


@pytest.fixture
def tiny_args():
    """The pipeline's options for a run of seconds on the tiny decoder (cloud and device)."""
    def args(model_dir, out) -> list[str]:
        return ["--task", "lamp7", "--users", "2", "--k", "3", "--epochs", "1", "--base-epochs", "1",
                "--max-length", "96", "--cloud-model", str(model_dir), "--device-model", str(model_dir),
                "--out", str(out)]
    return args


@pytest.fixture
def fake_cloud(monkeypatch):
    """The cloud LM's replies: a tiny random model writes no parsable pairs, so the cloud
    step's generations are replaced by a fixed mix of good (the words reversed: same words,
    little ROUGE-L overlap), off-topic and unparsable ones; every other step runs for real."""
    real_chat = generate.chat
    replies = ["Input: [{rx}], Response: [{y}]", "Input: [quantum chromodynamics lattice "
               "gauge theory], Response: [no]", "no pair here"]

    def chat(model, tokenizer, conversations, **kw):
        if kw.get("desc", "").startswith("augment"):
            assert kw["reply_prefix"] == augment.REPLY_PREFIX
            out = []
            for i, conv in enumerate(conversations):
                x, y = conv[-1]["content"].split("Input: [")[1].split("], Response: [")
                rx = " ".join(reversed(x.split()))
                out.append(replies[i % 3].format(rx=rx, y=y[:-2]))
            return out
        return real_chat(model, tokenizer, conversations, **kw)
    monkeypatch.setattr(generate, "chat", chat)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread avoids the 20x slowdown of two threads on a shared 2-core CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_decoder(seed: int, vocab: int = 8) -> qwen2.Qwen2:
    """A tiny random Qwen2 with peaked, model-specific next-token distributions."""
    torch.manual_seed(seed)
    config = qwen2.Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = qwen2.Qwen2(config).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)  # peaked, model-specific distributions
    return model




@pytest.fixture(scope="session")
def tiny_model():
    """random_decoder(seed, vocab=8): a tiny random Qwen2, different for each seed."""
    return random_decoder


# ---------------------------------------------------------------- tiny BERT / RoBERTa encoders
WORDS = "the cat sat on a mat dog ran fast slow big small red blue green is was".split()


def tiny_tokenizer(directory, model_type: str) -> None:
    """A word-level tokenizer.json with BERT ([CLS] a [SEP] b [SEP]) or RoBERTa
    (<s> a </s></s> b </s>) special tokens; ids 0..3 special, then WORDS."""
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if model_type == "bert" else ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(special + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=special[1] if model_type == "bert" else "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(special)
    if model_type == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    else:
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok.save(str(directory / "tokenizer.json"))


def tiny_config(model_type: str, **extra) -> dict:
    roberta = model_type == "roberta"
    return {"model_type": model_type, "vocab_size": 4 + len(WORDS), "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 37, "max_position_embeddings": 66 if roberta else 64,
            "type_vocab_size": 1 if roberta else 2, "pad_token_id": 1 if roberta else 0,
            "layer_norm_eps": 1e-5 if roberta else 1e-12, "hidden_act": "gelu", **extra}


NLI_LABELS = {"0": "contradiction", "1": "entailment", "2": "neutral"}


def tiny_checkpoint(directory, model_type="roberta", id2label=NLI_LABELS, seed=0):
    """Our own SequenceClassifier, randomly initialised, written as a hub-style directory
    (no transformers needed)."""
    torch.manual_seed(seed)
    cfg = tiny_config(model_type, architectures=[f"{model_type.capitalize()}ForSequenceClassification"],
                      id2label=id2label)
    model = encoder.SequenceClassifier(encoder.Config.from_dict(cfg))
    for p in model.parameters():  # larger than default init, so the logits differ visibly
        torch.nn.init.normal_(p, std=0.3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(cfg))
    tiny_tokenizer(directory, model_type)
    return directory


@pytest.fixture(scope="session")
def tiny_encoder():
    """Builders of tiny encoder checkpoints: .tokenizer(dir, model_type), .config(model_type,
    **extra), .checkpoint(dir, model_type="roberta", id2label=NLI labels, seed=0)."""
    return types.SimpleNamespace(tokenizer=tiny_tokenizer, config=tiny_config, checkpoint=tiny_checkpoint,
                                 words=WORDS, nli_labels=NLI_LABELS)


# ---------------------------------------------------------------- tiny transformers decoders
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128, eos_token_id=2)


def write_tiny_tokenizer(directory):
    """A word-level tokenizer with ChatML specials: enough for load() to find tokenizer.json."""
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
                                        + [f"w{i}" for i in range(TINY["vocab_size"] - 4)])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(Path(directory) / "tokenizer.json"))


def randomize(model, seed=0):
    """Non-zero biases and norm weights (HF initialises them to 0 and 1), so every term counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if "norm" in name or "bias" in name else 0.05)
                    + (1.0 if "norm" in name else 0.0))


def hf_tiny(kind, tmp_path, tied=False):
    """Save a tiny random transformers model in `tmp_path`; return (hf_model, directory)."""
    transformers = pytest.importorskip("transformers")
    extra = dict(tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    if kind == "qwen2":
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, **extra))
    else:  # Llama with every optional bias on and a head_dim that is not hidden / heads
        config = transformers.LlamaConfig(**TINY, **extra, attention_bias=True, mlp_bias=True, head_dim=24)
        hf = transformers.LlamaForCausalLM(config)
    randomize(hf)
    hf.save_pretrained(tmp_path)
    write_tiny_tokenizer(tmp_path)
    hf = type(hf).from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    return hf, tmp_path


def padded_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY["vocab_size"], (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :1] = 0
    return ids, mask


@pytest.fixture(scope="session")
def tiny_hf():
    """Tiny random transformers decoders, the oracles of qwen2.py / generate.py: .model(kind,
    directory, tied=False) -> (hf model, directory), .padded_batch(seed), .randomize(model),
    .tokenizer(directory), .config (the shared config keys)."""
    return types.SimpleNamespace(model=hf_tiny, padded_batch=padded_batch, randomize=randomize,
                                 tokenizer=write_tiny_tokenizer, config=TINY)
