import io
import json
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


@pytest.fixture(scope="module")
def server(real_run):
    """`speedtune serve RUN`: the run folder is converted to GGUF on the fly and served by llama.cpp."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "speedtune", "serve", str(real_run), "--port", str(port),
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
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


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


def test_sixteen_concurrent_requests_all_answered(server):
    c = client(server)

    def ask(i):
        r = c.chat.completions.create(model="smol", messages=[{"role": "user", "content": f"Say the number {i}."}],
                                      max_tokens=12, temperature=0)
        return r.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert len(answers) == 16 and all(a.strip() for a in answers)


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
    from speedtune.chat import repl
    from speedtune.inference import Sampling
    from speedtune.remote import RemoteEngine

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


def test_chat_cli_on_gguf_and_run_folder(exported, real_run):
    gguf = next(exported.glob("*-q8_0.gguf"))
    r = cli("chat", gguf, "--prompt", "Who are you?", "--temperature", "0", "--max-new-tokens", "40")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    r = cli("chat", real_run, "--prompt", "Who are you?", "--temperature", "0", "--max-new-tokens", "40")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    proc = subprocess.run([sys.executable, "-m", "speedtune", "chat", str(gguf), "--temperature", "0",
                           "--max-new-tokens", "16"], input="/system Be brief.\nHello\n/nope\n/exit\n",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "system prompt set" in proc.stdout and "unknown command /nope" in proc.stdout


def test_url_that_nobody_serves_is_one_line():
    from conftest import assert_user_error

    assert_user_error(cli("chat", "--url", f"http://127.0.0.1:{free_port()}/v1", "--prompt", "hi"),
                      "no OpenAI-compatible server answered")


def test_serve_gguf_says_where_and_stops_cleanly_on_ctrl_c(exported):
    import signal

    gguf = next(exported.glob("*-q8_0.gguf"))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "speedtune", "serve", str(gguf), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}/v1" in err and gguf.stem in err and "server stopped" in err
    assert "Traceback" not in err
