"""The cloud service (cloud/server.py) and the device's client (cloud/client.py) against it: a real
server process on 127.0.0.1, plain HTTP clients, and `python -m cloud` through it.

The server runs a tiny random decoder (SmolLM2's tokenizer, 2 layers of width 32) and the
embedded MiniLM judge. A random decoder never writes a parsable "Input: ..., Response: ..."
pair, so in the server process (and in the in-process run it is compared with) every
augmentation reply is wrapped by `parsable`: the real, seeded generation decides whether the
reply becomes a good pair, an off-topic pair or stays unparsable, so the records still depend
on the seed and on generation being deterministic across processes.
"""
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import replace
from pathlib import Path

import pytest

import augment
import data
import filters
import generate
import options
import qwen2
from cloud import __main__ as run_cloud, batcher, client as cloud, server as cloud_server
from errors import InputError

ROOT = Path(__file__).resolve().parent.parent
JUDGE = "embedding:all-minilm-l6-v2"
TOKEN = "s3cret-test-token"


def parsable(real_chat):
    """generate.chat whose augmentation replies are parsable pairs built from the real generation."""
    def chat(model, tokenizer, conversations, *args, **kw):
        texts = real_chat(model, tokenizer, conversations, *args, **kw)
        if not (kw.get("desc") or "").startswith("augment"):
            return texts
        if any("FAIL INSIDE THE CLOUD" in conv[-1]["content"] for conv in conversations):
            raise RuntimeError("test: the cloud LM failed")  # an internal error, for the 500 test
        out = []
        for conv, text in zip(conversations, texts):
            x = conv[-1]["content"].split("Input: [")[1].split("], Response: [")[0]
            h = zlib.crc32(text.encode())  # the random text itself holds "Input: [", brackets, newlines
            out.append([f"Input: [{' '.join(reversed(x.split()))}], Response: [{h} ok]",
                        f"Input: [quantum chromodynamics on a lattice], Response: [{h} ok]", "no pair"][h % 3])
        return out
    return chat


def serve_parsable():
    """Entry point of the server process: `server.main` with `parsable` augmentation replies."""
    generate.chat = parsable(generate.chat)
    cloud_server.main(sys.argv[1:])


def start_server(model_dir, port: int, log: Path, token: str = "") -> subprocess.Popen:
    """A server process on 127.0.0.1:port, returned once /health answers (or failed with its log)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), CDCDA_TOKEN=token)
    cmd = [sys.executable, "-c", "import test_server; test_server.serve_parsable()", "--port", str(port),
           "--cloud-model", str(model_dir), "--judge", JUDGE]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300  # a loaded machine: minutes
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if json.loads(r.read())["status"] == "ok":
                    return proc
        except OSError:
            time.sleep(0.2)
    stop(proc)
    pytest.fail(f"server not up after 300 s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, free_port):
    """The module's server (token required): its base URL."""
    port, log = free_port(), tmp_path_factory.mktemp("log") / "server.log"
    proc = start_server(tiny_model_dir, port, log, TOKEN)
    yield f"http://127.0.0.1:{port}"
    stop(proc)


def post(url, body: bytes, token=TOKEN, timeout=300):
    """(status, JSON answer) of a plain urllib POST."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


PAIRS = [("cannot believe it is raining again this weekend", "ugh raining AGAIN this weekend smh"),
         ("finally finished my thesis draft tonight", "thesis draft DONE finally lol"),
         ("the new coffee shop downtown is amazing", "new coffee shop downtown = amazing")]  # short: fast


SERVICE = cloud.Endpoint("", TOKEN)  # the module's server, its URL filled in by each test


def settings(k: int, temperature: float = 0.7) -> options.Settings:
    return options.Settings(k=k, temperature=temperature, augment_decoding="free")


def test_augment_over_http_equals_in_process(server, tiny_model_dir, monkeypatch):
    pairs = PAIRS
    service = replace(SERVICE, url=server)
    remote = cloud.remote_augment(service, "lamp7", pairs, settings(3), 5)
    records, counts = remote.records, remote.counts
    monkeypatch.setattr(generate, "chat", parsable(generate.chat))
    model, tok = qwen2.load(str(tiny_model_dir))
    # the service's few-row products (FewRowLinear) equal nn.Linear's to ~1e-6, not bit for bit,
    # and the tiny random model's next-token distribution is nearly uniform over 49,152 ids, so
    # any bit moves a draw: the same arithmetic here
    batcher.few_rows(model)
    judge = filters.make_judge(JUDGE, "cpu")
    out = augment.augment(augment.CloudLM(model, tok), pairs, settings(3), 5, data.get_task("lamp7"))
    sel = filters.select(pairs, out, judge, options.Settings())
    assert records == sel.records  # same seed, same synthetic data, across processes and the wire
    assert counts == sel.counts and counts["generated"] == 9
    assert remote.kept == sel.kept
    assert 0 < counts["kept"] < counts["candidates"] < 9 and counts["unparsable"] > 0  # not a trivial comparison
    other = cloud.remote_augment(service, "lamp7", pairs, settings(3), 99).records
    assert other != records  # and the seed matters


def test_openai_chat_completions_shape_and_determinism(server, tiny_model_dir):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
    body = {"model": str(tiny_model_dir), "messages": messages, "max_tokens": 8, "temperature": 0.7,
            "seed": 3, "n": 2}
    status, answer = post(server + "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200 and answer["object"] == "chat.completion" and answer["id"].startswith("chatcmpl-")
    assert answer["model"] == str(tiny_model_dir) and isinstance(answer["created"], int)
    assert [c["index"] for c in answer["choices"]] == [0, 1]
    for c in answer["choices"]:
        assert c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str)
        assert c["finish_reason"] in ("stop", "length")
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= 16 and usage["prompt_tokens"] > 5
    model, tok = qwen2.load(str(tiny_model_dir))
    # the device side of --cloud-api: conversation i is sent with seed 3 + i, one request each
    chat = cloud.api_chat(replace(SERVICE, url=server), str(tiny_model_dir))
    replies = chat(None, None, [messages, messages], max_new_tokens=8, temperature=0.7, seed=3)
    assert replies == [generate.chat(model, tok, [messages], max_new_tokens=8, temperature=0.7, seed=s)[0]
                       for s in (3, 4)]
    assert answer["choices"][0]["message"]["content"] != answer["choices"][1]["message"]["content"]


def augment_body(**change):
    body = {"task": "lamp7", "pairs": [["rain again", "ugh rain"]], "k": 2, "seed": 0}
    return json.dumps({k: v for k, v in (body | change).items() if v is not ...}).encode()


@pytest.mark.parametrize("path, body, token, status, field", [
    ("/v1/augment", b"{not json", TOKEN, 400, "body"),
    ("/v1/augment", b"[1, 2]", TOKEN, 400, "body"),
    ("/v1/augment", augment_body(pairs=...), TOKEN, 422, "pairs"),
    ("/v1/augment", augment_body(pairs="rain"), TOKEN, 422, "pairs"),
    ("/v1/augment", augment_body(pairs=[["a", "b"], ["only one"]]), TOKEN, 422, "pairs[1]"),
    ("/v1/augment", augment_body(pairs=[["a", "b"]] * (cloud_server.MAX_PAIRS + 1)), TOKEN, 422, "pairs"),
    ("/v1/augment", augment_body(task="lamp9"), TOKEN, 422, "task"),
    ("/v1/augment", augment_body(k=0), TOKEN, 422, "k"),
    ("/v1/augment", augment_body(k=cloud_server.MAX_K + 1), TOKEN, 422, "k"),
    ("/v1/augment", augment_body(k="5"), TOKEN, 422, "k"),
    ("/v1/augment", augment_body(thresholds={"eps_xyz": 1}), TOKEN, 422, "thresholds.eps_xyz"),
    ("/v1/augment", augment_body(thresholds={"eps_tdf": "high"}), TOKEN, 422, "thresholds.eps_tdf"),
    ("/v1/augment", augment_body(thresholds={"eps_tdf": 1.0}), TOKEN, 422, "thresholds.eps_tdf"),  # cdcda's ranges
    ("/v1/augment", augment_body(thresholds={"eps_max_len": -1}), TOKEN, 422, "thresholds.eps_max_len"),
    ("/v1/augment", augment_body(thresholds={"eps_max_len": 0}), TOKEN, 422, "thresholds.eps_max_len"),
    ("/v1/augment", augment_body(thresholds={"eps_min_len": -0.5}), TOKEN, 422, "thresholds.eps_min_len"),
    ("/v1/augment", augment_body(thresholds={"eps_min_len": 3}), TOKEN, 422, "thresholds.eps_min_len"),  # > max
    ("/v1/augment", augment_body(thresholds={"eps_scf": 1.5}), TOKEN, 422, "thresholds.eps_scf"),
    ("/v1/augment", augment_body(temperature=2.5), TOKEN, 422, "temperature"),
    ("/v1/augment", augment_body(seed=-1), TOKEN, 422, "seed"),
    ("/v1/augment", augment_body(thresholds={"eps_max_len": 1e9}), TOKEN, 422, "thresholds.eps_max_len"),  # budget
    ("/v1/augment", augment_body(pairs=[["a", "b"], ["word " * 20_000, "b"]], thresholds={"eps_max_len": 0.7}),
     TOKEN, 422, "pairs[1]"),  # 20,000 words: its prompt fits the tiny model's 32,768, not with the budget
    ("/v1/augment", augment_body(pairs=[["word " * 33_000, "b"]]), TOKEN, 413, "pairs[0]"),  # past the context
    ("/v1/augment", b"[" * 100_000 + b"]" * 100_000, TOKEN, 400, "body"),  # nested too deep to parse
    ("/v1/augment", b"{" + b" " * (cloud_server.MAX_BODY + 10) + b"}", TOKEN, 413, "body"),
    ("/v1/augment", augment_body(), "wrong-token", 401, "Authorization"),
    ("/v1/augment", augment_body(), None, 401, "Authorization"),
    ("/v1/chat/completions", b"{}", TOKEN, 422, "messages"),
    ("/v1/chat/completions", json.dumps({"model": "gpt-4", "messages": []}).encode(), TOKEN, 404, "model"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 99}).encode(),
     TOKEN, 422, "n"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}).encode(),
     TOKEN, 422, "top_p"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "word " * 32_000}],
                                         "max_tokens": 1000}).encode(), TOKEN, 422, "max_tokens"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "word " * 33_000}]}).encode(),
     TOKEN, 413, "messages"),
    ("/v1/nothing", b"{}", TOKEN, 404, "path"),
])
def test_bad_requests_get_4xx_naming_the_field(server, path, body, token, status, field):
    got, answer = post(server + path, body, token)
    assert (got, answer["error"]["field"]) == (status, field), answer
    assert field.split("[")[0].split(".")[0] in answer["error"]["message"]
    with urllib.request.urlopen(server + "/health", timeout=5) as r:  # still serving
        assert json.loads(r.read())["status"] == "ok"


def test_internal_error_is_a_500_and_the_server_keeps_serving(server):
    status, answer = post(server + "/v1/augment", augment_body(pairs=[["FAIL INSIDE THE CLOUD", "b"]]))
    assert status == 500 and "RuntimeError: test: the cloud LM failed" in answer["error"]["message"]
    t = time.time()
    with pytest.raises(cloud.CloudError, match="HTTP 500: .* not retried"):  # a bug: the same request fails again
        cloud.remote_augment(replace(SERVICE, url=server, retries=1, backoff=60), "lamp7",
                             [("FAIL INSIDE THE CLOUD", "b")], settings(1), 0)
    assert time.time() - t < 60  # no backoff sleep happened (a retry would sleep 60 s first)
    selection = cloud.remote_augment(replace(SERVICE, url=server), "lamp7", PAIRS[:1], settings(1), 0)
    assert selection.counts["generated"] == 1 and len(selection.records) == selection.counts["candidates"]


def test_client_does_not_retry_4xx(server):
    t = time.time()
    with pytest.raises(cloud.CloudError, match="HTTP 422: k: between 1 and 16"):
        cloud.remote_augment(replace(SERVICE, url=server, backoff=5), "lamp7", [("a", "b")], settings(0), 0)
    assert time.time() - t < 5  # no backoff sleep happened
    with pytest.raises(cloud.CloudError, match="HTTP 401"):
        cloud.remote_augment(replace(SERVICE, url=server, token="nope", backoff=5), "lamp7", [("a", "b")],
                             settings(1), 0)


def test_killed_server_keeps_finished_users_and_rerun_completes(tiny_model_dir, tmp_path, monkeypatch, free_port):
    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CDCDA_TOKEN", raising=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(tiny_model_dir, port, tmp_path / "server.log")
    real, calls = cloud.remote_augment, []

    def killed_before_second_user(service, *a):
        calls.append(a[0])
        if len(calls) == 2:
            stop(proc)  # the cloud goes away after the first user's upload and training
        return real(replace(service, retries=1, backoff=0.05, timeout=30), *a)
    argv = ["--task", "lamp7", "--users", "2", "--k", "2", "--epochs", "1", "--base-epochs", "1",
            "--max-length", "64", "--methods", "cdcda", "--device-model", str(tiny_model_dir),
            "--cloud", url, "--out", str(tmp_path / "run"), "--history-pairs", "identity",
            "--augment-decoding", "free"]
    monkeypatch.setattr(cloud, "remote_augment", killed_before_second_user)
    try:
        with pytest.raises(InputError, match=url):
            run_cloud.main(argv)
        done = list((tmp_path / "run" / "users").glob("*/result.json"))
        assert len(done) == 1 and not (tmp_path / "run" / "results.json").exists()
        first = done[0].read_text()
        proc = start_server(tiny_model_dir, port, tmp_path / "server2.log")  # same URL: same settings
        monkeypatch.setattr(cloud, "remote_augment", real)
        rep = run_cloud.main(argv)
        assert len(rep["users"]) == 2 and done[0].read_text() == first  # resumed, the finished user kept
        assert len(list((tmp_path / "run" / "users").glob("*/synthetic.jsonl"))) == 2
    finally:
        stop(proc)


def test_api_priming_and_stop_equal_in_process(server, tiny_model_dir):
    """--cloud-api augments like the in-process cloud: the reply is started with the same
    prefix (continue_final_message) and stopped at the same text, so the replies are equal."""
    model, tok = qwen2.load(str(tiny_model_dir))
    chat = cloud.api_chat(replace(SERVICE, url=server), str(tiny_model_dir))
    conversations = [[{"role": "user", "content": "say something"}]]
    for prefix, stop in (("Input: [", ""), ("Input: [", "]"), (["Input: [a], Response: ["], "]")):
        remote = chat(None, None, conversations, max_new_tokens=8, temperature=0.7, seed=5, reply_prefix=prefix,
                      stop=stop)
        local = generate.chat(model, tok, conversations, max_new_tokens=8, temperature=0.7, seed=5,
                              reply_prefix=prefix, stop=stop)
        assert remote == local and remote[0].startswith("Input: [")
    status, answer = post(server + "/v1/chat/completions", json.dumps(
        {"messages": conversations[0], "continue_final_message": True}).encode())
    assert status == 422 and answer["error"]["field"] == "continue_final_message"


def test_batched_requests_get_what_they_get_alone(tiny_model_dir):
    """Four requests queued before the decoding thread starts, one of them scaffolded (each reply
    carries its own end ids, scaffold and top-p), are decoded in one batch (prompts of other
    lengths, other seeds and temperatures, k replies of one prompt), and each gets the replies
    `generate.chat` gives it alone."""
    model, tok = qwen2.load(str(tiny_model_dir))
    decoder = batcher.Batcher(model, max_batch=64)
    conversations = [[{"role": "user", "content": text}] for text in ("say hi", "a much longer prompt than that one",
                                                                      "rain again")]
    requests = [dict(conversations=conversations[:1] * 3, seed=1, temperature=0.7),
                dict(conversations=conversations[2:] * 2, seed=4, temperature=0.7, stop="]", reply_prefix="Input: [",
                     scaffold="], Response: [", scaffold_tokens=5),
                dict(conversations=conversations, seed=2, temperature=1.0, max_new_tokens=6),
                dict(conversations=conversations[1:], seed=3, temperature=0.0)]
    alone = [generate.chat(model, tok, **({"max_new_tokens": 8} | r)) for r in requests]
    together = [None] * len(requests)

    def ask(i):
        together[i] = generate.chat(model, tok, **({"max_new_tokens": 8} | requests[i]), decode=decoder.generate)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for i, t in enumerate(threads):  # queued in this order
        t.start()
        deadline = time.time() + 30
        while len(decoder.waiting) <= i and time.time() < deadline:
            time.sleep(0.01)
    decoder.start()
    deadline = time.time() + 60
    for t in threads:
        t.join(max(0.0, deadline - time.time()))
    assert together == alone and len(set(alone[0])) > 1  # k samples of one prompt differ
    assert decoder.most == 4  # the scaffolded one shares the batch too


def test_concurrent_http_requests_equal_sequential_ones(server):
    """The server's answers do not depend on what else is in flight."""
    bodies = [augment_body(seed=s, k=3) for s in range(3)] + [json.dumps(
        {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 6, "seed": 7, "n": 3}).encode()]
    paths = ["/v1/augment"] * 3 + ["/v1/chat/completions"]

    def strip(answer):  # what differs between two answers of the same request anyway
        return {k: v for k, v in answer.items() if k not in ("id", "created")}
    alone = [strip(post(server + p, b)[1]) for p, b in zip(paths, bodies)]
    together = [None] * len(bodies)
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, strip(post(server + paths[i], bodies[i])[1])))
               for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone and all("error" not in a for a in alone)


def chat_body(i: int) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": f"Say hi to number {i}."}], "max_tokens": 12,
                       "temperature": 0.7, "seed": i}).encode()


def timed_post(url, body, out, i, timeout=300):
    t = time.time()
    out[i] = post(url, body, timeout=timeout) + (time.time() - t,)


def test_hostile_uploads_beside_good_requests(server):
    """The issue's hostile uploads (a negative eps_max_len, a pair of 20,000 words, eps_max_len 1e9)
    sent together with good chat requests: each hostile one gets a 4xx within 10 s, each good one
    200 with the reply it gets alone, none later than 5 times the slowest alone."""
    alone = {}
    for i in range(3):
        timed_post(server + "/v1/chat/completions", chat_body(i), alone, i)
    hostile = [augment_body(thresholds={"eps_max_len": -1.0}),
               augment_body(pairs=[["word " * 20_000, "a long one"]]),
               augment_body(thresholds={"eps_max_len": 1e9})]
    bodies = [(f"hostile {j}", "/v1/augment", b) for j, b in enumerate(hostile)] + [
        (i, "/v1/chat/completions", chat_body(i)) for i in range(3)]
    together = {}
    threads = [threading.Thread(target=timed_post, args=(server + path, body, together, name))
               for name, path, body in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    slowest = max(seconds for _, _, seconds in alone.values())
    for name, (status, answer, seconds) in together.items():
        if str(name).startswith("hostile"):
            assert status in (413, 422) and seconds < 10, (name, status, answer, seconds)
            assert answer["error"]["field"] in ("thresholds.eps_max_len", "pairs[0]"), answer
        else:
            assert status == 200 and answer["choices"] == alone[name][1]["choices"], name
            assert seconds <= 5 * slowest + 0.5, (name, seconds, slowest)


def health(server) -> dict:
    with urllib.request.urlopen(server + "/health", timeout=10) as r:
        return json.loads(r.read())


def test_an_abandoned_upload_is_cancelled_and_holds_up_nothing(server):
    """A client sends a long upload (64 pairs, k = 16: 13 batches of decoding) and gives up after
    2 s (its timeout closes the connection): its job leaves the batch at the next step, no further
    batch is started (/health counts it cancelled), and the next request is answered about as fast
    as alone."""
    alone = {}
    timed_post(server + "/v1/chat/completions", chat_body(7), alone, 0)
    before = health(server)["jobs"]
    pairs = [[f"tweet number {i} about the rain and the weekend and the coffee " * 3, f"reply {i}"] for i in range(64)]
    t = time.time()
    with pytest.raises(OSError):  # TimeoutError, or urllib's URLError around it
        post(server + "/v1/augment", augment_body(pairs=pairs, k=16), timeout=2)
    assert time.time() - t < 10
    after = {}
    timed_post(server + "/v1/chat/completions", chat_body(7), after, 0)
    assert after[0][1]["choices"] == alone[0][1]["choices"]
    assert after[0][2] <= 3 * alone[0][2] + 1.0, (after[0][2], alone[0][2])
    deadline = time.time() + 10
    while health(server)["jobs"]["cancelled"] == before["cancelled"] and time.time() < deadline:
        time.sleep(0.1)
    jobs = health(server)["jobs"]
    assert jobs["cancelled"] == before["cancelled"] + 1 and jobs["failed"] == before["failed"]
    time.sleep(1)
    assert health(server)["jobs"] == jobs  # no further batch of the upload was started


def test_server_options_are_range_checked_before_any_work(capsys):
    for argv, option in ((["--eps-max-len", "-1"], "--eps-max-len -1.0"), (["--eps-tdf", "1"], "--eps-tdf 1.0"),
                         (["--eps-min-len", "3"], "--eps-min-len 3.0 above --eps-max-len"),
                         (["--max-batch", "0"], "--max-batch 0"), (["--prefill-chunk", "0"], "--prefill-chunk 0"),
                         (["--prefix-cache", "-1"], "--prefix-cache -1"),
                         (["--eps-scf", "nan"], "--eps-scf nan")):
        with pytest.raises(SystemExit):
            cloud_server.main(argv + ["--cloud-model", "/nonexistent"])  # refused before loading anything
        assert option in capsys.readouterr().err
    assert cloud_server.MAX_BATCH >= generate.BATCH + cloud_server.MAX_K - 1  # an augmentation batch fits
