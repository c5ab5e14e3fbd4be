"""Table 3 (paper sec. 5.5): stored size, time to first token and decoding speed of the cloud
model and the personalized device model, measured on this machine.

    python efficiency.py [--cloud-model M] [--device-model M] [--out DIR]

The device model is as the pipeline deploys it here: NF4 block linears with bf16 compute and
an fp32 LoRA adapter (r = 16) on every block linear; the embedding (tied head) and norms stay
bf16. The cloud model runs in fp32, as the pipeline runs it. Neither size nor speed depends
on the weights' values, so random checkpoints of the paper's shapes time the paper's models.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import generate
import lora
import nf4
import options
import qwen2
import report
from errors import InputError


def stored_bytes(model) -> dict:
    """Bytes of the model's state dict (a tied weight once), split by kind: NF4 codes, NF4
    absmax (fp32, one per 64 weights), LoRA adapter, everything else (dense weights, norms)."""
    parts, seen = {"nf4 codes": 0, "nf4 absmax": 0, "lora": 0, "dense": 0}, set()
    nf4_keys = {f"{name}.{buffer}" for name, m in model.named_modules() if isinstance(m, nf4.NF4Linear)
                for buffer in ("weight", "absmax")}
    for key, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        kind = ("lora" if key.endswith((".lora_A", ".lora_B")) else "dense" if key not in nf4_keys
                else "nf4 absmax" if key.endswith("absmax") else "nf4 codes")
        parts[kind] += t.numel() * t.element_size()
    return parts


@torch.inference_mode()
def speed(model, prompt: list[int], new_tokens: int, runs: int) -> dict:
    """Median time to first token (prefill + one sampled token) and decoding tokens/s after it,
    at batch size 1, greedy, no early stop; one warm-up run first."""
    ids = torch.tensor([prompt])
    generate.generate(model, ids, 2, temperature=0, eos_token_id=None)  # warm-up
    ttft, decode = [], []
    for _ in range(runs):
        t = time.perf_counter()
        generate.generate(model, ids, 1, temperature=0, eos_token_id=None)
        first = time.perf_counter() - t
        t = time.perf_counter()
        generate.generate(model, ids, new_tokens, temperature=0, eos_token_id=None)
        total = time.perf_counter() - t
        ttft.append(first)
        decode.append((new_tokens - 1) / max(total - first, 1e-9))
    return {"ttft_s": statistics.median(ttft), "decode_tok_s": statistics.median(decode)}


def efficiency(args, prompt_tokens: int = 128, new_tokens: int = 32, runs: int = 3) -> dict:
    """Table 3 on this machine: M_cloud as the pipeline runs it (fp32) and the personalized
    device model as deployed here (NF4 base with bf16 compute + fp32 LoRA r=16 on every block
    linear; embedding/tied head and norms stay bf16, not quantized). The device model is built
    from --device-model: M_base has its shapes, and neither size nor speed depends on values."""
    rows, models = {}, {}
    for role, source in (("cloud", args.cloud_model), ("device", args.device_model)):
        model, tok = qwen2.load(source, "float32", args.device)
        if role == "device":
            model = lora.add_lora(nf4.quantize_model(model, torch.bfloat16), r=args.lora_r, alpha=args.lora_alpha)
        text = "Paraphrase the following tweet without any explanation before or after it: " * prompt_tokens
        prompt = tok.encode(text)[:prompt_tokens]  # a fixed-length prompt
        parts = stored_bytes(model)
        rows[role] = {"size_mb": sum(parts.values()) / 1e6, **speed(model, prompt, new_tokens, runs),
                      **{f"{k} mb": v / 1e6 for k, v in parts.items()}}
        models[role] = source + (f" (NF4 blocks, bf16 embedding and norms, fp32 LoRA r={args.lora_r})"
                                 if role == "device" else " (fp32)")
    models["setup"] = (f"{prompt_tokens}-token prompt, {new_tokens} new tokens, batch 1, greedy, median of {runs} "
                       f"runs, {torch.get_num_threads()} torch threads on {args.device}")
    labels = {"cloud": "Cloud-based LLM", "device": "On-device LM (personalized)"}
    return {"task": "efficiency", "users": [], "queries": 0, "models": models, "labels": labels, "rows": rows,
            "counts": {}, "seconds": {}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Table 3: inference efficiency of the cloud and the device model")
    p.add_argument("--cloud-model", default=qwen2.EMBEDDED, help="cloud LM: embedded name, hub-style dir or hub id")
    p.add_argument("--device-model", default=qwen2.EMBEDDED, help="on-device LM (its shapes: M_base has them)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=8)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--runs", type=int, default=3, help="timed runs; the median is reported")
    p.add_argument("--out", default="runs", help="writes OUT/efficiency.json and .md")
    args = p.parse_args(argv)
    if not options.DEVICE.fullmatch(args.device):
        p.error(f"--device {args.device!r}: use cpu, cuda or cuda:N")
    if args.runs < 1 or args.lora_r < 1:
        p.error("--runs and --lora-r must be at least 1")
    return report.write(efficiency(args, runs=args.runs), Path(args.out), "efficiency",
                        title="Table 3: inference efficiency on this machine")


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"efficiency.py: error: {e}")
