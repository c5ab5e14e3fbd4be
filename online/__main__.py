"""`python -m online`: the second system (Qin et al., DAC'24) on top of cdcda.py's run.

    python -m online --buffer 16 [--buffer-policy random] [--synthesis-filter rouge1]
        the device streams the user's history through a 16-item buffer (EOE + DSS + IDD, or
        reservoir sampling) and only the kept items are uploaded and trained on, by every
        method (`history`, in front of step 1); `--synthesis-filter rouge1` swaps step 3 for
        that paper's ROUGE-1 check (`buffer.rouge1_select`)
    python -m online --compare-buffers --data data/stream [--buffer-sizes 16,32]
        Direct-FT and CDCDA-PLM on what a 16- or 32-item buffer keeps (scores, random; with and
        without augmentation) against the whole history (`buffer_methods`), in OUT/buffers. The
        cloud augments the whole history once per user and a buffer row takes the synthetic
        pairs of its own items: the same prompts at the same temperature as uploading only those
        items would send, though not the same random draws (one seeded generator serves a whole
        upload, so a pair's draws depend on what else is in it).
Every other option is cdcda.py's.
"""
import functools
import json
import sys
from dataclasses import replace
from pathlib import Path

import cdcda
import hub
import options
from cdcda import Method
from errors import InputError
from online import buffer

BUFFER_SIZES = (16, 32)  # the comparison's buffer capacities (items)
OPTIONS = ("buffer", "buffer_policy", "synthesis_filter", "eps_rouge1")


def buffer_history(pairs, device_model, tokenizer, capacity: int, policy: str, seed: int):
    """The device streams D_u, oldest first, through a `capacity`-item buffer (policy "scores":
    EOE + DSS + IDD on its own embeddings; "random") and keeps only what the buffer holds.
    Returns (the kept pairs in arrival order, a summary)."""
    if len(pairs) <= capacity:
        print(f"  buffer of {capacity}: the history has only {len(pairs)} items, so it keeps them all")
    kept, summary = buffer.keep_history(device_model, tokenizer, [x for x, _ in pairs], capacity, policy, seed)
    return [pairs[i] for i in kept], summary | {"kept_indices": kept}


def history(capacity: int, policy: str):
    """`cdcda.Steps.history` for --buffer: what the buffer keeps, its summary in buffer.json."""
    def keep(pairs, device_model, tokenizer, seed, user_dir):
        pairs, summary = buffer_history(pairs, device_model, tokenizer, capacity, policy, seed)
        hub.write_atomic(user_dir / "buffer.json", json.dumps(summary, indent=1))
        return pairs, {"history": summary["seen"], "buffered": summary["kept"]}
    return keep


def buffered(capacity: int, policy: str, augmented: bool):
    """A row trained on the `capacity` items a buffer keeps (`buffer_history`), plus, when
    `augmented`, the kept synthetic pairs generated from those items."""
    name = f"{policy}-{capacity}" + ("+aug" if augmented else "")

    def method(run: cdcda.Run) -> list[str]:
        pairs, summary = buffer_history(run.pairs, run.device_model, run.tokenizer, capacity, policy, run.seed)
        hub.write_atomic(run.user_dir / f"buffer-{policy}-{capacity}.json", json.dumps(summary, indent=1))
        synthetic = []
        if augmented:
            sources = set(pairs)
            synthetic = [(r["syn_input"], r["syn_output"]) for r in cdcda.synthetic_records(run.user_dir)
                         if r["kept"] and (r["input"], r["output"]) in sources]
        return run.personalized(name, cdcda.download(pairs, synthetic))
    return name, method


def buffer_methods(capacities=BUFFER_SIZES) -> dict:
    """The comparison's rows: M_base, the whole history (Direct-FT, CDCDA-PLM), and for each
    capacity a buffer chosen by the scores or at random, without and with augmentation."""
    rows = {"base": "no personalization (M_base)", "direct-ft": "whole history",
            "cdcda": "whole history + augmentation"}
    methods = {m: cdcda.METHODS[m]._replace(label=label) for m, label in rows.items()}
    for capacity in capacities:
        for policy in ("scores", "random"):
            for augmented in (False, True):
                name, method = buffered(capacity, policy, augmented)
                label = f"{capacity}-item buffer, {'EOE+DSS+IDD' if policy == 'scores' else 'random'}"
                methods[name] = Method(label + (" + augmentation" if augmented else ""), method, augmented)
    return methods


def main(argv=None) -> dict:
    p = options.parser(cdcda.METHODS)
    p.description = "cdcda.py's run with Qin et al.'s on-device buffer, or the buffers against the whole history"
    p.add_argument("--buffer", type=int, default=0, metavar="N", help="keep only N history items, chosen "
                   "online on the device (default 0: the whole history)")
    p.add_argument("--buffer-policy", default="scores", choices=["scores", "random"],
                   help="how --buffer chooses: EOE + DSS + IDD, or reservoir sampling")
    p.add_argument("--synthesis-filter", default="cdcda", choices=["cdcda", "rouge1"],
                   help="step 3: the paper's SCF + TDF + LSF, or Qin et al.'s ROUGE-1 check")
    p.add_argument("--eps-rouge1", type=float, default=buffer.EPS_ROUGE1, help="--synthesis-filter rouge1's threshold")
    p.add_argument("--compare-buffers", action="store_true", help="whole history vs 16/32-item online "
                   "buffers (scores, random), each with and without augmentation, in OUT/buffers")
    p.add_argument("--buffer-sizes", default=",".join(map(str, BUFFER_SIZES)), metavar="N,N",
                   help="--compare-buffers' capacities (items)")
    p.add_argument("--buffer-rows", default="all", metavar="ROW,ROW", help="--compare-buffers' rows (default all: "
                   "base, direct-ft, cdcda, then scores-N, random-N, each also +aug)")
    args = p.parse_args(argv)
    options.check_ranges(p, args, {
        "buffer": (lambda v: v >= 0, "0 (the whole history) or a positive number of items"),
        "eps_rouge1": (lambda v: 0 <= v <= 1, "in [0, 1]")})
    if args.compare_buffers and args.buffer:
        p.error("--compare-buffers streams every user through its own buffers; drop --buffer")
    sizes = args.buffer_sizes.split(",")
    if not all(n.isdigit() and int(n) > 0 for n in sizes):
        p.error(f"--buffer-sizes: {args.buffer_sizes!r} is not a comma-separated list of positive integers")
    methods = buffer_methods([int(n) for n in sizes]) if args.compare_buffers else cdcda.METHODS
    if args.compare_buffers:
        rows = list(methods) if args.buffer_rows == "all" else args.buffer_rows.split(",")
        if unknown := [r for r in rows if r not in methods]:
            p.error(f"--buffer-rows: no row {', '.join(unknown)}; the rows are {','.join(methods)}")
        args.methods, methods = ",".join(rows), {r: methods[r] for r in rows}
        args.out = str(Path(args.out or Path("runs") / args.task) / "buffers")
    settings = options.check(p, args, methods, extra=OPTIONS)
    roles, steps = {}, cdcda.Steps()
    if args.buffer:
        roles["history"] = f"{args.buffer}-item online buffer, {args.buffer_policy} (Qin et al.)"
        steps = replace(steps, history=history(args.buffer, args.buffer_policy))
    if args.synthesis_filter == "rouge1":
        roles["synthesis filter"] = f"ROUGE-1 > {args.eps_rouge1} (Qin et al.)"
        steps = replace(steps, select=functools.partial(buffer.rouge1_select, threshold=args.eps_rouge1))
    return cdcda.run(replace(settings, roles=roles), methods, steps)


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"python -m online: error: {e}")
