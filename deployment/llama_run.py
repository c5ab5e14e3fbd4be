"""llama.cpp's side of `make llama-check`, run by .venv-llama's python (llama-cpp-python and numpy
only): `python deployment/llama_run.py REQUEST.json OUT_DIR`.

REQUEST.json (written by llama_check.py): {"gguf": path, "n_ctx": int, "max_new_tokens": int,
"eos": [ids], "prompts": [{"text": str, "ids": [int]}]}. For each prompt it writes
OUT_DIR/logprobs-{i}.npy, llama.cpp's log-probabilities of the next token at every prompt position
((T, V) float32, from `Llama(..., logits_all=True)`), and in OUT_DIR/llama.json its own tokens of
the text, its greedy reply's ids and text (temperature 0, up to max_new_tokens or an eos id), and
the seconds of the prefill and of the decoding."""
import json
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np


def main(request_path: str, out_dir: str) -> None:
    request, out = json.loads(Path(request_path).read_text()), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scorer = llama_cpp.Llama(model_path=request["gguf"], n_ctx=request["n_ctx"], logits_all=True,
                             verbose=False)
    results = {"llama_cpp_version": llama_cpp.__version__, "n_threads": scorer.n_threads,
               "prompts": []}
    for i, prompt in enumerate(request["prompts"]):
        print(f"llama.cpp: scoring prompt {i + 1}/{len(request['prompts'])}", flush=True)
        scorer.reset()
        scorer.eval(prompt["ids"])
        logits = np.asarray(scorer.scores[:len(prompt["ids"])], dtype=np.float64)  # (T, V)
        top = logits.max(axis=1, keepdims=True)
        logprobs = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
        np.save(out / f"logprobs-{i}.npy", logprobs.astype(np.float32))
        tokens = scorer.tokenize(prompt["text"].encode(), add_bos=False, special=True)
        results["prompts"].append({"tokens": tokens})
    del scorer
    llm = llama_cpp.Llama(model_path=request["gguf"], n_ctx=request["n_ctx"], verbose=False)
    eos = set(request["eos"])
    for i, prompt in enumerate(request["prompts"]):
        print(f"llama.cpp: greedy reply {i + 1}/{len(request['prompts'])}", flush=True)
        ids, sampled, start, first = [], 0, time.perf_counter(), None
        for token in llm.generate(prompt["ids"], temp=0.0, repeat_penalty=1.0, reset=True):
            sampled += 1
            first = first or time.perf_counter()  # the prompt is prefilled, one token sampled
            if token in eos:
                break
            ids.append(token)
            if len(ids) == request["max_new_tokens"]:
                break
        end = time.perf_counter()
        text = llm.detokenize(ids).decode("utf-8", "replace")
        results["prompts"][i] |= {"greedy_ids": ids, "greedy_text": text, "decoded": sampled - 1,
                                  "prefill_s": first - start, "decode_s": end - first}
    (out / "llama.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python deployment/llama_run.py REQUEST.json OUT_DIR")
    main(*sys.argv[1:])
