import io
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import cli

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving(target):
    """`speedtune serve TARGET` on a free port of 127.0.0.1 until the API answers: yields its /v1 URL, then stops."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "speedtune", "serve", str(target), "--port", str(port),
                             "--name", "smol"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(proc.stdout.read())
        try:
            urllib.request.urlopen(url + "/models", timeout=2)
            break
        except OSError:
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(real_run):
    """`speedtune serve RUN`: the run folder is converted to GGUF on the fly and served by llama.cpp."""
    yield from serving(real_run)


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key="none", max_retries=0)


def test_models_chat_and_completions(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["smol"]
    r = c.chat.completions.create(model="smol", messages=[{"role": "user", "content": "What is 2 + 2?"}],
                                  max_tokens=48, temperature=0)
    assert r.choices[0].message.content.strip() and r.choices[0].finish_reason == "stop"
    parts = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=48, temperature=0,
        stream=True) if ch.choices]
    assert len([p for p in parts if p]) > 1 and "".join(parts).strip() == r.choices[0].message.content.strip()
    done = c.completions.create(model="smol", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert done.choices[0].text


WORDS = ["apple", "river", "violet", "engine", "castle", "tiger", "pencil", "garden", "rocket", "silver", "candle"]


def names_only_its_word(answer: str, word: str) -> bool:
    """The answer to "Say the word W." names W and no other of WORDS: a request that got another's answer shows.
    (Exact equality with the request sent alone is tests/test_serve_isolation.py's: with these repeated prompts a
    greedy near-tie may flip between runs, see there.)"""
    return set(re.findall(r"[a-z]+", answer.lower())) & set(WORDS) == {word}


def test_sixteen_concurrent_requests_each_get_their_own_answer(server):
    c = client(server)

    def ask(word):
        r = c.chat.completions.create(model="smol", messages=[{"role": "user", "content": f"Say the word {word}."}],
                                      max_tokens=12, temperature=0)
        return r.choices[0].message.content

    words = WORDS[:4] * 4
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, words))
    assert all(names_only_its_word(a, w) for a, w in zip(answers, words)), list(zip(words, answers))


def test_malformed_request_gets_4xx_json_and_server_stays_up(server):
    for body in (b'{"messages": 5}', b"not json", b"[1, 2]"):
        req = urllib.request.Request(server + "/chat/completions", data=body, method="POST",
                                     headers={"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert 400 <= e.value.code < 500
        assert "error" in json.loads(e.value.read())
    assert client(server).models.list().data


def test_chat_repl_over_url_keeps_history(server):
    """The REPL over stdin, against the server: the second request carries the first turn and its answer."""
    from speedtune.commands.chat import repl
    from speedtune.inference.engine import Sampling
    from speedtune.inference.remote import RemoteEngine

    engine = RemoteEngine(server)
    seen = []
    real_stream = engine.stream

    def recording(messages, sampling):
        seen.append([dict(m) for m in messages])
        yield from real_stream(messages, sampling)

    engine.stream = recording
    out = io.StringIO()
    repl(engine, Sampling(24, 0, 1), None, io.StringIO("My name is Ada.\nWhat is my name?\n/reset\nHi\n/exit\n"), out)
    assert [len(m) for m in seen] == [1, 3, 1]
    assert seen[1][0]["content"] == "My name is Ada." and seen[1][1]["role"] == "assistant" and seen[1][1]["content"]
    assert out.getvalue().count(">>> ") == 5 and "(history cleared)" in out.getvalue()


def test_chat_cli_on_gguf_and_run_folder(real_run):
    """The run was trained on the bundled identity data ("I am Quokka ... the Speedtune Lab"): the adapter applies in
    both the run folder (transformers + PEFT) and its GGUF, and the base model does not answer so."""
    from speedtune.models.embedded import gguf_path

    gguf = next((real_run / "export").glob("*-q8_0.gguf"))  # the quickstart's export
    ask = ("--prompt", "Who are you?", "--temperature", "0", "--max-new-tokens", "40")
    base = cli("chat", gguf_path(), *ask)
    assert base.returncode == 0 and base.stdout.strip() and "Quokka" not in base.stdout, base.stdout + base.stderr
    for target in (gguf, real_run):
        r = cli("chat", target, *ask)
        assert r.returncode == 0 and "Quokka" in r.stdout, (target, r.stdout, r.stderr)
    proc = subprocess.run([sys.executable, "-m", "speedtune", "chat", str(gguf), "--temperature", "0",
                           "--max-new-tokens", "16"], input="/system Be brief.\nHello\n/nope\n/exit\n",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "system prompt set" in proc.stdout and "unknown command /nope" in proc.stdout


def test_url_that_nobody_serves_is_one_line():
    from conftest import assert_user_error

    assert_user_error(cli("chat", "--url", f"http://127.0.0.1:{free_port()}/v1", "--prompt", "hi"),
                      "no OpenAI-compatible server answered")


def test_serve_gguf_says_where_and_stops_cleanly_on_ctrl_c(real_run):
    import signal

    gguf = next((real_run / "export").glob("*-q8_0.gguf"))  # the quickstart's export
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "speedtune", "serve", str(gguf), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            break
        except OSError:
            time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}/v1" in err and gguf.stem in err and "server stopped" in err
    assert "Traceback" not in err


# --- the bounds: the real server on the embedded GGUF (fast), one server per set of flags ---

EOG_BANNED = {"0": -100, "2": -100}  # <|endoftext|> and <|im_end|>: the model cannot stop by itself


@pytest.fixture(scope="module")
def embedded_gguf():
    from speedtune.models.embedded import gguf_path

    return gguf_path()


class Served:
    def __init__(self, gguf, *flags):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "speedtune", "serve", str(gguf), "--port", str(self.port),
                                      "--name", "smol", *map(str, flags)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}/v1"
        for line in self.proc.stderr:  # the socket listens before the model loads; this line follows the load
            if line.startswith("serving"):
                return
        self.proc.wait()
        pytest.fail(f"speedtune serve exited with {self.proc.returncode}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def small_ctx(embedded_gguf):
    """n_ctx 256, the default --request-timeout (120 s)."""
    s = Served(embedded_gguf, "--n-ctx", 256)
    yield s
    s.stop()


def post(url, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


HI = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("path, body, needle", [
    ("/chat/completions", {"messages": [], "max_tokens": -5}, "messages: must hold at least one message"),
    ("/chat/completions", {"messages": HI, "max_tokens": 0}, "max_tokens: must be at least 1 (got 0)"),
    ("/chat/completions", {"messages": HI, "max_tokens": -5}, "max_tokens: must be at least 1 (got -5)"),
    ("/completions", {"prompt": "Hi", "max_tokens": 0}, "max_tokens: must be at least 1 (got 0)"),
    ("/completions", {"prompt": "Hi", "max_tokens": -1}, "max_tokens: Input should be greater than or equal to 0"),
    ("/completions", {"prompt": ["a", "b"]}, "prompt: one prompt per request"),
])
def test_out_of_bounds_requests_get_openai_400(small_ctx, path, body, needle):
    status, _, payload = post(small_ctx.url + path, body)
    assert status == 400 and payload["error"]["type"] == "invalid_request_error", payload
    assert needle in payload["error"]["message"]
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as e:  # what the official client makes of it
        client(small_ctx.url).chat.completions.create(model="smol", messages=[], max_tokens=5)
    assert e.value.status_code == 400 and "messages" in e.value.message


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_max_tokens_beyond_the_context_is_capped_and_said(small_ctx, stream):
    raw = client(small_ctx.url).chat.completions.with_raw_response.create(
        model="smol", messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=100_000_000,
        temperature=0, logit_bias=EOG_BANNED, stream=stream, **({"stream_options": None} if stream else {}))
    header = raw.headers["x-speedtune-max-tokens"]
    capped, prompt = int(header.split()[0]), int(header.split("after the ")[1].split("-token")[0])
    assert capped + prompt == 256 and "capped from 100000000" in header
    if stream:
        chunks = [c for c in raw.parse() if c.choices]
        assert chunks[-1].choices[0].finish_reason == "length"
        assert 0.5 * capped < sum(1 for c in chunks if c.choices[0].delta.content) <= capped
    else:
        r = raw.parse()
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == capped
        assert r.usage.prompt_tokens == prompt


def test_request_timeout_stops_a_long_generation(embedded_gguf):
    s = Served(embedded_gguf, "--n-ctx", 8192, "--request-timeout", 2)
    try:
        t0 = time.monotonic()
        raw = client(s.url).chat.completions.with_raw_response.create(
            model="smol", messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=8000,
            temperature=0, logit_bias=EOG_BANNED)
        took = time.monotonic() - t0
        r = raw.parse()
        assert r.choices[0].finish_reason == "length" and 0 < r.usage.completion_tokens < 8000
        assert raw.headers["x-speedtune-stopped"] == "timeout: --request-timeout 2 s"
        assert 2 <= took < 6, took
        assert client(s.url).models.list().data  # and the server is free again
    finally:
        s.stop()


def test_sigterm_stops_the_server_during_a_long_generation(embedded_gguf):
    import http.client
    import signal

    s = Served(embedded_gguf, "--n-ctx", 8192, "--request-timeout", 600)
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 8000, "stream": True,
        "logit_bias": EOG_BANNED}), {"content-type": "application/json"})
    resp = conn.getresponse()
    seen = 0
    while seen < 5:  # tokens are flowing: the generation is under way
        seen += resp.readline().startswith(b"data: {")
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    rc = s.proc.wait(timeout=10)
    took = time.monotonic() - t0
    rest = resp.read().decode()
    assert rc == 0 and took < 10, (rc, took)
    assert '"finish_reason": "length"' in rest and rest.rstrip().endswith("data: [DONE]")
    assert "server stopped" in s.proc.stderr.read()


def test_hundred_concurrent_chat_requests_each_get_their_own_answer(small_ctx):
    from openai import OpenAI

    c = OpenAI(base_url=small_ctx.url, api_key="none", max_retries=0, timeout=300)

    def ask(word):
        r = c.chat.completions.create(model="smol", messages=[{"role": "user", "content": f"Say the word {word}."}],
                                      max_tokens=12, temperature=0, logit_bias=EOG_BANNED)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

    words = WORDS[:10] * 10
    t0 = time.monotonic()
    with ThreadPoolExecutor(100) as pool:
        answers = list(pool.map(ask, words))
    took = time.monotonic() - t0
    print(f"\n100 concurrent chat requests x 12 tokens: {took:.1f} s ({1200 / took:.0f} tokens/s)")
    assert all(f == "length" and n == 12 for _, f, n in answers)
    assert all(names_only_its_word(a, w) for (a, _, _), w in zip(answers, words)), list(zip(words, answers))
