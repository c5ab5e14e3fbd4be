"""nf4.py: the NF4 table, blockwise quantization against bitsandbytes, NF4Linear, quantize_model."""
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nf4
import qwen2


def test_table_is_normal_quantiles():
    """QLoRA's construction: 8 positive and 7 negative quantiles of N(0, 1) at evenly spaced
    probabilities from 0.9677083 down to 0.5 (float32 points, as the original), plus 0, over the max."""
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9).double())[:-1]  # (8,)
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8).double())[:-1]  # (7,)
    values = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    assert torch.allclose(nf4.NF4.double(), values / values.max(), atol=1e-7, rtol=0)  # float32 table
    assert NormalDist().inv_cdf(0.5 + (offset - 0.5) / 8) / NormalDist().inv_cdf(offset) == pytest.approx(
        nf4.NF4[8].item(), abs=1e-6)  # the smallest positive value, by hand: Phi^-1(0.5585) / Phi^-1(0.9677)


def test_worked_example():
    """[1, -0.5, 0, 0.3]: absmax 1; -0.5 lies below the midpoint -0.4600 of codes 2 and 3 -> 2;
    0.3 above the midpoint 0.2920 of codes 10 and 11 -> 11. Bytes: 15|2 = 0xF2, 7|11 = 0x7B."""
    packed, absmax = nf4.quantize(torch.tensor([1.0, -0.5, 0.0, 0.3]))
    assert packed.tolist() == [0xF2, 0x7B] and absmax.tolist() == [1.0]
    # odd length: [2, -2, 1] / 2 = [1, -1, 0.5] -> 15, 0, 12 (0.5 < 0.5017), padding zero -> 7
    packed, absmax = nf4.quantize(torch.tensor([2.0, -2.0, 1.0]))
    assert packed.tolist() == [0xF0, 0xC7] and absmax.tolist() == [2.0]
    back = nf4.dequantize(packed, absmax, (3,))
    assert back.tolist() == [2.0, -2.0, 2 * nf4.NF4[12].item()]


SHAPES = [(64,), (128, 64), (3, 37), (1000, 7), (96, 576), (5,)]  # 111, 7000, 5: not multiples of 64


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_bitsandbytes(shape):
    bnb = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    w = torch.randn(shape)
    w.view(-1)[:64] = 0.0 if w.numel() >= 128 else w.view(-1)[:64]  # an all-zero block, absmax 0
    packed, absmax = nf4.quantize(w)
    ref_packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(packed, ref_packed.view(-1))
    assert torch.equal(absmax, state.absmax)
    ours = nf4.dequantize(packed, absmax, shape)
    assert ours.shape == w.shape
    assert torch.equal(ours.view(-1), bnb.dequantize_4bit(ref_packed, state).view(-1))


def test_matches_bitsandbytes_bf16_input():
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    packed, absmax = nf4.quantize(w)
    ref_packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(packed, ref_packed.view(-1)) and torch.equal(absmax, state.absmax)


def test_mean_absolute_error_on_normal_weights():
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    mae = (nf4.dequantize(*nf4.quantize(w), w.shape) - w).abs().mean().item()
    assert 0.071 < mae < 0.075  # about 0.073 (bitsandbytes gives the same)


def test_nf4_linear_is_a_linear_with_the_dequantized_weight():
    torch.manual_seed(0)
    linear = nn.Linear(128, 48)
    layer = nf4.NF4Linear(linear, torch.bfloat16)
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (128 * 48 // 2,)
    weight = layer.dequantized()  # (48, 128) bf16
    assert weight.dtype == torch.bfloat16 and weight.shape == (48, 128)
    x = torch.randn(2, 5, 128, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32  # back to the input's dtype
    ref = (F.linear(x.detach().bfloat16(), weight) + linear.bias.detach().bfloat16()).float()
    assert torch.equal(y, ref)
    # near the original layer (4-bit error, about 10% here), and the gradient flows through the dequantized weight
    assert (y - linear(x)).abs().mean() < 0.15 * linear(x).abs().mean()
    y.sum().backward()
    expected = torch.ones(2, 5, 48, dtype=torch.bfloat16) @ weight
    assert torch.allclose(x.grad, expected.float())


def tiny_config(**kw):
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return qwen2.Config(**{**base, **kw})


def test_quantize_model_swaps_block_linears_only():
    torch.manual_seed(0)
    model = qwen2.Qwen2(tiny_config())
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        ref = model(ids)
    nf4.quantize_model(model)
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, (nn.Linear, nf4.NF4Linear))}
    assert kinds.pop("lm_head") == "Linear"  # the (tied) head and the embedding stay dense
    assert len(kinds) == 2 * 7 and set(kinds.values()) == {"NF4Linear"}
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert model.model.layers[0].self_attn.q_proj.bias.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(ids)
    assert logits.dtype == torch.bfloat16
    assert F.cosine_similarity(logits.float().flatten(), ref.flatten(), dim=0) > 0.99
    with pytest.raises(ValueError, match="no nn.Linear"):
        nf4.quantize_model(model)
