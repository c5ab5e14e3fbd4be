"""Decoder speed: qwen2.py against transformers' `generate`, same weights, same machine, one run.

For each dtype and batch size: prefill time of a 128-token prompt (generate 1 token), and
decoding tokens/s (B * N new tokens after the first, greedy, no eos stop): medians of
`--repeats` back-to-back (1 token, N + 1 tokens) pairs, qwen2.py and transformers one after
the other so that load from other processes hits both alike. Weights: the embedded
SmolLM2-135M-Instruct (hub-style directory converted from the GGUF), which transformers loads
from the same directory. On a shared machine `--threads 1` gives steadier figures.

    .venv/bin/python bench/bench_decoder.py [--new-tokens 32] [--repeats 3] [--threads N]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import generate  # noqa: E402
import hub  # noqa: E402
import qwen2  # noqa: E402
from embedded import smollm2  # noqa: E402


def timings(run, new_tokens: int, repeats: int) -> tuple[float, float]:
    """(prefill s, decode s for new_tokens - 1 tokens): medians over repeats of back-to-back pairs."""
    prefill, decode = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        run(1)
        middle = time.perf_counter()
        run(new_tokens)
        prefill.append(middle - start)
        decode.append(time.perf_counter() - middle - (middle - start))
    return statistics.median(prefill), statistics.median(decode)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=qwen2.EMBEDDED, help="qwen2.load source (default: embedded SmolLM2)")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (prefill)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per row")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the best is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    directory = smollm2.embedded_dir() if args.model == qwen2.EMBEDDED else hub.snapshot(args.model)
    print(f"model {args.model} ({directory}); torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'dtype':9} {'B':>2} | {'prefill s':>9} {'hf':>7} {'ratio':>5} | {'decode tok/s':>12} {'hf':>7} {'ratio':>5}")
    for dtype in args.dtypes.split(","):
        ours, _ = qwen2.load(args.model, dtype=dtype)
        hf = AutoModelForCausalLM.from_pretrained(directory, dtype=hub.DTYPES[dtype]).eval()
        hf.generation_config.eos_token_id = None  # decode exactly N tokens, as qwen2 with eos None
        for B in map(int, args.batch_sizes.split(",")):
            ids = torch.randint(100, ours.config.vocab_size, (B, args.prompt_len),
                                generator=torch.Generator().manual_seed(0))
            mask = torch.ones_like(ids)

            def run_ours(n):
                return generate.generate(ours, ids, n, temperature=0, eos_token_id=None, attention_mask=mask)

            def run_hf(n):
                return hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=0)
            with torch.inference_mode():
                assert torch.equal(run_ours(4), run_hf(4)) or dtype != "float32", "greedy tokens differ"
                (p_ours, d_ours), (p_hf, d_hf) = [timings(run, args.new_tokens + 1, args.repeats)
                                                  for run in (run_ours, run_hf)]
            speed = [B * args.new_tokens / d if d > 0 else float("nan") for d in (d_ours, d_hf)]
            print(f"{dtype:9} {B:>2} | {p_ours:9.3f} {p_hf:7.3f} {p_hf / p_ours:5.2f} | "
                  f"{speed[0]:12.1f} {speed[1]:7.1f} {speed[0] / speed[1]:5.2f}", flush=True)
    print("ratio > 1: qwen2.py faster (prefill: hf time / ours; decode: ours tok/s / hf tok/s)")


if __name__ == "__main__":
    main()
