"""LoRA adapters and the on-device personalization fine-tuning step (sec. 4, eq. 5 and 6).

Eq. 5, M_device = M_base + Delta W_u, with Delta W = (alpha / r) B A on every linear layer of
the decoder blocks (Hu et al. 2021, sec. 4.1; the paper: r = 16, alpha = 8):

    y = base(x) + (alpha / r) * x A^T B^T      A: (r, in) Kaiming-uniform,  B: (out, r) zeros

so an untouched adapter leaves the model unchanged. The base is an `nn.Linear` or an
`nf4.NF4Linear` (frozen either way); A and B stay in fp32 even when the base computes in bf16.
Eq. 6, Delta W_u = argmin CE(M_device | D_u + D_u^filtered), is `finetune`: cross-entropy on
the response tokens of ChatML examples, AdamW over the adapter only.

State-dict keys: a `LoRALinear` holds its base as a submodule, so after `add_lora` the frozen
weight is `...q_proj.base.weight` next to `...q_proj.lora_A` and `...q_proj.lora_B`. One
wrapper then serves both base types without copying their forward; the keys that leave the
process never contain `base.`: `save_adapter` writes only the `lora_A`/`lora_B` tensors, and
`merge` puts plain `nn.Linear` layers back, so a merged model has the checkpoint's own keys.
"""
import json
import math
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

import hub
import nf4
from errors import InputError

TARGETS = nf4.TARGETS  # q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
IGNORE = -100  # label of a token that carries no loss (prompt, padding)
MAX_GRAD_NORM = 1.0  # gradient clipping, as transformers' Trainer does by default


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B A dropout(x) (eq. 5); the base is frozen.

    x (..., in) -> y (..., out). The LoRA path runs in fp32 (x is cast to it) and is added in
    the base output's dtype, as peft does.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, (nn.Linear, nf4.NF4Linear)):
            raise TypeError(f"LoRALinear wraps nn.Linear or nf4.NF4Linear, not {type(base).__name__}")
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., r)
        return y + (F.linear(h, self.lora_B) * self.scaling).to(y.dtype)

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W + (alpha / r) B A, (out, in), in `dtype` (default the base's: the compute dtype for
        NF4). A bf16 result rounds away much of a small delta (8 bits of mantissa)."""
        if isinstance(self.base, nf4.NF4Linear):
            weight = self.base.dequantized()
        else:
            weight = self.base.weight
        delta = (self.lora_B @ self.lora_A) * self.scaling  # (out, in) fp32
        return (weight.float() + delta).to(dtype or weight.dtype)


def add_lora(model: nn.Module, r: int = 16, alpha: float = 8, dropout: float = 0.0, targets=None) -> nn.Module:
    """Wrap the `targets` linear layers (default: the model's `lora_targets`, else TARGETS) of
    every block (`nf4.blocks(model)`) in `LoRALinear` and freeze every other parameter. Returns
    `model` (changed in place)."""
    targets = targets or getattr(model, "lora_targets", TARGETS)
    model.requires_grad_(False)
    found = set()
    for block in nf4.blocks(model):
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoRALinear):
                    raise ValueError("add_lora: the model already has LoRA adapters")
                if name in targets:
                    setattr(parent, name, LoRALinear(child, r, alpha, dropout))
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


def save_adapter(model: nn.Module, path) -> None:
    """Write the adapter as safetensors, with r, alpha and targets in its metadata (atomically)."""
    settings = lora_settings(model)
    metadata = {"r": str(settings["r"]), "alpha": str(settings["alpha"]), "targets": json.dumps(settings["targets"])}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with hub.atomic(path) as tmp:
        save_file({k: v.contiguous() for k, v in adapter_state_dict(model).items()}, str(tmp), metadata=metadata)


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Load an adapter written by `save_adapter` into a model prepared with the same
    `add_lora(r, alpha, targets)`; any difference in settings, keys or shapes is an error."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if not {"r", "alpha", "targets"} <= meta.keys():
        raise InputError(f"{path}: not a cdcda adapter (metadata lacks r, alpha, targets)")
    saved = {"r": int(meta["r"]), "alpha": float(meta["alpha"]), "targets": json.loads(meta["targets"])}
    ours = lora_settings(model)
    if saved != {**ours, "alpha": float(ours["alpha"])}:
        raise InputError(f"{path}: adapter was trained with {saved}, the model has LoRA {ours}")
    own = adapter_state_dict(model)
    if own.keys() != tensors.keys():
        extra, missing = sorted(tensors.keys() - own.keys()), sorted(own.keys() - tensors.keys())
        raise InputError(f"{path}: adapter keys differ from the model's: unexpected {extra[:3]}, missing {missing[:3]}")
    for key, value in tensors.items():
        if value.shape != own[key].shape:
            raise InputError(f"{path}: {key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}")
        own[key].copy_(value)  # state_dict tensors share storage with the parameters
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer: LoRALinear -> nn.Linear with weight W + (alpha/r) B A
    (an NF4 base becomes dense, in its compute dtype). Returns `model` (changed in place)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                weight = child.merged_weight()  # (out, in)
                bias = child.base.bias
                dense = nn.Linear(child.base.in_features, child.base.out_features, bias=bias is not None,
                                  device=weight.device, dtype=weight.dtype)
                dense.weight.data.copy_(weight)
                if bias is not None:
                    dense.bias.data.copy_(bias)
                setattr(parent, name, dense.requires_grad_(False))
    return model


def fit_messages(tokenizer, messages: list[dict], budget: int) -> list[dict]:
    """The messages with the last user message's content shortened at its end, so that the
    rendered prompt (chat template + generation prompt) takes at most `budget` tokens; the
    messages themselves when they already fit.

    One rule for training (`encode_example`) and answering (the device's prompt before
    generation), so the model answers the prompt shape it was trained on. What is kept: the
    template, the system text, the content's start (LaMP's instruction comes first: "Generate a
    headline for the following article: ...", "... review: ...") and the content's trailing
    whitespace (appendix B's space before <|im_end|>); what goes: the end of the review, the
    article, the abstract. Raises ValueError when the prompt without that content is already
    over `budget`.
    """
    def length(msgs):
        return len(tokenizer.encode(tokenizer.apply_chat_template(msgs, add_generation_prompt=True)))

    over = length(messages) - budget
    if over <= 0:
        return messages
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise ValueError(f"the prompt takes {over + budget} tokens > {budget} and has no user content to shorten")
    i = users[-1]
    body = messages[i]["content"].rstrip()
    tail = messages[i]["content"][len(body):]
    ids = tokenizer.encode(body)
    keep = len(ids) - over
    while True:  # a cut can re-tokenize differently at its edge: measure again, cut again
        kept = tokenizer.decode(ids[:keep]).rstrip() if keep > 0 else ""
        fitted = messages[:i] + [{**messages[i], "content": kept + tail}] + messages[i + 1:]
        over = length(fitted) - budget
        if over <= 0:
            return fitted
        if keep <= 0:
            raise ValueError(f"the chat template and the other messages alone take {over + budget} tokens, "
                             f"more than the {budget} allowed; raise --max-length")
        keep -= over


def encode_example(tokenizer, messages: list[dict], response: str, max_length: int) -> tuple[list[int], int]:
    """One training example -> (token ids, number of prompt tokens).

    ids = chat_template(messages, add_generation_prompt=True) + response + <|im_end|>: the
    prompt is what the model sees at inference, the rest is what it must produce. Longer than
    `max_length`: the prompt gets max(max_length - response tokens, max_length // 2) tokens, its
    user content shortened at its end (`fit_messages`: template, system text and instruction
    stay), and the response gets the rest (cut at its end, losing its <|im_end|>, only when it
    alone is longer than half of max_length).
    """
    end = tokenizer.encode(tokenizer.end_of_turn)  # <|im_end|> (ChatML), </s> (T5)
    if len(end) != 1:
        raise ValueError(f"tokenizer encodes {tokenizer.end_of_turn!r} as {end}, not as one special token")
    answer = tokenizer.encode(response) + end
    messages = fit_messages(tokenizer, messages, max(max_length - len(answer), max_length // 2))
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return prompt + answer[: max_length - len(prompt)], len(prompt)


def finetune(model: nn.Module, tokenizer, examples: list[tuple[list[dict], str]], epochs: int = 2,
             lr: float = 2e-4, batch_size: int = 4, grad_accum: int = 1, max_length: int = 512,
             seed: int = 0, desc: str | None = None, loss_fn=None) -> list[float]:
    """Eq. 6: train the model's trainable (LoRA) parameters with cross-entropy on the response
    tokens of `examples` [(ChatML prompt messages, response text), ...]. Returns the mean loss of
    each epoch. `loss_fn(model, ids (B, T), labels (B, T)) -> scalar` replaces the cross-entropy
    (default `response_loss`); RKD-FT passes the reverse KL to a teacher (baselines.py).

    Batches of `batch_size` examples in a seeded shuffled order, right-padded (with a causal
    mask a real token never sees the padding after it, so no attention mask is needed); logits
    are computed only where a label is (the response), AdamW (no weight decay) steps every
    `grad_accum` batches on the mean loss, gradients clipped to norm 1. A NaN/inf loss or
    gradient, or a loss above twice the first batch's (or above 2 ln V, twice that of uniform
    guessing, if that is more) raises FloatingPointError before the optimizer steps on it, so
    no broken adapter gets saved. Seeds torch's global RNG with `seed` (LoRA dropout).

    Precision: no autocast. On an NF4 model (`nf4.quantize_model`) the base already computes in
    bf16 and the fp32 adapters cast their input, so only the LoRA matmuls (rank r) run in fp32;
    wrapping the step in torch.autocast(bf16) measured no faster on the CPU.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("finetune: the model has no trainable parameters; call lora.add_lora(model) first")
    if not examples:
        raise ValueError("finetune: no training examples")
    encoded = [encode_example(tokenizer, messages, response, max_length) for messages, response in examples]
    cut = sum(len(ids) >= max_length for ids, _ in encoded)
    if cut:
        print(f"finetune: {cut} of {len(encoded)} examples reach max_length={max_length}; "
              "user contents cut at their end (see lora.fit_messages)", file=sys.stderr)
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    torch.manual_seed(seed)  # LoRA dropout
    batches_per_epoch = math.ceil(len(encoded) / batch_size)
    was_training = model.training
    model.train()
    epoch_losses, limit = [], None
    with tqdm(total=epochs * batches_per_epoch, desc=desc or "fine-tune", unit="batch") as bar:
        for epoch in range(epochs):
            order = list(range(len(encoded)))
            rng.shuffle(order)
            total = 0.0
            for i in range(batches_per_epoch):
                batch = [encoded[j] for j in order[i * batch_size:(i + 1) * batch_size]]
                ids, labels = right_pad(batch, tokenizer.pad_token_id, device)  # (B, T) each
                loss = (loss_fn or response_loss)(model, ids, labels)
                if limit is None:  # twice the first loss, or twice that of uniform guessing
                    limit = 2 * max(loss.item(), math.log(model.config.vocab_size))
                check_loss(loss, limit, f"epoch {epoch + 1}, batch {i + 1}")
                (loss / grad_accum).backward()
                if (i + 1) % grad_accum == 0 or i + 1 == batches_per_epoch:
                    norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                    if not torch.isfinite(norm):
                        raise FloatingPointError(f"finetune: gradient norm is {norm.item()} at epoch {epoch + 1}, "
                                                 f"batch {i + 1}; lower lr={lr}")
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                total += loss.item()
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            epoch_losses.append(total / batches_per_epoch)
    model.train(was_training)
    return epoch_losses


def right_pad(batch: list[tuple[list[int], int]], pad_token_id: int, device="cpu"):
    """[(ids, n_prompt), ...] -> ids (B, T_max), labels (B, T_max): labels are the ids on the
    response tokens and IGNORE on the prompt and the padding."""
    T = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), T), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)
    for row, (tokens, n_prompt) in enumerate(batch):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        labels[row, n_prompt: len(tokens)] = torch.tensor(tokens[n_prompt:])
    return ids.to(device), labels.to(device)


def response_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions: position t predicts
    labels[t + 1]. Only those positions go through the output head (fp32 logits). An
    encoder-decoder (t5.T5) computes its own (prompt to the encoder, response to the decoder)."""
    if hasattr(model, "response_loss"):
        return model.response_loss(ids, labels)
    hidden = model.model(ids)  # (B, T, H)
    target = labels[:, 1:]  # (B, T-1)
    keep = target != IGNORE
    logits = model.lm_head(hidden[:, :-1][keep])  # (N, V), N = response tokens in the batch
    return F.cross_entropy(logits.float(), target[keep])


def check_loss(loss: torch.Tensor, limit: float, where: str) -> None:
    if not torch.isfinite(loss) or loss.item() > limit:
        raise FloatingPointError(f"finetune: loss {loss.item()} at {where} (NaN/inf or above {limit:.1f}): "
                                 "training diverged; lower the learning rate")
