"""Table 3 (paper sec. 5.5): stored size, peak memory, time to first token and decoding speed of
the cloud model and the personalized device model, before and after deployment, on this machine.

    python -m experiments.efficiency [--cloud-model M] [--device-model M] [--runs 5] [--out DIR]
    python -m experiments.efficiency --paper-shapes [--runs 5] [--new-tokens 16]

Rows (each built and timed in a fresh process, so that one's memory cannot count for another):
- cloud: the cloud LM as the pipeline runs it (fp32); with --paper-shapes Qwen2.5-3B-Instruct's
  shapes in bf16.
- device, NF4 + LoRA: NF4 block linears with bf16 compute and an fp32 LoRA adapter (r = 16) on
  every block linear; embedding (tied head) and norms bf16. What the device trains.
- device, deployed: that model after `deploy.deploy` (deployment/) (LoRA merged, int4 groups of 32 on torch's
  fused kernel, int8 embedding and head; nearest codes, untuned: gridtune.py changes only the
  values of the scales and zero points). What the device serves (MLC-LLM's role in the paper).
- anchors with --paper-shapes, all Qwen2.5-0.5B-Instruct's shapes: the model in bf16 and fp32,
  and bitsandbytes' NF4 through transformers (bf16 compute), the library a user would pick for
  4-bit PyTorch inference (skipped, and said so, when they are not installed).
Neither size nor speed depends on the weights' values, so --paper-shapes times random weights of
the paper's exact configs. Peak memory: the process's peak resident memory during the timed runs
(its high-water mark reset after building the model and returning the memory the build freed)
minus its resident memory before building it.
"""
import argparse
import ctypes
import gc
import importlib.util
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import generate
import hub
import lora
import nf4
import options
import qwen2
import report
from deployment import deploy
from errors import InputError

# Qwen2.5's config.json values (REFERENCE.md): both tie the head to the embedding; q/k/v biases.
QWEN25 = dict(vocab_size=151936, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
              max_position_embeddings=32768, model_type="qwen2")
PAPER_SHAPES = {
    "Qwen2.5-3B-Instruct": dict(QWEN25, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                num_attention_heads=16),
    "Qwen2.5-0.5B-Instruct": dict(QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                  num_attention_heads=14),
}
FORMS = {"fp32": "fp32", "bf16": "bf16", "nf4+lora": "NF4 blocks + fp32 LoRA, bf16 embedding/norms",
         "deployed": "deployed: LoRA merged, int4 g32 blocks, int8 embedding/head",
         "bnb-nf4": "bitsandbytes NF4 through transformers, bf16 compute"}


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


def random_model(config: qwen2.Config, dtype: torch.dtype) -> qwen2.Qwen2:
    """A Qwen2 of `config` with N(0, 0.02) weights (norms 1, biases 0), built in `dtype` directly."""
    with torch.device("meta"):
        model = qwen2.Qwen2(config).to(dtype)
    model.to_empty(device="cpu")
    for name, p in model.named_parameters():
        with torch.no_grad():
            p.fill_(1.0) if name.endswith("norm.weight") else p.zero_() if name.endswith("bias") else p.normal_(0, 0.02)
    if config.tie_word_embeddings:  # to_empty gives each name its own tensor
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def build(source: str, form: str, args):
    """Our model from `source` (a PAPER_SHAPES name, or a model for qwen2.load) in `form`:
    (model, stored parts in bytes)."""
    if source in PAPER_SHAPES:
        model = random_model(qwen2.Config(**PAPER_SHAPES[source]), torch.float32 if form == "fp32" else torch.bfloat16)
    else:
        model = qwen2.load(source, "float32", args.device)[0]
        if form == "bf16":
            model = model.to(torch.bfloat16)
    if form in ("nf4+lora", "deployed"):
        model = lora.add_lora(nf4.quantize_model(model, torch.bfloat16), r=args.lora_r, alpha=args.lora_alpha)
    if form == "deployed":
        model = deploy.deploy(model, device=args.device)
        return model, deploy.stored_bytes(model)
    return model, stored_bytes(model)


@torch.inference_mode()
def speed(model, prompt: list[int], new_tokens: int, runs: int, device="cpu", hf: bool = False) -> dict:
    """Median time to first token (prefill + one sampled token) and decoding tokens/s after it,
    at batch size 1, greedy, no early stop; one full warm-up run first. `hf`: a transformers model,
    through its own `generate`."""
    ids = torch.tensor([prompt], device=device)

    def run(n):
        if hf:
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        else:
            generate.generate(model, ids, n, temperature=0, eos_token_id=None)
    run(new_tokens)  # warm-up, every shape once (bf16 kernels are made per shape on first use)
    ttft, decode = [], []
    for _ in range(runs):
        t = time.perf_counter()
        run(1)
        first = time.perf_counter() - t
        t = time.perf_counter()
        run(new_tokens)
        total = time.perf_counter() - t
        ttft.append(first)
        decode.append((new_tokens - 1) / max(total - first, 1e-9))
    return {"ttft_s": statistics.median(ttft), "decode_tok_s": statistics.median(decode)}


def memory_mb(field: str) -> float:
    """VmRSS or VmHWM (peak resident memory) of this process in MB; 0 where /proc is missing."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    except (OSError, StopIteration):
        return 0.0
    return int(line.split()[1]) * 1024 / 1e6


def release_freed_memory() -> None:
    """Hand memory freed while building back to the OS (glibc keeps freed heap pages resident
    otherwise, and they would count as the model's)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def reset_peak() -> bool:
    """Reset this process's peak resident memory to its current one (Linux /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def bnb_model(source: str, directory: Path):
    """Qwen2.5 shapes, random bf16 weights written as a transformers checkpoint and loaded back
    with bitsandbytes' NF4 (block 64, bf16 compute) on the CPU: (model, stored parts)."""
    import transformers  # bench-only anchors: not library dependencies
    config = qwen2.Config(**PAPER_SHAPES[source])
    model = random_model(config, torch.bfloat16)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config.to_dict() | {"architectures": ["Qwen2ForCausalLM"],
                                                                          "torch_dtype": "bfloat16"}))
    del model, state
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.Qwen2ForCausalLM.from_pretrained(directory, quantization_config=quant, device_map="cpu",
                                                          dtype=torch.bfloat16).eval()
    return model, {"transformers footprint": model.get_memory_footprint()}


def measure(source: str, form: str, args, prompt_tokens: int) -> dict:
    """One row: build, then size, peak memory and speed (runs in its own process from `main`)."""
    torch.manual_seed(0)
    for name in ("transformers", "bitsandbytes") if form == "bnb-nf4" else ():  # bench-only anchors
        if importlib.util.find_spec(name) is None:
            raise ImportError(f"{name} is not installed")
    before = memory_mb("VmRSS")
    with tempfile.TemporaryDirectory() as tmp:
        model, parts = bnb_model(source, Path(tmp)) if form == "bnb-nf4" else build(source, form, args)
    release_freed_memory()
    prompt = [(17 * i + 11) % 1000 + 100 for i in range(prompt_tokens)]  # a fixed prompt of ordinary ids
    reset = reset_peak()
    row = speed(model, prompt, args.new_tokens, args.runs, args.device, hf=form == "bnb-nf4")
    peak = memory_mb("VmHWM") - before if reset else float("nan")
    return {"size_mb": sum(parts.values()) / 1e6, "peak_mb": peak, **row, "threads": torch.get_num_threads(),
            **{f"{k} mb": v / 1e6 for k, v in parts.items()}}


def rows_to_run(args) -> dict:
    """{row key: (source, form, label)} for this run."""
    if args.paper_shapes:
        big, small = "Qwen2.5-3B-Instruct", "Qwen2.5-0.5B-Instruct"
        rows = {"cloud": (big, "bf16", "Cloud-based LLM"), "deployed": (small, "deployed", "On-device LM, deployed"),
                "device-bf16": (small, "bf16", "anchor"), "bnb-nf4": (small, "bnb-nf4", "anchor"),
                "device": (small, "nf4+lora", "On-device LM, NF4 + LoRA"), "device-fp32": (small, "fp32", "anchor")}
    else:
        rows = {"cloud": (args.cloud_model, "fp32", "Cloud-based LLM"),
                "device": (args.device_model, "nf4+lora", "On-device LM, NF4 + LoRA"),
                "deployed": (args.device_model, "deployed", "On-device LM, deployed")}
    return {k: (src, form, f"{label}: {src} ({FORMS[form]})") for k, (src, form, label) in rows.items()}


def ratios(rows: dict) -> list[str]:
    """The comparisons Table 3 makes, from the rows that ran."""
    lines = []
    dep = rows.get("deployed")
    for key, what in (("cloud", "the cloud model"), ("device", "NF4 + LoRA"), ("device-bf16", "the bf16 device model"),
                      ("bnb-nf4", "bitsandbytes NF4")):
        if dep and key in rows:
            lines.append(f"deployed vs {what}: decode {dep['decode_tok_s'] / rows[key]['decode_tok_s']:.2f}x, "
                         f"time to first token {dep['ttft_s'] / rows[key]['ttft_s']:.2f}x, "
                         f"stored {dep['size_mb'] / rows[key]['size_mb']:.3f}x")
    return lines


def efficiency(args, prompt_tokens: int = 128, isolate: bool = True, partial: Path | None = None) -> dict:
    """Table 3 on this machine: the rows of `rows_to_run` (those in args.rows, if given), each in
    a fresh process when `isolate` (a row whose anchor library is missing is left out, and the
    report says so). Each finished row is printed and, with `partial`, written there at once."""
    rows, models, skipped = {}, {}, []
    ctx = multiprocessing.get_context("spawn")
    for key, (source, form, label) in rows_to_run(args).items():
        if args.rows and key not in args.rows:
            continue
        print(f"efficiency: {label} ...", file=sys.stderr, flush=True)
        try:
            if isolate:
                with ctx.Pool(1) as pool:
                    rows[key] = pool.apply(measure, (source, form, args, prompt_tokens))
            else:
                rows[key] = measure(source, form, args, prompt_tokens)
        except ImportError as e:
            skipped.append(f"{label}: skipped ({e})")
            continue
        models[key] = label
        print(f"efficiency: {key}: {json.dumps(rows[key])}", file=sys.stderr, flush=True)
        if partial:
            hub.write_atomic(partial, json.dumps({"models": models, "rows": rows}, indent=1))
    models["setup"] = (f"{prompt_tokens}-token prompt, {args.new_tokens} new tokens, batch 1, greedy, median of "
                       f"{args.runs} runs, {next(iter(rows.values()))['threads']} torch threads on {args.device}"
                       + (", random weights of the paper's shapes" if args.paper_shapes else ""))
    rep = {"task": "efficiency", "users": [], "queries": 0, "models": models, "labels": dict(models), "rows": rows,
           "counts": {}, "seconds": {}, "ratios": ratios(rows), "skipped": skipped}
    return rep


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Table 3: inference efficiency of the cloud and the device model")
    p.add_argument("--cloud-model", default=qwen2.EMBEDDED, help="cloud LM: embedded name, hub-style dir or hub id")
    p.add_argument("--device-model", default=qwen2.EMBEDDED, help="on-device LM (its shapes: M_base has them)")
    p.add_argument("--paper-shapes", action="store_true",
                   help="random weights of Qwen2.5-3B-Instruct (cloud) and -0.5B-Instruct (device) + anchors")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=8)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--runs", type=int, default=5, help="timed runs; the median is reported")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens decoded per run (default 32; 16 with --paper-shapes)")
    p.add_argument("--rows", default=None, help="comma-separated subset of the rows (cloud, device, deployed; "
                   "with --paper-shapes also device-bf16, device-fp32, bnb-nf4); default all")
    p.add_argument("--out", default="runs", help="writes OUT/efficiency.json and .md (-paper-shapes with "
                   "--paper-shapes); OUT/NAME.partial.json as rows finish")
    args = p.parse_args(argv)
    if problem := options.device_problem(args.device):
        p.error(problem)
    args.new_tokens = args.new_tokens or (16 if args.paper_shapes else 32)
    if args.runs < 1 or args.lora_r < 1 or args.new_tokens < 2:
        p.error("--runs and --lora-r must be at least 1, --new-tokens at least 2")
    args.rows = args.rows and [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(args.rows or ()) - set(rows_to_run(args))
    if unknown or args.rows == []:
        p.error(f"--rows: unknown {sorted(unknown)}; choose from {', '.join(rows_to_run(args))}")
    name = "efficiency-paper-shapes" if args.paper_shapes else "efficiency"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rep = efficiency(args, partial=Path(args.out) / f"{name}.partial.json")
    note = "".join(f"\n{line}" for line in rep["ratios"] + rep["skipped"]) + "\n"
    return report.write(rep, Path(args.out), name, title="Table 3: inference efficiency on this machine", note=note)


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"python -m experiments.efficiency: error: {e}")
