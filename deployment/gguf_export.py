"""The deployed model as one GGUF file, ggml's format, which llama.cpp (and ollama, LM Studio)
runs: how the personalized model reaches a phone.

deploy.py's tensors map onto GGUF's blocks (REFERENCE.md, "GGUF blocks") with the same codes:

- block linears, int4 groups of 32, w' = (q - 8) s + z (bf16 s and z), become Q4_1 blocks
  w = q d + m with d = fp16(s) and m = fp16(z - 8 s), the value of code 0; a block's first 16
  codes go in the low nibbles of its 16 bytes, the last 16 in the high ones. The fp16 rounding
  of d and m is the only change: |w - w'| <= |d - s| q + |m - (z - 8 s)|, at most half an fp16
  ulp of s times 15 plus half an ulp of z - 8 s (a bf16 s >= 2^-17 is exact in fp16: d = s).
- embedding and head, int8 per row with a bf16 scale s_v, become Q8_0 blocks of 32 (the hidden
  size a multiple of 32), each block of row v with d = fp16(s_v), the codes as they are.
- norms, and Qwen2's q/k/v biases, F32 (from bf16: exact). A tied head is written once, as
  token_embd: llama.cpp uses it for the output when output.weight is absent.
- architecture `llama`: llama.cpp rotates the adjacent pairs (2i, 2i+1) of each head, our
  `rotate_half` the pairs (i, i + d/2), so the q and k rows are interleaved per head (the inverse of
  smollm2.convert_gguf). A Qwen2 model is written as the `qwen2` architecture, which llama.cpp
  rotates in the rotate_half (NEOX) form: rows as they are, the q/k/v biases added.

`python -m deployment --export gguf --deployed DIR --out FILE.gguf` (DIR: what deploy.save wrote).
"""
import argparse
import json
from pathlib import Path

import gguf
import numpy as np
import torch

import hub
import qwen2
from deployment import deploy
from errors import InputError

BLOCK = 32  # weights per Q4_1 / Q8_0 block (gguf.GGML_QUANT_SIZES)
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}  # model_type ->
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {  # tokenizer.json's pre-tokenizer (`pre_tokenizer_steps`) -> llama.cpp's name
    (("Digits", True), ("ByteLevel", False, True)): "smollm",  # SmolLM2: digits one by one
    (("Split", QWEN2_SPLIT, "Isolated"), ("ByteLevel", False, False)): "qwen2",
    (("ByteLevel", False, True),): "gpt-2",
}


# ---------------------------------------------------------------- blocks
def q4_1_blocks(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> np.ndarray:
    """Codes (N, K) 0..15, scale and zero (N, K/32) -> Q4_1 bytes (N, K/32 * 20): per block
    fp16 d = s, fp16 m = z - 8 s, then byte j = q_j | q_(j+16) << 4."""
    N, K = codes.shape
    G = K // BLOCK
    d = scale.float().half()  # (N, G)
    m = (zero.float() - 8 * scale.float()).half()  # the value of code 0
    if not (torch.isfinite(d).all() and torch.isfinite(m).all()):
        raise ValueError("a scale or zero point is beyond fp16's range (65504): not a Q4_1 block")
    q = codes.reshape(N, G, 2, BLOCK // 2)  # (N, G, halves, 16)
    nibbles = q[:, :, 0] | (q[:, :, 1] << 4)  # (N, G, 16)
    d, m = d[..., None].view(torch.uint8), m[..., None].view(torch.uint8)  # (N, G, 2) each
    return torch.cat((d, m, nibbles), dim=2).reshape(N, G * 20).numpy()


def q8_0_blocks(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """Int8 codes (V, H), one scale per row (V,) -> Q8_0 bytes (V, H/32 * 34): per block fp16 d =
    the row's scale, then its 32 codes."""
    V, H = codes.shape
    G = H // BLOCK
    d = scale.float().half()[:, None, None].view(torch.uint8).expand(V, G, 2)  # (V, G, 2)
    blocks = torch.cat((d, codes.view(torch.uint8).reshape(V, G, BLOCK)), dim=2)  # (V, G, 34)
    return blocks.reshape(V, G * 34).numpy()


def interleave(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows (N, ...) of q or k in rotate_half order -> llama.cpp's: row 2i of a head is our row i,
    row 2i+1 our row i + d/2 (d = N / heads)."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, 2, half, -1).transpose(1, 2).reshape(rows.shape)


# ---------------------------------------------------------------- metadata
def special_id(tokenizer: qwen2.Tokenizer, name: str):
    """The id of tokenizer_config.json's `name` ("bos_token", ...), None if it names none."""
    token = tokenizer.config.get(name)
    token = token.get("content") if isinstance(token, dict) else token
    return tokenizer.tokenizer.token_to_id(token) if token else None


def pre_tokenizer_steps(spec: dict) -> tuple:
    """tokenizer.json's pre-tokenizer as (type, what sets it apart, ...) per step."""
    spec = spec.get("pre_tokenizer") or {}
    steps = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else [spec]
    fields = {"Digits": ("individual_digits",), "ByteLevel": ("add_prefix_space", "use_regex"),
              "Split": ("pattern", "behavior")}
    out = []
    for step in steps:
        values = [step.get(f) for f in fields.get(step.get("type"), ())]  # pattern: {"Regex": ..}
        values = [v.get("Regex", v.get("String")) if isinstance(v, dict) else v for v in values]
        out.append((step.get("type"), *values))
    return tuple(out)


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: qwen2.Tokenizer, vocab_size: int, where: str):
    """tokenizer.ggml.*: byte-level BPE ("gpt2") tokens by id, their types, merges, special ids,
    the chat template. Ids the tokenizer lacks below the model's vocab_size: [PAD{id}], unused."""
    spec = json.loads(tokenizer.tokenizer.to_str())  # tokenizer.json
    steps = pre_tokenizer_steps(spec)
    if steps not in PRE_TOKENIZERS:
        raise InputError(f"{where}: the tokenizer's pre-tokenizer {steps} is none llama.cpp knows "
                         f"here ({', '.join(PRE_TOKENIZERS.values())})")
    if spec["model"]["type"] != "BPE":
        raise InputError(f"{where}: a {spec['model']['type']} tokenizer, not byte-level BPE (gpt2)")
    vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)  # token -> id
    if max(vocab.values()) >= vocab_size:
        raise InputError(f"{where}: the tokenizer has id {max(vocab.values())}, the model "
                         f"{vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for i, added in tokenizer.tokenizer.get_added_tokens_decoder().items():
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZERS[steps])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    adders = {"bos_token": writer.add_bos_token_id, "eos_token": writer.add_eos_token_id,
              "unk_token": writer.add_unk_token_id}
    for name, add in adders.items():
        if special_id(tokenizer, name) is not None:
            add(special_id(tokenizer, name))
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)  # as tokenizer.encode: the chat template writes the specials
    writer.add_chat_template(tokenizer.chat_template)


def add_config(writer: gguf.GGUFWriter, c: qwen2.Config):
    """{arch}.*: the config.json values llama.cpp reads."""
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---------------------------------------------------------------- the file
def tensors(config: qwen2.Config, state: dict, where: str):
    """(GGUF name, array, its type) for every tensor of a deployed model's portable state
    (deploy.py), checked against the config's shapes; a missing, unexpected or misshapen tensor is
    an error."""
    with torch.device("meta"):
        model = qwen2.Qwen2(config)
    names = gguf.get_tensor_name_map(ARCHITECTURES[config.model_type], config.num_hidden_layers)
    linears = {name for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")}
    used = set()

    def take(key, shape, dtype):
        if key not in state:
            raise InputError(f"{where}: missing tensor {key!r}")
        t = state[key]
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise InputError(f"{where}: {key} is {t.dtype} {tuple(t.shape)}, expected {dtype} "
                             f"{tuple(shape)}")
        used.add(key)
        return t

    for key, p in model.state_dict().items():
        module, kind = key.rsplit(".", 1)
        out = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if module == "lm_head" and config.tie_word_embeddings:
            continue
        if module in ("model.embed_tokens", "lm_head"):  # int8 rows -> Q8_0
            V, H = p.shape
            if H % BLOCK:
                raise InputError(f"{where}: hidden size {H} is not a multiple of {BLOCK} (Q8_0)")
            codes = take(key, (V, H), torch.int8)
            scale = take(f"{module}.scale", (V,), deploy.DTYPE)
            yield out, q8_0_blocks(codes, scale), gguf.GGMLQuantizationType.Q8_0
        elif module in linears and kind == "weight":  # int4 groups -> Q4_1
            N, K = p.shape
            scale = state.get(f"{module}.scale")
            if scale is not None and scale.dim() == 2 and scale.shape[1] * BLOCK != K:
                raise InputError(f"{where}: {module} has groups of {K / scale.shape[1]:g} weights; "
                                 f"Q4_1 blocks hold {BLOCK}")
            codes = deploy.unpack(take(key, (N, K // 2), torch.uint8))
            scale = take(f"{module}.scale", (N, K // BLOCK), deploy.DTYPE)
            zero = take(f"{module}.zero", (N, K // BLOCK), deploy.DTYPE)
            heads = {"q_proj": config.num_attention_heads,
                     "k_proj": config.num_key_value_heads}.get(module.rsplit(".", 1)[1])
            if heads and config.model_type == "llama":
                codes, scale, zero = (interleave(t, heads) for t in (codes, scale, zero))
            yield out, q4_1_blocks(codes, scale, zero), gguf.GGMLQuantizationType.Q4_1
        else:  # norms, biases -> F32
            value = take(key, p.shape, deploy.DTYPE).float().numpy()
            yield out, value, gguf.GGMLQuantizationType.F32
    extra = sorted(set(state) - used)
    if extra:
        more = f" and {len(extra) - 1} more" if extra[1:] else ""
        raise InputError(f"{where}: unexpected tensor {extra[0]!r}{more}")


def write(config: qwen2.Config, state: dict, tokenizer: qwen2.Tokenizer, path, name: str,
          where: str) -> Path:
    """A GGUF file at `path` (atomically) from a deployed model's config, portable state and
    tokenizer; `where` names the source in errors."""
    if config.model_type not in ARCHITECTURES:
        raise InputError(f"{where}: model_type {config.model_type!r}; GGUF export knows "
                         f"{', '.join(ARCHITECTURES)}")
    if config.model_type == "llama" and (config.attention_bias or config.mlp_bias):
        raise InputError(f"{where}: a llama model with biases (attention_bias / mlp_bias) is not "
                         "written")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with hub.atomic(path) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[ARCHITECTURES[config.model_type]])
        writer.add_name(name)
        add_config(writer, config)
        add_tokenizer(writer, tokenizer, config.vocab_size, where)
        for out, array, kind in tensors(config, state, where):
            writer.add_tensor(out, array, raw_dtype=kind)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=True)
            writer.close()
        except BaseException:  # interrupted: no partial file left beside `path`
            writer.close()
            tmp.unlink(missing_ok=True)
            raise
    return path


def export(deployed, tokenizer, path, name: str | None = None) -> Path:
    """Write `deployed` (a directory deploy.save wrote, or a deployed / dense / NF4 (+ LoRA) model,
    quantized as deploy.portable_state does) as a GGUF at `path`. tokenizer: None for a directory
    (its own)."""
    if isinstance(deployed, (str, Path)):
        config, state, where = deploy.read_state(deployed)
        tokenizer = tokenizer or qwen2.Tokenizer.from_dir(deployed)
        name = name or Path(deployed).name
    else:
        config, state, where = deployed.config, deploy.portable_state(deployed), "model"
        name = name or deployed.name_or_path or "cdcda deployed model"
    return write(config, state, tokenizer, path, name, str(where))


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(prog="python -m deployment --export gguf",
                                description="write a deployed model (deploy.save's directory) "
                                "as a GGUF file that llama.cpp runs: Q4_1 block linears, Q8_0 "
                                "embedding and head")
    p.add_argument("--export", choices=("gguf",), required=True, help="the file format")
    p.add_argument("--deployed", required=True,
                   help="a deployed model's directory, e.g. runs/lamp7/users/ID/cdcda.deployed")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--name", default=None,
                   help="general.name in the file (default: the directory's name)")
    args = p.parse_args(argv)
    path = export(args.deployed, None, args.out, args.name)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return path
