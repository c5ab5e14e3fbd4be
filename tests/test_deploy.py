"""deployment/: int4 groups and int8 rows worked by hand, the fused kernels held against a plain
dequantize-then-matmul reference, LoRA merged, save/load bit-exact; `python -m deployment` end
to end on the tiny decoder."""
import json

import pytest
import torch
import torch.nn.functional as F

import cdcda
import generate
import lora
import nf4
import qwen2
import runner
from deployment import __main__ as run_deployment, deploy, gptq, gridtune
from errors import InputError


def group_of_32():
    """-1.5 + 0.25 k for k = 0..15 and back down, with one value (k = 5) replaced by 0.1."""
    k = torch.tensor(list(range(16)) + list(range(15, -1, -1)), dtype=torch.float32)
    w = -1.5 + 0.25 * k
    w[5] = 0.1
    return w, k


def test_quantize_one_group_by_hand():
    w, k = group_of_32()
    codes, scale, zero = deploy.quantize(w[None])
    # min -1.5, max 2.25: s = 3.75 / 15 = 0.25, z = -1.5 + 8 * 0.25 = 0.5 (both exact in bf16)
    assert scale.dtype == zero.dtype == torch.bfloat16
    assert scale.item() == 0.25 and zero.item() == 0.5
    expected = k.clone()
    expected[5] = 6  # round((0.1 - 0.5) / 0.25) + 8 = round(-1.6) + 8 = 6 -> (6 - 8) 0.25 + 0.5 = 0.0
    assert codes[0].tolist() == expected.tolist()
    back = deploy.dequantize(codes, scale, zero)[0]
    assert back[5].item() == 0.0
    assert torch.equal(back[torch.arange(32) != 5], w[torch.arange(32) != 5])  # on the grid: exact


@pytest.mark.parametrize("value", [0.0, 0.75, -3.0])
def test_a_constant_group_comes_back_exactly(value):
    codes, scale, zero = deploy.quantize(torch.full((2, 32), value))
    assert (codes == 8).all() and torch.equal(deploy.dequantize(codes, scale, zero), torch.full((2, 32), value))


def test_quantize_error_is_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(16, 128) * torch.rand(16, 1) * 3 + torch.randn(16, 1)  # rows of different ranges and offsets
    codes, scale, zero = deploy.quantize(w)
    assert codes.dtype == torch.uint8 and codes.max() <= 15 and scale.shape == (16, 4)
    s, z = scale.float().repeat_interleave(32, 1), zero.float().repeat_interleave(32, 1)
    err = (deploy.dequantize(codes, scale, zero) - w).abs()
    assert (err <= s / 2 + (z.abs() + 8 * s) * 2 ** -8).all()  # half a step, plus bf16 rounding of s and z
    assert err.max() > s.min() / 4  # the bound is not vacuous: the error is of the size of a step


def test_shapes_the_kernels_cannot_take_are_refused():
    with pytest.raises(ValueError, match="multiple of the group size 32"):
        deploy.quantize(torch.zeros(4, 48))
    with pytest.raises(ValueError, match="out_features 24 is not a multiple of 16"):
        int4_layer(24, 64)


def test_pack_by_hand_and_back():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert deploy.pack(codes).tolist() == [[0x12, 0xF0]]  # even column in the high nibble
    rand = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(deploy.unpack(deploy.pack(rand)), rand)


def int4_layer(N, K, bias=True, seed=0, device="cpu"):
    torch.manual_seed(seed)
    w = torch.randn(N, K)
    codes, scale, zero = deploy.quantize(w)
    b = torch.randn(N).bfloat16() if bias else None
    layer = deploy.Int4Linear(deploy.pack(codes).to(device), scale.to(device), zero.to(device),
                              None if b is None else b.to(device))
    return layer, deploy.dequantize(codes, scale, zero), b


@pytest.mark.parametrize("N,K", [(16, 32), (32, 64), (48, 96), (16, 128)])
def test_int4_linear_is_dequantize_then_matmul(N, K):
    layer, w, b = int4_layer(N, K)
    x = torch.randn(2, 3, K).bfloat16()
    ref = F.linear(x.float(), w, b.float())  # (2, 3, N) the plain reference, fp32
    y = layer(x)
    assert y.shape == (2, 3, N) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    y32 = layer(x.float())  # the output comes back in the input's dtype
    assert y32.dtype == torch.float32


def test_int4_codes_read_back_through_the_kernel():
    layer, _, _ = int4_layer(32, 96, seed=1)
    torch.manual_seed(1)
    codes, scale, zero = deploy.quantize(torch.randn(32, 96))
    assert torch.equal(layer.codes(), codes)
    portable = layer.portable()
    assert torch.equal(portable["weight"], deploy.pack(codes))
    assert torch.equal(portable["scale"], scale) and torch.equal(portable["zero"], zero)


def test_int8_row_by_hand():
    codes, scale = deploy.quantize_rows(torch.tensor([[0.5, -1.27, 0.0]]))
    # s = bf16(1.27 / 127) = bf16(0.01) = 0.010009765625; 0.5 / s = 49.95 -> 50; -1.27 / s = -126.88 -> -127
    assert scale.item() == 0.010009765625 and codes.tolist() == [[50, -127, 0]]


def test_int8_embedding_and_head_match_the_dequantized_table():
    torch.manual_seed(0)
    table = torch.randn(40, 64)
    codes, scale = deploy.quantize_rows(table)
    dense = codes.float() * scale.float()[:, None]  # (40, 64)
    assert (dense - table).abs().max() <= table.abs().amax(1).max() / 127  # half a step, with room for bf16
    ids = torch.tensor([[3, 0, 39]])
    assert torch.equal(deploy.Int8Embedding(codes, scale)(ids), dense[ids].bfloat16())
    x = torch.randn(2, 5, 64).bfloat16()
    ref = x.float() @ dense.t()
    y = deploy.Int8Linear(codes, scale)(x)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def nf4_lora_model(tied=True, seed=0):
    """A tiny random Qwen2 (q/k/v biases) as the device trains it: NF4 base + LoRA with a
    trained-looking (non-zero) B."""
    torch.manual_seed(seed)
    config = qwen2.Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = qwen2.Qwen2(config).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    model = lora.add_lora(nf4.quantize_model(model), r=4, alpha=8)
    for m in model.modules():
        if isinstance(m, lora.LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.3)
    return model


def reference_logits(model, ids):
    """Dequantize-then-matmul: the fp32 model whose weights are the deployed ones, dequantized."""
    state = deploy.portable_state(model)
    ref = qwen2.Qwen2(model.config).eval()
    dense = {}
    for key, t in state.items():
        if key.endswith(".scale") or key.endswith(".zero"):
            continue
        stem = key[: -len(".weight")]
        if key.startswith(("model.embed_tokens", "lm_head")):
            dense[key] = t.float() * state[stem + ".scale"].float()[:, None]
        elif t.dtype == torch.uint8:
            dense[key] = deploy.dequantize(deploy.unpack(t), state[stem + ".scale"], state[stem + ".zero"])
        else:
            dense[key] = t.float()
    if model.config.tie_word_embeddings:
        dense["lm_head.weight"] = dense["model.embed_tokens.weight"]
    ref.load_state_dict(dense, strict=True)
    return ref(ids)


@torch.inference_mode()
@pytest.mark.parametrize("tied", [True, False])
def test_deployed_model_merges_lora_within_quantization_error(tied):
    model = nf4_lora_model(tied)
    ids = torch.randint(0, 96, (2, 12))
    trained = model(ids).float()  # NF4 + LoRA, unmerged
    deployed = deploy.deploy(model)
    assert not any(isinstance(m, (lora.LoRALinear, nf4.NF4Linear, torch.nn.Linear)) for m in deployed.modules())
    assert (deployed.lm_head.weight is deployed.model.embed_tokens.weight) == tied
    out = deployed(ids).float()
    ref = reference_logits(model, ids)
    torch.testing.assert_close(out, ref, rtol=0, atol=0.03 * ref.abs().max().item())  # the kernels: bf16 error
    names = dict(deployed.named_modules())
    for name, m in model.named_modules():  # each merged weight within half a step of W_nf4 + (alpha/r) B A
        if isinstance(m, lora.LoRALinear):
            merged = m.base.dequantized().float() + m.scaling * m.lora_B @ m.lora_A  # (out, in) fp32
            p = names[name].portable()
            s = p["scale"].float().repeat_interleave(32, 1)
            z = p["zero"].float().repeat_interleave(32, 1)
            err = (deploy.dequantize(deploy.unpack(p["weight"]), p["scale"], p["zero"]) - merged).abs()
            assert (err <= s / 2 + (z.abs() + 8 * s + merged.abs()) * 2 ** -8).all(), name
    for m in model.modules():
        if isinstance(m, lora.LoRALinear):
            m.lora_B.zero_()
    base = model(ids).float()  # the adapter left out

    def rel(a):
        return ((a - trained).norm() / trained.norm()).item()
    assert rel(out) < rel(base) / 2  # the int4 error (large on a 2-layer random model) is below the adapter's effect


@torch.inference_mode()
def test_save_load_is_bit_exact_and_generates(tiny_model_dir, tmp_path):
    model, tok = qwen2.load(str(tiny_model_dir))
    model = lora.add_lora(nf4.quantize_model(model), r=4, alpha=8)
    deployed = deploy.deploy(model)
    deploy.save(deployed, tok, tmp_path / "dep")
    loaded, tok2 = deploy.load(tmp_path / "dep")
    before, after = deploy.portable_state(deployed), deploy.portable_state(loaded)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert "lm_head.weight" in before  # untied: the head is stored on its own
    assert torch.equal(deploy.portable_state(model)["model.layers.1.mlp.down_proj.weight"],
                       before["model.layers.1.mlp.down_proj.weight"])  # deploying twice changes nothing
    ids = torch.tensor([tok.encode("Hello there")])
    assert torch.equal(deployed(ids), loaded(ids))
    out = generate.generate(loaded, ids, 4, temperature=0, eos_token_id=None)
    assert out.shape == (1, ids.shape[1] + 4)
    sizes = deploy.stored_bytes(loaded)
    assert sum(sizes.values()) == sum(t.numel() * t.element_size() for t in before.values())  # the file's tensors
    linears = sum(p.numel() for n, p in qwen2.load(str(tiny_model_dir))[0].model.layers.named_parameters()
                  if n.endswith("proj.weight"))
    assert sizes["int4 codes"] == linears / 2 and sizes["int4 scales+zeros"] == linears / 32 * 4
    assert sizes["int8 embedding/head"] == 2 * (49152 * 32 + 49152 * 2)  # untied: embedding and head


def test_load_names_what_is_wrong(tmp_path, tiny_model_dir):
    with pytest.raises(InputError, match="no deployed.safetensors"):
        deploy.load(tmp_path)
    model, _ = qwen2.load(str(tiny_model_dir))
    state = deploy.portable_state(model)
    state.pop("model.layers.0.mlp.up_proj.scale")
    with pytest.raises(InputError, match="missing key 'model.layers.0.mlp.up_proj.scale'"):
        deploy.from_portable(model.config, state)
    state = deploy.portable_state(model) | {"extra.weight": torch.zeros(1)}
    with pytest.raises(InputError, match="unexpected key 'extra.weight'"):
        deploy.from_portable(model.config, state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.inference_mode()
def test_cuda_kernels_match_the_reference_and_the_cpu():
    layer, w, b = int4_layer(256, 896, device="cuda")
    x = torch.randn(3, 896).bfloat16()
    ref = F.linear(x.float(), w, b.float())
    y = layer(x.cuda()).float().cpu()
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    cpu_layer, _, _ = int4_layer(256, 896)
    assert torch.equal(layer.codes().cpu(), cpu_layer.codes())
    model = nf4_lora_model(tied=True)
    ids = torch.randint(0, 96, (2, 12))
    on_cpu = deploy.deploy(model)(ids).float()
    on_gpu = deploy.deploy(model, device="cuda")(ids.cuda()).float().cpu()
    torch.testing.assert_close(on_gpu, on_cpu, rtol=0, atol=0.05 * on_cpu.abs().max().item())


def test_the_merge_keeps_a_small_delta_that_bf16_would_round_away():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nf4.NF4Linear(torch.nn.Linear(64, 32, bias=False), torch.bfloat16), r=4, alpha=4)
    with torch.no_grad():
        layer.lora_B.fill_(1e-3)  # a delta of about 1e-4 next to weights of about 0.1: below bf16's step
    want = layer.base.dequantized().float() + (layer.lora_B @ layer.lora_A) * layer.scaling
    assert torch.equal(deploy.dense_weight(layer), want)
    assert not torch.allclose(layer.merged_weight().float(), want, rtol=0, atol=1e-6)  # the bf16 merge loses it


@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_deploy_answers_with_the_deployed_model_and_reports_both(tiny_model_dir, tmp_path, monkeypatch, fake_cloud,
                                                                 tiny_args, rounding):
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    calibrations, tuned, real_blocks, real_tune = [], [], gptq.gptq_blocks, gridtune.tune
    monkeypatch.setattr(gptq, "gptq_blocks", lambda model, calibration, *a: calibrations.append(calibration)
                        or real_blocks(model, calibration, *a))
    monkeypatch.setattr(gridtune, "tune", lambda model, state, calibration, *a, **kw: tuned.append(calibration)
                        or real_tune(model, state, calibration, *a, **kw))
    argv = tiny_args(tiny_model_dir, tmp_path / "run") + ["--methods", "cdcda", "--deploy-rounding", rounding]
    rep = run_deployment.main(argv)
    counts = [json.loads((d / "result.json").read_text())["counts"] for d in (tmp_path / "run" / "users").iterdir()]
    assert sorted(map(len, tuned)) == sorted(c["generated"] // 3 + c["kept"] for c in counts)  # the grids tuned
    # on the inputs CDCDA-PLM trained on: the user's pairs (k = 3 candidates each) and the kept ones
    assert calibrations == (tuned if rounding == "gptq" else [])  # GPTQ on the same
    assert list(rep["rows"]) == ["cdcda", "cdcda-deployed"]
    made = [json.loads((d / "settings.json").read_text())["extra"] for d in (tmp_path / "run" / "users").iterdir()]
    assert made == [{"deploy_rounding": rounding, "deploy_tune_epochs": 3}] * 2  # what a re-run must share
    fine, deployed = rep["rows"]["cdcda"], rep["rows"]["cdcda-deployed"]
    assert deployed["gold_nll"] > 0 and "rouge1" in deployed
    assert deployed["gold_nll"] != fine["gold_nll"]  # a different (quantized) model answered
    assert abs(deployed["gold_nll"] - fine["gold_nll"]) < 0.1 * fine["gold_nll"]  # ... one close to its source
    user_dir = next((tmp_path / "run" / "users").iterdir())
    model, _ = deploy.load(user_dir / "cdcda.deployed")
    assert isinstance(model.model.layers[0].mlp.up_proj, deploy.Int4Linear)
    assert "| CDCDA-PLM, deployed (int4) |" in (tmp_path / "run" / "results.md").read_text()


def test_deployed_methods_need_their_adapter_first(capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(runner, "run", lambda settings, methods, prepare, family: ran.append(settings.methods))
    run_deployment.main([])
    assert ran == [("base", "direct-ft", "direct-ft-deployed", "cdcda", "cdcda-deployed")]
    for bad, message in ((["--methods", "cdcda-deployed,cdcda"], "--methods: cdcda-deployed needs cdcda before it"),
                         (["--deploy-tune-epochs", "-1"], "--deploy-tune-epochs -1: must be at least 0")):
        with pytest.raises(SystemExit):
            run_deployment.main(bad)
        assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_deployed_row_changes_no_other_row(tiny_model_dir, tmp_path, monkeypatch, fake_cloud, tiny_args):
    """--deploy is evaluation only: each method's LoRA is drawn from its own seeded generator, so
    the rows of a run with a deployed row between them equal those of a run without one."""
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    torch.rand(7)  # whatever drew from torch's global generator before the runs
    run_deployment.main(tiny_args(tiny_model_dir, tmp_path / "with") + ["--methods", "direct-ft,direct-ft-deployed,cdcda"])
    cdcda.main(tiny_args(tiny_model_dir, tmp_path / "without") + ["--methods", "direct-ft,cdcda"])
    for user in (tmp_path / "without" / "users").iterdir():
        without, with_ = (json.loads((tmp_path / run / "users" / user.name / "result.json").read_text())
                          for run in ("without", "with"))
        for key in ("predictions", "losses", "gold_nll"):
            assert {m: with_[key][m] for m in ("direct-ft", "cdcda")} == without[key]
