"""The encoder-decoder device model of Table 4 (sec. 5.6): T5 v1.1 / FlanT5 in plain PyTorch.

    memory = Encoder(shared(input_ids))            # (B, S, d), bidirectional, once
    h      = Decoder(shared(decoder_ids), memory)  # (B, T, d), causal self + cross attention
    logits = lm_head(h)                            # (B, T, V); h * d_model^-0.5 first if scale_decoder_outputs

Pre-norm blocks: x = x + Attn(LN(x)); [decoder: x = x + CrossAttn(LN(x), memory)]; x = x + FF(LN(x)).
T5's ways (Raffel et al. 2020, sec. 2.1; v1.1's changes): LN is RMS-style in fp32; no absolute
positions but a learned scalar per head and relative-position bucket (`position_bucket`) added to
scores NOT scaled by 1/sqrt(d); FF is gated-GELU. The head is its own matrix (FlanT5) or the
embedding (tied); the decoder output is rescaled only where `scale_decoder_outputs` says so (a
config without the key, as the hub's FlanT5 files: = `tie_word_embeddings`; transformers 5 writes
every T5 tied and keeps the old meaning in that key). Module names are the safetensors keys.

The method's glue: `family` picks T5 or the decoder from a config.json, as a `cdcda.Family`
whose `chat` decodes with `generate_ids` and whose `loss` is eq. 6 for seq2seq (`T5.response_loss`);
`T5.blocks` / `lora_targets` say what NF4 and LoRA wrap; the prompt is plain text (`Tokenizer`).
No dropout (LoRA)."""
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import cdcda
import generate
import hub
import qwen2
import train
from errors import InputError


@dataclass
class Config:
    """The model's `config.json`; field names are its keys (unknown keys are ignored)."""
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_decoder_layers: int | None = None   # None: = num_layers
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = True        # HF's default; the hub's FlanT5 config.json says false
    scale_decoder_outputs: bool | None = None  # transformers 5's key; None (absent): = tie_word_embeddings
    decoder_start_token_id: int = 0
    pad_token_id: int = 0
    eos_token_id: int = 1
    model_type: str = "t5"
    MODEL_TYPES = ("t5",)  # what this file loads (a class attribute, not a config key)

    def __post_init__(self):
        if self.feed_forward_proj not in ("gated-gelu", "gated-gelu_new"):
            raise InputError(f"feed_forward_proj {self.feed_forward_proj!r}: only T5 v1.1's 'gated-gelu' is supported")
        self.num_decoder_layers = self.num_decoder_layers or self.num_layers
        if self.scale_decoder_outputs is None:  # a config written before transformers 5
            self.scale_decoder_outputs = self.tie_word_embeddings

    from_json = classmethod(qwen2.Config.from_json.__func__)  # config.json -> Config, unknown keys ignored
    to_dict = qwen2.Config.to_dict


class LayerNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps): no mean, no bias; variance in fp32, as HF's T5LayerNorm."""
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


def position_bucket(relative, bidirectional: bool, num_buckets: int, max_distance: int):
    """Relative position (key - query) -> bucket id. Bidirectional: half the buckets for keys
    after the query. Of the rest, offsets below half go to their own bucket, larger ones
    logarithmically up to max_distance (and beyond it to the last bucket)."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket += (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)  # causal: only the past
    exact = num_buckets // 2
    log = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact)
                   * (num_buckets - exact)).long()
    return bucket + torch.where(distance < exact, distance, log.clamp(max=num_buckets - 1))


class Attention(nn.Module):
    """softmax(q k^T + bias) v over n_heads heads of d_kv (no 1/sqrt(d) scaling: T5's init absorbs it)."""
    def __init__(self, c: Config, relative_bias: bool):
        super().__init__()
        inner = c.num_heads * c.d_kv
        self.n_heads, self.d_kv = c.num_heads, c.d_kv
        self.q, self.k, self.v = (nn.Linear(c.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, c.d_model, bias=False)
        if relative_bias:
            self.relative_attention_bias = nn.Embedding(c.relative_attention_num_buckets, c.num_heads)

    def heads(self, x):  # (B, T, inner) -> (B, n_heads, T, d_kv)
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.d_kv).transpose(1, 2)

    def kv(self, x):  # (B, S, d) -> k, v (B, n_heads, S, d_kv)
        return self.heads(self.k(x)), self.heads(self.v(x))

    def forward(self, x, k, v, bias):
        """x (B, T, d) queries, k, v (B, H, S, d_kv), bias (B or 1, H, T, S) additive -> (B, T, d)."""
        y = F.scaled_dot_product_attention(self.heads(self.q(x)), k, v, attn_mask=bias.to(x.dtype), scale=1.0)
        return self.o(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class SelfAttentionLayer(nn.Module):
    def __init__(self, c: Config, relative_bias: bool):
        super().__init__()
        self.SelfAttention, self.layer_norm = Attention(c, relative_bias), LayerNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x, bias, cache=None, index=0):
        h = self.layer_norm(x)
        k, v = self.SelfAttention.kv(h)
        if cache is not None:
            k, v = cache.update(index, k, v)  # (B, H, past + T, d_kv)
        return x + self.SelfAttention(h, k, v, bias)


class CrossAttentionLayer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.EncDecAttention, self.layer_norm = Attention(c, False), LayerNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x, k, v, bias):
        return x + self.EncDecAttention(self.layer_norm(x), k, v, bias)


class FeedForward(nn.Module):
    """Gated GELU (Shazeer 2020): wo(gelu_tanh(wi_0 x) * wi_1 x)."""
    def __init__(self, c: Config):
        super().__init__()
        self.wi_0, self.wi_1 = (nn.Linear(c.d_model, c.d_ff, bias=False) for _ in range(2))
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x):
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class FeedForwardLayer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.DenseReluDense, self.layer_norm = FeedForward(c), LayerNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class Block(nn.Module):
    """layer = [self-attention, (cross-attention,) feed-forward], HF's order and names."""
    def __init__(self, c: Config, first: bool, decoder: bool):
        super().__init__()
        middle = [CrossAttentionLayer(c)] if decoder else []
        self.layer = nn.ModuleList([SelfAttentionLayer(c, first), *middle, FeedForwardLayer(c)])


class Stack(nn.Module):
    """The encoder or the decoder: blocks and a final norm (the embedding is the model's `shared`)."""
    def __init__(self, c: Config, decoder: bool):
        super().__init__()
        n = c.num_decoder_layers if decoder else c.num_layers
        self.block = nn.ModuleList(Block(c, i == 0, decoder) for i in range(n))
        self.final_layer_norm = LayerNorm(c.d_model, c.layer_norm_epsilon)
        self.decoder, self.config = decoder, c

    def position_bias(self, past: int, T: int, S: int, device):
        """(1, H, T, S): the first block's learned bias for query positions past..past+T-1, keys 0..S-1."""
        c = self.config
        relative = torch.arange(S, device=device)[None] - torch.arange(past, past + T, device=device)[:, None]
        bucket = position_bucket(relative, not self.decoder, c.relative_attention_num_buckets,
                                 c.relative_attention_max_distance)  # (T, S)
        return self.block[0].layer[0].SelfAttention.relative_attention_bias(bucket).permute(2, 0, 1)[None]


def padding_bias(attention_mask, dtype):
    """(B, S) 1 = token -> (B, 1, 1, S) additive: 0 for a token, the dtype's minimum for padding."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


@torch.inference_mode()
def generate_ids(model, input_ids, max_new_tokens: int, temperature: float = 0.7, top_p: float = 1.0,
                 eos_token_id=..., attention_mask=None, generator=None, copies=None):
    """The encoder once, then the decoder token by token from decoder_start_token_id with a
    `qwen2.KVCache` of its self-attention (cross keys and values are computed once).
    Returns (B, S + n) as `generate.generate` does: the prompt (the encoder's input), then the new
    ids, n <= max_new_tokens, a finished row filled with its eos id. `copies`: replies per prompt."""
    if copies is not None:
        rows = torch.arange(len(input_ids), device=input_ids.device).repeat_interleave(torch.as_tensor(copies))
        input_ids, attention_mask = input_ids[rows], None if attention_mask is None else attention_mask[rows]
    c = model.config
    eos_token_id = c.eos_token_id if eos_token_id is ... else eos_token_id
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    B, device = input_ids.shape[0], input_ids.device
    cross = model.cross_kv(model.encode(input_ids, attention_mask))
    shape = SimpleNamespace(num_hidden_layers=c.num_decoder_layers, num_key_value_heads=c.num_heads, head_dim=c.d_kv)
    cache = qwen2.KVCache(shape, B, max_new_tokens, model.shared.weight.dtype, device)
    tokens = torch.full((B, 1), c.decoder_start_token_id, dtype=torch.long, device=device)
    eos_ids, done, out = torch.tensor(eos, device=device), torch.zeros(B, dtype=torch.bool, device=device), []
    for _ in range(max_new_tokens):
        hidden = model.decode(tokens, cross, attention_mask, cache)
        next_token = generate.sample(model.lm_head(hidden[:, -1]), temperature, top_p, generator)  # (B,)
        if eos:
            next_token = torch.where(done, eos[0], next_token)
            done |= torch.isin(next_token, eos_ids)
        out.append(next_token)
        if eos and bool(done.all()):
            break
        tokens = next_token[:, None]
    return torch.cat([input_ids, *(t[:, None] for t in out)], 1)


class T5(nn.Module):
    """Seq2seq LM: `model(input_ids, decoder_input_ids, attention_mask) -> logits (B, T, V)`."""
    lora_targets = ("q", "k", "v", "o", "wi_0", "wi_1", "wo")  # every linear layer of the blocks

    def __init__(self, config: Config):
        super().__init__()
        self.config, self.name_or_path = config, ""
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder, self.decoder = Stack(config, False), Stack(config, True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    def blocks(self) -> list[nn.Module]:
        """The blocks whose linear layers NF4 and LoRA wrap (nf4.blocks)."""
        return [*self.encoder.block, *self.decoder.block]

    def encode(self, input_ids, attention_mask=None):
        """ids (B, S) -> memory (B, S, d); attention_mask (B, S) 1 = token, 0 = padding."""
        x = self.shared(input_ids)
        bias = self.encoder.position_bias(0, x.shape[1], x.shape[1], x.device)  # (1, H, S, S)
        if attention_mask is not None:
            bias = bias + padding_bias(attention_mask, bias.dtype)
        for block in self.encoder.block:
            x = block.layer[1](block.layer[0](x, bias))
        return self.encoder.final_layer_norm(x)

    def cross_kv(self, memory) -> list:
        """Each decoder block's cross-attention keys and values of the memory, computed once."""
        return [block.layer[1].EncDecAttention.kv(memory) for block in self.decoder.block]

    def decode(self, decoder_input_ids, cross: list, attention_mask=None, cache=None):
        """decoder ids (B, T) after `cache.seq_len` cached positions -> hidden (B, T, d), scaled
        by d_model^-0.5 when `scale_decoder_outputs` (T5's rule). Cross attention skips padding."""
        x = self.shared(decoder_input_ids)
        T, past = x.shape[1], cache.seq_len if cache is not None else 0
        bias = self.decoder.position_bias(past, T, past + T, x.device)  # (1, H, T, past + T)
        future = torch.arange(past + T, device=x.device)[None] > torch.arange(past, past + T, device=x.device)[:, None]
        bias = bias.masked_fill(future, torch.finfo(bias.dtype).min)
        cross_bias = torch.zeros((), device=x.device) if attention_mask is None else padding_bias(attention_mask, x.dtype)
        cross_bias = cross_bias.expand(x.shape[0], 1, T, cross[0][0].shape[2])
        for i, block in enumerate(self.decoder.block):
            x = block.layer[0](x, bias, cache, i)
            x = block.layer[2](block.layer[1](x, *cross[i], cross_bias))
        if cache is not None:
            cache.seq_len += T
        x = self.decoder.final_layer_norm(x)
        return x * self.config.d_model ** -0.5 if self.config.scale_decoder_outputs else x

    def forward(self, input_ids, decoder_input_ids, attention_mask=None):
        memory = self.encode(input_ids, attention_mask)
        return self.lm_head(self.decode(decoder_input_ids, self.cross_kv(memory), attention_mask))

    def response_loss(self, ids, labels):
        """Eq. 6 for seq2seq, on `train.encode_example`'s rows (prompt + response, labels on the
        response): the prompt goes to the encoder, the decoder is teacher-forced on the response
        (its input shifted right behind decoder_start), mean CE over the response tokens."""
        starts = [next(i for i, t in enumerate(target) if t != train.IGNORE) for target in labels.tolist()]
        rows = [(tokens[:n], [t for t in target[n:] if t != train.IGNORE])
                for tokens, target, n in zip(ids.tolist(), labels.tolist(), starts)]
        pad, device = self.config.pad_token_id, ids.device
        enc, mask = generate.left_pad([p for p, _ in rows], pad, device)
        T = max(len(a) for _, a in rows)
        dec = torch.full((len(rows), T), pad, dtype=torch.long)
        target = torch.full((len(rows), T), train.IGNORE, dtype=torch.long)
        for row, (_, a) in enumerate(rows):
            dec[row, :len(a)] = torch.tensor([self.config.decoder_start_token_id] + a[:-1])
            target[row, :len(a)] = torch.tensor(a)
        target = target.to(device)
        hidden = self.decode(dec.to(device), self.cross_kv(self.encode(enc, mask)), mask)  # (B, T, d)
        keep = target != train.IGNORE
        return F.cross_entropy(self.lm_head(hidden[keep]).float(), target[keep])


class Tokenizer(qwen2.Tokenizer):
    """T5's SentencePiece tokenizer (tokenizer.json through `tokenizers`); no chat template: a
    prompt is its messages' texts, one after the other, ended by </s> (as T5's tokenizer ends
    every input); a training response ends with </s> too (`end_of_turn`)."""
    def __init__(self, tokenizer, config: dict):
        super().__init__(tokenizer, {"eos_token": "</s>", "pad_token": "<pad>", **config})
        self.end_of_turn = self._special["eos_token"]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return "".join(m["content"] for m in messages) + self.end_of_turn

    def save(self, directory):
        super().save(directory)  # then its config again, without the ChatML template T5 has no use for
        (Path(directory) / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2, ensure_ascii=False))


TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",  # = shared.weight
               "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")  # unused, old files


def load(source: str, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) from a hub-style directory or a hub repo id (google/flan-t5-base)."""
    directory = hub.snapshot(str(source))
    config = Config.from_json(directory)
    state = {k: v for k, v in hub.load_state_dict(directory).items() if k not in TIED_COPIES}
    # a hub FlanT5 re-saved by transformers 5: "tied" in its config, its own head in the file (transformers uses it)
    config.tie_word_embeddings = config.tie_word_embeddings and "lm_head.weight" not in state
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["shared.weight"]
    with torch.device("meta"):
        model = T5(config)
    hub.check_state_dict(model, state, str(directory))
    state = {k: v.to(device=device, dtype=hub.dtype(dtype), copy=True) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.shared.weight
    model.name_or_path = str(source)
    return model.eval(), Tokenizer.from_dir(directory)


save_pretrained = qwen2.save_pretrained  # the same files: config, weights (a tied head once), tokenizer


def chat(model, tokenizer, conversations, *args, reply_prefix="", scaffold="", **kwargs) -> list[str]:
    """`generate.chat` for a T5: the same batching and seeds, decoded by `generate_ids`."""
    if reply_prefix or scaffold:
        raise ValueError("t5.chat: a reply prefix or a scaffold needs a decoder-only model")
    return generate.chat(model, tokenizer, conversations, *args, decode=functools.partial(generate_ids, model),
                         **kwargs)


def response_loss(model, ids, labels):
    return model.response_loss(ids, labels)


def family(source) -> cdcda.Family:
    """How the method loads, saves, asks and trains `source`: as a T5 when its config.json says
    model_type "t5", else as the decoder (Qwen2, Llama, the embedded default)."""
    t5 = source != qwen2.EMBEDDED and hub.load_config(hub.snapshot(str(source))).get("model_type") == "t5"
    return cdcda.Family(load, save_pretrained, Config.from_json, chat, response_loss) if t5 else cdcda.Family()
