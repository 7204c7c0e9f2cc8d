"""`speedtune serve` keeps requests apart (the real server on the embedded GGUF, on 127.0.0.1): greedy requests sent
at once each get the answer the same request gets alone, streamed or not, and a request stopped by the server's
per-request bound (--request-timeout) leaves the requests waiting behind it whole.

Exact equality needs the same arithmetic: llama-cpp-python reuses the cached prefix of the previous request, and
llama.cpp's logits are not bit-identical across batch sizes, so a greedy near-tie can flip when one request follows
a different prefix than another. The prompts here differ in one token at the same position ("Say the word apple."),
so every request, alone or in a crowd, re-evaluates the same suffix from the same cached prefix."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_serve import EOG_BANNED, WORDS, Served

TIMEOUT = 10  # the server's --request-timeout in the timeout test, seconds


def prompt(n: int) -> list[dict]:
    return [{"role": "user", "content": f"Say the word {WORDS[n]}."}]


def test_the_prompts_differ_in_one_token_at_one_place(tokenizer):
    ids = [tokenizer(tokenizer.apply_chat_template(prompt(n), tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False).input_ids for n in range(len(WORDS))]
    assert len({len(x) for x in ids}) == 1
    differ = {i for x in ids for i, (a, b) in enumerate(zip(x, ids[0])) if a != b}
    assert len(differ) == 1


@pytest.fixture(scope="module")
def embedded_gguf():
    from speedtune.models.embedded import gguf_path

    return gguf_path()


def ask(url: str, n: int, stream: bool = False, max_tokens: int = 16) -> dict:
    """One greedy chat request: its answer, finish reason, token count and the x-speedtune-stopped header."""
    from openai import OpenAI

    c = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
    raw = c.chat.completions.with_raw_response.create(model="smol", messages=prompt(n), max_tokens=max_tokens,
                                                      temperature=0, stream=stream)
    if stream:
        chunks = [ch for ch in raw.parse() if ch.choices]
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        finish, tokens = chunks[-1].choices[0].finish_reason, None
    else:
        r = raw.parse()
        text, finish, tokens = r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
    return {"text": text, "finish": finish, "tokens": tokens, "stopped": raw.headers.get("x-speedtune-stopped")}


@pytest.fixture(scope="module")
def served(embedded_gguf):
    s = Served(embedded_gguf, "--n-ctx", 2048)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def alone(served) -> dict:
    """Each request's answer when it is the only one, after the request that sets the cached prefix."""
    ask(served.url, 0)
    answers = {n: ask(served.url, n) for n in range(1, 9)}
    assert all(WORDS[n] in a["text"].lower() and a["stopped"] is None for n, a in answers.items()), answers
    return answers  # each names its own word: a mixed-up answer would show


@pytest.mark.slow
def test_concurrent_greedy_requests_each_equal_the_request_alone(served, alone):
    ask(served.url, 9)
    with ThreadPoolExecutor(len(alone)) as pool:  # half streamed, half not
        crowd = dict(zip(alone, pool.map(lambda n: ask(served.url, n, stream=n % 2 == 0), alone)))
    for n in alone:
        if n % 2 == 0:  # a stream carries no usage: its token count is not compared
            crowd[n]["tokens"] = alone[n]["tokens"]
    assert crowd == alone


@pytest.mark.slow
def test_a_timed_out_request_leaves_the_others_whole(embedded_gguf, alone):
    """A long generation holds the model until --request-timeout stops it; three requests sent while it runs wait
    behind it, then each gets its whole answer, the same as alone (measured on a server without the short bound),
    with no stop header."""
    import http.client

    s = Served(embedded_gguf, "--n-ctx", 2048, "--request-timeout", TIMEOUT)
    others = {n: alone[n] for n in (1, 2, 3)}
    try:
        ask(s.url, 0)  # the same cached prefix as for the answers alone
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=120)
        t0 = time.monotonic()
        conn.request("POST", "/v1/chat/completions", json.dumps({
            "messages": prompt(7), "max_tokens": 4000, "temperature": 0, "stream": True, "logit_bias": EOG_BANNED}),
            {"content-type": "application/json"})
        long = conn.getresponse()
        events = []
        crowd, sent = {}, threading.Event()

        def send_others():
            sent.set()
            with ThreadPoolExecutor(len(others)) as pool:
                crowd.update(zip(others, pool.map(lambda n: ask(s.url, n), others)))

        helper, sent_at = threading.Thread(target=send_others), None
        for line in long:  # a bounded stream: the server ends it at the deadline, or at the context's end
            if line.startswith(b"data: {"):
                events.append(json.loads(line[6:]))
                if sent_at is None and time.monotonic() - t0 > TIMEOUT - 2:
                    # sent while the long request generates: their own deadlines leave them 8 s once it stops
                    helper.start()
                    sent.wait()
                    sent_at = time.monotonic() - t0
            if line.startswith(b"data: [DONE]"):
                break
        took = time.monotonic() - t0
        conn.close()
        helper.join(timeout=120)
        assert sent_at is not None and sent_at < took and not helper.is_alive()
        finish = [e["choices"][0]["finish_reason"] for e in events if e["choices"][0].get("finish_reason")]
        n_tokens = sum(1 for e in events if e["choices"][0]["delta"].get("content"))
        assert finish == ["length"] and 0 < n_tokens < 2000 and TIMEOUT <= took < TIMEOUT + 3, (finish, n_tokens, took)
        assert crowd == others
    finally:
        s.stop()
