"""The device's client for the cloud (cloud/client.py) on its own: retries, backoff, errors, URLs.
Against the real server it is tested in test_server.py."""
import threading
import time

import pytest

import options
from cloud import client as cloud

ONE = options.Settings(k=1)


def test_client_retries_then_raises_cloud_unavailable_on_a_closed_port(free_port):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t = time.time()
    with pytest.raises(cloud.CloudUnavailable, match=f"{url}/v1/augment unavailable after 3 tries"):
        cloud.remote_augment(cloud.Endpoint(url, retries=2, backoff=0.05, timeout=2), "lamp7", [("a", "b")], ONE, 0)
    assert 0.15 <= time.time() - t < 3  # slept 0.05 + 0.1 between the tries


def test_client_retries_5xx_with_backoff(json_server):
    """A stub server that fails twice with 503, then answers: the third try succeeds."""
    calls = []

    def flaky(body):
        calls.append(time.time())
        if len(calls) >= 3:
            return 200, {"records": [], "counts": {"generated": 1}}
        return 503, {"error": {"message": "busy", "field": None}}
    url = json_server(flaky)
    selection = cloud.remote_augment(cloud.Endpoint(url, backoff=0.05), "lamp7", [("a", "b")], ONE, 0)
    assert (selection.kept, selection.records, selection.counts) == ([], [], {"generated": 1})
    assert len(calls) == 3 and calls[2] - calls[0] >= 0.15 - 0.01
    calls.clear()
    with pytest.raises(cloud.CloudUnavailable, match="after 2 tries: HTTP 503: busy"):
        cloud.remote_augment(cloud.Endpoint(url, retries=1, backoff=0.01), "lamp7", [("a", "b")], ONE, 0)


def test_chat_url():
    assert cloud.chat_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert cloud.chat_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert cloud.chat_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"


@pytest.mark.parametrize("concurrency", [1, 3])
def test_openai_chat_keeps_at_most_concurrency_requests_in_flight_and_the_order(concurrency, json_server):
    """A stub that holds each request 100 ms and counts how many are open at once: never more
    than `concurrency`, exactly that many at some point, and replies come back in order."""
    lock, open_now, most = threading.Lock(), [0], [0]

    def slow(body):
        with lock:
            open_now[0] += 1
            most[0] = max(most[0], open_now[0])
        time.sleep(0.1)
        with lock:
            open_now[0] -= 1
        return 200, {"choices": [{"message": {"content": body["messages"][-1]["content"] + "!"}}]}
    conversations = [[{"role": "user", "content": str(i)}] for i in range(9)]
    api = cloud.Endpoint(json_server(slow), concurrency=concurrency)
    replies = cloud.openai_chat(api, "m", conversations, 8, 0.7, 0)
    assert replies == [f"{i}!" for i in range(9)] and most[0] == concurrency


def test_api_chat_sends_what_vllm_needs_for_the_scaffold(json_server):
    """Structured decoding through the API: per conversation a first request continuing the reply
    prefix, a second continuing prefix + first part + scaffold, both stopped at "]", top_p 1 (vLLM
    would otherwise take a model's generation_config defaults) and their own seeds."""
    bodies = []

    def echo(body):
        bodies.append(body)
        return 200, {"choices": [{"message": {"content": f"s{body['seed']}"}}]}
    chat = cloud.api_chat(cloud.Endpoint(json_server(echo)), "m")
    conversations = [[{"role": "user", "content": c}] for c in "ab"]
    replies = chat(None, None, conversations, 8, 0.7, seed=10, reply_prefix="Input: [",
                   stop="]", scaffold="], Response: [", scaffold_tokens=5)
    assert replies == ["Input: [s10], Response: [s12", "Input: [s11], Response: [s13"]
    bodies.sort(key=lambda b: b["seed"])
    assert [b["messages"][-1]["content"] for b in bodies] == [
        "Input: [", "Input: [", "Input: [s10], Response: [", "Input: [s11], Response: ["]
    assert [b["max_tokens"] for b in bodies] == [8, 8, 5, 5]
    assert all(b["continue_final_message"] is True and b["add_generation_prompt"] is False
               and b["stop"] == "]" and b["top_p"] == 1.0 and b["model"] == "m" for b in bodies)


@pytest.mark.parametrize("how, retried", [
    (400, False), (401, False), (404, False), (413, False), (422, False),
    (500, False),  # a bug on the server: the same request would fail again
    (502, True), (503, True), (504, True), ("drop", True), ("slow", True)])
def test_client_retries_only_what_a_retry_can_cure(how, retried, json_server):
    """A stub that answers the first two tries with an HTTP status, drops the connection without an
    answer, or answers after the client's timeout; the third try gets 200. Retried: 502-504, a
    dropped connection, a timeout; raised at once: 4xx, and 500."""
    calls = []

    def stub(body):
        calls.append(time.time())
        if len(calls) < 3 and how == "drop":
            return None  # no answer: the client reads an empty status line
        if len(calls) < 3 and how == "slow":
            time.sleep(0.6)  # past the client's timeout
        status = 200 if len(calls) >= 3 else how if isinstance(how, int) else 200
        return status, ({"records": [], "counts": {}} if status == 200 else
                        {"error": {"message": f"status {status}", "field": None}})
    endpoint = cloud.Endpoint(json_server(stub), retries=3, backoff=0.01, timeout=0.3)
    if retried:
        assert cloud.remote_augment(endpoint, "lamp7", [("a", "b")], ONE, 0).records == []
        assert len(calls) == 3
    else:
        with pytest.raises(cloud.CloudError, match=f"HTTP {how}: status {how}"):
            cloud.remote_augment(endpoint, "lamp7", [("a", "b")], ONE, 0)
        assert len(calls) == 1


def test_client_does_not_retry_an_unknown_host():
    t = time.time()
    with pytest.raises(cloud.CloudUnavailable, match="unreachable"):
        cloud.post_json(cloud.Endpoint("http://host.invalid", backoff=5), "http://host.invalid/v1/augment", {})
    assert time.time() - t < 5  # no backoff sleep
