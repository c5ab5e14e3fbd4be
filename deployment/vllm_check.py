"""`python deployment/vllm_check.py`: the model leaves the lab (issue 29), checked on a real vLLM
(`make vllm-check`, which builds vLLM's CPU environment .venv-vllm first).

1. The cloud: vLLM's OpenAI server serves the embedded cloud model as `smollm2-135m-instruct`;
   `python -m cloud --cloud-api URL --task lamp7 --out OUT --methods base,cdcda` runs the demo with
   its augmentation there, and its results.md must hold a table.
2. Users' adapters: vLLM serves a run's M_base with one `--lora-modules user-ID=DIR` entry per
   user (DIR/adapter_config.json in PEFT's layout, its base_model_name_or_path M_base); each
   user's queries (the appendix-B prompts, as the device answers them) are asked greedily through
   the user's adapter, and the replies are compared with our own model's: M_base in fp32 plus the
   adapter (`lora.load_adapter`), `generate.chat` at temperature 0. A run without adapters is
   made first (`cdcda.py --task lamp7 --methods direct-ft --epochs 1`: the demo's 3 users and M_base).

Each vLLM is started on a free loopback port in a session of its own, its log in OUT, and
stopped when its part ends, however it ends (an error, Ctrl-C, SIGTERM). The driver needs only
the standard library; the project's side (`ours`, run in .venv) prints JSON for it.
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLOUD_NAME = "smollm2-135m-instruct"  # the cloud model's name in the project (qwen2.EMBEDDED)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post_json(url: str, body: dict, timeout: float = 300) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read())


@contextmanager
def vllm(python: str, model: str, name: str, log: Path, loras=(), port: int = 0, wait_s: float = 1800):
    """vLLM's OpenAI server on `model` (served as `name`, `loras`: (name, directory) pairs) until
    the block ends: its base URL ("http://127.0.0.1:PORT/v1"); port 0: a free one."""
    port = port or free_port()
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", name,
           "--dtype", "float32", "--max-model-len", "2048", "--host", "127.0.0.1", "--port", str(port),
           "--enable-lora", "--max-lora-rank", "16", "--max-loras", str(max(1, len(loras))),
           "--generation-config", "vllm"]  # a request's unset options: vLLM's neutral ones (client.py)
    cmd += ["--lora-modules", *(f"{n}={d}" for n, d in loras)] if loras else []
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "2"}
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"vllm: starting on port {port} ({model}, log {log}); the first start compiles for minutes")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url, t0 = f"http://127.0.0.1:{port}/v1", time.time()
        while True:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace").splitlines()[-15:]
                sys.exit("vllm exited with {} before serving; {}:\n{}".format(proc.returncode, log, "\n".join(tail)))
            try:
                served = [m["id"] for m in get_json(url + "/models")["data"]]
                break
            except (OSError, ValueError, KeyError):
                if time.time() - t0 > wait_s:
                    sys.exit(f"vllm: not serving after {wait_s:.0f} s; see {log}")
                time.sleep(3)
            if int(time.time() - t0) % 60 < 3:
                print(f"vllm: waiting, {time.time() - t0:.0f} s")
        print(f"vllm: serving {served} at {url} after {time.time() - t0:.0f} s")
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: vLLM's engine processes too
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        print(f"vllm: stopped (exit {proc.returncode})")


def cloud_check(args) -> None:
    """Part 1: the demo with vLLM as its cloud; the table and how long the augmentation took."""
    model = subprocess.check_output([args.python, "-c", "from embedded import smollm2; print(smollm2.embedded_dir())"],
                                    cwd=ROOT, text=True).strip()
    out = Path(args.out)
    with vllm(args.vllm, model, CLOUD_NAME, out / "vllm.log", port=args.port) as url:
        t = time.time()
        subprocess.run([args.python, "-m", "cloud", "--cloud-api", url, "--task", "lamp7", "--out", str(out),
                        "--methods", args.methods], cwd=ROOT, check=True)
        print(f"vllm-check: python -m cloud --cloud-api took {time.time() - t:.0f} s")
    results = sorted(out.glob("**/results.md"))
    if not results or not any(line.startswith("|") for line in results[0].read_text().splitlines()):
        sys.exit(f"vllm-check: no results table under {out}")
    print(f"vllm-check: the cloud on vLLM gave {results[0]}:\n{results[0].read_text()}")


def adapters(run: Path, method: str) -> list[Path]:
    return sorted(p.parent for p in run.glob(f"**/users/*/{method}.adapter/adapter_config.json"))


def lora_check(args) -> None:
    """Part 2: a user's adapter served by vLLM answers as our own model does (greedy)."""
    run = Path(args.lora_run)
    if not adapters(run, args.method):
        subprocess.run([args.python, "cdcda.py", "--task", "lamp7", "--methods", args.method,
                        "--epochs", "1", "--out", str(run)], cwd=ROOT, check=True)
    found = adapters(run, args.method)
    if not found:
        sys.exit(f"vllm-check: no {run}/**/users/*/{args.method}.adapter/adapter_config.json")
    bases = {json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"] for d in found}
    if len(bases) != 1 or None in bases:
        sys.exit(f"vllm-check: the adapters under {run} name bases {sorted(map(str, bases))}, not one directory")
    print(f"vllm-check: our model's greedy replies for {len(found)} adapter(s), while vLLM starts")
    mine = subprocess.Popen([args.python, __file__, "ours", *map(str, found)], cwd=ROOT, stdout=subprocess.PIPE)
    base, = bases
    loras = [(f"user-{d.parent.name}", str(d)) for d in found]
    same = total = 0
    report = []
    with vllm(args.vllm, base, "m-base", run / "vllm.log", loras) as url:
        ours = json.loads(mine.communicate()[0] or "null")
        if mine.returncode:
            sys.exit(f"vllm-check: our side failed (exit {mine.returncode})")
        for u, (name, _) in zip(ours, loras):
            for messages, mine in zip(u["conversations"], u["replies"]):
                body = {"model": name, "messages": messages, "max_tokens": u["max_tokens"], "temperature": 0}
                theirs = (post_json(url + "/chat/completions", body)["choices"][0]["message"]["content"] or "")
                theirs = theirs.strip()
                same, total = same + (theirs == mine), total + 1
                report.append({"user": u["user"], "ours": mine, "vllm": theirs, "same": theirs == mine})
                print(f"  {name}: {'same' if theirs == mine else 'DIFFERENT'}: ours {mine!r} vllm {theirs!r}")
    (run / "vllm-lora.json").write_text(json.dumps(report, indent=1))
    print(f"vllm-check: {same} of {total} greedy replies through the users' adapters are identical "
          f"(vLLM vs our fp32 M_base + adapter); {run / 'vllm-lora.json'}")


def ours(directories: list[str]) -> None:
    """(In .venv) per adapter: the user's query conversations as the device answers them, and our
    fp32 M_base + adapter's greedy replies, as JSON on stdout (progress on stderr)."""
    sys.path.insert(0, str(ROOT))
    import contextlib

    import cdcda
    import data
    import generate
    import lora
    import qwen2
    import train
    out = []
    for directory in map(Path, directories):
        config = json.loads((directory / "adapter_config.json").read_text())
        run_dir = directory.parent.parent.parent  # RUN/users/ID/METHOD.adapter
        settings = json.loads((run_dir / "run.json").read_text())
        task = data.get_task(settings["task"])
        user = next(u for u in data.load_users(task.name, settings.get("data")) if u.user_id == directory.parent.name)
        with contextlib.redirect_stdout(sys.stderr):
            model, tok = qwen2.load(config["base_model_name_or_path"], "float32")
            lora.add_lora(model, r=config["r"], alpha=config["lora_alpha"], targets=config["target_modules"])
            lora.load_adapter(model, directory)
            n, max_length = cdcda.ANSWER_TOKENS[task.name], settings["max_length"]
            budget = max(max_length - n, max_length // 2)
            conversations = [train.fit_messages(tok, task.messages(q.input), budget) for q in user.queries]
            replies = generate.chat(model, tok, conversations, max_new_tokens=n, temperature=0.0,
                                    desc=f"ours {user.user_id}")
        out.append({"user": user.user_id, "adapter": str(directory), "max_tokens": n,
                    "conversations": conversations, "replies": replies})
    print(json.dumps(out))


def main(argv=None) -> None:
    if argv is None and sys.argv[1:2] == ["ours"]:
        return ours(sys.argv[2:])
    p = argparse.ArgumentParser(prog="deployment/vllm_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm", default=str(ROOT / ".venv-vllm" / "bin" / "python"), help="vLLM's python")
    p.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"), help="the project's python")
    p.add_argument("--out", default="runs/vllm-check", help="part 1's run (python -m cloud --out)")
    p.add_argument("--methods", default="base,cdcda", help="part 1's rows: the ones the cloud writes for (cdcda) "
                   "and M_base beside it; direct-ft never meets the cloud, so its row is the in-process run's")
    p.add_argument("--lora-run", default="runs/vllm-lora", help="part 2's run: its users' adapters")
    p.add_argument("--method", default="direct-ft", help="part 2: whose adapters (METHOD.adapter)")
    p.add_argument("--port", type=int, default=0, help="part 1's vLLM port (0: a free one); a resumed "
                   "run needs its first port: the URL is one of the run's settings")
    p.add_argument("--skip", choices=("cloud", "lora"), action="append", default=[], help="leave a part out")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally blocks stop vLLM
    if "cloud" not in args.skip:
        cloud_check(args)
    if "lora" not in args.skip:
        lora_check(args)


if __name__ == "__main__":
    main()
