"""The cloud of CDCDA-PLM as an HTTP service (paper sec. 4: steps 2 and 3 run on the cloud).

    python -m cloud.server --port 8000 [--cloud-model DIR_OR_NAME] [--judge embedding:all-minilm-l6-v2]
                           [--max-batch 96] [--prefill-chunk 32] [--prefix-cache 2048] [--cloud-dtype float32]

The device uploads the user's history D_u (step 1), this server augments it (step 2, eq. 1)
and selects (step 3, eq. 2-4: `augment.augment`, `filters.select`, as the method does in process), and the
device downloads D_filtered (step 4; client.py is the device's client, `python -m cloud --cloud URL`):

  POST /v1/augment           {"task", "pairs": [[x, y], ...], "k", "temperature", "seed",
                              "thresholds": {eps_scf, eps_tdf, eps_min_len, eps_max_len},
                              "decoding": "free" | "structured"}
                             -> {"records": [selection records], "counts", "judge", "model"}
                             (upload = the request, download = the response)
  POST /v1/chat/completions  an OpenAI-compatible subset (messages, temperature, top_p,
                             max_tokens, n, seed, model, stop; vLLM's continue_final_message)
  GET  /health, GET /v1/models

Errors are JSON {"error": {"message", "field"}}: 400 malformed JSON, 401 missing or wrong bearer
token (when CDCDA_TOKEN is set on the server), 404 unknown path or model, 408/411 body late or
without Content-Length, 413 body over MAX_BODY or a prompt longer than the model's context, 422 a
missing, wrongly typed or out-of-range field (the ranges of cdcda.py's options) or a generation
budget that runs past the context (as vLLM refuses max_tokens past max_model_len), 500 an
internal error; the server goes on serving after each. Every check runs before any decoding.

Why the standard library (`http.server.ThreadingHTTPServer`): no dependency. A thread per
request parses, validates and waits; the main thread (`Batcher`) decodes the requests in flight
together, up to --max-batch replies at a time, a new one prefilled --prefill-chunk tokens a step
(from the longest prefix it shares with a recent prompt, --prefix-cache) and joining the running
batch, each reply from its own generator, so a reply is the one its request gets alone. A request
whose client is gone (its timeout, a dropped connection) is cancelled at the next step. The judge
runs one selection at a time. Production would put a real serving stack (vLLM: paged KV memory,
TLS in front) behind the same API; `--cloud-api` already augments through any OpenAI-compatible
server, with the filters on the device.
"""
import argparse
import functools
import hmac
import json
import math
import os
import select
import socket
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
from cloud.batcher import PREFILL_CHUNK, PREFIX_TOKENS, Batcher, Cancelled
from errors import InputError

MAX_BODY = 1 << 20  # bytes of one request body
MAX_PAIRS = 256  # history pairs of one upload
MAX_K = 16  # synthetic samples per pair
MAX_N, MAX_TOKENS = 8, 1024  # chat completions: choices, new tokens
MAX_BATCH = generate.BATCH + MAX_K  # --max-batch's default: a batch of augmentation (generate.BATCH
# replies or a few more: `generate.chat` keeps a prompt's k together) fits, with room for chat requests
ROLES = ("system", "user", "assistant")
THRESHOLDS = ("eps_scf", "eps_tdf", "eps_min_len", "eps_max_len")


class RequestError(Exception):
    """A request the server refuses: HTTP status, message, and the offending field (or None)."""
    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def get(body: dict, name: str, kind, default=..., ok=None, rule: str = "", where: str = ""):
    """body[name] checked against a JSON type (int, float: finite, str, list, dict) and a rule; a
    missing or null field takes `default` (none given: required). Errors name the field as where + name."""
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
    if kind is float and not math.isfinite(value):
        raise RequestError(422, f"{field}: must be a finite number, got {value!r}", field)
    if ok is not None and not ok(value):
        raise RequestError(422, f"{field}: {rule}, got {value!r}"[:300], field)
    return value


def request_seed(body: dict) -> int:
    """body["seed"] (default 0): cdcda.py's --seed range, and below 2**63 (a torch generator's seed)."""
    return get(body, "seed", int, 0, lambda v: options.RANGES["seed"][0](v) and v < 2 ** 63,
               "a non-negative integer below 2**63")


def option(body: dict, name: str, kind, default, where: str = ""):
    """body[name] checked against the range of cdcda.py's option of that name (`options.RANGES`)."""
    ok, rule = options.RANGES[name]
    return get(body, name, kind, default, ok, f"must be {rule}", where)


class Cloud:
    """What the server holds: the cloud LM and its decoding loop (`Batcher`), its tokenizer, the
    judge, default thresholds."""
    def __init__(self, cloud_model: str, judge: str, settings: options.Settings, device: str = "cpu",
                 token: str | None = None, max_batch: int = MAX_BATCH, dtype: str = "float32", chunk: int = PREFILL_CHUNK,
                 prefix: int = PREFIX_TOKENS):
        self.model, self.tokenizer = qwen2.load(cloud_model, dtype, device)
        self.judge = filters.make_judge(judge, device)
        self.model_name, self.settings, self.token = cloud_model, settings, token  # default thresholds
        self.batcher = Batcher(self.model, max_batch, chunk, prefix=prefix)  # serve() runs its loop on the thread that loaded it
        self.judge_lock = threading.Lock()  # one judge: one selection at a time

    def augment(self, body: dict, gone=None) -> dict:
        """Steps 2-3 for one upload: `augment.augment` (eq. 1), `filters.select` (eq. 2-4). gone: whether the
        client has left (then its decoding is cancelled and no further part is started)."""
        get(body, "task", str, ok=lambda t: t in data.TASKS, rule=f"one of {', '.join(data.TASKS)}")
        pairs = get(body, "pairs", list, ok=lambda p: 1 <= len(p) <= MAX_PAIRS, rule=f"1 to {MAX_PAIRS} pairs")
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
                raise RequestError(422, f"pairs[{i}]: expected [input, output], two strings", f"pairs[{i}]")
        k = get(body, "k", int, 5, lambda v: options.RANGES["k"][0](v) and v <= MAX_K, f"between 1 and {MAX_K}")
        temperature = option(body, "temperature", float, 0.7)
        seed = request_seed(body)
        decoding = get(body, "decoding", str, "free", lambda v: v in ("free", "structured"), "free or structured")
        given = get(body, "thresholds", dict, {})
        for name in set(given) - set(THRESHOLDS):
            raise RequestError(422, f"thresholds.{name}: unknown; use {', '.join(THRESHOLDS)}", f"thresholds.{name}")
        thresholds = {name: option(given, name, float, getattr(self.settings, name), where="thresholds.")
                      for name in THRESHOLDS}
        if thresholds["eps_min_len"] > thresholds["eps_max_len"]:
            raise RequestError(422, f"thresholds.eps_min_len: {thresholds['eps_min_len']} above eps_max_len "
                               f"{thresholds['eps_max_len']}: eq. 4 would keep nothing", "thresholds.eps_min_len")
        settings = replace(self.settings, k=k, temperature=temperature, augment_decoding=decoding, **thresholds)
        self.check_context(pairs, settings)
        decode = functools.partial(self.batcher.generate, gone=gone)
        cloud = augment.CloudLM(self.model, self.tokenizer, functools.partial(generate.chat, decode=decode))
        pairs = [tuple(p) for p in pairs]
        candidates = augment.augment(cloud, pairs, settings, seed, data.get_task(body["task"]))  # step 2
        if gone is not None and gone():
            raise Cancelled("the client is gone")
        with self.judge_lock:
            selection = filters.select(pairs, candidates, self.judge, settings)  # step 3
        return {"records": selection.records, "counts": selection.counts, "judge": self.judge.name,
                "model": self.model_name, "thresholds": thresholds}  # eps_scf null: the judge's default

    def check_context(self, pairs: list, settings):
        """Each pair's augmentation prompt (`augment.augment`'s: the paper's prompt in the chat
        template, then REPLY_PREFIX) and the most tokens its replies may take (`generation_budget`
        of its parts, and the scaffold) within the model's context: 413 for a prompt past it alone,
        422 for a budget that runs past it (the eps_max_len's when the budget alone does)."""
        tok, context, eps = self.tokenizer, self.model.config.max_position_embeddings, settings.eps_max_len
        if settings.augment_decoding == "structured":
            scaffold = max(map(len, generate.scaffold_ids(tok, "]", augment.SCAFFOLD).values()))
            budget = (augment.generation_budget(tok, [x for x, _ in pairs], eps) + scaffold
                      + augment.generation_budget(tok, [y for _, y in pairs], eps))
        else:
            budget = augment.generation_budget(tok, [f"Input: [{x}], Response: [{y}]" for x, y in pairs], eps)
        for i, (x, y) in enumerate(pairs):
            turn = [{"role": "user", "content": augment.AUGMENT_PROMPT.format(x=x, y=y)}]
            prompt = len(tok.encode(tok.apply_chat_template(turn) + augment.REPLY_PREFIX))
            if prompt >= context:
                raise RequestError(413, f"pairs[{i}]: its prompt is {prompt} tokens, the model's context "
                                   f"{context}", f"pairs[{i}]")
            if prompt + budget > context:
                field = "thresholds.eps_max_len" if budget >= context else f"pairs[{i}]"
                raise RequestError(422, f"{field}: pairs[{i}]'s prompt of {prompt} tokens and a generation budget "
                                   f"of {budget} (eq. 4's eps_max_len {eps} times the longest part, and slack) "
                                   f"exceed the model's context of {context}", field)

    def chat_completions(self, body: dict, gone=None) -> dict:
        """OpenAI's chat completion for one conversation: n samples of one prefill, sample i from its
        own generator (`generate.reply_generator(seed, i)`), as `generate.chat([messages] * n, max_tokens,
        temperature, seed)` draws them, decoded with the other requests in flight.
        As vLLM does, `continue_final_message` (with `add_generation_prompt: false`) continues
        a final assistant message instead of starting a new turn (its content is the reply's
        start, not repeated in the answer), and `stop` (a string) ends the reply before it.
        gone: whether the client has left (then its decoding is cancelled)."""
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
        temperature = option(body, "temperature", float, 1.0)
        top_p = get(body, "top_p", float, 1.0, lambda v: 0 < v <= 1, "in (0, 1]")
        max_tokens = get(body, "max_tokens", int, 256, lambda v: 1 <= v <= MAX_TOKENS, f"between 1 and {MAX_TOKENS}")
        n = get(body, "n", int, 1, lambda v: 1 <= v <= MAX_N, f"between 1 and {MAX_N}")
        seed = request_seed(body)
        stop = get(body, "stop", str, "", lambda v: len(v) <= 16, "a string of at most 16 characters")
        cont = body.get("continue_final_message") is True
        if cont and (messages[-1]["role"] != "assistant" or body.get("add_generation_prompt") is not False):
            raise RequestError(422, "continue_final_message: needs a final assistant message and "
                               "add_generation_prompt false", "continue_final_message")
        tok, device = self.tokenizer, self.model.model.embed_tokens.weight.device
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        prompt = tok.encode(tok.apply_chat_template(turns[:-1]) + turns[-1]["content"] if cont
                            else tok.apply_chat_template(turns))
        context = self.model.config.max_position_embeddings
        if len(prompt) >= context:
            raise RequestError(413, f"messages: {len(prompt)} prompt tokens, the model's context {context}", "messages")
        if len(prompt) + max_tokens > context:
            raise RequestError(422, f"max_tokens: {len(prompt)} prompt tokens + max_tokens {max_tokens} exceed the "
                               f"model's context of {context}", "max_tokens")
        generators = [generate.reply_generator(seed, i, device) for i in range(n)]
        out = self.batcher.generate(torch.tensor([prompt], device=device), max_tokens, temperature, copies=[n],
                                    generator=generators, eos_token_id=tuple(generate.end_ids(tok, stop)),
                                    top_p=top_p, gone=gone)  # (n, T + new)
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
                                      "most_batched": cloud.batcher.most, "jobs": dict(cloud.batcher.counts)},
                  "/v1/models": lambda: {"object": "list", "data": [
                      {"id": cloud.model_name, "object": "model", "created": 0, "owned_by": "cdcda"}]}}
        self.answer(lambda: routes[self.path]() if self.path in routes else self.unknown())

    def do_POST(self):
        routes = {"/v1/augment": self.server.cloud.augment, "/v1/chat/completions": self.server.cloud.chat_completions}
        self.answer(lambda: routes[self.path](self.body(), self.gone) if self.path in routes else self.unknown())

    def gone(self) -> bool:
        """Has the client closed its connection? It has sent its whole request (one a connection),
        so the socket turns readable only at its end: EOF, or a reset."""
        try:
            readable = select.select([self.connection], [], [], 0)[0]
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):
            return True

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
        except Cancelled:
            self.log_message("client left; its request was cancelled: %s %s", self.command, self.path)
            self.close_connection = True
            return
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
          device: str = "cpu", token: str | None = None, max_batch: int = MAX_BATCH, dtype: str = "float32",
          chunk: int = PREFILL_CHUNK, prefix: int = PREFIX_TOKENS):
    """Load the models once, then serve until interrupted. token=None reads CDCDA_TOKEN
    (unset or empty: no authorization)."""
    token = (os.environ.get("CDCDA_TOKEN") or None) if token is None else token
    if host not in ("127.0.0.1", "localhost") and not token:
        print(f"warning: serving users' personal data on {host} without CDCDA_TOKEN", file=sys.stderr)
    cloud = Cloud(cloud_model, judge, settings, device, token, max_batch, dtype, chunk, prefix)
    server = ThreadingHTTPServer((host, port), Handler)  # bound after loading: no connection waits on it
    server.daemon_threads, server.cloud = True, cloud
    print(f"cdcda cloud: http://{host}:{server.server_address[1]}  model {cloud.model_name} ({dtype}, up to "
          f"{max_batch} replies a batch, prefill {chunk} tokens a step, prefixes of {prefix} tokens cached), judge {cloud.judge.name}, token {'required' if token else 'off'}", flush=True)
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
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, help="most replies decoded together, across the "
                   f"requests (default {MAX_BATCH}: augmentation's AUGMENT_BATCH and a request's k)")
    p.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK, help="prompt tokens of a request prefilled between two "
                   "decoding steps (vLLM's chunked prefill): a long prompt delays the others by a chunk's time")
    p.add_argument("--prefix-cache", type=int, default=PREFIX_TOKENS, help="prompt positions whose keys and values are "
                   "kept for later prompts that begin the same way (vLLM's prefix caching; 0: off)")
    p.add_argument("--cloud-dtype", default="float32", choices=["float32", "bfloat16"], help="the cloud LM's weights "
                   "and compute (bfloat16: faster on CPUs with bf16 units)")
    options.add_options(p, options.FILTER_OPTIONS)
    args = p.parse_args(argv)
    options.check_ranges(p, args, {name: options.RANGES[name] for name in THRESHOLDS} | {
        "port": (lambda v: 0 <= v < 65536, "between 0 and 65535"), "max_batch": (lambda v: v >= 1, "at least 1"),
        "prefill_chunk": (lambda v: v >= 1, "at least 1"), "prefix_cache": (lambda v: v >= 0, "at least 0")})
    if args.eps_min_len > args.eps_max_len:
        p.error(f"--eps-min-len {args.eps_min_len} above --eps-max-len {args.eps_max_len}: eq. 4 would keep nothing")
    if problem := options.device_problem(args.torch_device):
        p.error(problem)
    serve(args.host, args.port, args.cloud_model, args.judge or options.EMBEDDED["judge"],
          options.Settings(**{name: getattr(args, name) for name in THRESHOLDS}), args.torch_device,
          max_batch=args.max_batch, dtype=args.cloud_dtype,
          chunk=args.prefill_chunk, prefix=args.prefix_cache)


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"python -m cloud.server: error: {e}")
