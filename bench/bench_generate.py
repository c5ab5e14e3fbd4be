"""Step 2's generation: main's code, ours and transformers' in one run; the cloud service's requests/s.

augment   step 2 (structured decoding, k = 5, T = 0.7, the run's seeds and budgets) on the lamp7
          demo's prompts: each target user's history pairs as the demo uploads them (with the
          history rewrites, read from the model cache or written first), user by user:
  main          main's own code (452a1fd, `git archive` into a temporary directory, run in a
                subprocess): every reply prefilled, a prompt's k copies too; structured decoding in
                two passes, the second prefilling the prompt and the sampled input again; a batch
                decodes until its longest reply ends
  ours          `augment.augment` now: a prompt prefilled once for its k replies, the scaffold
                written where the input ends and the response decoded from the same cache,
                finished replies leaving the batch
  ours, bf16    the same with the cloud LM in bfloat16 (`--cloud-dtype bfloat16`)
  transformers  main's two passes with transformers' `generate(num_return_sequences=k,
                do_sample=True)`: the same model files, fp32, sdpa attention, 32 replies a batch
          Reported: seconds, reply tokens per second (the replies' texts re-encoded), the
          ratios, and what step 3 keeps of each path's candidates.
server    `python -m cloud.server` in its own process; --requests chat completions at concurrency
          1, 4, 16 and 1 again (the load may drift), in two shapes (`bench_server`), over the
          demo's first user's pairs (each prompt asked once before, so that every level finds it
          in the server's prefix cache).
beside    a short chat request's seconds alone and while a 4,000-token upload is being served,
          at each of --chunks (the server's --prefill-chunk; 8192: chunking off) (`bench_beside`).

    .venv/bin/python bench/bench_generate.py [--parts augment,server,beside] [--users 3] [--requests 32]
                                             [--prefix-cache 2048]

Prints only; writes nothing but the model cache. Run it on a quiet machine (it prints the load).
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import augment  # noqa: E402
import cdcda  # noqa: E402
import data  # noqa: E402
import filters  # noqa: E402
import generate  # noqa: E402
import options  # noqa: E402
import qwen2  # noqa: E402
from cloud import client  # noqa: E402
from cloud.batcher import PREFILL_CHUNK, PREFIX_TOKENS  # noqa: E402
from embedded import smollm2  # noqa: E402

MAIN = "452a1fd"  # main before issue 24
BATCH = generate.BATCH

# runs in the subprocess, in main's tree: its augment.augment per user, timed; the replies' texts out
MAIN_SCRIPT = """
import json, sys, time
import augment, data, generate, qwen2
job = json.load(open(sys.argv[1]))
model, tok = qwen2.load(qwen2.EMBEDDED, "float32", "cpu")
texts, real_chat = [], generate.chat
def chat(*a, **kw):
    replies = real_chat(*a, **kw)
    if kw.get("desc", "").endswith("responses"):
        texts.extend(r + "]" for r in replies)
    return replies
out = []
for user in job["users"]:
    texts.clear()
    t = time.perf_counter()
    augment.augment(model, tok, [tuple(p) for p in user["pairs"]], job["k"], job["temperature"], user["seed"],
                    chat=chat, task=data.get_task("lamp7"), max_len_ratio=job["ratio"], structured=True)
    out.append({"seconds": time.perf_counter() - t, "texts": list(texts)})
json.dump(out, open(sys.argv[2], "w"))
"""


def demo_uploads(settings, n_users: int) -> list[dict]:
    """Each target user's D_u and seed, as the demo's run makes them."""
    task = data.get_task("lamp7")
    users = data.load_users(task.name)
    judge = filters.make_judge(settings.judge, "cpu")
    t = time.perf_counter()
    rewrites = cdcda.history_rewrites(task, users, settings, judge, cdcda.Family())
    print(f"history rewrites (the model cache, else written now): {time.perf_counter() - t:.1f} s")
    targets = data.split_users(users, n_users)[0]
    return [{"user": u.user_id, "pairs": cdcda.upload(task, u, rewrites),
             "seed": settings.seed + zlib.crc32(u.user_id.encode()) % 10_000} for u in targets]  # as run_user


def main_path(uploads, settings) -> list[dict]:
    """main's augment.augment, in main's own tree, in a subprocess (one model load, not timed)."""
    a = settings
    with tempfile.TemporaryDirectory() as tmp:
        tree, job, out = Path(tmp) / "main", Path(tmp) / "job.json", Path(tmp) / "out.json"
        tree.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", MAIN], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        job.write_text(json.dumps({"users": uploads, "k": a.k, "temperature": a.temperature,
                                   "ratio": a.eps_max_len}))
        env = dict(os.environ, PYTHONPATH=str(tree), TQDM_DISABLE="1")
        subprocess.run([sys.executable, "-c", MAIN_SCRIPT, str(job), str(out)], cwd=tree, env=env, check=True)
        return json.loads(out.read_text())


def ours(model, tok, upload, settings) -> dict:
    """augment.augment now, timed; its replies' texts."""
    texts = []

    def chat(*a, **kw):
        replies = generate.chat(*a, **kw)
        texts.extend(r + "]" for r in replies)
        return replies
    t = time.perf_counter()
    augment.augment(augment.CloudLM(model, tok, chat), upload["pairs"], settings, upload["seed"],
                    data.get_task("lamp7"))
    return {"seconds": time.perf_counter() - t, "texts": texts}


def hf_pass(hf, tok, prompts, n, max_new, temperature, seed) -> list[str]:
    """transformers' replies cut at "]", n per prompt, BATCH // n prompts a batch."""
    ends, per = generate.end_ids(tok, "]"), max(1, BATCH // n)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts = [None] * (len(prompts) * n)
    torch.manual_seed(seed)
    for start in range(0, len(order), per):
        rows = order[start:start + per]
        ids, mask = generate.left_pad([prompts[i] for i in rows], tok.pad_token_id)
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=True, temperature=temperature,
                          top_k=0, top_p=1.0, num_return_sequences=n, eos_token_id=ends, pad_token_id=tok.pad_token_id)
        for j, new in enumerate(out[:, ids.shape[1]:].tolist()):
            texts[rows[j // n] * n + j % n] = generate.reply_text(tok, new, "]")[0]
    return texts


def transformers_path(hf, tok, upload, settings) -> dict:
    """main's two passes, each with transformers' generate: k samples of each prompt, then the responses."""
    a, pairs = settings, upload["pairs"]
    ratio, k = a.eps_max_len, a.k
    t = time.perf_counter()
    convs = [[{"role": "user", "content": augment.AUGMENT_PROMPT.format(x=x, y=y)}] for x, y in pairs]
    first = [tok.encode(tok.apply_chat_template(c) + augment.REPLY_PREFIX) for c in convs]
    xs = [(augment.REPLY_PREFIX + x).strip() for x in hf_pass(
        hf, tok, first, k, augment.generation_budget(tok, [x for x, _ in pairs], ratio), a.temperature,
        upload["seed"])]
    second = [tok.encode(tok.apply_chat_template(c) + x + augment.SCAFFOLD)
              for c, x in zip([c for c in convs for _ in range(k)], xs)]
    ys = hf_pass(hf, tok, second, 1, augment.generation_budget(tok, [y for _, y in pairs], ratio), a.temperature,
                 upload["seed"] + 1)
    return {"seconds": time.perf_counter() - t, "texts": [(x + augment.SCAFFOLD + y).strip() + "]"
                                                          for x, y in zip(xs, ys)]}


def bench_augment(args, settings, tok):
    uploads = demo_uploads(settings, args.users)
    k = settings.k
    results = {}
    print("main's path (452a1fd) in a subprocess ...", flush=True)
    results["main (452a1fd)"] = main_path(uploads, settings)
    paths = {"ours": qwen2.load(qwen2.EMBEDDED, "float32")[0], "ours, bf16": qwen2.load(qwen2.EMBEDDED, "bfloat16")[0]}
    hf = None
    if not args.no_transformers:
        import transformers
        hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2.embedded_dir(), dtype=torch.float32,
                                                               attn_implementation="sdpa").eval()
    with torch.inference_mode():
        for name, model in paths.items():
            results[name] = [ours(model, tok, u, settings) for u in uploads]
        if hf is not None:
            results["transformers"] = [transformers_path(hf, tok, u, settings) for u in uploads]
    task, judge = data.get_task("lamp7"), filters.make_judge(settings.judge, "cpu")
    originals = [p for u in uploads for p in u["pairs"] for _ in range(k)]
    seconds = {name: sum(r["seconds"] for r in runs) for name, runs in results.items()}
    print(f"\naugmentation: {len(uploads)} users, {len(originals) // k} pairs x k = {k}, structured, "
          f"T = {settings.temperature}, {torch.get_num_threads()} threads, "
          f"load average before / after: {args.load} / {os.getloadavg()[0]:.2f}")
    print("| path | seconds | reply tokens/s | speed-up over main | over transformers | unparsable | kept |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        texts = [t for r in runs for t in r["texts"]]
        assert len(texts) == len(originals), (name, len(texts))
        tokens = sum(len(tok.encode(t)) for t in texts)
        parsed = [(o, augment.parse_pair(t)) for o, t in zip(originals, texts)]
        good = [(o, p) for o, p in parsed if p is not None and task.valid_output(p[1])]
        candidates = data.Candidates(list(range(len(good))), [p for _, p in good], {})
        sel = filters.select([o for o, _ in good], candidates, judge, settings)
        over_hf = f"{seconds['transformers'] / seconds[name]:.2f}x" if "transformers" in seconds else "-"
        print(f"| {name} | {seconds[name]:.1f} | {tokens / seconds[name]:.1f} | "
              f"{seconds['main (452a1fd)'] / seconds[name]:.2f}x | {over_hf} | {len(texts) - len(good)} | "
              f"{sel.counts['kept']} of {len(texts)} |")


def start_server(extra: list[str]):
    """`python -m cloud.server` on a free port with these options: (its URL, process, log)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.NamedTemporaryFile("w+", suffix=".log")
    proc = subprocess.Popen([sys.executable, "-m", "cloud.server", "--port", str(port)] + extra,
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2).close()
            return url, proc, log
        except OSError:
            if proc.poll() is not None:
                log.seek(0)
                raise SystemExit(f"cloud.server exited:\n{log.read()[-2000:]}")
            time.sleep(0.3)


def bench_beside(args, tok):
    """A short chat request (16 new tokens) timed alone, then sent 1 s after an upload of one
    4,000-token pair (k = 1, free decoding, eps_max_len 0.9 so that its budget fits the context);
    at each --chunks value of --prefill-chunk (8192, longer than the prompt, is chunking off: the
    upload's prefill in one piece). The upload's own seconds show what chunking costs it."""
    x = " ".join(f"rain {i % 97}" for i in range(1_000))  # about 4,000 tokens
    upload = {"task": "lamp7", "pairs": [[x, "ugh rain again"]], "k": 1, "seed": 0, "decoding": "free",
              "thresholds": {"eps_max_len": 0.9}}
    chat = {"messages": [{"role": "user", "content": "Say hi in five words."}], "max_tokens": 16,
            "temperature": 0.7, "seed": 1}
    prompt = len(tok.encode(tok.apply_chat_template([{"role": "user", "content": augment.AUGMENT_PROMPT.format(
        x=x, y="ugh rain again")}]) + augment.REPLY_PREFIX))

    def post(url, body):
        t = time.perf_counter()
        request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=3600) as r:
            answer = json.loads(r.read())
        return time.perf_counter() - t, answer
    rows = []
    for chunk in args.chunks:
        name = f"--prefill-chunk {chunk}" + (" (the default)" if chunk == PREFILL_CHUNK else "")
        url, proc, log = start_server(["--prefill-chunk", str(chunk)])
        pool = ThreadPoolExecutor(1)
        try:
            post(url + "/v1/chat/completions", chat)  # warm-up
            alone = [post(url + "/v1/chat/completions", chat) for _ in range(2)]
            uploading = pool.submit(post, url + "/v1/augment", upload)
            time.sleep(1.0)
            seconds, answer = post(url + "/v1/chat/completions", chat)
            assert answer["choices"] == alone[0][1]["choices"]  # the reply it gets alone
            assert not uploading.done(), uploading.exception() or "the upload ended first"  # in flight
            upload_s = uploading.result()[0]  # its seconds, the chat beside it
            rows.append((name, [a for a, _ in alone], seconds, upload_s))
            print(f"  {name}: alone {[round(a, 2) for a, _ in alone]} s; beside the upload {seconds:.2f} s; "
                  f"the upload {upload_s:.1f} s", flush=True)
        finally:
            proc.terminate()  # the upload in flight goes with it
            proc.wait(30)
            pool.shutdown(wait=False, cancel_futures=True)
    print(f"\ncloud.server, a chat request (16 new tokens) 1 s after an upload of a {prompt}-token prompt, "
          f"load average now {os.getloadavg()[0]:.2f}")
    print("| server | chat alone (s, 2 tries) | chat beside the upload (s) | over the slowest alone | the upload (s) |")
    print("|---|---|---|---|---|")
    for name, alone, seconds, upload_s in rows:
        print(f"| {name} | {', '.join(f'{a:.2f}' for a in alone)} | {seconds:.2f} | {seconds / max(alone):.1f}x "
              f"| {upload_s:.1f} |")


def server_rates(url, ask, n_requests, distinct: int) -> list[tuple[int, float]]:
    """requests/s of n_requests asks at concurrency 1, 4, 16 and 1 again (the load may drift),
    after one ask of each of the `distinct` prompts: every level finds them in the server's prefix
    cache (or none does, --prefix-cache 0), not only the levels after the first."""
    for i in range(distinct):  # warm-up
        ask(i)
    rates = []
    for c in (1, 4, 16, 1):
        t = time.perf_counter()
        with ThreadPoolExecutor(c) as pool:
            list(pool.map(ask, range(n_requests)))
        rates.append((c, n_requests / (time.perf_counter() - t)))
        print(f"  concurrency {c}: {rates[-1][1]:.3f} requests/s", flush=True)
    return rates


def bench_server(args, settings, tok):
    """Two shapes of chat completion, one conversation a request, each its own seed: the first part
    of structured augmentation as --cloud-api sends it (a ~90-token prompt, a reply stopped at "]":
    mostly short, some run to max_tokens) and a short question with a reply of up to 64 tokens."""
    task = data.get_task("lamp7")
    user = data.split_users(data.load_users(task.name), 1)[0][0]
    pairs = [task.pair(item) for item in user.profile]
    # the requests cycle over the user's prompts, as --cloud-api sends each of them k times
    distinct = min(len(pairs), args.requests)
    pairs = [(x[len(task.instruction):], y) for x, y in (pairs * args.requests)[:args.requests]]
    first_parts = [[{"role": "user", "content": augment.AUGMENT_PROMPT.format(x=x, y=y)},
                    {"role": "assistant", "content": augment.REPLY_PREFIX}] for x, y in pairs]
    questions = [[{"role": "user", "content": f"Write a tweet about {y[:60]}"}] for _, y in pairs]
    first_budget = augment.generation_budget(tok, [x for x, _ in pairs], settings.eps_max_len)
    shapes = {f"augmentation's first part (stop \"]\", max_tokens {first_budget})": (first_parts, first_budget, "]"),
              "a tweet written to a short question (max_tokens 64)": (questions, 64, "")}
    url, proc, log = start_server(["--max-batch", str(args.max_batch), "--prefill-chunk", str(args.chunks[0]),
                                   "--prefix-cache", str(args.prefix_cache)])
    table = {}
    try:
        for name, (convs, max_tokens, stop) in shapes.items():
            print(f"server, {name}:", flush=True)
            table[name] = server_rates(url, lambda i: client.openai_chat(  # one conversation a request, as --cloud-api
                client.Endpoint(url, timeout=1200), qwen2.EMBEDDED, convs[i:i + 1], max_tokens, 0.7, i, stop=stop),
                len(convs), distinct)
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"\ncloud.server: {args.requests} chat completions a level, --max-batch {args.max_batch}, "
          f"--prefill-chunk {args.chunks[0]}, --prefix-cache {args.prefix_cache}, {distinct} distinct prompts, "
          f"load average now {os.getloadavg()[0]:.2f}")
    print("| requests | concurrency | requests/s | over concurrency 1 (first, last) |")
    print("|---|---|---|---|")
    for name, rates in table.items():
        for c, r in rates[:3]:
            print(f"| {name} | {c} | {r:.3f} | {r / rates[0][1]:.2f}x, {r / rates[3][1]:.2f}x |")
        print(f"| {name} | 1 (again) | {rates[3][1]:.3f} | |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="augment,server", help="comma-separated: augment, server, beside")
    p.add_argument("--users", type=int, default=3, help="the demo's target users to augment for")
    p.add_argument("--no-transformers", action="store_true", help="leave transformers' generate out")
    p.add_argument("--requests", type=int, default=32, help="chat completions per concurrency level")
    p.add_argument("--max-batch", type=int, default=96, help="the server's --max-batch (its default)")
    p.add_argument("--chunks", type=lambda v: [int(c) for c in v.split(",")], default=[PREFILL_CHUNK, 16, 128, 8192],
                   help="the server's --prefill-chunk values to try (--parts beside); the first one for "
                   "--parts server")
    p.add_argument("--prefix-cache", type=int, default=PREFIX_TOKENS, help="the server's --prefix-cache (--parts server)")
    args = p.parse_args(argv)
    args.load = f"{os.getloadavg()[0]:.2f}"
    parts = set(args.parts.split(","))
    if parts - {"augment", "server", "beside"}:
        p.error(f"--parts {args.parts}: use augment, server, beside")
    settings = options.parse(["--task", "lamp7"], cdcda.METHODS)  # the demo's settings
    tok = qwen2.Tokenizer.from_dir(smollm2.embedded_dir())
    print(f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads, load average {args.load}; SmolLM2-135M-Instruct")
    if "augment" in parts:
        bench_augment(args, settings, tok)
    if "server" in parts:
        bench_server(args, settings, tok)
    if "beside" in parts:
        bench_beside(args, tok)


if __name__ == "__main__":
    main()
