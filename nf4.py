"""4-bit NormalFloat (NF4) weights for the on-device model (sec. 5.1: "NF4 data type, bfloat16
for computation"; QLoRA, Dettmers et al. 2023).

A weight matrix is cut into blocks of 64 consecutive values (row-major). Each block is scaled
by its absolute maximum into [-1, 1] and every value is replaced by the index (0..15) of the
nearest of the 16 NF4 values; two indices share one byte, the first in the high nibble. Stored
cost: 4 bits per weight plus one fp32 absmax per block (0.5 + 4/64 = 0.5625 bytes per weight),
or with double quantization of the absmax values 0.5 + 1/64 + 4/(64*256) ~ 0.516 bytes.
The packed bytes and absmax values are the same as bitsandbytes' `quantize_4bit(w,
blocksize=64, quant_type="nf4")` (tests/test_nf4.py holds them against it).

`NF4Linear` swaps in for an `nn.Linear`: it keeps the packed codes and absmax values as
buffers and dequantizes to the compute dtype right before the matmul, again in the backward
pass instead of keeping a dense copy for it. `quantize_model` swaps the linear layers of the
decoder blocks (q, k, v, o, gate, up, down) and casts the rest of the model to the compute dtype.
NF4 saves memory, not time: the weights are dequantized before every matmul (speeds: RESULTS.md).

The token embedding (and the output head, tied to it in SmolLM2 and Qwen2.5-0.5B) is NOT
quantized; it stays in the compute dtype (bf16), as in QLoRA/bitsandbytes, where only
`nn.Linear` layers of the blocks become 4-bit and the head is skipped. The paper's 0.42 GB for
Qwen2.5-0.5B points the same way: NF4 codes of the block linears plus the bf16 embedding,
without the absmax values, as transformers' `get_memory_footprint` counts (the sizes, as
bench/bench_adapt.py measures them, are in RESULTS.md).
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
    (ceil(n/block_size),)).

    Values are taken in row-major order; the last block may be short (its absmax is over the
    values it has), and an odd n gets one padding zero (code 7) in the last byte's low nibble,
    as bitsandbytes does.
    """
    flat = weight.detach().reshape(-1).float()  # (n,)
    n = flat.numel()
    if not torch.isfinite(flat).all():
        raise ValueError(f"nf4.quantize: weight of shape {tuple(weight.shape)} has NaN or inf values")
    blocks = math.ceil(n / block_size)
    padded = F.pad(flat, (0, blocks * block_size - n)).view(blocks, block_size)  # zeros keep absmax
    absmax = padded.abs().amax(dim=1)  # (blocks,)
    scaled = padded * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)  # (blocks, block_size) in [-1, 1]
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


def double_quantize(absmax: torch.Tensor, block_size: int = 256):
    """Double quantization (QLoRA sec. 3): the fp32 absmax values, minus their mean, in 8 bits.

    Symmetric linear int8 per block of 256: code = round(c / scale * 127) with c = absmax - mean
    and scale = max |c| over the block. Returns (codes int8 (m,), scales fp32 (ceil(m/256),),
    offset fp32 ()). Round-trip bound: |absmax' - absmax| <= scale / 254 (half a step) plus fp32
    rounding. (bitsandbytes uses its non-linear "dynamic" 8-bit map here instead; the stored
    size, 1 byte per block of 64 weights, is the same.)
    """
    offset = absmax.mean()
    centered = absmax - offset  # (m,)
    m = centered.numel()
    blocks = math.ceil(m / block_size)
    padded = F.pad(centered, (0, blocks * block_size - m)).view(blocks, block_size)
    scales = padded.abs().amax(dim=1)  # (blocks,)
    codes = torch.round(padded / scales.clamp(min=1e-38).unsqueeze(1) * 127).to(torch.int8)
    return codes.view(-1)[:m], scales, offset


def double_dequantize(codes: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor, block_size: int = 256):
    """Inverse of `double_quantize`: fp32 absmax values (m,)."""
    m = codes.numel()
    padded = F.pad(codes.float(), (0, scales.numel() * block_size - m)).view(-1, block_size)
    return (padded * (scales / 127).unsqueeze(1)).view(-1)[:m] + offset


class NF4Linear(nn.Module):
    """Swap-in for `nn.Linear` with NF4 weights: y = x W^T + b, W dequantized to `compute_dtype`.

    Buffers: `weight` (packed codes, uint8 (out*in/2,)) and `absmax` (fp32 (out*in/64,)); with
    `double_quant` the absmax values are stored as `absmax_code` (int8), `absmax_scale` and
    `absmax_offset` (fp32) instead. `bias` (if any) is a frozen parameter in `compute_dtype`.
    The input is cast to `compute_dtype` and the output back to the input's dtype.
    """

    def __init__(self, linear: nn.Linear, compute_dtype=torch.bfloat16, double_quant: bool = False, block_size=64):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype, self.block_size = compute_dtype, block_size
        packed, absmax = quantize(linear.weight, block_size)
        self.register_buffer("weight", packed)
        if double_quant:
            code, scale, offset = double_quantize(absmax)
            self.register_buffer("absmax_code", code)
            self.register_buffer("absmax_scale", scale)
            self.register_buffer("absmax_offset", offset)
        else:
            self.register_buffer("absmax", absmax)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        """The dense weight (out, in) in `compute_dtype`."""
        if hasattr(self, "absmax_code"):
            absmax = double_dequantize(self.absmax_code, self.absmax_scale, self.absmax_offset)
        else:
            absmax = self.absmax
        shape = (self.out_features, self.in_features)
        return dequantize(self.weight, absmax, shape, self.block_size, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        y = _DequantizedMatmul.apply(x.to(self.compute_dtype), self)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        dq = ", double_quant" if hasattr(self, "absmax_code") else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, compute_dtype={self.compute_dtype}{dq}"


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


def quantize_model(model: nn.Module, compute_dtype=torch.bfloat16, double_quant: bool = False) -> nn.Module:
    """Swap every `nn.Linear` of the decoder blocks (`blocks(model)`) for an `NF4Linear`
    and cast the remaining parameters (embedding / tied head, norms) to `compute_dtype`.
    Buffers such as rotary frequencies keep their dtype. Returns `model` (changed in place)."""
    swapped = 0
    for block in blocks(model):
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, NF4Linear(child, compute_dtype, double_quant))
                    swapped += 1
    if swapped == 0:
        raise ValueError("nf4.quantize_model: no nn.Linear found in model.model.layers (already quantized?)")
    for module in model.modules():
        if isinstance(module, NF4Linear):
            continue
        for p in module.parameters(recurse=False):
            p.data = p.data.to(compute_dtype)  # a tied weight is one Parameter: cast once
    return model
