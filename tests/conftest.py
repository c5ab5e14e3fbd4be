"""Fixtures shared by the tests: tiny random models, the tiny pipeline's options, a fake cloud.

Tests take these as fixtures; no test file imports another.
"""
import hashlib
import json
import os
import shutil
import socket
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import tokenizers
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn

import augment
import cdcda
import data
import encoder
import generate
import lora
import qwen2
from embedded import smollm2


@pytest.fixture(scope="session", autouse=True)
def embedded_model():
    """The embedded SmolLM2 converted into the cache, as `make test` does first (`python -m embedded`)."""
    return smollm2.embedded_dir()


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
def json_server():
    """json_server(answer) -> the URL of an HTTP server on the loopback that answers each POST's JSON
    body with answer(body) -> (status, JSON object), or closes the connection unanswered when answer
    returns None. Every server started is shut down after the test."""
    servers = []

    def start(answer) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                reply = answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                if reply is None:
                    self.close_connection = True  # the client reads an empty status line
                    return
                raw = json.dumps(reply[1]).encode()
                self.send_response(reply[0])
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                try:
                    self.wfile.write(raw)
                except OSError:
                    pass  # the client gave up waiting (the timeout tests)

            def log_message(self, *a):
                pass
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


DEVICE = os.environ.get("CDCDA_TEST_DEVICE", "cpu")  # the pipeline tests' --device: cpu, cuda or cuda:N


@pytest.fixture
def tiny_args():
    """The pipeline's options for a run of seconds on the tiny decoder (cloud and device), on
    $CDCDA_TEST_DEVICE (default cpu), so the same tests run on a GPU unchanged; identity pairs
    and free decoding, whose counts the tests check exactly (the defaults have a test of their own)."""
    def args(model_dir, out) -> list[str]:
        return ["--task", "lamp7", "--users", "2", "--k", "3", "--epochs", "1", "--base-epochs", "1",
                "--max-length", "96", "--cloud-model", str(model_dir), "--device-model", str(model_dir),
                "--out", str(out), "--device", DEVICE, "--history-pairs", "identity",
                "--augment-decoding", "free"]
    return args


@pytest.fixture
def tiny_run(tiny_model_dir, tmp_path, monkeypatch, fake_cloud, tiny_args):
    """A finished tiny lamp7 run of M_base and CDCDA-PLM in tmp_path/runs/lamp7 (its own model cache):
    out, its report, its target users, their result.json by user id, the queries' ids in order."""
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs" / "lamp7"
    rep = cdcda.main(tiny_args(tiny_model_dir, out) + ["--methods", "base,cdcda"])
    targets = data.split_users(data.load_users("lamp7"), 2)[0]
    results = {u.user_id: json.loads((out / "users" / u.user_id / "result.json").read_text()) for u in targets}
    return types.SimpleNamespace(out=out, rep=rep, targets=targets, results=results,
                                 ids=[q.id for u in targets for q in u.queries])


@pytest.fixture
def fake_cloud(monkeypatch):
    """The cloud LM's replies: a tiny random model writes no parsable pairs, so the cloud
    step's generations are replaced by a fixed mix of good (the words reversed: same words,
    little ROUGE-L overlap), off-topic and unparsable ones, in the free and the structured
    decoding's shape; the device's history rewrites are the tweets' words reversed too. Every
    other step runs for real."""
    real_chat = generate.chat
    replies = ["Input: [{rx}], Response: [{y}]", "Input: [quantum chromodynamics lattice "
               "gauge theory], Response: [no]", "no pair here"]

    def chat(model, tokenizer, conversations, *args, **kw):
        desc = kw.get("desc") or ""
        if desc.startswith("rewrite"):
            return [" ".join(reversed(c[-1]["content"].split("Text: ")[1].split())) for c in conversations]
        if not desc.startswith("augment"):
            return real_chat(model, tokenizer, conversations, *args, **kw)
        pairs = [c[-1]["content"].split("Input: [")[1].split("], Response: [") for c in conversations]
        assert kw["reply_prefix"] == augment.REPLY_PREFIX
        out = [replies[i % 3].format(rx=" ".join(reversed(x.split())), y=y[:-2]) for i, (x, y) in enumerate(pairs)]
        if kw.get("scaffold"):  # structured decoding: the input up to its "]", the scaffold, the response
            return [(o.split("]")[0] if o.startswith("Input: [") else augment.REPLY_PREFIX + o) + kw["scaffold"]
                    + y[:-2] for o, (_, y) in zip(out, pairs)]
        return out
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
# ---------------------------------------------------------------- the paper's models in miniature, in a hub cache

SENTENCES = ["the cat sat on the mat", "a dog ran fast in the park", "hello world, this is a tweet!",
             "I love my new phone", "rain again this weekend ugh", "great product, would buy again",
             "Generate a headline for the following article:", "With the given examples, paraphrase the tweet."]


def byte_level_tokenizer(special: list[str], vocab_size: int = 400, corpus=()):
    """A byte-level BPE `tokenizers.Tokenizer` (GPT-2 / RoBERTa / Qwen style, no prefix space)
    trained on SENTENCES and `corpus`, `special` first in the vocabulary (ids 0, 1, ...)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((SENTENCES + list(corpus)) * 3, trainer)
    return tok


def tiny_roberta(directory, num_hidden_layers: int = 2, id2label: dict | None = None, seed: int = 0):
    """A random RoBERTa saved with transformers: RobertaModel, or RobertaForSequenceClassification
    with `id2label`; its tokenizer byte-level BPE with <s> <pad> </s> <unk> <mask> = 0..4, as
    roberta-large's. Returns the transformers model."""
    transformers = pytest.importorskip("transformers")
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


@pytest.fixture(scope="session")
def hub_checkpoints():
    """Builders of the paper's models in miniature, as transformers saves them: .qwen2(dir,
    corpus=(), seed=0), .roberta(dir, num_hidden_layers=2, id2label=None, seed=0), and
    .put(cache, repo_id, dir) to lay a directory into a Hugging Face cache."""
    return types.SimpleNamespace(qwen2=tiny_qwen2, roberta=tiny_roberta, put=put_in_hub_cache)


# ---------------------------------------------------------------- a tiny FlanT5 (Table 4's device model)
def tiny_t5(directory, tied: bool = False, seed: int = 0, corpus=(), num_decoder_layers: int = 2):
    """A random transformers T5ForConditionalGeneration shaped like FlanT5 in all but size
    (gated-GELU, untied head unless `tied`), written hub-style (config.json, model.safetensors
    with HF's keys, tokenizer.json: byte-level BPE with T5's <pad> </s> <unk> = 0, 1, 2).
    Weights are perturbed so norms and the position bias are not at their init. Returns it."""
    transformers = pytest.importorskip("transformers")
    tok = byte_level_tokenizer(["<pad>", "</s>", "<unk>"], vocab_size=400, corpus=corpus)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>",
                                                                 "unk_token": "<unk>"}))
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=tok.get_vocab_size(), d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                   num_decoder_layers=num_decoder_layers, num_heads=4,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                   feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=tied,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        if not tied:  # transformers 5 builds T5 with a tied head whatever the config says; FlanT5's is its own
            model.lm_head.weight = torch.nn.Parameter(torch.randn(config.vocab_size, 32) * 0.2)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()
             if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
             and not (tied and k == "lm_head.weight")}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config.to_dict() | {"tie_word_embeddings": tied}))
    return model


@pytest.fixture(scope="session")
def t5_checkpoint():
    """tiny_t5(directory, tied=False, seed=0, corpus=(), num_decoder_layers=2) -> the transformers model."""
    return tiny_t5


# ---------------------------------------------------------------- a word-level decoder (lora, train)
CHAT_WORDS = "user assistant system hello world the cat sat on a mat dog ran fast tell me about what is".split()


def word_tokenizer() -> qwen2.Tokenizer:
    """A word-level tokenizer with the ChatML special tokens, wrapped like the real one."""
    vocab = {w: i for i, w in enumerate(["[UNK]"] + CHAT_WORDS)}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])  # ids 20, 21
    return qwen2.Tokenizer(tok, {})


def word_model(seed=0, vocab_size=22, **kw) -> qwen2.Qwen2:
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


WORD_EXAMPLES = [
    ([{"role": "user", "content": "tell me about the cat"}], "the cat sat on a mat"),
    ([{"role": "user", "content": "what is a dog"}], "a dog ran fast"),
    ([{"role": "system", "content": "hello"}, {"role": "user", "content": "hello world"}], "hello"),
] * 3




@pytest.fixture
def words():
    """A word-level ChatML tokenizer (`words.tokenizer()`), a tiny decoder over its 22 ids
    (`words.model(seed)`), an adapter made to look trained (`words.randomize_b`) and chat examples."""
    return types.SimpleNamespace(tokenizer=word_tokenizer, model=word_model, randomize_b=randomize_b,
                           examples=WORD_EXAMPLES)
