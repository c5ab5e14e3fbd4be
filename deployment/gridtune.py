"""Tuning a deployed model's int4 grids end to end (the last step of deployment, after GPTQ).

Each block linear is stored as codes q and, per group of 32 weights, a scale s and a zero point
z: w' = (q - 8) s + z (deploy.py). With the codes fixed, the weights are a differentiable
function of s and z, a small set of numbers (2 per 32 weights). This step keeps the codes and
moves s and z so that the deployed model predicts what the personalized model it came from
predicts, on the calibration sequences (the pairs the adapter was trained on):

    loss = mean over positions t of KL(p_teacher(. | x_<t) || p_deployed(. | x_<t))

the teacher being the NF4 + LoRA model (evaluated with no gradient at each step), the student
the deployed model computed in fp32 from its codes, with

    s = s0 exp(a),   z = z0 + s0 b,   a = b = 0 at the start,

a and b (one each per group) the only trained parameters, Adam, one sequence per step; then s
and z are rounded back to bf16. Scales tuned with the codes fixed are EfficientQAT's "E2E-QP"
(Chen et al., 2024) and PEQA (Kim et al., 2023); here the target is the personalized model's
distribution, not new labels, so the step only undoes quantization error. The embedding and
head (int8), the norms and the biases stay as they are.
"""
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import qwen2
from deployment import deploy

EPOCHS = 3
LR = 1e-3


class GridLinear(nn.Module):
    """y = x W^T + b with W = (q - 8) s0 e^a + z0 + s0 b per group; q, s0, z0 from a deployed
    layer's portable tensors; a and b (N, K/g) trained."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias=None):
        super().__init__()
        self.group_size = packed.shape[1] * 2 // scale.shape[1]
        self.register_buffer("centred", deploy.unpack(packed).float() - 8)  # (N, K)
        self.register_buffer("s0", scale.float())  # (N, K/g)
        self.register_buffer("z0", zero.float())
        self.register_buffer("bias", None if bias is None else bias.float())
        self.a = nn.Parameter(torch.zeros_like(self.s0))
        self.b = nn.Parameter(torch.zeros_like(self.s0))

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero), each (N, K/g) fp32."""
        return self.s0 * torch.exp(self.a), self.z0 + self.s0 * self.b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, z = self.grid()
        weight = self.centred * s.repeat_interleave(self.group_size, 1) + z.repeat_interleave(self.group_size, 1)
        return F.linear(x, weight, self.bias)


def student(config: qwen2.Config, state: dict, device) -> qwen2.Qwen2:
    """The deployed model in fp32 from its portable state: GridLinear block linears, the int8
    embedding / head dequantized, everything but the grids frozen."""
    model = qwen2.Qwen2(config)
    names = {id(m): n for n, m in model.named_modules()}
    for parent, name, layer in deploy.block_linears(model):
        key = names[id(layer)]
        setattr(parent, name, GridLinear(state[f"{key}.weight"], state[f"{key}.scale"], state[f"{key}.zero"],
                                         state.get(f"{key}.bias")))
    heads = [("model.embed_tokens", model.model.embed_tokens)]
    if not config.tie_word_embeddings:
        heads.append(("lm_head", model.lm_head))
    for key, module in heads:
        module.weight.data = state[f"{key}.weight"].float() * state[f"{key}.scale"].float()[:, None]
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for key, p in model.named_parameters():
        if key.endswith("norm.weight"):
            p.data = state[key].float()
    model = model.to(device)
    for key, p in model.named_parameters():
        p.requires_grad_(key.endswith((".a", ".b")))
    return model


def tune(teacher: nn.Module, state: dict, calibration, epochs: int = EPOCHS, lr: float = LR, seed: int = 0) -> dict:
    """The portable state (deploy.portable_state) with every block linear's scale and zero
    tuned as the module docstring says, on `calibration` (token id sequences); the codes and
    everything else as they were. Returns a new dict; the progress bar shows each epoch's mean KL."""
    if not calibration:
        raise ValueError("gridtune.tune: no calibration sequences to tune on")
    device = teacher.model.norm.weight.device
    model = student(teacher.config, state, device)
    grids = [m for m in model.modules() if isinstance(m, GridLinear)]
    optimizer = torch.optim.Adam([p for m in grids for p in (m.a, m.b)], lr=lr)
    order = torch.Generator().manual_seed(seed)
    with tqdm(total=epochs * len(calibration), desc="deploy: tune grids", unit="seq") as bar:
        for epoch in range(epochs):
            total = 0.0
            for i in torch.randperm(len(calibration), generator=order).tolist():
                ids = torch.tensor([calibration[i]], device=device)
                with torch.no_grad():
                    target = F.log_softmax(teacher(ids).float(), dim=-1)  # (1, T, V)
                log_p = F.log_softmax(model(ids), dim=-1)
                loss = F.kl_div(log_p, target, log_target=True, reduction="none").sum(-1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item()
                bar.update()
            bar.set_postfix(kl=f"{total / len(calibration):.4f}")
    tuned = dict(state)
    names = {id(m): n for n, m in model.named_modules()}
    with torch.no_grad():
        for m in grids:
            s, z = m.grid()
            tuned[f"{names[id(m)]}.scale"] = s.to(deploy.DTYPE).cpu()
            tuned[f"{names[id(m)]}.zero"] = z.to(deploy.DTYPE).cpu()
    return tuned
