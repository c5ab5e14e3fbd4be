"""Requests/s of the --cloud-api client (`cloud.openai_chat`) at concurrency 1 and N, one run.

Two servers, both on loopback, both spoken to through the same client:
  server      the project's OpenAI-compatible cloud (`python -m server`, its own process, the
              --cloud-model given): one model behind a lock generates one request at a time,
              so concurrency can only hide the client's and the server's per-request work
              (HTTP, JSON, tokenizing), not generation.
  latency     a stand-in written here that answers every request after --latency seconds and
              serves requests side by side, as a batching server (vLLM) does while it has room:
              the ratio it gives is what the client's concurrency itself delivers.
Each server gets --requests chat completions (the augmentation prompts of the embedded lamp7
demo's first user, `augment.AUGMENT_PROMPT`, --max-tokens new tokens) at concurrency 1, then
at --concurrency, after one warm-up request; the script prints requests/s and the ratio.

    .venv/bin/python bench/bench_cloud_concurrency.py [--requests 16] [--concurrency 4] [--max-tokens 32]
        [--cloud-model smollm2-135m-instruct] [--latency 0.25]
"""
import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import augment  # noqa: E402
import cloud  # noqa: E402
import data  # noqa: E402
import qwen2  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def project_server(model: str, log) -> tuple[subprocess.Popen, str]:
    """`python -m server` on a free loopback port, once /health answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--cloud-model", model],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"server.py did not come up (exit code {proc.poll()}); see {log.name}")


def latency_server(seconds: float) -> tuple[ThreadingHTTPServer, str]:
    """A chat-completions endpoint that sleeps `seconds` per request, requests in parallel."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(seconds)
            raw = json.dumps({"choices": [{"message": {"role": "assistant", "content": "x], Response: [y]"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def rate(url: str, model: str, conversations, max_tokens: int, concurrency: int) -> float:
    """Requests per second of `conversations` sent with `concurrency` in flight."""
    t = time.perf_counter()
    cloud.openai_chat(cloud.Endpoint(url, timeout=600, concurrency=concurrency), model, conversations, max_tokens, 0.7, 0)
    return len(conversations) / (time.perf_counter() - t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--cloud-model", default=qwen2.EMBEDDED, help="server.py's model")
    p.add_argument("--latency", type=float, default=0.25, help="the stand-in's seconds per request")
    args = p.parse_args(argv)
    user = data.split_users(data.load_users("lamp7"), 1)[0][0]
    pairs = [data.get_task("lamp7").pair(item) for item in user.profile]
    conversations = [[{"role": "user", "content": augment.AUGMENT_PROMPT.format(x=x, y=y)},
                      {"role": "assistant", "content": augment.REPLY_PREFIX}]
                     for x, y in (pairs * args.requests)[:args.requests]]
    results = {}
    with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as log:
        proc, url = project_server(args.cloud_model, log)
        try:
            rate(url, args.cloud_model, conversations[:1], args.max_tokens, 1)  # warm-up
            results["server.py"] = [rate(url, args.cloud_model, conversations, args.max_tokens, c)
                                    for c in (1, args.concurrency)]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    server, url = latency_server(args.latency)
    rate(url, "stand-in", conversations[:1], args.max_tokens, 1)
    results[f"latency {args.latency} s"] = [rate(url, "stand-in", conversations, args.max_tokens, c)
                                            for c in (1, args.concurrency)]
    server.shutdown()
    print(f"{args.requests} chat completions, {args.max_tokens} new tokens each (server.py: {args.cloud_model})")
    print(f"| server | requests/s, concurrency 1 | requests/s, concurrency {args.concurrency} | ratio |")
    print("|---|---|---|---|")
    for name, (one, many) in results.items():
        print(f"| {name} | {one:.2f} | {many:.2f} | {many / one:.2f}x |")


if __name__ == "__main__":
    main()
