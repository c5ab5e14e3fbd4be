"""The device's side of the cloud (paper sec. 4, steps 1 and 4): a client for the cloud service.

In the paper the cloud and the device are different machines: the device uploads the user's
history D_u (step 1), the cloud augments (step 2) and selects (step 3), the device downloads
D_filtered (step 4). `remote_augment` does steps 1-4 against `python server.py` (this
project's cloud, `POST /v1/augment`; the protocol is in server.py); `api_chat` augments
through any OpenAI-compatible server (vLLM, or server.py's `/v1/chat/completions`) and the
filters then run on the device. Standard library only (`urllib.request`): timeouts, retries
with exponential backoff on connection errors and 5xx, a clear error on 4xx.
"""
import http.client
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import hub
import qwen2
import smollm2


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
                   decoding: str = "free", token: str | None = None, timeout: float = 600, retries: int = 3,
                   backoff: float = 1.0):
    """Steps 1-4 through server.py: upload D_u, get back (records, counts) as `cdcda.synthesize`
    writes them (records with "kept" flags; counts with "generated" and "unparsable").
    `decoding`: "free" or "structured" (`augment.augment`). token=None reads CDCDA_TOKEN."""
    token = os.environ.get("CDCDA_TOKEN") if token is None else token
    body = {"task": task_name, "pairs": [list(p) for p in pairs], "k": k, "temperature": temperature,
            "seed": seed, "thresholds": thresholds, "decoding": decoding}
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
                seed: int, api_key: str | None = None, stop: str = "", timeout: float = 120, retries: int = 3,
                backoff: float = 1.0, concurrency: int = 4) -> list[str]:
    """One reply per conversation from an OpenAI-compatible server (vLLM, or server.py), as the
    server wrote it. Conversation i is sent with seed + i, so the k copies of one augmentation
    prompt differ. A conversation that ends in an assistant message is continued (vLLM's
    `continue_final_message`); `stop` ends a reply before that text. api_key=None reads
    OPENAI_API_KEY. Up to `concurrency` requests are in flight at once (a thread pool;
    --cloud-concurrency), so a batching server (vLLM) has several to decode together; the
    replies come back in the conversations' order, and the seeds make them independent of it."""
    api_key = os.environ.get("OPENAI_API_KEY") if api_key is None else api_key
    endpoint = chat_url(url)

    def one(i):
        body = {"model": model, "messages": conversations[i], "max_tokens": max_tokens,
                "temperature": temperature, "seed": seed + i, "n": 1}
        if conversations[i][-1]["role"] == "assistant":
            body |= {"continue_final_message": True, "add_generation_prompt": False}
        if stop:
            body["stop"] = stop
        answer = post_json(endpoint, body, api_key, timeout, retries, backoff)
        try:
            return answer["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise CloudError(f"{endpoint}: not a chat completion: {str(answer)[:200]}") from None
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(len(conversations))))


def api_chat(url: str, model: str, api_key: str | None = None, **client):
    """`generate.chat` over an OpenAI-compatible server, for `augment.augment` (--cloud-api):
    chat(model, tokenizer, conversations, max_new_tokens, temperature, seed, ..., reply_prefix,
    stop) -> list[str]; the local model and tokenizer arguments are ignored. `reply_prefix`
    starts the assistant's turn as in process: it is sent as a final assistant message to be
    continued, and kept in the reply."""
    def chat(_model, _tokenizer, conversations, max_new_tokens=64, temperature=0.7, seed=0, batch_size=8, desc=None,
             reply_prefix="", stop=""):
        prefixes = [reply_prefix] * len(conversations) if isinstance(reply_prefix, str) else list(reply_prefix)
        primed = [c + [{"role": "assistant", "content": p}] if p else c for c, p in zip(conversations, prefixes)]
        texts = openai_chat(url, model, primed, max_new_tokens, temperature, seed, api_key, stop, **client)
        return [(p + t).strip() for p, t in zip(prefixes, texts)]
    return chat


def load_tokenizer(source: str) -> qwen2.Tokenizer:
    """The cloud model's tokenizer alone (augment sizes max_new_tokens with it) for --cloud-api."""
    return qwen2.Tokenizer.from_dir(smollm2.embedded_dir() if source == qwen2.EMBEDDED else hub.snapshot(source))
