"""What each deployment step costs in gold NLL, on the adapters a `python -m deployment` run saved
(RESULTS.md, "Table 3 with deployment"): for each user and fine-tuned method, the NF4 + LoRA
model, then its deployed copy with nearest codes, GPTQ codes, and either with the grids tuned
(gridtune.py), each made as `deployment.__main__.deployed` makes it. "gptq-onepass" is GPTQ with
every layer's X^T X collected in one pass through the unquantized model (the project's way before
issue 23), against "gptq", the published block after block on the quantized blocks' outputs.

    .venv/bin/python bench/deploy_rounding.py --run runs/lamp7 --base <the run's M_base directory>
        [--rewrites <the run's rewrites .json>] [--users 702q1,705q1] [--tune-seed 0] [--out F.json]
        [--variants nearest,gptq,gptq-onepass]

The run prints its M_base directory ("M_base: cached ..." or "written ..."); its rewrites are in
$CDCDA_CACHE/rewrites/ (LaMP-7 with --history-pairs rewrite). Slow: about 4 minutes per user and
method on one CPU thread (SmolLM2-135M).
"""
import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cdcda  # noqa: E402
import data  # noqa: E402
import lora  # noqa: E402
import nf4  # noqa: E402
import qwen2  # noqa: E402
import train  # noqa: E402
from deployment import deploy, gptq, gridtune  # noqa: E402

VARIANTS = ("nearest", "gptq", "gptq-onepass", "nearest+tune", "gptq+tune", "gptq-onepass+tune")


def one_pass_state(model, calibration) -> dict:
    """The deployed state with GPTQ codes from one pass through the unquantized model: each
    layer's X^T X / T as the NF4 + LoRA model computes it, no block quantized before another.
    The grids are nearest rounding's (min-max of the weights, as for every rounding)."""
    layers = [layer for _, _, layer in deploy.block_linears(model)]
    hessians = gptq.input_hessians(layers, lambda: [model(torch.tensor([ids])) for ids in calibration])
    state, names = deploy.portable_state(model), {id(m): n for n, m in model.named_modules()}
    for layer, H in zip(layers, hessians):
        codes = gptq.quantize_layer(deploy.dense_weight(layer), H)[0]
        state[f"{names[id(layer)]}.weight"] = deploy.pack(codes).cpu().contiguous()
    return state


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="the --out directory of a `python -m deployment` run")
    p.add_argument("--base", required=True, help="that run's M_base directory")
    p.add_argument("--rewrites", default=None, help="that run's rewrites .json (LaMP-7, --history-pairs rewrite)")
    p.add_argument("--users", default=None, help="comma-separated user ids (default: every user of the run)")
    p.add_argument("--tune-seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the per-query gold NLL here (JSON)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {','.join(VARIANTS)}")
    args = p.parse_args()
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        p.error(f"--variants: no {', '.join(sorted(unknown))}; choose from {','.join(VARIANTS)}")
    run = Path(args.run)
    settings = json.loads((run / "run.json").read_text())
    task = data.get_task(settings["task"])
    rewrites = json.loads(Path(args.rewrites).read_text()) if args.rewrites else None
    users = {u.user_id: u for u in data.load_users(task.name, settings.get("data"))}
    wanted = args.users.split(",") if args.users else sorted(d.name for d in (run / "users").iterdir())
    base, tok = qwen2.load(args.base, "float32", "cpu")
    device_model = nf4.quantize_model(base, torch.bfloat16)  # as cdcda.run makes it
    max_length = settings["max_length"]
    results = {}
    for uid in wanted:
        user = users[uid]
        pairs = cdcda.upload(task, user, rewrites)
        lines = (run / "users" / uid / "synthetic.jsonl").read_text().splitlines()
        kept = [(r["syn_input"], r["syn_output"]) for r in map(json.loads, lines) if r["kept"]]
        for method, trained_on in (("direct-ft", pairs), ("cdcda", pairs + kept)):
            model = lora.add_lora(copy.deepcopy(device_model), r=settings["lora_r"], alpha=settings["lora_alpha"])
            lora.load_adapter(model, run / "users" / uid / f"{method}.adapter")
            model.eval()
            calibration = [train.encode_example(tok, messages, y, max_length)[0]
                           for messages, y in cdcda.examples(task, trained_on)]
            golds = [(task.messages(q.input), q.gold) for q in user.queries]
            nll = {"nf4+lora": train.nll(model, tok, golds, max_length)}
            makers = {"nearest": lambda: deploy.portable_state(model),
                      "gptq": lambda: deploy.portable_state(model, rounded=gptq.gptq_blocks(model, calibration)),
                      "gptq-onepass": lambda: one_pass_state(model, calibration)}
            states = {r: make() for r, make in makers.items() if any(v.split("+")[0] == r for v in variants)}
            for variant in variants:
                rounding, _, tuned = variant.partition("+")
                state = states[rounding]
                if tuned:
                    state = gridtune.tune(model, state, calibration, seed=args.tune_seed)
                deployed = deploy.from_portable(model.config, state)
                nll[variant] = train.nll(deployed, tok, golds, max_length)
            results[f"{uid}/{method}"] = nll
            ref = sum(nll["nf4+lora"]) / len(nll["nf4+lora"])
            changes = [f"{v} {100 * (sum(x) / len(x) / ref - 1):+.1f}%" for v, x in nll.items() if v != "nf4+lora"]
            print(f"{uid} {method}: NF4 + LoRA {ref:.3f}, " + ", ".join(changes), flush=True)
    for method in ("direct-ft", "cdcda"):
        rows = [r for k, r in results.items() if k.endswith("/" + method)]
        ref = sum(sum(r["nf4+lora"]) for r in rows)
        print(f"all users, {method}: " + ", ".join(f"{v} {100 * (sum(sum(r[v]) for r in rows) / ref - 1):+.1f}%"
                                                    for v in variants))
    if args.out:
        Path(args.out).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
