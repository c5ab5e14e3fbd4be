"""The paper's comparisons on top of cdcda.py's pipeline (sec. 5.2-5.5).

    python cdcda.py --task lamp7 --methods all   Table 1: the eleven rows (`TABLE1`)
    python cdcda.py --task lamp7 --ablations     Table 2: RS, -DS, -LDA, -FT (`ABLATIONS`)
    python cdcda.py --task lamp7 --sweep-k       Figure 2: CDCDA-PLM at k = 1, 3, 5, and a PNG
    python cdcda.py --task lamp7 --efficiency    Table 3: size, time to first token, tokens/s
    python cdcda.py --task lamp7 --compare-buffers --data data/stream
                                                 Qin et al.'s online buffer against the whole history

Each row is a function of a `cdcda.Run` (one target user) in `METHODS`; the pipeline runs,
caches and scores them like its own three:
- cloud: M_cloud answers the appendix-B prompt, not personalized ("base": M_base does).
- RAG (sec. 5.1, "one retriever item"): the user's profile item that ranks first for the
  query's content (the query input without the task instruction, as `cdcda.upload` cuts it
  from the pairs) goes into the prompt's {RETRIEVED USER HISTORY}. BM25: Okapi, k1 = 1.2,
  b = 0.75 (baselines.BM25). Dense: the embedded MiniLM, cosine; "+contriever" rows use
  facebook/contriever, unnormalised dot product (a hub download: not in `--methods all`).
- speculative: M_cloud drafts gamma = 4 tokens, the personalized device model (Direct-FT's
  adapter on M_base: the row sits among the on-device personalized ones) verifies by exact
  rejection sampling, so the output is distributed as Direct-FT's (baselines.py says why);
  the acceptance rate is reported.
- eda-ft: Direct-FT on D_u plus EDA variants of each pair's input (response kept): k variants
  per pair (the augmentation budget CDCDA-PLM gets), alpha = 0.1, WordNet 3.0 from Debian's
  wordnet-base.
- rkd-ft: LoRA on M_base trained with the token-level reverse KL to M_cloud on D_u's responses
  (needs one tokenizer for both models).
- buffers (`buffer_methods`): Direct-FT and CDCDA-PLM on what a 16- or 32-item buffer keeps of
  the history (chosen by EOE + DSS + IDD, or at random), against the whole history. The cloud
  augments the whole history once per user and a buffer row takes the synthetic pairs of its
  own items: the same prompts at the same temperature as uploading only those items would
  send, though not the same random draws (one seeded generator serves a whole upload, so a
  pair's draws depend on what else is in it).
- ablations: rs keeps as many random parsed candidates as the filters kept (seeded); no-ds
  trains on all parsed candidates; -LDA is Direct-FT and -FT is M_base (cdcda.METHODS).
"""
import argparse
import copy
import functools
import json
import random
import statistics
import struct
import time
import zlib
from pathlib import Path

import torch

import baselines
import cdcda
import encoder
import lora
import nf4
import qwen2

WORDNET_DIR = "/usr/share/wordnet"  # Debian's wordnet-base
CONTRIEVER = "facebook/contriever"
GAMMA = 4  # drafted tokens per verification
EDA_ALPHA = 0.1


# ---------------------------------------------------------------- models, loaded once per process
@functools.cache
def load_cloud(source: str, device: str):
    print(f"loading the cloud model {source} in process for the cloud baselines")
    return qwen2.load(source, "float32", device)


def cloud_lm(run: cdcda.Run):
    """(model, tokenizer) of M_cloud: the run's, or loaded here when the pipeline did not load it
    (no method needed synthetic data) or only has its tokenizer (--cloud-api)."""
    if run.cloud is not None and run.cloud[0] is not None:
        return run.cloud
    return load_cloud(run.args.cloud_model, run.args.device)


load_encoder = functools.cache(encoder.load)  # (source, dtype, device) -> (model, tokenizer)
wordnet = functools.cache(baselines.load_wordnet)  # directory -> {lemma: synonyms}


# ---------------------------------------------------------------- Table 1
def reply(model, tokenizer, run: cdcda.Run, conversations, method: str) -> list[str]:
    return qwen2.chat(model, tokenizer, conversations, max_new_tokens=cdcda.ANSWER_TOKENS[run.task.name],
                      temperature=run.args.temperature, seed=run.seed, desc=f"answer {method}")


def retrieve(run: cdcda.Run, retriever: str) -> list[dict]:
    """The one profile item each query retrieves: ranked by BM25 or by a dense encoder for the
    query's content, over each item's field values."""
    documents = [" ".join(str(item[f]) for f in run.task.profile_fields) for item in run.user.profile]
    prefix = cdcda.instruction(run.task)
    picked = []
    for q in run.user.queries:
        query = q.input.removeprefix(prefix)
        if retriever == "bm25":
            (i,) = baselines.retrieve_bm25(query, documents, k=1)
        else:
            model, tok = load_encoder(retriever, "float32", run.args.device)
            embed = functools.partial(encoder.sentence_embeddings, model, tok, normalize=retriever != CONTRIEVER)
            (i,) = baselines.retrieve_dense(query, documents, embed, k=1)
        picked.append(run.user.profile[i])
    return picked


def prompted(where: str, retriever: str | None = None):
    """A row where M_cloud or the device's M_base answers the appendix-B prompt as it is, or
    with one retrieved item in it (RAG) when a retriever is named."""
    def method(run: cdcda.Run) -> list[str]:
        model, tok = cloud_lm(run) if where == "cloud" else (run.device_model, run.tokenizer)
        items = retrieve(run, retriever) if retriever else [None] * len(run.user.queries)
        conversations = [run.task.messages(q.input, retrieved=[item] if item else [])
                         for q, item in zip(run.user.queries, items)]
        return reply(model, tok, run, conversations, where + (f"+{retriever}" if retriever else ""))
    return method


def direct_ft_model(run: cdcda.Run):
    """The Direct-FT personalized device model: its adapter from this user's directory when the
    direct-ft row already trained it (same settings: cdcda.main checks), else trained here."""
    path = run.user_dir / "direct-ft.adapter.safetensors"
    if path.is_file():
        model = lora.add_lora(copy.deepcopy(run.device_model), r=run.args.lora_r, alpha=run.args.lora_alpha)
        return lora.load_adapter(model, path).eval()
    model, run.losses["direct-ft"] = cdcda.personalize(run.device_model, run.tokenizer, run.task, run.pairs,
                                                       run.args, run.seed, f"direct-ft {run.user.user_id}")
    lora.save_adapter(model, path)
    return model


def speculative(run: cdcda.Run) -> list[str]:
    """Speculative decoding, one query at a time: M_cloud drafts, Direct-FT's model verifies."""
    target, tok = direct_ft_model(run), run.tokenizer
    draft, cloud_tok = cloud_lm(run)
    baselines.check_shared_tokenizer(tok, cloud_tok, "cloud")
    same = target.config.vocab_size == draft.config.vocab_size
    generator = torch.Generator().manual_seed(run.seed)
    answers, totals = [], {"drafted": 0, "accepted": 0, "target_calls": 0, "new_tokens": 0}
    for q in run.user.queries:
        prompt = tok.encode(tok.apply_chat_template(run.task.messages(q.input)))
        ids, stats = baselines.speculative_generate(
            target, draft, torch.tensor([prompt]), cdcda.ANSWER_TOKENS[run.task.name], gamma=GAMMA,
            temperature=run.args.temperature, eos_token_id=tok.eos_token_ids, generator=generator,
            vocab_size=None if same else tok.tokenizer.get_vocab_size())
        answers.append(tok.decode(ids[0, len(prompt):].tolist()).strip())  # up to the eos (special: dropped)
        totals = {key: totals[key] + stats[key] for key in totals}
    cdcda.write_atomic(run.user_dir / "speculative.json", json.dumps(totals))
    return answers


def eda_pairs(run: cdcda.Run) -> list[tuple[str, str]]:
    """D_u plus k EDA variants of each pair's input, each with the pair's response."""
    rng, wn = random.Random(run.seed), wordnet(WORDNET_DIR)
    return list(run.pairs) + [(variant, y) for x, y in run.pairs
                              for variant in baselines.eda(x, wn, alpha=EDA_ALPHA, n_aug=run.args.k, rng=rng)]


def rkd_ft(run: cdcda.Run) -> list[str]:
    """RKD-FT: a fresh LoRA on M_base distilled from M_cloud with reverse KL on D_u."""
    teacher, cloud_tok = cloud_lm(run)
    student = lora.add_lora(copy.deepcopy(run.device_model), r=run.args.lora_r, alpha=run.args.lora_alpha)
    prefix, a = cdcda.instruction(run.task), run.args
    examples = [(run.task.messages(prefix + x), y) for x, y in run.pairs]
    run.losses["rkd-ft"] = baselines.rkd_finetune(
        student, teacher, run.tokenizer, examples, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
        max_length=a.max_length, seed=run.seed, desc=f"rkd-ft {run.user.user_id}", teacher_tokenizer=cloud_tok)
    lora.save_adapter(student, run.user_dir / "rkd-ft.adapter.safetensors")
    return run.answer(student.eval(), "rkd-ft")


# ---------------------------------------------------------------- Table 2
def candidates(run: cdcda.Run) -> list[tuple[str, str]]:
    """Every parsed candidate of this user (kept or not), from the synthesize step's cache."""
    return [(r["syn_input"], r["syn_output"]) for r in cdcda.synthetic_records(run.user_dir)]


def random_selection(run: cdcda.Run) -> list[tuple[str, str]]:
    """RS: as many parsed candidates as the filters kept, drawn at random (seeded per user)."""
    return random.Random(run.seed).sample(candidates(run), len(run.kept))


TABLE1 = ["cloud", "base", "cloud+bm25", "device+bm25", "cloud+dense", "device+dense", "direct-ft",
          "speculative", "eda-ft", "rkd-ft", "cdcda"]  # direct-ft first: speculative reuses its adapter
ABLATIONS = {"cdcda": "Full model (DS)", "rs": "Full model (RS)", "no-ds": "-DS",
             "direct-ft": "-DS -LDA", "base": "-DS -LDA -FT"}  # Table 2's rows, its labels
METHODS = {
    **cdcda.METHODS,
    "cloud": ("M_cloud (non-personalized)", prompted("cloud"), False),
    "cloud+bm25": ("M_cloud + BM25", prompted("cloud", "bm25"), False),
    "device+bm25": ("M_device + BM25", prompted("device", "bm25"), False),
    "cloud+dense": (f"M_cloud + dense ({encoder.EMBEDDED})", prompted("cloud", encoder.EMBEDDED), False),
    "device+dense": (f"M_device + dense ({encoder.EMBEDDED})", prompted("device", encoder.EMBEDDED), False),
    "cloud+contriever": ("M_cloud + Contriever", prompted("cloud", CONTRIEVER), False),
    "device+contriever": ("M_device + Contriever", prompted("device", CONTRIEVER), False),
    "speculative": ("Speculative (M_cloud drafts, Direct-FT verifies)", speculative, False),
    "eda-ft": ("EDA-FT", lambda run: run.personalized("eda-ft", eda_pairs(run)), False),
    "rkd-ft": ("RKD-FT", rkd_ft, False),
    "rs": ("CDCDA-PLM, random selection (RS)", lambda run: run.personalized(
        "rs", cdcda.download(run.pairs, random_selection(run))), True),
    "no-ds": ("CDCDA-PLM, no selection (-DS)", lambda run: run.personalized(
        "no-ds", cdcda.download(run.pairs, candidates(run))), True),
}


# ---------------------------------------------------------------- the second system: online buffers
def buffered(capacity: int, policy: str, augmented: bool):
    """A row trained on the `capacity` items a buffer keeps (see `cdcda.buffer_history`), plus,
    when `augmented`, the kept synthetic pairs generated from those items."""
    name = f"{policy}-{capacity}" + ("+aug" if augmented else "")

    def method(run: cdcda.Run) -> list[str]:
        pairs, summary = cdcda.buffer_history(run.pairs, run.device_model, run.tokenizer, capacity, policy, run.seed)
        cdcda.write_atomic(run.user_dir / f"buffer-{policy}-{capacity}.json", json.dumps(summary, indent=1))
        synthetic = []
        if augmented:
            sources = set(pairs)
            synthetic = [(r["syn_input"], r["syn_output"]) for r in cdcda.synthetic_records(run.user_dir)
                         if r["kept"] and (r["input"], r["output"]) in sources]
        return run.personalized(name, cdcda.download(pairs, synthetic))
    return name, method


BUFFER_SIZES = (16, 32)  # the buffer capacities (items)


def buffer_methods(capacities=BUFFER_SIZES) -> dict:
    """The comparison's rows: M_base, the whole history (Direct-FT, CDCDA-PLM), and for each
    capacity a buffer chosen by the scores or at random, without and with augmentation."""
    rows = {"base": "no personalization (M_base)", "direct-ft": "whole history",
            "cdcda": "whole history + augmentation"}
    methods = {m: (label, *cdcda.METHODS[m][1:]) for m, label in rows.items()}
    for capacity in capacities:
        for policy in ("scores", "random"):
            for augmented in (False, True):
                name, method = buffered(capacity, policy, augmented)
                label = f"{capacity}-item buffer, {'EOE+DSS+IDD' if policy == 'scores' else 'random'}"
                methods[name] = (label + (" + augmentation" if augmented else ""), method, augmented)
    return methods


# ---------------------------------------------------------------- Table 3
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
    qwen2.generate(model, ids, 2, temperature=0, eos_token_id=None)  # warm-up
    ttft, decode = [], []
    for _ in range(runs):
        t = time.perf_counter()
        qwen2.generate(model, ids, 1, temperature=0, eos_token_id=None)
        first = time.perf_counter() - t
        t = time.perf_counter()
        qwen2.generate(model, ids, new_tokens, temperature=0, eos_token_id=None)
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


# ---------------------------------------------------------------- Figure 2's plot, PNG by hand
def write_png(path: Path, pixels: list[list[tuple[int, int, int]]]) -> None:
    """An RGB image (rows of (r, g, b)) as PNG: signature, IHDR, one zlib IDAT, IEND."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in pixels)  # filter 0 per row
    header = struct.pack(">IIBBBBB", len(pixels[0]), len(pixels), 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


COLORS = {"blue": (31, 119, 180), "orange": (255, 127, 14), "green": (44, 160, 44)}


def plot(path: Path, ks: list[int], series: dict[str, list[float]], w: int = 320, h: int = 200) -> None:
    """Each metric against k, one colour each (COLORS order): x from the first k to the last,
    y from 0 (the x axis) to the largest value. No text (no font): the Markdown names the colours."""
    img = [[(255, 255, 255)] * w for _ in range(h)]
    top = max(max(v) for v in series.values()) or 1.0

    def px(k, v):  # (column, row) of the point (k, v)
        return 20 + (w - 40) * (k - ks[0]) // max(ks[-1] - ks[0], 1), round((h - 20) * (1 - v / top)) + 10
    lines = [((0, 0, 0), [(20, h - 10), (w - 20, h - 10)]), ((0, 0, 0), [(20, h - 10), (20, 10)])]  # the axes
    lines += [(colour, [px(k, v) for k, v in zip(ks, vs)]) for colour, vs in zip(COLORS.values(), series.values())]
    for colour, points in lines:
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            for s in range(257):
                img[round(y0 + (y1 - y0) * s / 256)][round(x0 + (x1 - x0) * s / 256)] = colour
    for colour, points in lines[2:]:  # 5x5 markers at the measured points
        for x, y in points:
            for dy in range(-2, 3):
                img[y + dy][x - 2:x + 3] = [colour] * 5
    write_png(path, img)


# ---------------------------------------------------------------- the command
def finish(rep: dict, out: Path, name: str, title: str | None = None, note: str = "", show: bool = True) -> None:
    """Write rep as out/name.json and .md (cdcda.markdown, `title` replacing its heading, `note`
    appended); print the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    cdcda.write_atomic(out / f"{name}.json", json.dumps(rep, indent=1))
    md = cdcda.markdown(rep) + note
    md = f"# {title}\n" + md.split("\n", 1)[1] if title else md
    cdcda.write_atomic(out / f"{name}.md", md)
    print(("\n" + md if show else note) + f"\nwritten: {out / name}.json, {out / name}.md")


def acceptance(rep: dict, out: Path) -> str:
    """The speculative row's acceptance rate (accepted / drafted tokens, all target users), put
    in rep["speculative"]; returns the line for the Markdown."""
    totals = [json.loads((out / "users" / u / "speculative.json").read_text()) for u in rep["users"]]
    rep["speculative"] = {key: sum(t[key] for t in totals) for key in totals[0]}
    drafted, accepted = rep["speculative"]["drafted"], rep["speculative"]["accepted"]
    rep["speculative"]["acceptance_rate"] = accepted / drafted if drafted else float("nan")
    return (f"speculative decoding (M_cloud drafts {GAMMA} tokens, Direct-FT's model verifies): {accepted} of "
            f"{drafted} drafted tokens accepted, acceptance rate {rep['speculative']['acceptance_rate']:.3f}\n")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="cdcda.py with the paper's baselines, ablations, k sweep "
                                "and efficiency table; every other option is cdcda.py's", add_help=False)
    p.add_argument("--methods", default=None, help=f"'all' ({','.join(TABLE1)}) or names from {','.join(METHODS)}")
    p.add_argument("--ablations", action="store_true", help=f"Table 2 ({','.join(ABLATIONS)}) in OUT/ablations")
    p.add_argument("--sweep-k", action="store_true", help="Figure 2: cdcda at k = 1, 3, 5 in OUT/sweep-k/k<k>")
    p.add_argument("--efficiency", action="store_true", help="Table 3: OUT/efficiency.{json,md}")
    p.add_argument("--compare-buffers", action="store_true", help="whole history vs 16/32-item online "
                   "buffers (scores, random), each with and without augmentation, in OUT/buffers")
    own, rest = p.parse_known_args(argv)
    if {"-h", "--help"} & set(rest):
        p.print_help()
        print("\ncdcda.py's options:")
    if own.methods:
        rest += ["--methods", ",".join(TABLE1) if own.methods == "all" else own.methods]
    args = cdcda.parse_args(rest, METHODS)  # checks everything else (and prints cdcda.py's --help)
    out = Path(args.out or Path("runs") / args.task)
    reports = {}
    if own.methods or not (own.ablations or own.sweep_k or own.efficiency or own.compare_buffers):
        reports["table1"] = rep = cdcda.main(rest, METHODS)
        if "speculative" in rep["rows"]:
            finish(rep, out, "results", note=acceptance(rep, out), show=False)
    if own.ablations:
        methods = {m: (label, *METHODS[m][1:]) for m, label in ABLATIONS.items()}
        reports["ablations"] = cdcda.main(rest + ["--methods", ",".join(ABLATIONS), "--out", str(out / "ablations")],
                                          methods)
    if own.compare_buffers:
        if args.buffer:
            raise ValueError("--compare-buffers streams every user through its own buffers; drop --buffer")
        methods = buffer_methods(BUFFER_SIZES)
        reports["buffers"] = cdcda.main(rest + ["--methods", ",".join(methods), "--out", str(out / "buffers")],
                                        methods)
    if own.sweep_k:
        reports["sweep_k"] = sweep(rest, out / "sweep-k")
    if own.efficiency:
        reports["efficiency"] = rep = efficiency(args)
        finish(rep, out, "efficiency", title="Table 3: inference efficiency on this machine")
    return reports


def sweep(rest: list[str], out: Path, ks=(1, 3, 5)) -> dict:
    """Figure 2: CDCDA-PLM at each k, each in its own directory (its own synthetic data)."""
    reps = {k: cdcda.main(rest + ["--methods", "cdcda", "--k", str(k), "--out", str(out / f"k{k}")]) for k in ks}
    first = reps[ks[0]]
    rep = {**first, "labels": {f"k={k}": f"CDCDA-PLM, k = {k}" for k in ks},
           "rows": {f"k={k}": r["rows"]["cdcda"] for k, r in reps.items()},
           "counts": {f"kept (k={k})": r["counts"].get("kept", 0) for k, r in reps.items()},
           "seconds": {f"k={k}": sum(r["seconds"].values()) for k, r in reps.items()},
           "settings": {**first["settings"], "k": list(ks)}}
    metric_names = [m for m in first["rows"]["cdcda"] if m != "bertscore_model"][:len(COLORS)]
    series = {m: [rep["rows"][f"k={k}"][m] for k in ks] for m in metric_names}
    plot(out / "sweep-k.png", list(ks), series)
    rep["plot"] = {"file": "sweep-k.png", "x": "k", "lines": dict(zip(COLORS, metric_names))}
    legend = ", ".join(f"{colour} {m}" for colour, m in rep["plot"]["lines"].items())
    finish(rep, out, "sweep-k", note=f"![Figure 2](sweep-k.png) x: k = {', '.join(map(str, ks))}; y: 0 to the "
           f"largest value; {legend}\n")
    return rep


if __name__ == "__main__":
    main()
