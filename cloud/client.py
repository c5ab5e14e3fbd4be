"""The device's side of the cloud (paper sec. 4, steps 1 and 4): a client for the cloud service.

In the paper the cloud and the device are different machines: the device uploads the user's
history D_u (step 1), the cloud augments (step 2) and selects (step 3), the device downloads
D_filtered (step 4). `remote_augment` does steps 1-4 against `python -m cloud.server` (this
project's cloud service, `POST /v1/augment`; the protocol is in server.py); `api_chat`
augments through any OpenAI-compatible server (vLLM, or the service's `/v1/chat/completions`)
and the filters then run on the device. Standard library only (`urllib.request`): timeouts, retries
with exponential backoff of what a retry can cure (a timeout, a refused or dropped connection, 502,
503, 504), a clear error at once on the rest (4xx: the request; 500: a bug on the server).
"""
import http.client
import json
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import filters
import qwen2


class CloudError(Exception):
    """The server refused the request (4xx) or failed on it (500, another 5xx but 502-504; an
    answer that is not JSON): retrying would not help."""


class CloudUnavailable(ConnectionError):
    """No answer (a timeout, a refused or dropped connection, 502, 503, 504) after the last try,
    or no route to the server at all (an unknown host)."""


RETRIED = (502, 503, 504)  # a gateway's or a busy server's: the same request may succeed later


@dataclass(frozen=True)
class Endpoint:
    """A server the device talks to: its URL, the bearer token (None: none sent), how long one
    request may take (then the connection is closed, and the service cancels the request), how
    often a failed one is retried (waiting backoff * 2**i), and how many requests `openai_chat`
    keeps in flight at once (--cloud-concurrency)."""
    url: str
    token: str | None = None
    timeout: float = 600
    retries: int = 3
    backoff: float = 1.0
    concurrency: int = 4


def post_json(endpoint: Endpoint, url: str, body: dict) -> dict:
    """POST JSON to `url` (on `endpoint`'s server). Retried: a timeout, a refused, reset or dropped
    connection, HTTP 502, 503 and 504 (CloudUnavailable after the last try). Raised at once: a 4xx
    (the request is at fault) and any other 5xx (a 500 is a bug on the server: the same request
    would fail again), as CloudError; a host that cannot be reached at all, as CloudUnavailable."""
    raw = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | (
        {"Authorization": f"Bearer {endpoint.token}"} if endpoint.token else {})
    last = None
    for attempt in range(endpoint.retries + 1):
        try:
            request = urllib.request.Request(url, raw, headers, method="POST")
            with urllib.request.urlopen(request, timeout=endpoint.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]["message"]
            except (ValueError, KeyError, TypeError, OSError):
                message = e.reason
            if e.code not in RETRIED:
                bug = " (a server error: not retried)" if e.code >= 500 else ""
                raise CloudError(f"{url}: HTTP {e.code}: {message}{bug}") from None
            last = f"HTTP {e.code}: {message}"
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            last = f"{type(reason).__name__}: {reason}"
            if not isinstance(reason, (TimeoutError, ConnectionError, http.client.HTTPException)):
                raise CloudUnavailable(f"cloud {url} unreachable: {last}") from None
        except ValueError as e:
            raise CloudError(f"{url}: the answer is not JSON ({e})") from None
        if attempt < endpoint.retries:
            time.sleep(endpoint.backoff * 2 ** attempt)
    raise CloudUnavailable(f"cloud {url} unavailable after {endpoint.retries + 1} tries: {last}")


def remote_augment(server: Endpoint, task_name: str, pairs, settings, seed: int) -> filters.Selection:
    """Steps 2-3 on the cloud service (server.py): upload D_u (step 1), download step 3's selection
    (step 4), as `filters.select` makes it in process: the kept pairs, a record per candidate with
    its scores and verdict, the counts (step 2's "generated", "unparsable", "off_label" too)."""
    thresholds = {name: getattr(settings, name) for name in ("eps_scf", "eps_tdf", "eps_min_len", "eps_max_len")}
    body = {"task": task_name, "pairs": [list(p) for p in pairs], "k": settings.k,
            "temperature": settings.temperature, "seed": seed, "thresholds": thresholds,
            "decoding": settings.augment_decoding}
    answer = post_json(server, server.url.rstrip("/") + "/v1/augment", body)
    if not (isinstance(answer.get("records"), list) and isinstance(answer.get("counts"), dict)):
        raise CloudError(f"{server.url}: the answer has no records/counts: {str(answer)[:200]}")
    kept = [(r["syn_input"], r["syn_output"]) for r in answer["records"] if r.get("kept")]
    return filters.Selection(kept, answer["records"], answer["counts"], answer.get("thresholds", {}))


def chat_url(url: str) -> str:
    """An OpenAI base URL ("http://host:8000/v1", as vLLM prints it, or "http://host:8000") -> its chat endpoint."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("" if url.endswith("/v1") else "/v1") + "/chat/completions"


def openai_chat(api: Endpoint, model: str, conversations: list[list[dict]], max_tokens: int, temperature: float,
                seed: int, stop: str = "", extra: dict | None = None) -> list[str]:
    """One reply per conversation from an OpenAI-compatible server (vLLM, or server.py), as the
    server wrote it. Conversation i is sent with seed + i, so the k copies of one augmentation
    prompt differ. A conversation that ends in an assistant message is continued (vLLM's
    `continue_final_message`); `stop` ends a reply before that text. Up to `api.concurrency`
    requests are in flight at once (a thread pool), so a batching server (vLLM) has several
    to decode together; the replies come back in the conversations' order, and the seeds make
    them independent of it. `extra`: more fields of every request's body.

    What vLLM (0.32) does otherwise than `generate.chat` in process, which no request can change:
    it samples with its own generator per seed (so the same seed gives other replies than ours, and
    its batch's numerics may still move a reply); it fills every sampling option a request leaves
    out from the model directory's generation_config.json (top_k, repetition_penalty, min_p: the
    real Qwen2.5 models have them) unless it is started with `--generation-config vllm`; top_p is
    sent as 1, as ours. Its `stop` and `continue_final_message` are ours: the reply ends before the
    stop text (which a token may hold with text before it), and the continued message is the
    rendered prompt's end as it is (transformers' chat template, no end of turn)."""
    endpoint = chat_url(api.url)

    def one(i):
        body = {"model": model, "messages": conversations[i], "max_tokens": max_tokens,
                "temperature": temperature, "top_p": 1.0, "seed": seed + i, "n": 1}
        if conversations[i][-1]["role"] == "assistant":
            body |= {"continue_final_message": True, "add_generation_prompt": False}
        if stop:
            body["stop"] = stop
        body |= extra or {}
        answer = post_json(api, endpoint, body)
        try:
            return answer["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise CloudError(f"{endpoint}: not a chat completion: {str(answer)[:200]}") from None
    with ThreadPoolExecutor(api.concurrency) as pool:
        return list(pool.map(one, range(len(conversations))))


def api_chat(api: Endpoint, model: str):
    """`generate.chat` over an OpenAI-compatible server, for `augment.augment` (--cloud-api):
    chat(model, tokenizer, conversations, max_new_tokens, temperature, seed, ..., reply_prefix,
    stop, scaffold, scaffold_tokens) -> list[str]; the local model and tokenizer arguments are
    ignored. `reply_prefix` starts the assistant's turn as in process: it is sent as a final
    assistant message to be continued, and kept in the reply; a scaffold is written after the
    first reply and continued by a second request (seeds after the first requests'). In process
    the scaffold's tokens follow the first part's tokens; here the server tokenizes the text of
    both again, so the ids at the seam may differ (the text does not). `labels` (a
    labels.LabelTrie) go with that request as vLLM's choice list (`constrained`)."""
    refused = []  # the server's refusal of the choice list: warned once, then not sent again

    def chat(_model, _tokenizer, conversations, max_new_tokens=64, temperature=0.7, seed=0, batch_size=8, desc=None,
             reply_prefix="", stop="", scaffold="", scaffold_tokens=0, labels=None):
        prefixes = [reply_prefix] * len(conversations) if isinstance(reply_prefix, str) else list(reply_prefix)
        primed = [c + [{"role": "assistant", "content": p}] if p else c for c, p in zip(conversations, prefixes)]
        texts = [p + t for p, t in zip(prefixes, openai_chat(api, model, primed, max_new_tokens, temperature, seed, stop))]
        if scaffold:  # the API cannot write into a reply: the scaffold starts a second request
            primed = [c + [{"role": "assistant", "content": t + scaffold}] for c, t in zip(conversations, texts)]
            texts = [t + scaffold + more for t, more in zip(texts, constrained(
                labels, primed, scaffold_tokens or max_new_tokens, temperature, seed + len(texts), stop))]
        return [t.strip() for t in texts]

    def constrained(labels, *args):
        """The replies to `args` (openai_chat's), each one of `labels`: vLLM's (0.12+)
        structured_outputs.choice (its older guided_choice is ignored: free replies). A server that
        refuses the field (HTTP 400/422 naming it) gets the free request, with a warning, once. This
        project's service (server.py) ignores the field: its replies are free."""
        if labels is None or refused:
            return openai_chat(api, model, *args)
        try:
            return openai_chat(api, model, *args, {"structured_outputs": {"choice": list(labels)}})
        except CloudError as e:
            if not any(f"HTTP {code}" in str(e) for code in (400, 422)) or "structured_outputs" not in str(e):
                raise
            refused.append(e)
            print(f"warning: {e}; the labels are not enforced, the responses are free", file=sys.stderr)
            return openai_chat(api, model, *args)
    return chat


def load_tokenizer(source: str) -> qwen2.Tokenizer:
    """The cloud model's tokenizer alone (augment sizes max_new_tokens with it) for --cloud-api."""
    return qwen2.Tokenizer.from_dir(qwen2.model_dir(source))
