"""How much of llama.cpp's distance from a deployed model is its own arithmetic?

    .venv/bin/python bench/llama_roundings.py --deployed DIR [--llama-python .venv-llama/bin/python]

`deployment/llama_check.py` holds llama.cpp's log-probabilities against the deployed weights in
fp32. llama.cpp does not compute in fp32: a Q4_1 / Q8_0 matmul first rounds its input to 8-bit
blocks of 32 (scale amax / 127, kept in fp16), and the attention's queries, keys and values are
fp16 (here rounded before the rotary embedding, llama.cpp's keys after it: an approximation).
This script emulates those roundings in the fp32 reference, step by step, with hooks on its
linear layers, and prints llama.cpp's agreement with each: if the emulated reference comes closer,
the gap is llama.cpp's arithmetic, not the file. Prints only (the GGUF goes to runs/llama-roundings).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import qwen2  # noqa: E402
from deployment import deploy, gguf_export, llama_check  # noqa: E402


def q8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x rounded as llama.cpp rounds a matmul's input: blocks of 32 along the last dimension,
    scale d = amax / 127 stored in fp16, codes round(x / d) in [-127, 127]."""
    if x.shape[-1] % gguf_export.BLOCK:
        raise ValueError(f"a matmul input of width {x.shape[-1]}: not blocks of {gguf_export.BLOCK}")
    blocks = x.reshape(-1, gguf_export.BLOCK)
    d = (blocks.abs().amax(-1, keepdim=True) / 127).half().float()
    codes = torch.where(d > 0, torch.round(blocks / torch.where(d > 0, d, 1)), 0).clamp(-127, 127)
    return (codes * d).reshape(x.shape)


def emulated(deployed: Path, activations: bool, qkv_fp16: bool) -> qwen2.Qwen2:
    """The fp32 reference with the chosen roundings hooked in."""
    model = llama_check.reference(deployed)
    for module in model.modules():
        if activations and isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda m, args: (q8_blocks(args[0]),))
        if qkv_fp16 and isinstance(module, qwen2.Attention):
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(module, name).register_forward_hook(lambda m, args, out: out.half().float())
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--deployed", required=True, help="a deployed model's directory (deploy.save's)")
    p.add_argument("--llama-python", default=".venv-llama/bin/python", help="make llama-check's venv")
    p.add_argument("--prompts", type=int, default=4)
    args = p.parse_args()
    deployed, out = Path(args.deployed), Path("runs/llama-roundings")
    out.mkdir(parents=True, exist_ok=True)
    _, tokenizer = deploy.load(deployed)
    gguf = gguf_export.export(deployed, tokenizer, out / "model.gguf")
    asked = llama_check.prompts(data.get_task("lamp7"), tokenizer, deployed, args.prompts)
    _, theirs = llama_check.run_llama(args.llama_python, gguf, asked, 8, tokenizer.eos_token_ids, out)
    print("| llama.cpp against | top-1 agreement | max abs dlogp | mean abs dlogp |\n|---|---|---|---|")
    for name, flags in (("fp32 reference", (False, False)), ("+ 8-bit inputs to matmuls", (True, False)),
                        ("+ fp16 q, k, v", (True, True))):
        model = emulated(deployed, *flags)
        with torch.inference_mode():
            rows = [llama_check.compare(theirs[i], model(torch.tensor([a["ids"]]))[0].float().log_softmax(-1).numpy(),
                                  a["ids"]) for i, a in enumerate(asked)]
        s = llama_check.summary(rows)
        print(f"| {name} | {s['top1_agree']:.4f} | {s['max_abs_dlogp']:.4f} | {s['mean_abs_dlogp']:.5f} |")


if __name__ == "__main__":
    main()
