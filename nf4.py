"""4-bit NormalFloat (NF4) weights for the on-device model (sec. 5.1: "NF4 data type, bfloat16
for computation"; QLoRA, Dettmers et al. 2023).

A weight matrix is cut into blocks of 64 consecutive values (row-major). Each block is scaled
by its absolute maximum into [-1, 1] and every value is replaced by the index (0..15) of the
nearest of the 16 NF4 values; two indices share one byte, the first in the high nibble: 4 bits
per weight plus one fp32 absmax per block, the same bytes as bitsandbytes' `quantize_4bit(w,
blocksize=64, quant_type="nf4")` (tests/test_nf4.py). QLoRA's double quantization of the absmax
values (off by default in bitsandbytes; the paper names none) is not used.

`NF4Linear` swaps in for an `nn.Linear`: it keeps the codes and absmax values as buffers and
dequantizes to the compute dtype right before the matmul, and again in the backward pass
instead of keeping a dense copy. `quantize_model` swaps the linear layers of the blocks (q, k,
v, o, gate, up, down) and casts the rest, the token embedding and tied head included, to the
compute dtype, as QLoRA does (README, "NF4"). NF4 saves memory, not time (RESULTS.md).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

# The 16 NF4 values: normal quantiles scaled to [-1, 1], with an exact zero (QLoRA, sec. 3).
# tests/test_nf4.py regenerates them from Phi^-1.
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])  # fmt: skip
MIDPOINTS = (NF4[:-1] + NF4[1:]) / 2  # (15,) a value between two midpoints goes to that code
# Both values of every byte at once: PAIRS[b] = (NF4[b >> 4], NF4[b & 15]).
PAIRS = torch.stack((NF4.repeat_interleave(16), NF4.repeat(16)), dim=1)  # (256, 2)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize(weight: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise NF4: `weight` (any shape, n values) -> (packed uint8 (ceil(n/2),), absmax fp32
    (ceil(n/block_size),)), row-major; a short last block's absmax is over its own values, an odd n
    gets one padding zero (code 7) in the last low nibble, as bitsandbytes does."""
    flat = weight.detach().reshape(-1).float()  # (n,)
    n = flat.numel()
    if not torch.isfinite(flat).all():
        raise ValueError(f"nf4.quantize: weight of shape {tuple(weight.shape)} "
                         "has NaN or inf values")
    blocks = math.ceil(n / block_size)
    padded = F.pad(flat, (0, blocks * block_size - n)).view(blocks, block_size)  # zeros keep absmax
    absmax = padded.abs().amax(dim=1)  # (blocks,)
    # (blocks, block_size) in [-1, 1]
    scaled = padded * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)
    codes = torch.bucketize(scaled, MIDPOINTS.to(weight.device)).to(torch.uint8)
    codes = codes.view(-1)[: n + n % 2]  # (even,) index of the nearest NF4 value
    packed = (codes[0::2] << 4) | codes[1::2]  # (ceil(n/2),) first value in the high nibble
    return packed, absmax


def dequantize(
    packed: torch.Tensor, absmax: torch.Tensor, shape, block_size: int = 64, dtype=torch.float32
) -> torch.Tensor:
    """Inverse of `quantize`: NF4[code] * absmax of its block, computed in fp32 and cast to
    `dtype` (as bitsandbytes does). Returns a tensor of `shape`."""
    n = math.prod(shape)
    # a table lookup per byte; int32 indices move half the bytes of int64 ones (2.5x faster here)
    values = F.embedding(packed.int(), PAIRS.to(packed.device)).view(-1)[:n]  # (n,) fp32 in [-1, 1]
    pad = absmax.numel() * block_size - n
    if pad:
        values = F.pad(values, (0, pad))
    out = values.view(-1, block_size).mul_(absmax.unsqueeze(1))  # (blocks, block_size), in place
    return out.view(-1)[:n].view(shape).to(dtype)


class NF4Linear(nn.Module):
    """Swap-in for `nn.Linear` with NF4 weights: y = x W^T + b, W dequantized to `compute_dtype`.
    Buffers `weight` (codes, uint8 (out*in/2,)) and `absmax` (fp32 (out*in/64,)); a frozen bias."""

    def __init__(self, linear: nn.Linear, compute_dtype=torch.bfloat16, block_size=64):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype, self.block_size = compute_dtype, block_size
        packed, absmax = quantize(linear.weight, block_size)
        self.register_buffer("weight", packed)
        self.register_buffer("absmax", absmax)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype),
                                                           requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        """The dense weight (out, in) in `compute_dtype`."""
        shape = (self.out_features, self.in_features)
        return dequantize(self.weight, self.absmax, shape, self.block_size, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        y = _DequantizedMatmul.apply(x.to(self.compute_dtype), self)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"compute_dtype={self.compute_dtype}")


class _DequantizedMatmul(torch.autograd.Function):
    """x W^T with W dequantized in forward and again in backward, so autograd keeps no dense
    copy of the frozen weight (QLoRA's memory saving). W gets no gradient."""

    @staticmethod
    def forward(ctx, x, layer):  # x (..., in) -> (..., out)
        ctx.layer = layer
        return F.linear(x, layer.dequantized())

    @staticmethod
    def backward(ctx, grad_out):  # (..., out) -> (..., in)
        grad_x = grad_out @ ctx.layer.dequantized() if ctx.needs_input_grad[0] else None
        return grad_x, None


def blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks whose linear layers are quantized and adapted: `model.model.layers`, or what a
    model lists itself (an encoder-decoder's `t5.T5.blocks()`)."""
    return model.blocks() if hasattr(model, "blocks") else model.model.layers


def quantize_model(model: nn.Module, compute_dtype=torch.bfloat16) -> nn.Module:
    """Swap every `nn.Linear` of the blocks (`blocks(model)`) for an `NF4Linear` and cast the other
    parameters (embedding / tied head, norms) to `compute_dtype`; `model`, changed in place."""
    swapped = 0
    for block in blocks(model):
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, NF4Linear(child, compute_dtype))
                    swapped += 1
    if swapped == 0:
        raise ValueError("nf4.quantize_model: no nn.Linear found in model.model.layers "
                         "(already quantized?)")
    for module in model.modules():
        if isinstance(module, NF4Linear):
            continue
        for p in module.parameters(recurse=False):
            p.data = p.data.to(compute_dtype)  # a tied weight is one Parameter: cast once
    return model
