"""`python -m online`: the second system (Qin et al., DAC'24) on top of cdcda.py's run.

    python -m online --buffer 16 [--buffer-policy random] [--synthesis-filter rouge1]
        the device streams the user's history through a 16-item buffer (EOE + DSS + IDD, or
        reservoir sampling) and only the kept items are uploaded and trained on, by every
        row (`methods.history_methods`: the buffer in front of step 1); `--synthesis-filter
        rouge1` swaps step 3 for that paper's ROUGE-1 check (`buffer.rouge1_select`)
    python -m online --compare-buffers --data data/stream [--buffer-sizes 16,32]
        Direct-FT and CDCDA-PLM on what a 16- or 32-item buffer keeps (scores, random; with and
        without augmentation) against the whole history (`buffer_methods`), in OUT/buffers. The
        cloud augments the whole history once per user and a buffer row takes the synthetic
        pairs of its own items: the same prompts at the same temperature as uploading only those
        items would send, though not the same random draws (one seeded generator serves a whole
        upload, so a pair's draws depend on what else is in it).
Every other option is cdcda.py's.
"""
import sys
from dataclasses import replace
from pathlib import Path

import cdcda
import options
import runner
from errors import InputError
from online import buffer
from online.methods import BUFFER_SIZES, OPTIONS, buffer_methods, history_methods


def main(argv=None) -> dict:
    p = options.parser(cdcda.METHODS)
    p.prog = "python -m online"
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
    roles = {}
    if args.buffer:
        roles["history"] = f"{args.buffer}-item online buffer, {args.buffer_policy} (Qin et al.)"
    if args.synthesis_filter == "rouge1":
        roles["synthesis filter"] = f"ROUGE-1 > {args.eps_rouge1} (Qin et al.)"
    if not args.compare_buffers:
        methods = history_methods(args.buffer, args.buffer_policy, args.synthesis_filter, args.eps_rouge1)
    return runner.run(replace(settings, roles=roles), methods, cdcda.prepare, cdcda.Family())


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"python -m online: error: {e}")
