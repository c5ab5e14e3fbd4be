"""The cloud of CDCDA-PLM as an HTTP service, and the device's client for it (paper sec. 4, steps 1-4).

In the paper the cloud and the device are different machines. The device uploads the user's
history D_u (step 1), the cloud augments it (step 2, eq. 1) and selects (step 3, eq. 2-4), and
the device downloads D_filtered (step 4) and personalizes offline. Over HTTP:

  POST /v1/augment           {"task", "pairs": [[x, y], ...], "k", "temperature", "seed",
                              "thresholds": {eps_scf, eps_tdf, eps_min_len, eps_max_len}}
                             -> {"records": [selection records], "counts", "judge", "model"}
                             (upload = the request, download = the response)
  POST /v1/chat/completions  an OpenAI-compatible subset (messages, temperature, top_p,
                             max_tokens, n, seed, model) over the same cloud LM
  GET  /health, GET /v1/models

Errors are JSON {"error": {"message", "field"}}: 400 malformed JSON, 401 missing or wrong bearer
token (when CDCDA_TOKEN is set on the server), 404 unknown path or model, 408/411 body late or
without Content-Length, 413 body over MAX_BODY, 422 a missing, wrongly typed or out-of-range
field, 500 an internal error; the server goes on serving after each.

Why the standard library (`http.server.ThreadingHTTPServer`, `urllib.request`): no dependency,
and a thread per request is enough for a reference whose one model generates one request at a
time anyway (a lock serializes it; parsing, validation and I/O run concurrently). Production
would put a real serving stack (vLLM, TLS in front) behind the same API; `api_chat` (the
device's --cloud-api) already augments through any OpenAI-compatible server, filters run locally.

    python cloud.py --port 8000 [--cloud-model DIR_OR_NAME] [--judge embedding:all-minilm-l6-v2]
"""
import argparse
import hmac
import http.client
import json
import math
import os
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import cdcda
import data
import filters
import hub
import qwen2

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


# ---------------------------------------------------------------- the server
class Cloud:
    """What the server holds: the cloud LM, its tokenizer, the judge, default thresholds, the lock."""
    def __init__(self, cloud_model: str, judge: str, thresholds: dict, device: str = "cpu",
                 token: str | None = None):
        self.model, self.tokenizer = qwen2.load(cloud_model, "float32", device)
        self.judge = cdcda.make_judge(judge, device)
        self.model_name, self.thresholds, self.token = cloud_model, thresholds, token
        self.lock = threading.Lock()  # one model: one generation at a time

    def augment(self, body: dict) -> dict:
        """Steps 2-3 for one upload: `cdcda.augment` (eq. 1) then `cdcda.select` (eq. 2-4)."""
        get(body, "task", str, ok=lambda t: t in data.TASKS, rule=f"one of {', '.join(data.TASKS)}")
        pairs = get(body, "pairs", list, ok=lambda p: 1 <= len(p) <= MAX_PAIRS, rule=f"1 to {MAX_PAIRS} pairs")
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
                raise RequestError(422, f"pairs[{i}]: expected [input, output], two strings", f"pairs[{i}]")
        k = get(body, "k", int, 5, lambda v: 1 <= v <= MAX_K, f"between 1 and {MAX_K}")
        temperature = get(body, "temperature", float, 0.7, lambda v: 0 <= v <= 2, "between 0 and 2")
        seed = get(body, "seed", int, 0, lambda v: 0 <= v < 2 ** 63, "a non-negative integer")
        given = get(body, "thresholds", dict, {})
        for name in set(given) - set(THRESHOLDS):
            raise RequestError(422, f"thresholds.{name}: unknown; use {', '.join(THRESHOLDS)}", f"thresholds.{name}")
        thresholds = dict(self.thresholds)
        for name in THRESHOLDS:
            thresholds[name] = get(given, name, float, thresholds[name], math.isfinite, "a finite number",
                                   where="thresholds.")
        pairs = [tuple(p) for p in pairs]
        with self.lock:
            originals, candidates, unparsable, off_label = cdcda.augment(
                self.model, self.tokenizer, pairs, k, temperature, seed, task=data.get_task(body["task"]),
                max_len_ratio=thresholds["eps_max_len"])
            sel = cdcda.select(originals, candidates, self.judge, thresholds)
        counts = {**sel.counts, "generated": len(pairs) * k, "unparsable": unparsable,
                  "off_label": off_label}  # as cdcda.synthesize
        return {"records": sel.records, "counts": counts, "judge": self.judge.name, "model": self.model_name,
                "thresholds": sel.thresholds}

    def chat_completions(self, body: dict) -> dict:
        """OpenAI's chat completion for one conversation; n samples share one seeded generator.
        With n=1 the reply equals `qwen2.chat([messages], max_tokens, temperature, seed)`."""
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
        tok, device = self.tokenizer, self.model.model.embed_tokens.weight.device
        prompt = tok.encode(tok.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages]))
        if len(prompt) + max_tokens > self.model.config.max_position_embeddings:
            raise RequestError(422, f"messages: {len(prompt)} prompt tokens + max_tokens {max_tokens} exceed the "
                               f"context of {self.model.config.max_position_embeddings}", "messages")
        ids = torch.tensor([prompt] * n, device=device)  # (n, T)
        with self.lock, torch.no_grad():
            generator = torch.Generator(device).manual_seed(seed)
            out = qwen2.generate(self.model, ids, max_tokens, temperature, top_p, eos_token_id=tok.eos_token_ids,
                                 generator=generator)  # (n, T + new)
        choices, used = [], 0
        for i, new in enumerate(out[:, len(prompt):].tolist()):
            ends = [j for j, t in enumerate(new) if t in tok.eos_token_ids]
            used += ends[0] + 1 if ends else len(new)
            text = tok.decode(new[:ends[0]] if ends else new).strip()
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop" if ends else "length", "logprobs": None})
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": used, "total_tokens": len(prompt) + used}}


class Handler(BaseHTTPRequestHandler):
    """One request on its own thread: authorize, read and parse the body, route, answer JSON."""
    server_version = "cdcda-cloud"
    timeout = 60  # seconds a client may take to send its request

    def do_GET(self):
        cloud = self.server.cloud
        routes = {"/health": lambda: {"status": "ok", "model": cloud.model_name, "judge": cloud.judge.name},
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


def serve(host: str = "127.0.0.1", port: int = 8000, cloud_model: str = qwen2.EMBEDDED, judge: str | None = None,
          thresholds: dict | None = None, device: str = "cpu", token: str | None = None):
    """Load the models once, then serve until interrupted. judge=None: cdcda's embedded default
    (resolved here, not at import: cdcda imports this module). token=None reads CDCDA_TOKEN
    (unset or empty: no authorization)."""
    token = (os.environ.get("CDCDA_TOKEN") or None) if token is None else token
    if host not in ("127.0.0.1", "localhost") and not token:
        print(f"warning: serving users' personal data on {host} without CDCDA_TOKEN", file=sys.stderr)
    thresholds = {"eps_scf": None, "eps_tdf": filters.EPS_TDF, "eps_min_len": filters.EPS_MIN_LEN,
                  "eps_max_len": filters.EPS_MAX_LEN} | (thresholds or {})
    cloud = Cloud(cloud_model, judge or cdcda.EMBEDDED["judge"], thresholds, device, token)
    server = ThreadingHTTPServer((host, port), Handler)  # bound after loading: no connection waits on it
    server.daemon_threads, server.cloud = True, cloud
    print(f"cdcda cloud: http://{host}:{server.server_address[1]}  model {cloud.model_name}, judge "
          f"{cloud.judge.name}, token {'required' if token else 'off'}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()


# ---------------------------------------------------------------- the client (the device)
class CloudError(Exception):
    """The server refused the request (4xx): retrying would not help."""


class CloudUnavailable(ConnectionError):
    """No answer (connection refused or reset, timeout, 5xx) after the last try."""


def post_json(url: str, body: dict, token: str | None, timeout: float, retries: int, backoff: float) -> dict:
    """POST JSON; retry connection errors, timeouts and 5xx `retries` times, waiting backoff * 2**i."""
    raw = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    last = None
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, raw, headers, method="POST"), timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]["message"]
            except (ValueError, KeyError, TypeError, OSError):
                message = e.reason
            if e.code < 500:
                raise CloudError(f"{url}: HTTP {e.code}: {message}") from None
            last = f"HTTP {e.code}: {message}"
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        except ValueError as e:
            raise CloudError(f"{url}: the answer is not JSON ({e})") from None
        if attempt < retries:
            time.sleep(backoff * 2 ** attempt)
    raise CloudUnavailable(f"cloud {url} unavailable after {retries + 1} tries: {last}")


def remote_augment(url: str, task_name: str, pairs, k: int, temperature: float, seed: int, thresholds: dict,
                   token: str | None = None, timeout: float = 600, retries: int = 3, backoff: float = 1.0):
    """Steps 1-4 through a `serve`: upload D_u, get back (records, counts) as `cdcda.run_user`
    writes them (records with "kept" flags; counts with "generated" and "unparsable").
    token=None reads CDCDA_TOKEN."""
    token = os.environ.get("CDCDA_TOKEN") if token is None else token
    body = {"task": task_name, "pairs": [list(p) for p in pairs], "k": k, "temperature": temperature,
            "seed": seed, "thresholds": thresholds}
    answer = post_json(url.rstrip("/") + "/v1/augment", body, token, timeout, retries, backoff)
    if not (isinstance(answer.get("records"), list) and isinstance(answer.get("counts"), dict)):
        raise CloudError(f"{url}: the answer has no records/counts: {str(answer)[:200]}")
    return answer["records"], answer["counts"]


def chat_url(url: str) -> str:
    """An OpenAI base URL ("http://host:8000/v1", as vLLM prints it, or "http://host:8000") -> its chat endpoint."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("" if url.endswith("/v1") else "/v1") + "/chat/completions"


def openai_chat(url: str, model: str, conversations: list[list[dict]], max_tokens: int, temperature: float,
                seed: int, api_key: str | None = None, timeout: float = 120, retries: int = 3, backoff: float = 1.0,
                concurrency: int = 4) -> list[str]:
    """One reply per conversation from an OpenAI-compatible server (vLLM, or `serve`).
    Conversation i is sent with seed + i, so the k copies of one augmentation prompt differ.
    api_key=None reads OPENAI_API_KEY."""
    api_key = os.environ.get("OPENAI_API_KEY") if api_key is None else api_key
    endpoint = chat_url(url)

    def one(i):
        body = {"model": model, "messages": conversations[i], "max_tokens": max_tokens,
                "temperature": temperature, "seed": seed + i, "n": 1}
        answer = post_json(endpoint, body, api_key, timeout, retries, backoff)
        try:
            return (answer["choices"][0]["message"]["content"] or "").strip()
        except (KeyError, IndexError, TypeError):
            raise CloudError(f"{endpoint}: not a chat completion: {str(answer)[:200]}") from None
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(len(conversations))))


def api_chat(url: str, model: str, api_key: str | None = None, **client):
    """`qwen2.chat`'s shape over an OpenAI-compatible server, for `cdcda.augment` (--cloud-api):
    chat(model, tokenizer, conversations, max_new_tokens, temperature, seed, ...) -> list[str];
    the local model and tokenizer arguments are ignored, and so is `reply_prefix` (the chat API
    cannot start the assistant's turn)."""
    def chat(_model, _tokenizer, conversations, max_new_tokens=64, temperature=0.7, seed=0, batch_size=8, desc=None,
             reply_prefix=""):
        return openai_chat(url, model, conversations, max_new_tokens, temperature, seed, api_key, **client)
    return chat


def load_tokenizer(source: str) -> qwen2.Tokenizer:
    """The cloud model's tokenizer alone (augment sizes max_new_tokens with it) for --cloud-api."""
    return qwen2.Tokenizer.from_dir(qwen2.embedded_dir() if source == qwen2.EMBEDDED else hub.snapshot(source))


def main(argv=None):
    p = argparse.ArgumentParser(description="The CDCDA-PLM cloud (steps 2-3) as an HTTP service; "
                                "set CDCDA_TOKEN to require 'Authorization: Bearer <token>'")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--cloud-model", default=qwen2.EMBEDDED, help="cloud LM: embedded name, hub-style dir or hub id")
    p.add_argument("--judge", default=cdcda.EMBEDDED["judge"], help="nli:MODEL or embedding:MODEL")
    p.add_argument("--eps-scf", type=float, default=None, help="eq. 2 default threshold (default: the judge's)")
    p.add_argument("--eps-tdf", type=float, default=filters.EPS_TDF, help="eq. 3 default ROUGE-L upper bound")
    p.add_argument("--eps-min-len", type=float, default=filters.EPS_MIN_LEN, help="eq. 4 default lower ratio")
    p.add_argument("--eps-max-len", type=float, default=filters.EPS_MAX_LEN, help="eq. 4 default upper ratio")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args(argv)
    serve(args.host, args.port, args.cloud_model, args.judge, cdcda.thresholds(args), args.device)


if __name__ == "__main__":
    main()
