"""deployment/gguf_export.py: Q4_1 and Q8_0 blocks worked by hand, the q/k interleaving held
against llama.cpp's rotary form, then tiny deployed models (llama with a head of its own; qwen2
with q/k/v biases, a tied head and more rows than the tokenizer has tokens) written and read back
with gguf's own reader: every tensor against the deployed model's, the metadata against the config
and tokenizer, and the logits of a model rebuilt from the file. llama.cpp itself runs the file in
`make llama-check` (deployment/llama_check.py)."""
import json

import gguf
import numpy as np
import pytest
import torch

import qwen2
from deployment import __main__ as run_deployment, deploy, gguf_export
from embedded import smollm2
from errors import InputError

Q = gguf.GGMLQuantizationType
# GGUF's names, from llama.cpp's tensor list (not gguf's TensorNameMap, which the exporter uses)
NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
         "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
         "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj"}


# ---------------------------------------------------------------- blocks by hand
def test_q4_1_block_by_hand():
    codes = torch.tensor([list(range(16)) + list(range(15, -1, -1))], dtype=torch.uint8)  # (1, 32)
    scale = torch.tensor([[0.25]], dtype=torch.bfloat16)
    zero = torch.tensor([[0.5]], dtype=torch.bfloat16)
    block = gguf_export.q4_1_blocks(codes, scale, zero)
    assert block.shape == (1, 20) and block.dtype == np.uint8
    # d = 0.25 (fp16 0x3400), m = 0.5 - 8 * 0.25 = -1.5 (fp16 0xBE00), little-endian
    assert block[0, :4].tolist() == [0x00, 0x34, 0x00, 0xBE]
    # byte j: code j in the low nibble, code j + 16 in the high one: j | (15 - j) << 4
    assert block[0, 4:].tolist() == [j | (15 - j) << 4 for j in range(16)]
    back = gguf.quants.dequantize(block, Q.Q4_1)
    assert back.tolist() == deploy.dequantize(codes, scale, zero).tolist()  # -1.5 + 0.25 q, exact


def test_q8_0_block_by_hand():
    codes = torch.arange(-16, 48, dtype=torch.int8).reshape(1, 64)  # one row, two blocks
    scale = torch.tensor([0.5], dtype=torch.bfloat16)
    blocks = gguf_export.q8_0_blocks(codes, scale)
    assert blocks.shape == (1, 68)
    assert blocks[0, :2].tolist() == blocks[0, 34:36].tolist() == [0x00, 0x38]  # fp16 0.5, twice
    assert blocks[0, 2:34].view(np.int8).tolist() == list(range(-16, 16))
    assert gguf.quants.dequantize(blocks, Q.Q8_0).tolist() == [[0.5 * c for c in range(-16, 48)]]


def test_interleave_is_llama_cpps_rotary_form():
    """llama.cpp's rope turns the pairs (2i, 2i+1) of a head by pos * theta_i; ours (qwen2.py) the
    pairs (i, i + d/2). On the interleaved rows of q and k every head's scores q_t . k_u are
    ours."""
    torch.manual_seed(0)
    heads, d, K, T = 3, 8, 16, 5
    x = torch.randn(T, K, dtype=torch.float64)
    Wq, Wk = torch.randn(2, heads * d, K, dtype=torch.float64)
    config = qwen2.Config(vocab_size=8, hidden_size=heads * d, intermediate_size=8,
                          num_hidden_layers=1, num_attention_heads=heads, rope_theta=100.0)
    theta = qwen2.rope_frequencies(config).double()
    angle = torch.arange(T, dtype=torch.float64)[:, None] * theta  # (T, d/2)
    both = torch.cat((angle, angle), -1)  # (T, d): rotate_half's angles

    def ours(W):  # (heads, T, d)
        y = (x @ W.T).view(T, heads, d).transpose(0, 1)
        return y * both.cos() + qwen2.rotate_half(y) * both.sin()

    def theirs(W):  # (heads, T, d)
        y = (x @ gguf_export.interleave(W, heads).T).view(T, heads, d // 2, 2).transpose(0, 1)
        a, b, c, s = y[..., 0], y[..., 1], angle.cos(), angle.sin()
        return torch.stack((a * c - b * s, a * s + b * c), -1).view(heads, T, d)

    scores = ours(Wq) @ ours(Wk).transpose(-1, -2)  # (heads, T, T)
    assert torch.allclose(scores, theirs(Wq) @ theirs(Wk).transpose(-1, -2), atol=1e-10)
    plain = (x @ Wq.T).view(T, heads, d // 2, 2).transpose(0, 1)  # not interleaved: other scores
    a, b, c, s = plain[..., 0], plain[..., 1], angle.cos(), angle.sin()
    plain = torch.stack((a * c - b * s, a * s + b * c), -1).view(heads, T, d)
    assert not torch.allclose(scores, plain @ theirs(Wk).transpose(-1, -2), atol=1e-3)


# ---------------------------------------------------------------- tiny deployed models
MODELS = {  # name -> config changes from the tiny llama of conftest's tiny_model_dir
    "llama": {},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": True, "vocab_size": 49152 + 32,
              "rope_theta": 1e6, "rms_norm_eps": 1e-6},
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tiny_model_dir, tmp_path_factory):
    """(deployed model, its tokenizer, the GGUF's path, its reader) for each of MODELS, with random
    norms (ones would hide a mix-up) and a saved deployed directory exported by the command."""
    tokenizer = qwen2.Tokenizer.from_dir(tiny_model_dir)
    tiny = qwen2.Config.from_json(tiny_model_dir).to_dict()
    config = qwen2.Config(**tiny | MODELS[request.param])
    torch.manual_seed(1)
    model = qwen2.Qwen2(config)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = 1 + 0.5 * torch.randn_like(p)
    deployed = deploy.deploy(model)
    directory = tmp_path_factory.mktemp(request.param) / "user.deployed"
    deploy.save(deployed, tokenizer, directory)
    path = directory.parent / "user.gguf"
    run_deployment.main(["--export", "gguf", "--deployed", str(directory), "--out", str(path)])
    return deployed, tokenizer, path, gguf.GGUFReader(str(path))


def read_back(reader, config, types=None) -> dict:
    """{our key: fp32 tensor} from the file, dequantized by gguf and un-interleaved (llama); the
    tensors' GGUF types into `types` by our key."""
    state = {}
    for t in reader.tensors:
        parts = t.name.split(".")  # blk.{i}.{name}.{weight,bias} or {name}.weight
        key = f"model.layers.{parts[1]}.{NAMES[parts[2]]}" if parts[0] == "blk" else NAMES[parts[0]]
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        heads = {"attn_q": config.num_attention_heads,
                 "attn_k": config.num_key_value_heads}.get(parts[-2])
        if heads and config.model_type == "llama" and parts[-1] == "weight":
            w = w.reshape(heads, config.head_dim // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        state[f"{key}.{parts[-1]}"] = w
        if types is not None:
            types[f"{key}.{parts[-1]}"] = t.tensor_type
    return state


def test_every_tensor_is_the_deployed_models(exported):
    deployed, _, _, reader = exported
    c = deployed.config
    state, types = deploy.portable_state(deployed), {}
    back = read_back(reader, c, types)
    expected = {k.replace(".scale", ".weight").replace(".zero", ".weight") for k in state}
    assert back.keys() == expected  # every tensor, nothing else (a tied head: token_embd only)
    assert ("lm_head.weight" in types) == (not c.tie_word_embeddings)
    moved = []  # per Q4_1 tensor: the share of its blocks whose m fp16 rounds
    for key, value in state.items():
        if key.endswith((".scale", ".zero")):
            continue
        module = key.rsplit(".", 1)[0]
        if value.dtype == torch.uint8:  # int4 groups -> Q4_1 within the fp16 rounding of d and m
            s, z = state[f"{module}.scale"].float(), state[f"{module}.zero"].float()
            m = z - 8 * s  # the value of code 0
            q = deploy.unpack(value).float()
            ours = deploy.dequantize(deploy.unpack(value), s, z)
            bound = (s.half().float() - s).abs().repeat_interleave(32, 1) * q
            bound += (m.half().float() - m).abs().repeat_interleave(32, 1)
            slack = 2 ** -22 * (23 * s.abs() + z.abs() + m.abs())  # fp32 arithmetic, both sides
            bound += slack.repeat_interleave(32, 1)
            assert (back[key] - ours).abs().le(bound).all() and types[key] == Q.Q4_1, key
            # at most half an fp16 ulp of d (times q <= 15) and of m (2^-25 when subnormal)
            half_ulp = 2 ** -11 * (15 * s + m.abs()) + 16 * 2 ** -25
            assert (bound <= (half_ulp + slack).repeat_interleave(32, 1)).all()
            moved.append((m.half().float() != m).float().mean().item())
        elif value.dtype == torch.int8:  # int8 rows -> Q8_0: the codes times fp16(row's scale)
            s = state[f"{module}.scale"].float()
            assert torch.equal(back[key], value.float() * s.half().float()[:, None]), key
            assert types[key] == Q.Q8_0
            assert torch.equal(s.half().float(), s)  # these scales are exact in fp16: exact weights
        else:  # norms, biases: F32 from bf16, exact
            assert torch.equal(back[key], value.float()) and types[key] == Q.F32, key
    assert max(moved) > 0  # the fp16 rounding of m happens here: the bound above is exercised


def metadata(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def test_metadata_is_the_config_and_tokenizer(exported):
    deployed, tokenizer, path, reader = exported
    c, meta = deployed.config, metadata(reader)
    arch = meta["general.architecture"]
    assert arch == c.model_type  # qwen2 (q/k/v biases) is written as llama.cpp's qwen2
    assert meta["general.name"] == "user.deployed"
    expected = {"block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
                "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
                "attention.head_count": c.num_attention_heads,
                "attention.head_count_kv": c.num_key_value_heads, "vocab_size": c.vocab_size,
                "rope.dimension_count": c.head_dim}
    for key, value in expected.items():
        assert meta[f"{arch}.{key}"] == value, key
    assert meta[f"{arch}.rope.freq_base"] == pytest.approx(c.rope_theta, rel=1e-7)
    eps = meta[f"{arch}.attention.layer_norm_rms_epsilon"]
    assert eps == pytest.approx(c.rms_norm_eps, rel=1e-7)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    assert len(tokens) == len(types) == c.vocab_size
    assert all(tokens[i] == t for t, i in vocab.items())
    assert tokens[len(vocab):] == [f"[PAD{i}]" for i in range(len(vocab), c.vocab_size)]
    assert [types[i] for i in range(4)] == [3, 3, 3, 3]  # <|endoftext|>, <|im_start|>, ... control
    assert types[tokenizer.tokenizer.token_to_id("Hello")] == 1 and set(types[len(vocab):]) <= {5}
    spec = json.loads(tokenizer.tokenizer.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in spec]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    bos, eos = (tokenizer.tokenizer.token_to_id(tokenizer.config[k])
                for k in ("bos_token", "eos_token"))
    assert (bos, eos) == (1, 2)  # <|im_start|>, <|im_end|>
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (bos, eos)
    assert meta["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template


def config_from(meta) -> qwen2.Config:
    """A Config from the file's metadata alone (as llama.cpp reads it)."""
    a = meta["general.architecture"]
    return qwen2.Config(vocab_size=len(meta["tokenizer.ggml.tokens"]),
                        hidden_size=meta[f"{a}.embedding_length"],
                        intermediate_size=meta[f"{a}.feed_forward_length"],
                        num_hidden_layers=meta[f"{a}.block_count"],
                        num_attention_heads=meta[f"{a}.attention.head_count"],
                        num_key_value_heads=meta[f"{a}.attention.head_count_kv"],
                        head_dim=meta[f"{a}.attention.key_length"],
                        rms_norm_eps=meta[f"{a}.attention.layer_norm_rms_epsilon"],
                        rope_theta=meta[f"{a}.rope.freq_base"], model_type=a)


def dense(config, state) -> qwen2.Qwen2:
    model = qwen2.Qwen2(config)
    if "lm_head.weight" not in state:  # absent: llama.cpp uses token_embd
        state = state | {"lm_head.weight": state["model.embed_tokens.weight"]}
    model.load_state_dict(state, strict=True)
    return model.eval()


def dequantized(state: dict) -> tuple[dict, dict]:
    """The deployed model's weights in fp32 from its portable state: as deploy.py computes them,
    and with each Q4_1 block's d = s and m = z - 8 s and each Q8_0 d = s_v rounded to fp16."""
    ours, rounded = {}, {}
    for key, value in state.items():
        module, kind = key.rsplit(".", 1)
        if value.dtype == torch.uint8:
            s, z = state[f"{module}.scale"].float(), state[f"{module}.zero"].float()
            ours[key] = deploy.dequantize(deploy.unpack(value), s, z)
            d, m = (t.half().float().repeat_interleave(32, 1) for t in (s, z - 8 * s))
            rounded[key] = deploy.unpack(value).float() * d + m
        elif value.dtype == torch.int8:
            ours[key] = value.float() * state[f"{module}.scale"].float()[:, None]
            rounded[key] = value.float() * state[f"{module}.scale"].half().float()[:, None]
        elif kind not in ("scale", "zero"):
            ours[key] = rounded[key] = value.float()
    return ours, rounded


def test_logits_of_the_model_rebuilt_from_the_file(exported):
    """A qwen2.Qwen2 built from the file's metadata and dequantized tensors gives, in fp32, the
    logits of the deployed model's own tensors with d and m rounded to fp16 (the only change). Next
    to the unrounded ones: each block's weights move by at most 2^-11 of its 15 d + |m| (the tensor
    test), so to first order the logits by at most 2^-11 relative per quantized layer."""
    deployed, tokenizer, _, reader = exported
    ours, rounded = dequantized(deploy.portable_state(deployed))
    from_file = dense(config_from(metadata(reader)), read_back(reader, deployed.config))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}])
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        logits = from_file(ids)
        assert torch.allclose(logits, dense(deployed.config, rounded)(ids), rtol=1e-5, atol=1e-5)
        unrounded = dense(deployed.config, ours)(ids)
    layers = 7 * deployed.config.num_hidden_layers
    assert 0 < (logits - unrounded).norm() / unrounded.norm() <= 2 ** -11 * layers


def test_smollm2s_reader_of_llama_cpp_files_reads_ours_back(exported, tmp_path):
    """smollm2.convert_gguf, which reads the real SmolLM2 GGUF llama.cpp's converter wrote, reads a
    llama export back to the same model and tokenizer: our interleaving is llama.cpp's."""
    deployed, tokenizer, path, reader = exported
    if deployed.config.model_type != "llama":
        pytest.skip("convert_gguf reads llama files only")
    smollm2.convert_gguf(path, tmp_path)
    model, tok = qwen2.load(str(tmp_path))
    ids = torch.tensor([tokenizer.encode("Write 12 short words, then stop.")])
    assert tok.encode("Write 12 short words, then stop.") == ids[0].tolist()
    rounded = dequantized(deploy.portable_state(deployed))[1]
    with torch.no_grad():
        expected = dense(deployed.config, rounded)(ids)
        assert torch.allclose(model(ids), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- errors
def test_the_command_names_what_is_wrong(tmp_path, tiny_model_dir):
    with pytest.raises(InputError, match=f"{tmp_path / 'nowhere'}: no deployed.safetensors"):
        run_deployment.main(["--export", "gguf", "--deployed", str(tmp_path / "nowhere"),
                             "--out", str(tmp_path / "x.gguf")])
    model, tokenizer = qwen2.load(str(tiny_model_dir))
    state = deploy.portable_state(model, group_size=16)
    with pytest.raises(InputError, match="layers.0.self_attn.q_proj has groups of 16 weights"):
        gguf_export.write(model.config, state, tokenizer, tmp_path / "a.gguf", "x", "model")
    state = deploy.portable_state(model)
    del state["model.layers.1.mlp.up_proj.zero"]
    with pytest.raises(InputError, match="here: missing tensor 'model.layers.1.mlp.up_proj.zero'"):
        gguf_export.write(model.config, state, tokenizer, tmp_path / "a.gguf", "x", "here")
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written
