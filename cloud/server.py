"""The cloud of CDCDA-PLM as an HTTP service (paper sec. 4: steps 2 and 3 run on the cloud).

    python -m cloud.server --port 8000 [--cloud-model DIR_OR_NAME] [--judge embedding:all-minilm-l6-v2]
                           [--max-batch 64] [--cloud-dtype float32]

The device uploads the user's history D_u (step 1), this server augments it (step 2, eq. 1)
and selects (step 3, eq. 2-4: `augment.synthesize`, as the pipeline does in process), and the
device downloads D_filtered (step 4; client.py is the device's client, `python -m cloud --cloud URL`):

  POST /v1/augment           {"task", "pairs": [[x, y], ...], "k", "temperature", "seed",
                              "thresholds": {eps_scf, eps_tdf, eps_min_len, eps_max_len},
                              "decoding": "free" | "structured"}
                             -> {"records": [selection records], "counts", "judge", "model"}
                             (upload = the request, download = the response)
  POST /v1/chat/completions  an OpenAI-compatible subset (messages, temperature, top_p,
                             max_tokens, n, seed, model, stop; vLLM's continue_final_message;
                             vLLM's structured_outputs is ignored: those replies are free)
  GET  /health, GET /v1/models

Errors are JSON {"error": {"message", "field"}}: 400 malformed JSON, 401 missing or wrong bearer
token (when CDCDA_TOKEN is set on the server), 404 unknown path or model, 408/411 body late or
without Content-Length, 413 body over MAX_BODY, 422 a missing, wrongly typed or out-of-range
field, 500 an internal error; the server goes on serving after each.

Why the standard library (`http.server.ThreadingHTTPServer`): no dependency. A thread per
request parses, validates and waits; the main thread (`Batcher`) decodes the requests in flight
together, up to --max-batch replies at a time, a new one joining at the next step, each reply
from its own generator, so a reply is the one its request gets alone. The judge runs one
selection at a time. Production would put a real serving stack (vLLM: paged KV memory, TLS in
front) behind the same API; `--cloud-api` already augments through any OpenAI-compatible server,
with the filters on the device.
"""
import argparse
import functools
import hmac
import json
import math
import os
import sys
import threading
import time
import traceback
import uuid
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import augment
import data
import filters
import generate
import options
import qwen2
from cloud.batcher import Batcher
from errors import InputError

MAX_BODY = 1 << 20  # bytes of one request body
MAX_PAIRS = 256  # history pairs of one upload
MAX_K = 16  # synthetic samples per pair
MAX_N, MAX_TOKENS = 8, 1024  # chat completions: choices, new tokens
ROLES = ("system", "user", "assistant")
THRESHOLDS = ("eps_scf", "eps_tdf", "eps_min_len", "eps_max_len")


class RequestError(Exception):
    """A request the server refuses: HTTP status, message, and the offending field (or None)."""
    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def get(body: dict, name: str, kind, default=..., ok=None, rule: str = "", where: str = ""):
    """body[name] checked against a JSON type (int, float, str, list, dict) and a rule; a missing
    or null field takes `default` (none given: required). Errors name the field as where + name."""
    field = where + name
    if body.get(name) is None:
        if default is ...:
            raise RequestError(422, f"{field}: missing", field)
        return default
    value = body[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RequestError(422, f"{field}: expected {kind.__name__}, got {type(value).__name__}", field)
    if ok is not None and not ok(value):
        raise RequestError(422, f"{field}: {rule}, got {value!r}"[:300], field)
    return value


class Cloud:
    """What the server holds: the cloud LM and its decoding loop (`Batcher`), its tokenizer, the
    judge, default thresholds."""
    def __init__(self, cloud_model: str, judge: str, settings: options.Settings, device: str = "cpu",
                 token: str | None = None, max_batch: int = 64, dtype: str = "float32"):
        self.model, self.tokenizer = qwen2.load(cloud_model, dtype, device)
        self.judge = filters.make_judge(judge, device)
        self.model_name, self.settings, self.token = cloud_model, settings, token  # default thresholds
        self.batcher = Batcher(self.model, max_batch)  # serve() runs its loop on the thread that loaded the model
        self.judge_lock = threading.Lock()  # one judge: one selection at a time

    def augment(self, body: dict) -> dict:
        """Steps 2-3 for one upload: `augment.augment` (eq. 1), then `filters.select` (eq. 2-4)."""
        get(body, "task", str, ok=lambda t: t in data.TASKS, rule=f"one of {', '.join(data.TASKS)}")
        pairs = get(body, "pairs", list, ok=lambda p: 1 <= len(p) <= MAX_PAIRS, rule=f"1 to {MAX_PAIRS} pairs")
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
                raise RequestError(422, f"pairs[{i}]: expected [input, output], two strings", f"pairs[{i}]")
        k = get(body, "k", int, 5, lambda v: 1 <= v <= MAX_K, f"between 1 and {MAX_K}")
        temperature = get(body, "temperature", float, 0.7, lambda v: 0 <= v <= 2, "between 0 and 2")
        seed = get(body, "seed", int, 0, lambda v: 0 <= v < 2 ** 63, "a non-negative integer")
        decoding = get(body, "decoding", str, "free", lambda v: v in ("free", "structured"), "free or structured")
        given = get(body, "thresholds", dict, {})
        for name in set(given) - set(THRESHOLDS):
            raise RequestError(422, f"thresholds.{name}: unknown; use {', '.join(THRESHOLDS)}", f"thresholds.{name}")
        thresholds = {name: get(given, name, float, getattr(self.settings, name), math.isfinite, "a finite number",
                                where="thresholds.") for name in THRESHOLDS}
        settings = replace(self.settings, k=k, temperature=temperature, augment_decoding=decoding, **thresholds)
        cloud = augment.CloudLM(self.model, self.tokenizer, functools.partial(generate.chat, decode=self.batcher.generate))
        pairs = [tuple(p) for p in pairs]
        candidates = augment.augment(cloud, pairs, settings, seed, data.get_task(body["task"]))  # step 2
        with self.judge_lock:
            selection = filters.select(pairs, candidates, self.judge, settings)  # step 3
        return {"records": selection.records, "counts": selection.counts, "judge": self.judge.name,
                "model": self.model_name, "thresholds": thresholds}  # eps_scf null: the judge's default

    def chat_completions(self, body: dict) -> dict:
        """OpenAI's chat completion for one conversation: n samples of one prefill, sample i from its
        own generator (`generate.reply_generator(seed, i)`), as `generate.chat([messages] * n, max_tokens,
        temperature, seed)` draws them, decoded with the other requests in flight.
        As vLLM does, `continue_final_message` (with `add_generation_prompt: false`) continues
        a final assistant message instead of starting a new turn (its content is the reply's
        start, not repeated in the answer), and `stop` (a string) ends the reply before it."""
        model = get(body, "model", str, self.model_name)
        if model != self.model_name:
            raise RequestError(404, f"model: {model!r} is not served here, {self.model_name!r} is", "model")
        messages = get(body, "messages", list, ok=lambda m: len(m) > 0, rule="at least one message")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise RequestError(422, f"messages[{i}]: expected {{role: {'|'.join(ROLES)}, content: str}}",
                                   f"messages[{i}]")
        if body.get("stream") not in (None, False):
            raise RequestError(422, "stream: not supported", "stream")
        temperature = get(body, "temperature", float, 1.0, lambda v: 0 <= v <= 2, "between 0 and 2")
        top_p = get(body, "top_p", float, 1.0, lambda v: 0 < v <= 1, "in (0, 1]")
        max_tokens = get(body, "max_tokens", int, 256, lambda v: 1 <= v <= MAX_TOKENS, f"between 1 and {MAX_TOKENS}")
        n = get(body, "n", int, 1, lambda v: 1 <= v <= MAX_N, f"between 1 and {MAX_N}")
        seed = get(body, "seed", int, 0, lambda v: 0 <= v < 2 ** 63, "a non-negative integer")
        stop = get(body, "stop", str, "", lambda v: len(v) <= 16, "a string of at most 16 characters")
        cont = body.get("continue_final_message") is True
        if cont and (messages[-1]["role"] != "assistant" or body.get("add_generation_prompt") is not False):
            raise RequestError(422, "continue_final_message: needs a final assistant message and "
                               "add_generation_prompt false", "continue_final_message")
        tok, device = self.tokenizer, self.model.model.embed_tokens.weight.device
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        prompt = tok.encode(tok.apply_chat_template(turns[:-1]) + turns[-1]["content"] if cont
                            else tok.apply_chat_template(turns))
        if len(prompt) + max_tokens > self.model.config.max_position_embeddings:
            raise RequestError(422, f"messages: {len(prompt)} prompt tokens + max_tokens {max_tokens} exceed the "
                               f"context of {self.model.config.max_position_embeddings}", "messages")
        generators = [generate.reply_generator(seed, i, device) for i in range(n)]
        out = self.batcher.generate(torch.tensor([prompt], device=device), max_tokens, temperature, copies=[n],
                                    generator=generators, eos_token_id=tuple(generate.end_ids(tok, stop)),
                                    top_p=top_p)  # (n, T + new)
        choices, used = [], 0
        for i, new in enumerate(out[:, len(prompt):].tolist()):
            text, end = generate.reply_text(tok, new, stop)
            used += len(new) if end is None else end + 1
            choices.append({"index": i, "message": {"role": "assistant", "content": text if cont else text.strip()},
                            "finish_reason": "length" if end is None else "stop", "logprobs": None})
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": used, "total_tokens": len(prompt) + used}}


class Handler(BaseHTTPRequestHandler):
    """One request on its own thread: authorize, read and parse the body, route, answer JSON."""
    server_version = "cdcda-cloud"
    timeout = 60  # seconds a client may take to send its request

    def setup(self):
        torch.set_num_threads(1)  # no OpenMP team of its own (serve()); the judge's encoder runs single-threaded
        super().setup()

    def do_GET(self):
        cloud = self.server.cloud
        routes = {"/health": lambda: {"status": "ok", "model": cloud.model_name, "judge": cloud.judge.name,
                                      "most_batched": cloud.batcher.most},
                  "/v1/models": lambda: {"object": "list", "data": [
                      {"id": cloud.model_name, "object": "model", "created": 0, "owned_by": "cdcda"}]}}
        self.answer(lambda: routes[self.path]() if self.path in routes else self.unknown())

    def do_POST(self):
        routes = {"/v1/augment": self.server.cloud.augment, "/v1/chat/completions": self.server.cloud.chat_completions}
        self.answer(lambda: routes[self.path](self.body()) if self.path in routes else self.unknown())

    def unknown(self):
        raise RequestError(404, f"path {self.path}: no such endpoint for {self.command}", "path")

    def body(self) -> dict:
        self.authorize()
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(411, "Content-Length: required", "Content-Length")
        if int(length) > MAX_BODY:
            raise RequestError(413, f"body: {length} bytes, the limit is {MAX_BODY}", "body")
        try:
            raw = self.rfile.read(int(length))
        except TimeoutError:
            raise RequestError(408, f"body: not received within {self.timeout} s", "body") from None
        self.unread = 0
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise RequestError(400, f"body: not valid JSON ({e})", "body") from None
        if not isinstance(body, dict):
            raise RequestError(400, f"body: expected a JSON object, got {type(body).__name__}", "body")
        return body

    def authorize(self):
        token = self.server.cloud.token
        given = self.headers.get("Authorization", "")
        if token and not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise RequestError(401, "Authorization: missing or wrong bearer token", "Authorization")

    def answer(self, handle):
        length = self.headers.get("Content-Length", "0")
        self.unread = int(length) if length.isdigit() else 0
        try:
            status, payload = 200, handle()
        except RequestError as e:
            status, payload = e.status, {"error": {"message": e.message, "field": e.field}}
        except Exception as e:  # a bug or a model failure: report it, keep serving
            traceback.print_exc()
            status, payload = 500, {"error": {"message": f"internal error: {type(e).__name__}: {e}", "field": None}}
        try:  # drain a refused body (up to 8 MiB), so the client reads our answer rather than a reset
            if 0 < self.unread <= 8 * MAX_BODY:
                self.rfile.read(self.unread)
        except OSError:
            pass
        self.close_connection = True  # one request per connection
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        try:
            self.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout); nothing to answer
            self.log_message("client left before the answer: %s %s", self.command, self.path)


def serve(host: str = "127.0.0.1", port: int = 8000, cloud_model: str = qwen2.EMBEDDED,
          judge: str = options.EMBEDDED["judge"], settings: options.Settings = options.Settings(),
          device: str = "cpu", token: str | None = None, max_batch: int = 64, dtype: str = "float32"):
    """Load the models once, then serve until interrupted. token=None reads CDCDA_TOKEN
    (unset or empty: no authorization)."""
    token = (os.environ.get("CDCDA_TOKEN") or None) if token is None else token
    if host not in ("127.0.0.1", "localhost") and not token:
        print(f"warning: serving users' personal data on {host} without CDCDA_TOKEN", file=sys.stderr)
    cloud = Cloud(cloud_model, judge, settings, device, token, max_batch, dtype)
    server = ThreadingHTTPServer((host, port), Handler)  # bound after loading: no connection waits on it
    server.daemon_threads, server.cloud = True, cloud
    print(f"cdcda cloud: http://{host}:{server.server_address[1]}  model {cloud.model_name} ({dtype}, up to "
          f"{max_batch} replies a batch), judge {cloud.judge.name}, token {'required' if token else 'off'}", flush=True)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    try:  # decoding on this thread, whose OpenMP threads already exist: a second team (a decoding thread
        cloud.batcher.loop()  # of its own) makes libgomp cut its spin-waits and each step slower (RESULTS.md)
    except KeyboardInterrupt:
        server.server_close()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m cloud.server", description="The CDCDA-PLM cloud (steps 2-3) as an "
                                "HTTP service; set CDCDA_TOKEN to require 'Authorization: Bearer <token>'")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--cloud-model", default=qwen2.EMBEDDED, help="cloud LM: embedded name, hub-style dir or hub id")
    p.add_argument("--max-batch", type=int, default=64, help="most replies decoded together, across the requests")
    p.add_argument("--cloud-dtype", default="float32", choices=["float32", "bfloat16"], help="the cloud LM's weights "
                   "and compute (bfloat16: faster on CPUs with bf16 units)")
    options.add_options(p, options.FILTER_OPTIONS)
    args = p.parse_args(argv)
    if problem := options.device_problem(args.torch_device):
        p.error(problem)
    if args.max_batch < 1:
        p.error(f"--max-batch {args.max_batch}: must be at least 1")
    thresholds = {name: getattr(args, name) for name in THRESHOLDS}
    serve(args.host, args.port, args.cloud_model, args.judge or options.EMBEDDED["judge"],
          options.Settings(**thresholds), args.torch_device, max_batch=args.max_batch, dtype=args.cloud_dtype)


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"python -m cloud.server: error: {e}")
