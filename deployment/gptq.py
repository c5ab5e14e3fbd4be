"""GPTQ rounding (Frantar et al., 2023): choose a layer's 4-bit codes so that its outputs, not
its weights, stay close to the full-precision layer's on the data it will see.

Rounding each weight to its nearest code (RTN) makes every error as small as it can be on its
own, but a layer computes y = W x, and the errors of correlated inputs add up. With calibration
inputs X (T, K) the output error of one row w (K,) quantized to w' is

    (w - w') H (w - w')^T,    H = X^T X / T    (K, K)

GPTQ rounds the columns one at a time and moves the columns not yet rounded to cancel what the
rounding just did (optimal brain surgeon). With the errors e_Q of the columns Q already rounded
fixed, the best change of the rest F is e_F = -H_FF^-1 H_FQ e_Q, that is

    w_F <- w_F + H_FF^-1 H_Fq e_q     after rounding column q (e_q = w_q - w'_q).

The same updates come from one triangular factor: with U upper triangular, U^T U = H^-1 (the
columns in rounding order), rounding column i subtracts (e_i / U_ii) U_{i, i+1:} from the
columns after it. Applied in blocks of 128 columns (each block's updates reach the later
columns in one matmul), this is the paper's Algorithm 1.

Choices here, as in the common recipes:
- H gets 1% of its mean diagonal added to the diagonal (a few thousand calibration tokens
  leave H singular), and a column no input ever used (H_ii = 0) is set to 0;
- columns are rounded in decreasing H_ii ("act order": the inputs with the most energy
  first, while the most columns are left to absorb their error);
- the group grid (scale and zero point) is the caller's, fixed before rounding from the
  unmodified weights, so every code lands on the grid the kernel computes with.

The grid is deploy.py's, w' = (q - 8) s + z with q in 0..15 (`quantize_layer`). As the paper does,
a model is quantized block after block, each block's H taken on the inputs that the blocks before
it, already quantized, produce (`gptq_blocks`).
"""
import copy

import torch
from torch import nn
from tqdm import tqdm

import lora
from deployment import deploy

DAMP = 0.01
BLOCK = 128


def input_hessians(layers: list[nn.Module], run) -> list[torch.Tensor]:
    """H = X^T X / T (fp32) of what each layer's forward receives while `run()` calls the model."""
    sums, counts = [0] * len(layers), [0] * len(layers)

    def hook(i):
        def accumulate(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float().cpu()  # (T, K)
            sums[i] = sums[i] + x.T @ x
            counts[i] += x.shape[0]
        return accumulate

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            run()
    finally:
        for handle in handles:
            handle.remove()
    if not all(counts):
        raise ValueError("gptq.input_hessians: a layer saw no input (empty calibration data?)")
    return [h / n for h, n in zip(sums, counts)]


def quantize(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
             damp: float = DAMP, block: int = BLOCK) -> torch.Tensor:
    """Codes (N, K) uint8 in 0..15 for `weight` (N, K) on the grid (q - 8) s + z, with scale and
    zero (N, K/g) per group of g columns, chosen by GPTQ against `hessian` (K, K) (module
    docstring). Computed in fp32 on the weight's device."""
    N, K = weight.shape
    g = K // scale.shape[1]
    W = weight.detach().float().clone()
    H = hessian.to(W.device, torch.float32).clone()
    s = scale.float().to(W.device).repeat_interleave(g, 1)  # (N, K): each column's grid
    z = zero.float().to(W.device).repeat_interleave(g, 1)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diagonal(H).mean() * torch.eye(K, device=W.device)
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    W, H, s, z = W[:, order], H[order][:, order], s[:, order], z[:, order]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.empty_like(W)
    for start in range(0, K, block):
        end = min(start + block, K)
        errors = torch.empty(N, end - start, device=W.device)
        for i in range(start, end):
            q = deploy.round_to_grid(W[:, i], s[:, i], z[:, i])
            codes[:, i] = q
            e = (W[:, i] - ((q - 8) * s[:, i] + z[:, i])) / U[i, i]
            W[:, i + 1:end] -= e[:, None] * U[i, i + 1:end]
            errors[:, i - start] = e
        W[:, end:] -= errors @ U[start:end, end:]
    return codes[:, torch.argsort(order)].to(torch.uint8)


def quantize_layer(weight: torch.Tensor, hessian: torch.Tensor, group_size: int = deploy.GROUP_SIZE):
    """(N, K) float -> (codes uint8 (N, K), scale, zero): deploy.py's min-max grid, GPTQ's codes on
    it for inputs whose X^T X / T is `hessian` (K, K)."""
    scale, zero = deploy.grid(weight, group_size)
    return quantize(weight, hessian, scale, zero), scale, zero


class _Captured(Exception):
    """Raised by `gptq_blocks`' hook once the first block's inputs are caught: no need to go on."""


def gptq_blocks(model: nn.Module, calibration, group_size: int = deploy.GROUP_SIZE) -> dict:
    """GPTQ as published (Frantar et al. 2023, sec. 4 and their code's sequential loop): block after
    block, each block's linear layers rounded against what the blocks before it, already quantized,
    give it on the calibration sequences (token id lists, run one at a time). For block i: H = X^T X / T
    of each linear from block i's own forward (NF4 + LoRA, unquantized) on those inputs
    (`input_hessians`), codes by `quantize_layer` on H, then block i with its linears deployed
    (`Int4Linear`, as the deployed model computes) makes the inputs of block i + 1. Returns
    id(layer) -> (codes, scale, zero, H) for every block linear not yet int4; the model is unchanged.
    Hessians are fp32 on the CPU (the down projections' (K, K) dominate: about 10 MB a block for
    SmolLM2-135M, 95 MB for Qwen2.5-0.5B, one block's at a time)."""
    device, inputs = model.model.norm.weight.device, []  # per sequence: the block's (x, cos, sin, mask, cache)

    def catch(module, args):
        inputs.append(args)
        raise _Captured
    handle = model.model.layers[0].register_forward_pre_hook(catch)
    try:
        with torch.inference_mode():
            for ids in tqdm(calibration, desc="deploy: GPTQ calibration", unit="seq"):
                try:
                    model(torch.tensor([ids], device=device))
                except _Captured:
                    pass
    finally:
        handle.remove()
    rounded = {}
    for block in tqdm(model.model.layers, desc="deploy: GPTQ", unit="block"):
        layers = [layer for _, _, layer in deploy.linears(block) if not isinstance(layer, deploy.Int4Linear)]
        hessians = input_hessians(layers, lambda: [block(*args) for args in inputs]) if layers else []
        deployed = copy.deepcopy(block)
        for (parent, name, _), layer in zip(deploy.linears(deployed), [layer for _, _, layer in deploy.linears(block)]):
            if isinstance(layer, deploy.Int4Linear):
                continue
            H = hessians[layers.index(layer)]
            codes, scale, zero = quantize_layer(deploy.dense_weight(layer), H, group_size)
            rounded[id(layer)] = (codes, scale, zero, H)
            bias = layer.base.bias if isinstance(layer, lora.LoRALinear) else layer.bias
            setattr(parent, name, deploy.Int4Linear(deploy.pack(codes), scale, zero,
                                                     None if bias is None else bias.detach().to(deploy.DTYPE)))
        with torch.inference_mode():
            inputs = [(deployed(*args), *args[1:]) for args in inputs]  # the next block's inputs
    return rounded
