"""LoRA adapters: eq. 5 of the paper, M_device = M_base + Delta W_u (sec. 4), on every linear
layer of the blocks (Hu et al. 2021, sec. 4.1; the paper: r = 16, alpha = 8):

    y = base(x) + (alpha / r) * x A^T B^T      A: (r, in) Kaiming-uniform,  B: (out, r) zeros

so an untouched adapter leaves the model unchanged. The base, an `nn.Linear` or `nf4.NF4Linear`,
is frozen and held as a submodule (`...q_proj.base.weight` beside `lora_A`, `lora_B`), so one
wrapper serves both; A and B stay fp32. `save_adapter` / `load_adapter` write and read only A and
B, in PEFT's layout; `merge` puts plain `nn.Linear` layers back with the checkpoint's own keys.
Training (eq. 6) is train.py."""
import json
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import hub
import nf4
from errors import InputError

TARGETS = nf4.TARGETS  # q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
PEFT_PREFIX = "base_model.model."  # PEFT's names: PEFT_PREFIX + our module's name + ".weight"
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # an adapter directory's files
PEFT_ONLY = ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern")  # peft options we lack


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B A dropout(x) (eq. 5), x (..., in) -> y (..., out); the base
    frozen, the LoRA path in fp32 and added in the base output's dtype, as peft does."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, generator=None):
        super().__init__()
        if not isinstance(base, (nn.Linear, nf4.NF4Linear)):
            raise TypeError(f"LoRALinear wraps nn.Linear or nf4.NF4Linear, not "
                            f"{type(base).__name__}")
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        device = base.weight.device
        # (r, in), as nn.Linear initialises its weight
        A = nn.init.kaiming_uniform_(torch.empty(r, base.in_features), a=math.sqrt(5),
                                     generator=generator)
        self.lora_A = nn.Parameter(A.to(device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))  # (out, r)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., r)
        return y + (F.linear(h, self.lora_B) * self.scaling).to(y.dtype)

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W + (alpha / r) B A (out, in) in `dtype` (default the base's); bf16 would round away a
        small delta."""
        if isinstance(self.base, nf4.NF4Linear):
            weight = self.base.dequantized()
        else:
            weight = self.base.weight
        delta = (self.lora_B @ self.lora_A) * self.scaling  # (out, in) fp32
        return (weight.float() + delta).to(dtype or weight.dtype)


def add_lora(model: nn.Module, r: int = 16, alpha: float = 8, dropout: float = 0.0, targets=None,
             seed: int | None = None) -> nn.Module:
    """Wrap the `targets` linear layers (default: the model's `lora_targets`, else TARGETS) of every
    block (`nf4.blocks`) in `LoRALinear`, freeze everything else; `model`, changed in place. seed:
    the A matrices drawn from a generator of their own (the same adapter whatever drew from torch's
    global generator before, on any device); None: from the global one."""
    targets = targets or getattr(model, "lora_targets", TARGETS)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    model.requires_grad_(False)
    found = set()
    for block in nf4.blocks(model):
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoRALinear):
                    raise ValueError("add_lora: the model already has LoRA adapters")
                if name in targets:
                    setattr(parent, name, LoRALinear(child, r, alpha, dropout, generator))
                    found.add(name)
    missing = set(targets) - found
    if missing:
        raise ValueError(f"add_lora: targets {sorted(missing)} match no layer of nf4.blocks(model)")
    return model


def lora_settings(model: nn.Module) -> dict:
    """{"r", "alpha", "targets"} of the model's adapters (one setting for all of them)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise ValueError("the model has no LoRA adapters: call lora.add_lora(model) first")
    ranks = {(m.r, m.alpha) for m in layers.values()}
    if len(ranks) > 1:
        raise ValueError(f"the model's adapters mix (r, alpha) settings {sorted(ranks)}")
    (r, alpha), = ranks
    return {"r": r, "alpha": alpha, "targets": sorted({name.rsplit(".", 1)[-1] for name in layers})}


def adapter_state_dict(model: nn.Module) -> dict:
    """Only the adapter: {"model.layers.0.self_attn.q_proj.lora_A": (r, in), ...}."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def save_adapter(model: nn.Module, directory, base_model: str | None = None) -> Path:
    """The adapter in PEFT's layout, which peft, vLLM and llama.cpp read (atomically):
    DIRECTORY/adapter_config.json and adapter_model.safetensors, A and B under PEFT's names.
    base_model: the directory or hub id of the model the adapter goes on (M_base)."""
    s, directory = lora_settings(model), Path(directory)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": s["r"], "lora_alpha": s["alpha"],
              "lora_dropout": 0.0, "target_modules": s["targets"], "bias": "none",
              "fan_in_fan_out": False, "base_model_name_or_path": base_model}
    tensors = {PEFT_PREFIX + k + ".weight": v.contiguous()
               for k, v in adapter_state_dict(model).items()}
    with hub.atomic(directory) as tmp:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=1))
        shutil.rmtree(directory, ignore_errors=True)  # os.replace cannot replace a full directory
    return directory


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """A PEFT adapter directory (`save_adapter`'s, or peft's own) into a model with `add_lora`
    adapters of the same r, alpha and targets (else an InputError naming the file)."""
    config, weights = Path(directory, CONFIG), Path(directory, WEIGHTS)
    try:
        c = json.loads(config.read_text())
        saved = {"r": c["r"], "alpha": float(c["lora_alpha"]),
                 "targets": sorted(c["target_modules"]), **{k: c[k] for k in PEFT_ONLY if c.get(k)}}
        tensors = {k.removeprefix(PEFT_PREFIX).removesuffix(".weight"): v
                   for k, v in load_file(weights).items()}
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise InputError(f"{directory}: not a PEFT LoRA adapter ({type(e).__name__}: {e})") from e
    s, own = lora_settings(model), adapter_state_dict(model)
    if saved != {**s, "alpha": float(s["alpha"])}:
        raise InputError(f"{config}: the adapter has {saved}, the model has LoRA {s}")
    wrong = sorted(tensors.keys() ^ own.keys())
    wrong = wrong or [k for k in own if tensors[k].shape != own[k].shape]
    if wrong:
        raise InputError(f"{weights}: tensors differ from the model's adapters in {wrong[:3]}")
    for key, value in tensors.items():
        own[key].copy_(value)  # state_dict tensors share storage with the parameters
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer: nn.Linear with W + (alpha/r) B A (dense, in the compute
    dtype)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                weight = child.merged_weight()  # (out, in)
                bias = child.base.bias
                dense = nn.Linear(child.base.in_features, child.base.out_features,
                                  bias=bias is not None,
                                  device=weight.device, dtype=weight.dtype)
                dense.weight.data.copy_(weight)
                if bias is not None:
                    dense.bias.data.copy_(bias)
                setattr(parent, name, dense.requires_grad_(False))
    return model
