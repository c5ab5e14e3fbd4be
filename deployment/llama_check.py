"""`make llama-check`: llama.cpp itself runs a deployed model's GGUF and answers as our deployed
model does. `python -m deployment.llama_check [--deployed DIR] [--llama-python PY]`

1. the deployed model: DIR (deploy.save's, e.g. runs/lamp7/users/ID/direct-ft.deployed) or, by
   default, the embedded SmolLM2-135M-Instruct deployed as it is (deploy.deploy, no adapter);
2. gguf_export writes it as OUT/model.gguf;
3. appendix-B prompts of the task's queries (the user's own first when DIR is under users/ID/),
   rendered and tokenized by our tokenizer; llama_run.py, in llama-cpp-python's venv, gives
   llama.cpp's tokens of the same text, its next-token log-probabilities at every prompt position
   and its greedy replies (temperature 0);
4. against ours (the deployed model's bf16 int4 kernels, generate.generate at temperature 0) and a
   reference, the deployed weights in fp32 (`reference`, from deployed.safetensors, not from the
   GGUF): tokens equal, top-1 agreement over the prompt positions, |difference| of the
   log-probability of each next prompt token, greedy replies equal or where they part.

Passes when llama.cpp tokenizes every prompt as we do and computes the deployed model as closely
as our own runtime does: its largest log-probability difference from the fp32 reference at most
TOLERANCE times ours, its top-1 agreement with the reference at most TOP1_SLACK below ours (both
round the activations: bf16 here, 8-bit blocks in llama.cpp's Q4_1 / Q8_0 products). The figures
go to OUT/report.json; RESULTS.md keeps them with the command, the date and the machine."""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import data
import generate
import qwen2
from cdcda import ANSWER_TOKENS
from deployment import deploy, gguf_export
from errors import InputError

TOLERANCE = 2.0  # llama.cpp's max |log-prob difference| from the fp32 reference, over ours
TOP1_SLACK = 0.02  # how much lower llama.cpp's top-1 agreement with it may be than ours
N_CTX = 512  # llama.cpp's context


def default_deployed(out: Path) -> Path:
    """The embedded SmolLM2 deployed (int4 groups of 32, int8 embedding) under OUT, made once."""
    directory = out / f"{qwen2.EMBEDDED}.deployed"
    if not (directory / deploy.FILE).is_file():
        print(f"deploying {qwen2.EMBEDDED} into {directory}", flush=True)
        model, tokenizer = qwen2.load(qwen2.EMBEDDED)
        deploy.save(deploy.deploy(model), tokenizer, directory)
    return directory


def reference(directory: Path) -> qwen2.Qwen2:
    """The deployed model's weights in fp32, (q - 8) s + z and q s_v from its file, in a plain
    qwen2.Qwen2: what both runtimes approximate."""
    config, state, _ = deploy.read_state(directory)
    dense = {}
    for key, value in state.items():
        module, kind = key.rsplit(".", 1)
        if value.dtype == torch.uint8:  # int4 groups
            scale, zero = state[f"{module}.scale"], state[f"{module}.zero"]
            dense[key] = deploy.dequantize(deploy.unpack(value), scale, zero)
        elif value.dtype == torch.int8:  # int8 rows
            dense[key] = value.float() * state[f"{module}.scale"].float()[:, None]
        elif kind not in ("scale", "zero"):
            dense[key] = value.float()
    if config.tie_word_embeddings:
        dense["lm_head.weight"] = dense["model.embed_tokens.weight"]
    model = qwen2.Qwen2(config)
    model.load_state_dict(dense, strict=True)
    return model.eval()


def prompts(task: data.Task, tokenizer, deployed: Path, n: int) -> list[dict]:
    """The first n queries' appendix-B prompts (the deployed user's own first), text and ids."""
    users = sorted(data.load_users(task.name), key=lambda u: u.user_id != deployed.parent.name)
    out = []
    for query in (q for u in users for q in u.queries):
        text = tokenizer.apply_chat_template(task.messages(query.input))
        ids = tokenizer.encode(text)
        if len(ids) + ANSWER_TOKENS[task.name] <= N_CTX:
            out.append({"query": query.id, "text": text, "ids": ids})
        if len(out) == n:
            return out
    raise InputError(f"{task.name}: fewer than {n} queries fit llama.cpp's context of {N_CTX}")


def run_llama(python: str, gguf_path: Path, asked: list[dict], max_new: int, eos, out: Path):
    """llama_run.py in llama-cpp-python's venv: (its json, its log-probabilities per prompt)."""
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        request = Path(tmp) / "request.json"
        request.write_text(json.dumps({"gguf": str(gguf_path), "n_ctx": N_CTX, "eos": eos,
                                       "max_new_tokens": max_new, "prompts": asked}))
        script = Path(__file__).with_name("llama_run.py")
        subprocess.run([python, str(script), str(request), tmp], check=True)
        llama = json.loads((Path(tmp) / "llama.json").read_text())
        return llama, [np.load(Path(tmp) / f"logprobs-{i}.npy") for i in range(len(asked))]


@torch.inference_mode()
def ours(model, tokenizer, prompt: dict, max_new_tokens: int) -> dict:
    """Log-probabilities (T, V) at the prompt's positions and the greedy reply of one model."""
    ids = torch.tensor([prompt["ids"]])
    start = time.perf_counter()
    logprobs = model(ids)[0].float().log_softmax(-1).numpy()
    middle = time.perf_counter()
    new = generate.generate(model, ids, max_new_tokens, temperature=0,
                            eos_token_id=tokenizer.eos_token_ids)[0, ids.shape[1]:].tolist()
    seconds = time.perf_counter() - middle  # a prefill like the one above, then the decoding
    ends = [i for i, t in enumerate(new) if t in tokenizer.eos_token_ids]
    return {"logprobs": logprobs, "greedy_ids": new[:ends[0]] if ends else new,
            "decoded": len(new) - 1, "decode_s": seconds - (middle - start)}


def compare(a: np.ndarray, b: np.ndarray, ids: list[int]) -> dict:
    """Two models' log-probabilities (T, V) on one prompt: top-1 agreement over its positions,
    the largest and mean |difference| of the log-probability of each next prompt token."""
    rows = np.arange(len(ids) - 1)
    diff = np.abs(a[rows, ids[1:]] - b[rows, ids[1:]])
    return {"top1_agree": float((a.argmax(1) == b.argmax(1)).mean()), "positions": len(ids),
            "max_abs_dlogp": float(diff.max()), "mean_abs_dlogp": float(diff.mean())}


def summary(rows: list[dict]) -> dict:
    """`compare`'s figures over all prompts (means weighted by positions)."""
    n = sum(r["positions"] for r in rows)
    return {"top1_agree": sum(r["top1_agree"] * r["positions"] for r in rows) / n,
            "max_abs_dlogp": max(r["max_abs_dlogp"] for r in rows),
            "mean_abs_dlogp": sum(r["mean_abs_dlogp"] * r["positions"] for r in rows) / n}


def failures(report: dict) -> list[str]:
    """What fails the check (module docstring)."""
    out = [f"llama.cpp tokenizes the prompt of {r['query']} otherwise"
           for r in report["prompts"] if not r["tokens_equal"]]
    theirs, mine = report["llama_vs_fp32"], report["ours_vs_fp32"]
    if theirs["max_abs_dlogp"] > TOLERANCE * mine["max_abs_dlogp"]:
        out.append(f"llama.cpp's max |dlogp| from the fp32 reference, "
                   f"{theirs['max_abs_dlogp']:.4f}, is over {TOLERANCE} x ours "
                   f"({mine['max_abs_dlogp']:.4f})")
    if theirs["top1_agree"] < mine["top1_agree"] - TOP1_SLACK:
        out.append(f"llama.cpp's top-1 agrees with the fp32 reference's at "
                   f"{theirs['top1_agree']:.4f} of the positions, ours at {mine['top1_agree']:.4f}")
    return out


def show(report: dict) -> None:
    for r in report["prompts"]:
        print(f"{r['query']}: greedy replies {'equal' if r['greedy_equal'] else 'differ'}\n"
              f"  ours:      {r['ours']!r}\n  llama.cpp: {r['llama_cpp']!r}")
    for name in ("llama_vs_ours", "llama_vs_fp32", "ours_vs_fp32"):
        if name in report:
            s = report[name]
            print(f"{name}: top-1 agreement {s['top1_agree']:.4f}; |dlogp| of the next prompt "
                  f"token: max {s['max_abs_dlogp']:.4f}, mean {s['mean_abs_dlogp']:.5f}")
    print(f"greedy replies equal: {report['greedy_equal']}/{len(report['prompts'])}; decoding "
          f"llama.cpp {report['llama_tokens_per_s']:.1f} tokens/s ({report['llama_threads']} "
          f"threads), ours {report['ours_tokens_per_s']:.1f}; GGUF "
          f"{report['gguf_bytes'] / 2**20:.1f} MiB, {deploy.FILE} "
          f"{report['safetensors_bytes'] / 2**20:.1f} MiB")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m deployment.llama_check",
                                description="llama.cpp runs a deployed model's GGUF, held "
                                "against ours")
    p.add_argument("--deployed", default=None, help="a deployed model's directory (default: the "
                   f"embedded {qwen2.EMBEDDED} deployed without an adapter)")
    p.add_argument("--llama-python", default=".venv-llama/bin/python",
                   help="python of a venv with llama-cpp-python (make llama-check builds it)")
    p.add_argument("--task", default="lamp7", choices=sorted(data.TASKS), help="whose prompts")
    p.add_argument("--prompts", type=int, default=4, help="how many queries")
    p.add_argument("--out", default="runs/llama-check", help="where the GGUF and report.json go")
    args = p.parse_args(argv)
    if not Path(args.llama_python).is_file():
        raise InputError(f"--llama-python {args.llama_python}: no such file (make llama-check "
                         "builds .venv-llama)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deployed = Path(args.deployed) if args.deployed else default_deployed(out)
    model, tokenizer = deploy.load(deployed)
    gguf_path = gguf_export.export(deployed, tokenizer, out / "model.gguf")
    task = data.get_task(args.task)
    asked, max_new = prompts(task, tokenizer, deployed, args.prompts), ANSWER_TOKENS[task.name]
    llama, logprobs = run_llama(args.llama_python, gguf_path, asked, max_new,
                                      tokenizer.eos_token_ids, out)
    fp32 = reference(deployed)
    rows = []
    for i, prompt in enumerate(asked):
        print(f"ours: prompt {i + 1}/{len(asked)}", flush=True)
        mine, theirs, lp = ours(model, tokenizer, prompt, max_new), llama["prompts"][i], logprobs[i]
        pairs = zip(theirs["greedy_ids"], mine["greedy_ids"])
        row = {"query": prompt["query"], "prompt_tokens": len(prompt["ids"]),
               "tokens_equal": theirs["tokens"] == prompt["ids"],
               "llama_vs_ours": compare(lp, mine["logprobs"], prompt["ids"]),
               "greedy_equal": theirs["greedy_ids"] == mine["greedy_ids"],
               "greedy_parts_at": next((j for j, (a, b) in enumerate(pairs) if a != b), None),
               "ours": tokenizer.decode(mine["greedy_ids"]).strip(),
               "llama_cpp": theirs["greedy_text"].strip(), "ours_decoded": mine["decoded"],
               "ours_decode_s": mine["decode_s"]}
        row |= {f"llama_{k}": theirs[k] for k in ("decoded", "decode_s", "prefill_s")}
        ref = ours(fp32, tokenizer, prompt, max_new)
        row |= {"llama_vs_fp32": compare(lp, ref["logprobs"], prompt["ids"]),
                "ours_vs_fp32": compare(mine["logprobs"], ref["logprobs"], prompt["ids"]),
                "fp32_greedy_equal_llama": ref["greedy_ids"] == theirs["greedy_ids"],
                "fp32_greedy_equal_ours": ref["greedy_ids"] == mine["greedy_ids"]}
        rows.append(row)
    report = {"deployed": str(deployed), "gguf": str(gguf_path), "task": task.name,
              "gguf_bytes": gguf_path.stat().st_size,
              "safetensors_bytes": (deployed / deploy.FILE).stat().st_size,
              "llama_cpp_version": llama["llama_cpp_version"], "llama_threads": llama["n_threads"],
              "llama_tokens_per_s": (sum(r["llama_decoded"] for r in rows)
                                     / sum(r["llama_decode_s"] for r in rows)),
              "ours_tokens_per_s": (sum(r["ours_decoded"] for r in rows)
                                    / sum(r["ours_decode_s"] for r in rows)),
              "greedy_equal": sum(r["greedy_equal"] for r in rows)}
    for name in ("llama_vs_ours", "llama_vs_fp32", "ours_vs_fp32"):
        report[name] = summary([r[name] for r in rows])
    report["prompts"] = rows
    report["failures"] = failures(report)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    show(report)
    print(f"report: {out / 'report.json'}")
    if report["failures"]:
        raise SystemExit("llama-check failed: " + "; ".join(report["failures"]))
    print("llama-check passed")
    return report


if __name__ == "__main__":
    try:
        main()
    except (InputError, subprocess.CalledProcessError) as e:
        sys.exit(f"python -m deployment.llama_check: error: {e}")
