"""Bounded load test of the cloud service (`python -m cloud.server`): N concurrent users' uploads, loopback only.

Starts its own server process on 127.0.0.1 (a free port, a random bearer token), sends a fixed
number of uploads (`POST /v1/augment`, steps 1-4) from --users concurrent clients through
`cloud.remote_augment` (timeouts, bounded retries), stops the server, and reports:
requests/s, p50/p95/max latency, errors (uploads that failed after their retries) and lost
users (users with at least one failed upload: their synthetic data never came back).
Each upload is the first --pairs history pairs of one lamp7 user of the embedded demo data.

--model tiny (default) serves a tiny random decoder (2 layers of width 32, SmolLM2's
tokenizer): it measures the service itself (HTTP, JSON, validation, the model lock, queueing),
with generation nearly free; a random decoder writes no parsable pair, so the judge idles.
--model embedded serves SmolLM2-135M-Instruct: the real cost of augmentation and selection.
The model lock serializes generation, so latency grows with the queue: p95 is about
users x (one upload's service time) at full concurrency.

    .venv/bin/python bench/load_cloud.py [--users 16] [--requests 32] [--pairs 3] [--k 2] [--model tiny]
"""
import argparse
import ipaddress
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import cdcda  # noqa: E402
import data  # noqa: E402
import options  # noqa: E402
import qwen2  # noqa: E402
from cloud import client as cloud  # noqa: E402
from embedded import smollm2  # noqa: E402


def tiny_model(directory: Path) -> str:
    """A tiny random (untied) decoder with SmolLM2's tokenizer, saved hub-style."""
    torch.manual_seed(0)
    config = qwen2.Config(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                          model_type="llama", rms_norm_eps=1e-5)
    qwen2.save_pretrained(qwen2.Qwen2(config), qwen2.Tokenizer.from_dir(smollm2.embedded_dir()), directory)
    return str(directory)


def start_server(host: str, model: str, token: str, log) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cloud.server", "--host", host, "--port", str(port),
                             "--cloud-model", model], cwd=ROOT, env=dict(os.environ, CDCDA_TOKEN=token),
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{host}:{port}"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"server did not come up (exit code {proc.poll()}); see {log.name}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="loopback address to serve on (others are refused)")
    p.add_argument("--users", type=int, default=16, help="concurrent users (client threads)")
    p.add_argument("--requests", type=int, default=32, help="uploads in all, spread over the users")
    p.add_argument("--pairs", type=int, default=3, help="history pairs per upload")
    p.add_argument("--k", type=int, default=2, help="synthetic samples per pair")
    p.add_argument("--model", default="tiny", choices=["tiny", "embedded"])
    p.add_argument("--timeout", type=float, default=600, help="client timeout per try (s)")
    args = p.parse_args(argv)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        p.error(f"--host {args.host}: loopback only (127.0.0.1, ::1, localhost)")
    if not 1 <= args.users <= args.requests <= 1024:
        p.error("need 1 <= --users <= --requests <= 1024")

    task = data.get_task("lamp7")
    users = data.load_users("lamp7")
    uploads = [(f"user{i % args.users:02d}", cdcda.upload(task, users[i % len(users)])[:args.pairs])
               for i in range(args.requests)]
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(Path(tmp)) if args.model == "tiny" else qwen2.EMBEDDED
        log = open(Path(tmp) / "server.log", "w+")
        proc, url = start_server(args.host, model, token, log)
        latencies, failed, lock = [], {}, threading.Lock()
        start = threading.Barrier(args.users)

        def user(name):
            start.wait()  # all users begin together
            for _, pairs in [u for u in uploads if u[0] == name]:
                t = time.perf_counter()
                try:
                    service = cloud.Endpoint(url, token, timeout=args.timeout, retries=2, backoff=0.5)
                    counts = cloud.remote_augment(service, "lamp7", pairs,
                                                  options.Settings(k=args.k, augment_decoding="free"), 0).counts
                    assert counts["generated"] == len(pairs) * args.k, counts
                    with lock:
                        latencies.append(time.perf_counter() - t)
                except (cloud.CloudError, cloud.CloudUnavailable, AssertionError) as e:
                    with lock:
                        failed.setdefault(name, []).append(str(e)[:200])
        t0 = time.perf_counter()
        try:
            with ThreadPoolExecutor(args.users) as pool:
                list(pool.map(user, sorted({name for name, _ in uploads})))
            wall = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(30)
        log.seek(0)
        server_log = log.read()
        internal = server_log.count("Traceback")
        if internal:
            print(server_log[server_log.index("Traceback"):][:3000], file=sys.stderr)
    errors = sum(len(v) for v in failed.values())
    q = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
    result = {"model": args.model, "users": args.users, "requests": args.requests, "pairs": args.pairs,
              "k": args.k, "ok": len(latencies), "errors": errors, "lost_users": len(failed),
              "server_tracebacks": internal, "seconds": round(wall, 2),
              "requests_per_s": round(len(latencies) / wall, 2),
              "p50_s": round(statistics.median(latencies), 3) if latencies else None,
              "p95_s": round(q[18], 3) if latencies else None,
              "max_s": round(max(latencies), 3) if latencies else None,
              "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    print(json.dumps(result))
    for name, messages in sorted(failed.items()):
        print(f"  {name}: {messages[0]}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
