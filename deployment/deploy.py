"""Deployment after personalization (paper sec. 5.5, Table 3): merge the user's LoRA into its
base, store the merged model in 4 bits, and decode with torch's fused 4-bit kernels (the paper
serves with MLC-LLM, whose q4f16_1 is group-quantized too; README, "Deployment").

1. merge: W = dequantize(NF4 base) + (alpha / r) B A (`lora.LoRALinear.merged_weight`, in fp32:
   bf16 would round away much of a small delta) for every linear layer of the decoder blocks.
2. block linears: int4 in groups of 32 along the input dimension, a bf16 scale and zero point
   per group (torch's int4 kernels' scheme). For a group w_1..w_32 of one output row:

       s = bf16((w_max - w_min) / 15)                 z = bf16(w_min + 8 s)
       q_i = clamp(round((w_i - z) / s) + 8, 0, 15)   w'_i = (q_i - 8) s + z

   (nearest codes; a constant group gets s = 0, code 8, w' = w). With calibration inputs GPTQ
   picks the codes on the same grid instead (gptq.py, `gptq_blocks`); gridtune.py tunes the
   grids afterwards. 5 bits per weight.
3. embedding and head: int8 per row, s_v = bf16(max_i |E_vi| / 127), a tied head stored once.
   Norms and biases stay bf16; compute is bf16.

Kernels: `aten._weight_int4pack_mm_for_cpu` on CPU, `aten._weight_int4pack_mm` on CUDA, each
computing x @ ((q - 8) s + z)^T from its own private packed layout; the file stores the portable
form instead, codes two to a byte (even column in the high nibble) `weight` (N, K/2) uint8, `scale`
and `zero` (N, K/32) bf16, read back from a packed layer through the kernel (`Int4Linear.codes`).
"""
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import hub
import lora
import nf4
import qwen2
from errors import InputError

GROUP_SIZE = 32
DTYPE = torch.bfloat16  # scales, zero points, norms, biases and compute
FILE = "deployed.safetensors"
FORMAT = "cdcda-deployed-int4"


# ---------------------------------------------------------------- int4 groups (the block linears)
def grid(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> the min-max grid of each group, (scale bf16 (N, K/g), zero bf16 (N, K/g));
    K must be a multiple of `group_size`."""
    N, K = weight.shape
    if K % group_size:
        raise ValueError(f"deploy.quantize: in_features {K} is not a multiple of the group size {group_size}")
    w = weight.detach().float().reshape(N, K // group_size, group_size)  # (N, G, g)
    if not torch.isfinite(w).all():
        raise ValueError(f"deploy.quantize: weight of shape {(N, K)} has NaN or inf values")
    lo, hi = w.amin(dim=2), w.amax(dim=2)  # (N, G)
    scale = ((hi - lo) / 15).to(DTYPE)  # 0 for a constant group: every code 8, w' = z = w
    return scale, (lo + 8 * scale.float()).to(DTYPE)


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Nearest code 0..15 of w on the grid (q - 8) s + z (a zero scale gives code 8)."""
    step = torch.where(scale == 0, 1.0, scale)
    return (torch.round((w - zero) / step) + 8).clamp(0, 15)


def quantize(weight: torch.Tensor, group_size: int = GROUP_SIZE):
    """(N, K) float -> (codes uint8 (N, K) in 0..15, scale, zero), the module docstring's scheme:
    each weight's nearest code on its group's grid (GPTQ's codes: gptq.quantize_layer)."""
    scale, zero = grid(weight, group_size)
    N, K = weight.shape
    w = weight.detach().float().reshape(N, K // group_size, group_size)
    codes = round_to_grid(w, scale.float()[..., None], zero.float()[..., None])
    return codes.to(torch.uint8).reshape(N, K), scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(q - 8) s + z in fp32: codes (N, K), scale and zero (N, K/g) -> (N, K). The reference
    every kernel result is held against."""
    g = codes.shape[1] // scale.shape[1]
    return ((codes.float() - 8) * scale.float().repeat_interleave(g, 1)
            + zero.float().repeat_interleave(g, 1))


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes (N, K) 0..15 -> bytes (N, K/2): column 2j in the high nibble, 2j+1 in the low one."""
    return (codes[:, 0::2] << 4) | codes[:, 1::2]


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack`: (N, K/2) uint8 -> (N, K) uint8."""
    return torch.stack((packed >> 4, packed & 15), dim=2).reshape(packed.shape[0], -1)


def inner_k_tiles(K: int) -> int:
    """The kernels' K tiling: 8, 4 or 2 tiles of 16, the largest that divides K."""
    return next(t for t in (8, 4, 2) if K % (16 * t) == 0)


class Int4Linear(nn.Module):
    """Swap-in for `nn.Linear` with int4 group weights: y = x W'^T + b, W' = (q - 8) s + z.

    Buffers: `weight` (the kernel's packed layout for this device), `scales_and_zeros`
    (K/g, N, 2) bf16, `bias` (N,) bf16 or absent. Built from the portable form (module
    docstring) by `from_portable`; `portable()` gives it back. Input is cast to bf16 and the
    output back to the input's dtype."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias=None):
        super().__init__()
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.group_size = self.in_features // scale.shape[1]
        if self.out_features % 16:
            raise ValueError(f"Int4Linear: out_features {self.out_features} is not a multiple of 16 (the kernels' tile)")
        codes = unpack(packed)  # on the device the layer runs on
        if packed.is_cuda:
            weight = torch.ops.aten._convert_weight_to_int4pack(pack(codes), inner_k_tiles(self.in_features))
        else:
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), inner_k_tiles(self.in_features))
        self.register_buffer("weight", weight)
        sz = torch.stack((scale, zero), dim=2).transpose(0, 1).contiguous()  # (K/g, N, 2)
        self.register_buffer("scales_and_zeros", sz.to(DTYPE))
        self.register_buffer("bias", None if bias is None else bias.to(DTYPE))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # (M, K) bf16 -> (M, N) bf16
        if self.weight.is_cuda:
            return torch.ops.aten._weight_int4pack_mm(x, self.weight, self.group_size, self.scales_and_zeros)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, self.scales_and_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        y = self.matmul(x.reshape(-1, self.in_features).to(DTYPE).contiguous())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def codes(self) -> torch.Tensor:
        """The codes (N, K) uint8, read back through the kernel: with every scale 1 and zero 8,
        W' = q, and the identity as input gives I q^T = q^T; integers up to 15 (one term per
        sum) are exact in bf16."""
        unit = torch.ones_like(self.scales_and_zeros)
        unit[..., 1] = 8
        eye = torch.eye(self.in_features, dtype=DTYPE, device=self.weight.device)
        saved, self.scales_and_zeros = self.scales_and_zeros, unit
        try:
            return self.matmul(eye).t().round().to(torch.uint8)  # (N, K)
        finally:
            self.scales_and_zeros = saved

    def portable(self) -> dict:
        """{"weight": (N, K/2) uint8, "scale", "zero": (N, K/g) bf16[, "bias"]}, on the CPU."""
        sz = self.scales_and_zeros.transpose(0, 1).cpu()  # (N, K/g, 2)
        out = {"weight": pack(self.codes()).cpu(), "scale": sz[..., 0].contiguous(), "zero": sz[..., 1].contiguous()}
        if self.bias is not None:
            out["bias"] = self.bias.cpu()
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


# ---------------------------------------------------------------- int8 rows (embedding, head)
def quantize_rows(weight: torch.Tensor):
    """(V, H) float -> (codes int8 (V, H), scale bf16 (V,)), symmetric per row (module docstring)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1).clamp(min=1e-6) / 127).to(DTYPE)  # (V,)
    codes = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale


class Int8Embedding(nn.Module):
    """Swap-in for `nn.Embedding`: row v is weight[v] * scale[v], in bf16."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)  # (V, H) int8
        self.register_buffer("scale", scale)  # (V,) bf16

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, H) bf16
        return self.weight[ids].to(DTYPE) * self.scale[ids][..., None]


class Int8Linear(nn.Module):
    """Swap-in for the output head: logits = x (q s)^T, through `aten._weight_int8pack_mm` on
    CPU (x bf16 (M, H), q int8 (V, H), s bf16 (V,)); dequantized before `F.linear` on CUDA.
    A tied head holds the embedding's own tensors."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)  # (V, H) int8
        self.register_buffer("scale", scale)  # (V,) bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., V)
        x2 = x.reshape(-1, x.shape[-1]).to(DTYPE).contiguous()
        if self.weight.is_cuda:
            y = F.linear(x2, self.weight.to(DTYPE) * self.scale[:, None])
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scale)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


# ---------------------------------------------------------------- the model
def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight a block linear computes with: LoRA merged (eq. 5) in fp32 (merged in
    bf16, the user's delta would be partly rounded away before quantization), NF4 dequantized."""
    if isinstance(layer, lora.LoRALinear):
        return layer.merged_weight(torch.float32)
    if isinstance(layer, nf4.NF4Linear):
        return layer.dequantized()
    return layer.weight


def block_linears(model: nn.Module):
    """(parent module, attribute name, layer) for every linear layer of the decoder blocks."""
    return [found for block in model.model.layers for found in linears(block)]


def linears(block: nn.Module):
    """(parent module, attribute name, layer) for every linear layer of one decoder block."""
    kinds = (nn.Linear, nf4.NF4Linear, lora.LoRALinear, Int4Linear)
    return [(parent, name, child) for parent in list(block.modules()) for name, child in list(parent.named_children())
            if isinstance(child, kinds) and not isinstance(parent, lora.LoRALinear)]  # a LoRA's base: once


def portable_state(model: nn.Module, group_size: int = GROUP_SIZE, rounded: dict | None = None) -> dict:
    """The deployed model's tensors in the file's form, from a dense, NF4 or NF4 + LoRA model
    (quantized here: nearest codes, or those in `rounded`, id(layer) -> (codes, scale, zero, ...),
    as `gptq.gptq_blocks` gives them) or a deployed one (read back). Keys are the checkpoint's
    (`...q_proj.weight`, `.scale`, `.zero`, `.bias`; `model.embed_tokens.weight`, `.scale`;
    `lm_head.*` only when not tied; the norms)."""
    state, names = {}, {id(m): n for n, m in model.named_modules()}
    for _, _, layer in block_linears(model):
        key = names[id(layer)]
        if isinstance(layer, Int4Linear):
            tensors = layer.portable()
        else:
            codes, scale, zero = rounded[id(layer)][:3] if rounded else quantize(dense_weight(layer), group_size)
            bias = layer.base.bias if isinstance(layer, lora.LoRALinear) else layer.bias
            tensors = {"weight": pack(codes), "scale": scale, "zero": zero}
            if bias is not None:
                tensors["bias"] = bias.detach().to(DTYPE)
        state |= {f"{key}.{k}": v.cpu().contiguous() for k, v in tensors.items()}
    heads = [("model.embed_tokens", model.model.embed_tokens)]
    if not model.config.tie_word_embeddings:
        heads.append(("lm_head", model.lm_head))
    for key, module in heads:
        if isinstance(module, (Int8Embedding, Int8Linear)):
            codes, scale = module.weight, module.scale
        else:
            codes, scale = quantize_rows(module.weight)
        state |= {f"{key}.weight": codes.cpu().contiguous(), f"{key}.scale": scale.cpu().contiguous()}
    for i, block in enumerate(model.model.layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"model.layers.{i}.{norm}.weight"] = getattr(block, norm).weight.detach().to(DTYPE).cpu()
    state["model.norm.weight"] = model.model.norm.weight.detach().to(DTYPE).cpu()
    return state


def from_portable(config: qwen2.Config, state: dict, device="cpu", where: str = "deployed model") -> qwen2.Qwen2:
    """The deployed `Qwen2` (Int4Linear block linears, int8 embedding and head, bf16 norms) built
    from `portable_state`'s tensors; a missing or unexpected key is an error naming it."""
    with torch.device("meta"):
        model = qwen2.Qwen2(config)
    state, used = dict(state), set()

    def take(key):
        if key not in state:
            raise InputError(f"{where}: missing key {key!r}")
        used.add(key)
        return state[key].to(device)

    names = {id(m): n for n, m in model.named_modules()}
    for parent, name, layer in block_linears(model):
        key = names[id(layer)]
        bias = take(f"{key}.bias") if layer.bias is not None else None
        setattr(parent, name, Int4Linear(take(f"{key}.weight"), take(f"{key}.scale"), take(f"{key}.zero"), bias))
    embed = Int8Embedding(take("model.embed_tokens.weight"), take("model.embed_tokens.scale"))
    model.model.embed_tokens = embed
    model.lm_head = (Int8Linear(embed.weight, embed.scale) if config.tie_word_embeddings
                     else Int8Linear(take("lm_head.weight"), take("lm_head.scale")))
    for key, p in list(model.named_parameters()):  # the norms: the only parameters left
        module_name, attr = key.rsplit(".", 1)
        setattr(model.get_submodule(module_name), attr, nn.Parameter(take(key).to(DTYPE), requires_grad=False))
    extra = sorted(set(state) - used)
    if extra:
        raise InputError(f"{where}: unexpected key {extra[0]!r}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    return model.eval()


def deploy(model: nn.Module, group_size: int = GROUP_SIZE, device=None, rounded: dict | None = None) -> qwen2.Qwen2:
    """Step 1-3 of the module docstring on a dense, NF4 or NF4 + LoRA model: a new deployed
    model on `device` (default: the model's), with the codes of `rounded` where given (GPTQ's).
    The input model is left as it was."""
    device = device or model.model.norm.weight.device
    return from_portable(model.config, portable_state(model, group_size, rounded), device)


def stored_bytes(model: nn.Module) -> dict:
    """Bytes a deployed model's file holds, by kind, from its buffers' shapes (the packed
    kernel layout has the codes' size only on CPU): int4 codes (N K / 2), their scales and
    zeros (2 bytes each per group), the int8 embedding / head with row scales (a tied head
    once), the rest (norms, biases)."""
    parts = {"int4 codes": 0, "int4 scales+zeros": 0, "int8 embedding/head": 0, "rest": 0}
    seen = set()
    for module in model.modules():
        if isinstance(module, Int4Linear):
            parts["int4 codes"] += module.out_features * module.in_features // 2
            parts["int4 scales+zeros"] += module.scales_and_zeros.numel() * 2
            parts["rest"] += 0 if module.bias is None else module.bias.numel() * 2
        elif isinstance(module, (Int8Embedding, Int8Linear)) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            parts["int8 embedding/head"] += module.weight.numel() + module.scale.numel() * 2
    parts["rest"] += sum(p.numel() * p.element_size() for p in model.parameters())  # the norms
    return parts


def save(model: nn.Module, tokenizer, directory, group_size: int = GROUP_SIZE) -> Path:
    """Write a deployed directory: config.json, tokenizer files and `deployed.safetensors` (the
    portable state, its scheme in the metadata), atomically. Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = portable_state(model, group_size)
    codes, scale = state["model.layers.0.self_attn.q_proj.weight"], state["model.layers.0.self_attn.q_proj.scale"]
    group = codes.shape[1] * 2 // scale.shape[1]  # a deployed model keeps its own group size
    hub.write_atomic(directory / "config.json", json.dumps(model.config.to_dict(), indent=2))
    tokenizer.save(directory)
    meta = {"format": FORMAT, "group_size": str(group),
            "scheme": "block linears int4 asymmetric (q-8)*scale+zero, bf16 scale and zero per group; "
                      "embedding/head int8 per row, bf16 scale"}
    with hub.atomic(directory / FILE) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return directory


def read_state(directory) -> tuple[qwen2.Config, dict, Path]:
    """(config, portable state, the file's path) of a directory written by `save`: the file's
    tensors as stored (`from_portable` checks their keys)."""
    directory = Path(directory)
    path = directory / FILE
    if not path.is_file():
        raise InputError(f"{directory}: no {FILE} (write one with deploy.save)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != FORMAT:
        raise InputError(f"{path}: not a cdcda deployed model (metadata format {meta.get('format')!r})")
    return qwen2.Config.from_json(directory), state, path


def load(directory, device="cpu"):
    """(deployed model, tokenizer) from a directory written by `save`."""
    config, state, path = read_state(directory)
    return from_portable(config, state, device, str(path)), qwen2.Tokenizer.from_dir(directory)
