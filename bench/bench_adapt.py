"""On-device adaptation benchmark (issue 3): LoRA training speed, ours vs peft, and model size.

    .venv/bin/python bench/bench_adapt.py [--steps 3] [--batch-size 4] [--skip-memory]

1. LoRA training tokens/s (r=16, alpha=8 on q,k,v,o,gate,up,down; AdamW) on SmolLM2-135M-
   Instruct: our fp32 path (`train.finetune`), peft on transformers loading the very same
   converted checkpoint, their ratio, and our NF4 + bf16 path. Same batches for all (ChatML
   examples of about 128 tokens, loss on the last quarter), timed after one warm-up batch.
2. Stored size and peak memory of the on-device model in fp32, bf16, NF4 and NF4 with double
   quantization, for SmolLM2-135M and for a randomly initialised model of Qwen2.5-0.5B's shape
   (the paper's device model: 0.42 GB). Each is measured in a fresh subprocess: resident memory
   after the converted model prefilled 128 tokens, and the peak during that prefill (Linux
   VmHWM, reset with /proc/self/clear_refs), both above the process's footprint before the model.
Timings on a shared 2-core CPU are noisy: repeat a run before trusting a few percent.
"""
import argparse
import ctypes
import gc
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lora  # noqa: E402
import nf4  # noqa: E402
import options  # noqa: E402
import qwen2  # noqa: E402
import train  # noqa: E402
from embedded import smollm2  # noqa: E402

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, model_type="qwen2")
WORDS = ("the user wrote a short review about a quiet hotel near the sea with friendly staff and "
         "a small breakfast room where coffee was good but the bread was old").split()


def examples(n: int, seed: int = 0) -> list[tuple[list[dict], str]]:
    """n ChatML examples of about 96 prompt and 32 response tokens (SmolLM2 tokenizer)."""
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [([{"role": "system", "content": "Write like this user."}, {"role": "user", "content": words(75)}],
             words(30)) for _ in range(n)]


def ours(model, tokenizer, data, batch_size) -> float:
    """Seconds per example-batch of `train.finetune` (after a warm-up batch)."""
    one = options.Settings(epochs=1, lr=1e-4, batch_size=batch_size, max_length=512)
    train.finetune(model, tokenizer, data[:batch_size], one, desc="warm-up")
    start = time.perf_counter()
    train.finetune(model, tokenizer, data, one, desc="ours")
    return time.perf_counter() - start


def peft_reference(directory, batches) -> float:
    """The same batches through peft on transformers (labels -100 on prompt and padding)."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    config = peft.LoraConfig(r=16, lora_alpha=8, lora_dropout=0.0, target_modules=list(lora.TARGETS))
    model = peft.get_peft_model(model, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

    def step(ids, labels):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), lora.MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    first = step(*batches[0])  # warm-up
    start = time.perf_counter()
    for ids, labels in batches:
        step(ids, labels)
    return time.perf_counter() - start, first


def training(args):
    model, tokenizer = qwen2.load()
    directory = smollm2.embedded_dir()
    data = examples(args.steps * args.batch_size)
    encoded = [train.encode_example(tokenizer, m, r, 512) for m, r in data]
    batches = [train.right_pad(encoded[i:i + args.batch_size], tokenizer.pad_token_id)
               for i in range(0, len(encoded), args.batch_size)]
    tokens = sum(len(ids) for ids, _ in encoded)  # real tokens, no padding
    print(f"## LoRA training, SmolLM2-135M-Instruct, r=16 alpha=8, {args.steps} batches of "
          f"{args.batch_size} x ~{tokens // len(encoded)} tokens, torch threads {torch.get_num_threads()}")
    with torch.no_grad():
        ids, labels = batches[0]
        our_first = train.response_loss(model, ids, labels).item()  # B = 0: the base model's loss
    lora.add_lora(model, r=16, alpha=8)
    t_ours = ours(model, tokenizer, data, args.batch_size)
    del model
    gc.collect()
    t_peft, peft_first = peft_reference(directory, batches)
    print(f"first-batch loss (untrained adapter): ours {our_first:.4f}, peft {peft_first:.4f}")
    gc.collect()
    quantized, _ = qwen2.load()
    lora.add_lora(nf4.quantize_model(quantized), r=16, alpha=8)
    t_nf4 = ours(quantized, tokenizer, data, args.batch_size)
    rows = [("ours, fp32", t_ours), ("peft + transformers, fp32", t_peft), ("ours, NF4 base + bf16 compute", t_nf4)]
    print("| path | tokens/s |\n| --- | ---: |")
    for name, seconds in rows:
        print(f"| {name} | {tokens / seconds:.0f} |")
    print(f"ratio ours / peft (fp32): {t_peft / t_ours:.2f}x (goal >= 1.0x)\n")


def state_bytes(model) -> int:
    """Bytes of the state dict, a tied tensor counted once (= the safetensors file, less its header)."""
    seen = {}
    for tensor in model.state_dict().values():
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def rss(field="VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(which: str, fmt: str) -> dict:
    """In a fresh process: build the model, convert it to `fmt`, measure. Returns a dict."""
    torch.manual_seed(0)
    before = rss()
    if which == "smollm2-135m":
        model, _ = qwen2.load()
    else:
        model = qwen2.Qwen2(qwen2.Config(**QWEN25_05B)).eval()
    extra = {}
    if fmt == "bf16":
        model.to(torch.bfloat16)
    elif fmt.startswith("nf4"):
        embedding = model.model.embed_tokens.weight
        packed, absmax = nf4.quantize(embedding)  # what quantizing the embedding too would store
        extra["embedding_nf4"] = packed.numel() + 4 * absmax.numel()
        extra["embedding_bf16"] = 2 * embedding.numel()
        nf4.quantize_model(model)
        extra["codes_and_rest"] = sum(  # transformers' get_memory_footprint: NF4 codes, no absmax
            t.numel() * t.element_size() for name, t in model.state_dict().items()
            if not name.endswith(("absmax", "absmax_code", "absmax_scale", "absmax_offset", "lm_head.weight")))
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the freed fp32 originals back to the OS
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    ids = torch.randint(0, model.config.vocab_size, (1, 128))
    with torch.no_grad():
        model(ids)
    resident, peak = rss() - before, rss("VmHWM") - before
    return dict(stored=state_bytes(model), resident=resident, peak=peak, **extra)


def memory():
    print("## On-device model size (GB = 1e9 bytes). resident: process memory above its footprint "
          "before loading, after prefilling 128 tokens; peak: the most during that prefill")
    print("| model | format | stored GB | resident GB | peak GB |\n| --- | --- | ---: | ---: | ---: |")
    for which in ("smollm2-135m", "qwen2.5-0.5b-shape"):
        for fmt in ("fp32", "bf16", "nf4"):
            out = subprocess.run([sys.executable, __file__, "--measure", which, fmt], capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"measuring {which} {fmt} failed:\n{out.stderr[-2000:]}")
            m = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {which} | {fmt} | {m['stored'] / 1e9:.3f} | {m['resident'] / 1e9:.3f} | {m['peak'] / 1e9:.3f} |",
                  flush=True)
            if fmt == "nf4":
                also = m["stored"] - m["embedding_bf16"] + m["embedding_nf4"]
                print(f"|  | (nf4, embedding NF4 too: not what quantize_model does) | {also / 1e9:.3f} | | |")
            if fmt == "nf4":
                print(f"|  | (nf4 counted as transformers' get_memory_footprint, absmax left out) | "
                      f"{m['codes_and_rest'] / 1e9:.3f} ({m['codes_and_rest'] / 2**30:.3f} GiB) | | |")
    print("paper, Qwen2.5-0.5B on device: 0.42 GB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed batches per path")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per batch")
    parser.add_argument("--skip-memory", action="store_true", help="only the training speed")
    parser.add_argument("--skip-training", action="store_true", help="only the model sizes")
    parser.add_argument("--measure", nargs=2, metavar=("MODEL", "FORMAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    if not args.skip_training:
        training(args)
    if not args.skip_memory:
        memory()


if __name__ == "__main__":
    main()
