"""gptq.py: two-column cases worked by hand, the blocked Cholesky form held against a plain
re-solve of the optimal brain surgeon step at every column, and what it is for: a lower output
error than nearest rounding on correlated inputs, in a layer and in a deployed model.

No library serves as the oracle here: torchao's GPTQ runs on CUDA only and llmcompressor's
needs `datasets` (pyarrow) and transformers <= 5.17; `reference_codes` below is written from
the equations, not from the Cholesky form the module uses."""
import copy

import pytest
import torch
from test_deploy import nf4_lora_model

from deployment import deploy, gptq


def loss(weight, codes, scale, zero, H):
    """sum over rows of e H e^T, e = w - w' (the output error on inputs with X^T X / T = H)."""
    e = weight - ((codes.float() - 8) * scale + zero)
    return torch.einsum("nk,kl,nl->", e, H, e).item()


def integer_grid(K):
    """Scale 1 and zero point 8 for one group of K: the codes are the integers 0..15 themselves."""
    return torch.ones(1, 1), torch.full((1, 1), 8.0)


def test_two_columns_by_hand():
    # H = [[1, .5], [.5, 1]]: equal energy, so column 0 first. 0.4 -> 0 (e = 0.4); column 1
    # moves by -H_10/H_11 e = +0.2 to 2.6 -> 3. Nearest rounding gives 2.
    # Output error e H e^T: GPTQ e = (0.4, -0.6): 0.16 - 0.24 + 0.36 = 0.28;
    # nearest e = (0.4, 0.4): 0.16 + 0.16 + 0.16 = 0.48.
    W, H = torch.tensor([[0.4, 2.4]]), torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    s, z = integer_grid(2)
    codes = gptq.quantize(W, H, s, z, damp=0)
    assert codes.tolist() == [[0, 3]]
    assert deploy.round_to_grid(W, s, z).tolist() == [[0, 2]]
    assert loss(W, codes, s, z, H) == pytest.approx(0.28)
    assert loss(W, torch.tensor([[0, 2]]), s, z, H) == pytest.approx(0.48)


def test_the_column_with_more_input_energy_goes_first_by_hand():
    # H = [[1, 1], [1, 4]]: column 1 first (H_11 = 4). 2.4 -> 2 (e = 0.4); column 0 moves by
    # -H_01/H_00 e = +0.4 to 0.85 -> 1. Codes (1, 2): e = (-0.55, 0.4), error
    # 0.3025 - 0.44 + 0.64 = 0.5025. Column 0 first would give (0, 3): 0.2025 - 0.54 + 1.44 =
    # 1.1025; nearest (0, 2): 0.2025 + 0.36 + 0.64 = 1.2025.
    W, H = torch.tensor([[0.45, 2.4]]), torch.tensor([[1.0, 1.0], [1.0, 4.0]])
    s, z = integer_grid(2)
    codes = gptq.quantize(W, H, s, z, damp=0)
    assert codes.tolist() == [[1, 2]]
    assert loss(W, codes, s, z, H) == pytest.approx(0.5025)
    assert loss(W, torch.tensor([[0, 3]]), s, z, H) == pytest.approx(1.1025)
    assert loss(W, torch.tensor([[0, 2]]), s, z, H) == pytest.approx(1.2025)


def reference_codes(W, H, scale, zero, damp):
    """The optimal brain surgeon step solved afresh at each column, in fp64: round the column
    with the largest H_ii left, then set the columns not yet rounded (F) to
    w_F = w0_F + H_FF^-1 H_FQ e_Q, which minimises e H e^T given the errors e_Q so far."""
    W0, H = W.double(), H.double().clone()
    H += damp * torch.diagonal(H).mean() * torch.eye(len(H), dtype=H.dtype)
    g = W.shape[1] // scale.shape[1]
    s, z = scale.double().repeat_interleave(g, 1), zero.double().repeat_interleave(g, 1)
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True).tolist()
    W, codes, done = W0.clone(), torch.zeros_like(W0), []
    for q in order:
        codes[:, q] = deploy.round_to_grid(W[:, q], s[:, q], z[:, q])
        done.append(q)
        rest = [j for j in order if j not in done]
        if rest:
            e = W0[:, done] - ((codes[:, done] - 8) * s[:, done] + z[:, done])  # (N, |Q|)
            W[:, rest] = W0[:, rest] + torch.linalg.solve(H[rest][:, rest], H[rest][:, done] @ e.T).T
    return codes


def correlated(T, K, seed):
    """T inputs of K features mixed so that they correlate, and their X^T X / T."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, K, generator=g) @ (torch.eye(K) + 0.5 * torch.randn(K, K, generator=g))
    return X, X.T @ X / T


@pytest.mark.parametrize("seed", [0, 1])
def test_blocked_cholesky_form_matches_the_reference(seed):
    torch.manual_seed(seed)
    W = torch.randn(6, 64)
    _, H = correlated(200, 64, seed)
    codes, scale, zero = deploy.quantize(W, 32)
    got = gptq.quantize(W, H, scale, zero, block=16)  # several blocks: the lazy updates between them
    want = reference_codes(W, H, scale.float(), zero.float(), gptq.DAMP)
    assert (got == want.to(torch.uint8)).float().mean() > 0.99  # fp32 against fp64: a rare tie may flip
    assert not torch.equal(got, codes)  # and it is not nearest rounding


def test_uncorrelated_inputs_give_nearest_rounding():
    torch.manual_seed(0)
    W = torch.randn(8, 64)
    codes, scale, zero = deploy.quantize(W, 32)
    H = torch.diag(torch.rand(64) + 0.5)  # no column can make up for another
    assert torch.equal(gptq.quantize(W, H, scale, zero), codes)
    assert torch.equal(gptq.quantize_layer(W, H, 32)[0], codes)


def test_lower_output_error_than_nearest_rounding():
    torch.manual_seed(0)
    W = torch.randn(32, 128)
    X, H = correlated(1000, 128, 0)
    codes, scale, zero = deploy.quantize(W, 32)
    smart = gptq.quantize_layer(W, H, 32)[0]
    assert smart.max() <= 15
    out = X @ W.T
    err_nearest = (X @ deploy.dequantize(codes, scale, zero).T - out).pow(2).mean()
    err_gptq = (X @ deploy.dequantize(smart, scale, zero).T - out).pow(2).mean()
    assert err_gptq < 0.6 * err_nearest


def test_an_unused_input_is_rounded_as_zero():
    W = torch.full((2, 32), 0.7)
    W[:, 0] = -1.0
    H = torch.eye(32)
    H[3, 3] = 0  # feature 3 never seen
    scale, zero = torch.full((2, 1), 0.25), torch.zeros(2, 1)
    codes = gptq.quantize(W, H, scale, zero)
    assert codes[:, 3].tolist() == [8, 8]  # (8 - 8) * 0.25 + 0 = 0
    assert codes[:, 0].tolist() == [4, 4]  # -1.0 = (4 - 8) * 0.25


def test_input_hessians_average_what_each_layer_sees():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
    xs = [torch.randn(1, 5, 3), torch.randn(1, 2, 3)]
    H = gptq.input_hessians([a, b], lambda: [b(a(x)) for x in xs])
    X = torch.cat([x[0] for x in xs])  # (7, 3)
    Y = a(X).detach()
    torch.testing.assert_close(H[0], X.T @ X / 7)
    torch.testing.assert_close(H[1], Y.T @ Y / 7)
    assert not a._forward_hooks and not b._forward_hooks
    with pytest.raises(ValueError, match="saw no input"):
        gptq.input_hessians([a], lambda: None)


@torch.inference_mode()
def test_deploying_with_calibration_lowers_the_models_error():
    model = nf4_lora_model(tied=True)
    torch.manual_seed(1)
    calibration = torch.randint(0, 96, (8, 24)).tolist()
    held_out = torch.randint(0, 96, (4, 24))
    want = model(held_out).float()

    def err(deployed):
        return ((deployed(held_out).float() - want).norm() / want.norm()).item()
    assert err(deploy.deploy(model, rounded=gptq.gptq_blocks(model, calibration))) < 0.9 * err(deploy.deploy(model))


@torch.inference_mode()
def test_gptq_blocks_feed_each_block_what_the_quantized_blocks_before_it_give():
    """Frantar et al.'s order: block i's Hessians come from the inputs that blocks 0..i-1, already
    deployed, produce. Held against a by-hand reference that runs the whole model for each block,
    with the blocks before it swapped for their deployed layers; and against the one-pass
    collection through the unquantized model, which agrees on block 0 only."""
    model = nf4_lora_model(tied=True)
    torch.manual_seed(1)
    calibration = [torch.randint(0, 96, (n,)).tolist() for n in (24, 9, 17, 30)]
    rounded = gptq.gptq_blocks(model, calibration)
    originals = [layer for _, _, layer in deploy.block_linears(model)]
    assert set(rounded) == set(map(id, originals))

    def run(net):
        return lambda: [net(torch.tensor([ids])) for ids in calibration]
    one_pass = dict(zip(map(id, originals), gptq.input_hessians(originals, run(model))))
    reference = copy.deepcopy(model)
    for i, block in enumerate(reference.model.layers):
        found = deploy.linears(block)
        hessians = gptq.input_hessians([layer for _, _, layer in found], run(reference))
        for (parent, name, layer), H, original in zip(found, hessians, deploy.linears(model.model.layers[i])):
            codes, scale, zero, got = rounded[id(original[2])]
            torch.testing.assert_close(got, H, rtol=1e-5, atol=1e-6)
            assert torch.equal(codes, gptq.quantize_layer(deploy.dense_weight(layer), H, 32)[0])
            change = ((got - one_pass[id(original[2])]).norm() / H.norm()).item()
            assert change < 1e-6 if i == 0 else change > 1e-2  # block 1 sees block 0's rounding
            bias = layer.base.bias if isinstance(layer, deploy.lora.LoRALinear) else layer.bias
            setattr(parent, name, deploy.Int4Linear(deploy.pack(codes), scale, zero,
                                                    None if bias is None else bias.to(deploy.DTYPE)))
    state = deploy.portable_state(model, rounded=rounded)  # what the pipeline deploys: these codes
    key = "model.layers.1.mlp.down_proj"
    layer = model.get_submodule(key)
    assert torch.equal(state[f"{key}.weight"], deploy.pack(rounded[id(layer)][0]))
    assert not torch.equal(rounded[id(layer)][0], gptq.quantize_layer(deploy.dense_weight(layer),
                                                                  one_pass[id(layer)])[0])
