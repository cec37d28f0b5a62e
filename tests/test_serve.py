"""`lmforge serve`: the OpenAI-compatible API, driven by the real `openai` client (and raw HTTP for
what a client library would refuse to send) against a server in a background thread, serving a
tiny model trained here in a second to answer three questions."""

from __future__ import annotations

import asyncio
import functools
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
import torch
from conftest import CHATML, QA, TEXT, chat_tokenizer, default_sigint, tiny_assistant  # noqa: F401  (test_chat_page imports them here)

openai = pytest.importorskip("openai", reason="the serve tests drive the server with the openai client: "
                             "pip install openai")
uvicorn = pytest.importorskip("uvicorn", reason="lmforge serve needs fastapi and uvicorn")

from lmforge.chat import Assistant
from lmforge.config import ModelConfig, SampleConfig, TokenizerConfig
from lmforge.model import GPT
from lmforge.serve import REQUEST_TIMEOUT, make_app, server_config
from lmforge.tokenizer import Tokenizer

KEY = "test-key"


# ---------------------------------------------------------------- a tiny model that can chat, and a server



@contextmanager
def running(app, request_timeout: float = REQUEST_TIMEOUT) -> Iterator[str]:
    """``app`` served as `lmforge serve` serves it (uvicorn, ``server_config``) in a background thread on
    a free port of 127.0.0.1; yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(server_config(app, request_timeout))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices gain nothing from two threads, and lose a hundredfold when another process
    holds the second core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server(one_thread):
    assistant = tiny_assistant()
    app = make_app(assistant, api_key=KEY, max_batch=8)
    with running(app) as url:
        yield SimpleNamespace(url=url, app=app, assistant=assistant, worker=app.state.worker)


@pytest.fixture
def client(server):
    return openai.OpenAI(api_key=KEY, base_url=server.url + "/v1", max_retries=0, timeout=60)


def chat(client, content: str | list, model: str = "tiny-chat", **kw):
    messages = [{"role": "user", "content": content}] if isinstance(content, str) else content
    return client.chat.completions.create(model=model, messages=messages, **kw)


def raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         key: str | None = KEY) -> tuple[int, dict]:
    """A raw request (for bodies no client library would send): its status and parsed JSON."""
    u = urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    _send(conn, method, path, body=body, headers={"Content-Type": "application/json", **auth, **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data) if data else {}


def _send(conn: http.client.HTTPConnection, method: str, path: str, **kw) -> None:
    """Send a request; a server may answer an oversized body (413) and close before it has all
    arrived, which a client sees as a broken pipe: the answer is still there to read."""
    try:
        conn.request(method, path, **kw)
    except (BrokenPipeError, ConnectionResetError):
        pass


def sse_events(server, path: str, payload: dict) -> list:
    """The data of each server-sent event of a streamed request, as raw text lines decoded."""
    u = urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", path, body=json.dumps(payload), headers={"Authorization": f"Bearer {KEY}"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    raw = r.read().decode()
    conn.close()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: "):] if e == "data: [DONE]" else json.loads(e[len("data: "):]) for e in events]


def assert_openai_error(body: dict, param: str | None = None, code: str | None = None,
                        kind: str = "invalid_request_error") -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == kind and body["error"]["message"]
    assert body["error"]["param"] == param and body["error"]["code"] == code, body


# ---------------------------------------------------------------- the API

def test_models_lists_the_served_model_and_health_and_openapi_answer(server, client):
    assert [m.id for m in client.models.list()] == ["tiny-chat"]
    assert client.models.retrieve("tiny-chat").owned_by == "lmforge"
    status, health = raw(server, "GET", "/health", key=None)
    assert status == 200 and health["status"] == "ok" and health["api_key_required"] is True
    status, doc = raw(server, "GET", "/openapi.json", key=None)
    assert status == 200 and {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(doc["paths"])


def test_chat_answers_with_the_trained_text_ends_at_the_end_token_and_counts_usage(server, client):
    for question, answer in QA.items():
        r = chat(client, question, temperature=0)
        assert r.object == "chat.completion" and r.model == "tiny-chat" and r.id.startswith("chatcmpl-")
        assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == answer
        assert r.choices[0].finish_reason == "stop"
        tok = server.assistant.tokenizer
        prompt = len(server.assistant.prompt_ids([{"role": "user", "content": question}]))
        # The end token was generated too: it counts, though it is not part of the text.
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt, len(tok.encode(answer)) + 1)
        assert r.usage.total_tokens == prompt + len(tok.encode(answer)) + 1


def test_max_tokens_ends_an_answer_with_finish_reason_length(server, client):
    r = chat(client, "hi", temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    assert QA["hi"].startswith(r.choices[0].message.content) and r.choices[0].message.content
    r = chat(client, "hi", temperature=0, max_completion_tokens=2, max_tokens=5)  # the newer name wins
    assert r.usage.completion_tokens == 2
    r = client.completions.create(model="tiny-chat", prompt="The quick", temperature=0, max_tokens=4)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason == "length" and " brown fox jumps".startswith(r.choices[0].text)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(server.assistant.tokenizer.encode("The quick")), 4, len(server.assistant.tokenizer.encode("The quick")) + 4)
    assert client.completions.create(model="tiny-chat", prompt="The", temperature=0).usage.completion_tokens == 16


def test_streamed_chat_deltas_join_to_the_unstreamed_answer_with_usage_last(server, client):
    whole = chat(client, "tell me a saying", temperature=0)
    chunks = list(chat(client, "tell me a saying", temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # it did stream, piece by piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_completion_is_openai_shaped_sse_ending_in_done(server, client):
    whole = client.completions.create(model="tiny-chat", prompt="A stitch", temperature=0, max_tokens=8)
    events = sse_events(server, "/v1/completions", {"prompt": "A stitch", "temperature": 0, "max_tokens": 8,
                                                     "stream": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and set(c["choices"][0]) == {"index", "text", "logprobs",
                                                                             "finish_reason"} for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole.choices[0].text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in chunks[-1]


def test_a_seeded_request_samples_the_same_alone_twice_and_inside_a_batch(server, client):
    def ask(seed=None, prompt="The"):
        return client.completions.create(model="tiny-chat", prompt=prompt, temperature=2, max_tokens=12,
                                         seed=seed).choices[0].text

    alone = ask(7)
    assert ask(7) == alone
    with ThreadPoolExecutor(8) as pool:  # the same request among others that share its batch
        futures = [pool.submit(ask, None, p) for p in ["A", "Where", "All", "the"]] + [pool.submit(ask, 7)]
        futures += [pool.submit(ask, None, p) for p in ["The early", "gold", "nine"]]
        assert futures[4].result() == alone
    assert len({ask(s) for s in range(5)}) > 1  # the seed matters


def test_n_answers_each_choice_with_its_own_index_and_counts_them_all(server, client):
    r = client.completions.create(model="tiny-chat", prompt="The", temperature=2, max_tokens=6, n=3, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2] and len({c.text for c in r.choices}) > 1
    assert r.usage.completion_tokens == 18 and r.usage.prompt_tokens == len(server.assistant.tokenizer.encode("The"))
    again = client.completions.create(model="tiny-chat", prompt="The", temperature=2, max_tokens=6, n=3, seed=3)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    several = client.completions.create(model="tiny-chat", prompt=["The", "A stitch"], temperature=0, max_tokens=4, n=2)
    alone = [client.completions.create(model="tiny-chat", prompt=p, temperature=0, max_tokens=4).choices[0].text
             for p in ("The", "A stitch")]
    assert [(c.index, c.text) for c in several.choices] == [(0, alone[0]), (1, alone[0]), (2, alone[1]), (3, alone[1])]
    greedy = chat(client, "hi", temperature=0, n=2)
    assert [c.message.content for c in greedy.choices] == [QA["hi"]] * 2
    streamed = {0: "", 1: ""}
    for c in chat(client, "hi", temperature=0, n=2, stream=True):
        streamed[c.choices[0].index] += c.choices[0].delta.content or ""
    assert streamed == {0: QA["hi"], 1: QA["hi"]}


def test_completion_logprobs_give_tokens_their_logprobs_top_alternatives_and_offsets(server, client):
    prompt = "The quick"
    r = client.completions.create(model="tiny-chat", prompt=prompt, temperature=0, max_tokens=5, logprobs=3)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.tokens) == 5
    assert lp.text_offset == [len(prompt) + len("".join(lp.tokens[:i])) for i in range(5)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and logprob <= 0
        assert max(top.values()) == pytest.approx(logprob) and top[token] == pytest.approx(logprob)  # greedy: the top one
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model="tiny-chat", prompt=prompt, temperature=0, max_tokens=5, logprobs=3, stream=True) if c.choices[0].text]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset
    assert client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=2).choices[0].logprobs is None


def test_chat_logprobs_give_each_token_its_bytes_and_top_alternatives(server, client):
    r = chat(client, "hi", temperature=0, max_tokens=6, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content and len(content) == 6
    for t in content:
        assert bytes(t.bytes) == t.token.encode() and t.logprob <= 0
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
    plain = chat(client, "hi", temperature=0, max_tokens=6, logprobs=True)
    assert [t.top_logprobs for t in plain.choices[0].logprobs.content] == [[]] * 6
    with ThreadPoolExecutor(3) as pool:  # likely in one batch: each still gets its own number of alternatives
        rs = list(pool.map(lambda k: chat(client, "hi", temperature=0, max_tokens=3, logprobs=True, top_logprobs=k),
                           [1, 5, 3]))
    assert [{len(t.top_logprobs) for t in r.choices[0].logprobs.content} for r in rs] == [{1}, {5}, {3}]
    assert chat(client, "hi", temperature=0, max_tokens=6).choices[0].logprobs is None


@pytest.mark.parametrize("stop", ["fox", ["nothing here", "lazy"], [" jumps"]])
def test_a_stop_string_ends_the_answer_before_it_streamed_or_not(server, client, stop):
    full = QA["hi"]
    first = min(full.index(s) for s in ([stop] if isinstance(stop, str) else stop) if s in full)
    ended = server.worker.stats["stop"]
    r = chat(client, "hi", temperature=0, stop=stop)
    assert r.choices[0].message.content == full[:first] and r.choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in chat(client, "hi", temperature=0, stop=stop, stream=True))
    assert text == full[:first]
    assert server.worker.stats["stop"] - ended == 2  # each row ended there, not generating on unseen


def test_a_request_for_another_model_is_404_and_an_unknown_path_too(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, "hi", model="gpt-4")
    assert e.value.code == "model_not_found" and e.value.param == "model" and "tiny-chat" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    status, body = raw(server, "GET", "/v1/nowhere")
    assert status == 404
    assert_openai_error(body)


def test_a_missing_or_wrong_api_key_is_401(server):
    wrong = openai.OpenAI(api_key="wrong", base_url=server.url + "/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.models.list()
    assert e.value.code == "invalid_api_key"
    for method, path, key in [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", None),
                              ("POST", "/v1/completions", KEY[:-1])]:
        status, body = raw(server, method, path, json.dumps({"prompt": "The"}).encode(), key=key)
        assert status == 401
        assert_openai_error(body, code="invalid_api_key")
    status, body = raw(server, "GET", "/v1/models", headers={"Authorization": f"Basic {KEY}"}, key=None)
    assert status == 401
    assert raw(server, "GET", "/health", key=None)[0] == 200


BAD_FIELDS = [
    ("temperature", 2.5), ("temperature", -0.1), ("temperature", "hot"), ("temperature", True),
    ("top_p", 0), ("top_p", 1.5), ("max_tokens", 0), ("max_tokens", 2.5), ("n", 0), ("n", 17), ("n", "2"),
    ("stop", 3), ("stop", ["a", 1]), ("stop", ["a", "b", "c", "d", "e"]), ("seed", "x"), ("stream", "yes"),
    ("messages", "hi"), ("messages", []), ("messages", [{"role": "robot", "content": "hi"}]),
    ("messages", [{"role": "user", "content": 5}]), ("messages", [{"role": "assistant", "content": "hi"}]),
    ("logprobs", 1), ("top_logprobs", 3), ("top_logprobs", 50), ("stream_options", {"include_usage": "yes"}),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
def test_a_malformed_or_out_of_range_field_is_an_openai_shaped_400_naming_it(server, field, value):
    payload = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], field: value}
    status, body = raw(server, "POST", "/v1/chat/completions", json.dumps(payload).encode())
    assert status == 400
    assert_openai_error(body, param=field)
    assert field in body["error"]["message"]


@pytest.mark.parametrize("field,value", [("prompt", 5), ("prompt", []), ("logprobs", 21), ("logprobs", True),
                                         ("max_tokens", -1), ("echo", "ignored: unknown fields are")])
def test_completions_check_their_own_fields(server, field, value):
    payload = {"prompt": "The", "max_tokens": 2, field: value}
    status, body = raw(server, "POST", "/v1/completions", json.dumps(payload).encode())
    if field == "echo":
        assert status == 200 and body["choices"][0]["text"]
    else:
        assert status == 400
        assert_openai_error(body, param=field)


@pytest.mark.parametrize("field,value,expect", [
    ("stop", ["s"] * 5, "at most 4 items"),  # once: "Input should be a valid string", the union's other type
    ("temperature", float("nan"), "finite number"), ("top_p", float("nan"), "finite number"),
    ("temperature", float("inf"), "finite number"),
])
def test_a_400_says_what_is_wrong_with_the_value_sent(server, field, value, expect):
    payload = {"messages": [{"role": "user", "content": "hi"}], field: value}
    status, body = raw(server, "POST", "/v1/chat/completions", json.dumps(payload).encode())  # NaN as JSON's NaN
    assert status == 400
    assert_openai_error(body, param=field)
    assert expect in body["error"]["message"], body


def test_a_missing_required_field_says_so(server):
    status, body = raw(server, "POST", "/v1/chat/completions", json.dumps({"model": "tiny-chat"}).encode())
    assert status == 400 and body["error"]["message"] == "messages is required"


def test_unknown_fields_are_ignored_as_openai_does(client):
    r = chat(client, "hi", temperature=0, extra_body={"frobnicate": {"x": 1}, "presence_penalty": 0.5})
    assert r.choices[0].message.content == QA["hi"]


@pytest.mark.parametrize("body,expect", [
    (b'{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
    (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "not valid UTF-8"),
    (b"", "must be a JSON object"),
    (b"[1, 2]", "must be a JSON object"),
], ids=["truncated", "invalid-utf8", "empty", "array"])
def test_a_body_that_is_not_a_json_object_is_a_400(server, body, expect):
    status, out = raw(server, "POST", "/v1/chat/completions", body)
    assert status == 400
    assert_openai_error(out)
    assert expect in out["error"]["message"]


def test_prompt_and_max_tokens_beyond_the_context_are_context_length_exceeded(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "hi", max_tokens=120)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    assert "maximum context length is 128 tokens" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "hi " * 200)
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-chat", prompt="The quick brown fox " * 50, max_tokens=1)
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"


def test_an_oversized_body_is_413_by_its_length_and_by_what_arrives(server):
    big = json.dumps({"prompt": "x" * (1 << 20)}).encode()
    status, body = raw(server, "POST", "/v1/completions", big)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # Chunked: no Content-Length to go by, so the server counts the bytes as they come.
    u = urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    _send(conn, "POST", "/v1/completions", body=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"
    conn.close()


def test_32_concurrent_requests_each_get_the_answer_they_get_alone(server, client):
    words = TEXT.split()
    requests = [("chat", q, 4 + i % 9) for i, q in enumerate(list(QA) * 4)]
    requests += [("text", " ".join(words[i:i + 1 + i % 3]), 3 + i % 11) for i in range(32 - len(requests))]

    def ask(kind, prompt, max_tokens):
        if kind == "chat":
            return chat(client, prompt, temperature=0, max_tokens=max_tokens).choices[0].message.content
        return client.completions.create(model="tiny-chat", prompt=prompt, temperature=0,
                                         max_tokens=max_tokens).choices[0].text

    alone = [ask(*r) for r in requests]
    batches_before = server.worker.stats["batches"]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda r: ask(*r), requests))
    assert together == alone
    assert server.worker.stats["batches"] - batches_before < 32  # they shared batches
    assert 1 < server.worker.stats["largest_batch"] <= 8


def _drop(server, payload: dict) -> None:
    """Send a completion request and hang up: after the first event of a stream, or at once."""
    u = urlsplit(server.url)
    body = json.dumps(payload).encode()
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                  + b"\r\n\r\n" + body)
        if payload.get("stream"):
            got = b""
            while b"data: " not in got:
                got += s.recv(4096)
            assert got.startswith(b"HTTP/1.1 200")
        else:
            time.sleep(0.1)


def _wait_cancelled(server, count: int) -> None:
    deadline = time.monotonic() + 10
    while server.worker.stats["cancelled"] < count:
        assert time.monotonic() < deadline, "a request whose client went away kept its rows"
        time.sleep(0.02)


def test_a_client_that_goes_away_frees_its_rows_streamed_or_not(server):
    slow = server.assistant.model.register_forward_hook(lambda *_: time.sleep(0.04))  # answers worth dropping
    try:  # greedy, "The" goes on for a long while ("The quick brown fox...") without the end token
        for payload in ({"prompt": "The", "max_tokens": 120, "stream": True}, {"prompt": "The", "max_tokens": 120, "n": 2}):
            before = server.worker.stats["cancelled"]
            _drop(server, {**payload, "temperature": 0})
            _wait_cancelled(server, before + payload.get("n", 1))
    finally:
        slow.remove()


def test_bad_requests_and_a_dropped_stream_between_good_ones_leave_every_good_one_answered(server, client):
    slow = server.assistant.model.register_forward_hook(lambda *_: time.sleep(0.01))  # a long answer to drop
    try:
        cancelled = server.worker.stats["cancelled"]
        bad = [b'{"prompt": "The", "max_tokens": 4', b'{"prompt": "\xc3\x28"}', b'{"prompt": "The", "n": "x"}',
               b'{"prompt": 7}', b"null"]
        with ThreadPoolExecutor(4) as pool:
            good = [pool.submit(chat, client, q, temperature=0) for q in QA]
            for body in bad:
                assert raw(server, "POST", "/v1/completions", body)[0] == 400
                good.append(pool.submit(chat, client, "hi", temperature=0))
            _drop(server, {"prompt": "The", "max_tokens": 40, "stream": True, "temperature": 2})
            good += [pool.submit(chat, client, q, temperature=0) for q in QA]
            answers = [f.result().choices[0].message.content for f in good]
        assert answers == list(QA.values()) + [QA["hi"]] * len(bad) + list(QA.values())
        _wait_cancelled(server, cancelled + 1)  # the dropped stream's row was ended early
    finally:
        slow.remove()
    assert chat(client, "what glitters?", temperature=0).choices[0].message.content == QA["what glitters?"]


def test_a_generation_that_fails_is_a_500_and_the_server_goes_on(server, client):
    def boom(*_):
        raise RuntimeError("out of memory (a test)")

    broken = server.assistant.model.register_forward_hook(boom)
    try:
        with pytest.raises(openai.InternalServerError) as e:
            chat(client, "hi", temperature=0)
        assert e.value.type == "server_error" and "out of memory (a test)" in e.value.message
        with pytest.raises(openai.APIError, match="out of memory"):  # a stream says it in an event
            list(chat(client, "hi", temperature=0, stream=True))
    finally:
        broken.remove()
    assert chat(client, "hi", temperature=0).choices[0].message.content == QA["hi"]


@pytest.mark.slow
def test_lmforge_serve_prints_its_url_and_serves_a_run_directory_there(tmp_path, one_thread):
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    from lmforge.checkpoint import save_model

    tok = Tokenizer.train([TEXT * 5], TokenizerConfig(vocab_size=300))  # no chat template: the alpaca one
    torch.manual_seed(0)
    save_model(tmp_path / "run", GPT(ModelConfig(vocab_size=tok.vocab_size, context_length=256, d_model=32, n_layer=2,
                                                 n_head=4)), 0, {"task": "pretrain"})
    tok.save(tmp_path / "run" / "tokenizer.json")
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(tmp_path / "run"), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=default_sigint)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving run (alpaca) at http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        with urllib.request.urlopen(url + "health", timeout=30) as r:
            assert json.loads(r.read())["model"] == "run"
        c = openai.OpenAI(api_key="none", base_url=url + "v1", max_retries=0, timeout=60)
        # greedy: a sampled token of this random model was the end token one time in 60 (finish "stop")
        r = c.chat.completions.create(model="run", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                      temperature=0)
        assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    # Ctrl+C ends it as it ends every lmforge command: one line, exit code 130.
    assert (proc.returncode, err, out) == (130, "lmforge: interrupted\n", "")


# ---------------------------------------------------------------- a classification run

@pytest.fixture(scope="module")
def classifier(one_thread):
    """A classifier with a random head whose bias puts the middle of these texts' scores at zero,
    so that its labels differ from text to text."""
    tok = chat_tokenizer()
    torch.manual_seed(1)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, context_length=64, d_model=32, n_layer=2, n_head=4))
    model.replace_head(2)
    model.eval()
    assistant = Assistant("tiny-spam", model, tok, "classify", ["ham", "spam"])
    texts = ["WIN a FREE prize now", "see you at lunch", "The quick brown fox", "A stitch in time saves nine"]
    with torch.no_grad():
        scores = sorted(float(torch.logit(torch.tensor(assistant.classify(t)[2]["spam"]))) for t in texts)
        model.lm_head.bias[1] -= (scores[1] + scores[2]) / 2
    labels = [assistant.classify(t)[0] for t in texts]
    assert set(labels) == {"ham", "spam"}
    app = make_app(assistant)
    with running(app) as url:
        yield SimpleNamespace(url=url, texts=texts, labels=labels,
                              client=openai.OpenAI(api_key="none", base_url=url + "/v1", max_retries=0))


def test_a_classification_run_answers_with_its_label(classifier):
    c = classifier.client
    for text, label in zip(classifier.texts, classifier.labels):
        r = c.chat.completions.create(model="tiny-spam", messages=[{"role": "user", "content": text}])
        assert r.choices[0].message.content == label and r.choices[0].finish_reason == "stop"
        probs = r.choices[0].model_extra["label_probabilities"]
        assert set(probs) == {"ham", "spam"} and max(probs, key=probs.get) == label
        assert c.completions.create(model="tiny-spam", prompt=text).choices[0].text == label
        streamed = c.chat.completions.create(model="tiny-spam", messages=[{"role": "user", "content": text}], stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == label
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny-spam", prompt="   ")
    assert e.value.param == "prompt"


def test_the_serve_command_refuses_a_bad_port_and_a_missing_model_in_one_line(capsys):
    from lmforge.cli import main

    assert main(["serve", "no/such/model/anywhere", "--port", "70000"]) == 2
    assert "--port must be between 0 and 65535" in capsys.readouterr().err
    assert main(["serve", "no/such/model/anywhere", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: ") and err.count("\n") == 1


@pytest.mark.parametrize("key", ["sécret", "two words", "", "ключ"])
def test_serve_refuses_an_api_key_no_client_could_send(key, capsys):
    # Headers are read as Latin-1 and compared as UTF-8: such a key once gave 401 to every client.
    from lmforge.cli import main

    assert main(["serve", "no/such/model/anywhere", "--port", "0", "--api_key", key]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--api_key must be printable ASCII with no spaces" in err


@pytest.mark.parametrize("seconds", ["0", "-5", "86401", "1e308"])
def test_serve_refuses_a_request_timeout_that_cannot_work(seconds, capsys):
    from lmforge.cli import main

    assert main(["serve", "no/such/model/anywhere", "--port", "0", "--request_timeout", seconds]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--request_timeout must be between 0 and 86400 seconds" in err


def test_serve_says_which_flag_to_change_when_it_cannot_listen():
    from lmforge.config import LmforgeError
    from lmforge.serve import bind

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(LmforgeError, match="pick another --port"):
            bind("127.0.0.1", taken.getsockname()[1])
    with pytest.raises(LmforgeError, match=r"give an address of this machine as --host"):
        bind("192.0.2.1", 0)  # TEST-NET-1: never an address of this machine


def test_a_row_that_fails_a_batch_fails_alone_and_the_others_are_answered(one_thread):  # noqa: F811
    import asyncio

    from lmforge.serve import Failed, Job, Row, Worker

    a = tiny_assistant()
    loop = asyncio.new_event_loop()
    poison = 7

    def fault(module, inputs):  # a fault of one request's own: its prompt holds the poison id
        if (inputs[0] == poison).any():
            raise RuntimeError("this request's fault (a test)")

    hook = a.model.register_forward_pre_hook(fault)
    worker = Worker(a, max_batch=4)
    cfg = SampleConfig(max_new_tokens=3, temperature=0, stop_at_eos=False)
    jobs = [Job(loop) for _ in range(3)]
    prompts = [[5, 6, 8], [5, poison, 8], [9, 10]]
    try:
        for job, ids in zip(jobs, prompts):  # queued before the worker starts: one batch of three
            row = Row(0, ids, cfg)
            row.job = job
            worker.queue.put(row)
        worker.queue.put(None)
        worker.start()
        worker._thread.join(60)
    finally:
        hook.remove()
    loop.run_until_complete(asyncio.sleep(0))
    events = []
    for job in jobs:
        got = []
        while not job.events.empty():
            got.append(job.events.get_nowait())
        events.append(got)
    loop.close()
    # Once all three failed with the one fault; now the batch is tried again row by row
    assert [type(e) for e in events[1]] == [Failed] and "this request's fault" in events[1][0].message
    for got in (events[0], events[2]):
        assert got and not any(isinstance(e, Failed) for e in got) and got[-1].finish_reason == "length"
    assert worker.stats["retried_alone"] == 3 and worker.stats["largest_batch"] == 3


def test_a_client_too_slow_to_send_its_request_is_disconnected_and_others_are_served():
    """uvicorn alone would keep a silent connection, or one that sends its request a byte at a time,
    open for ever; the server gives each request 1 s here (60 s by default) to arrive whole. An answer
    that takes longer than that to compute is not cut, and a kept-alive connection gets its next request."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/slow")
    async def slow(request: dict) -> dict:
        await asyncio.sleep(1.5)  # longer than the deadline: computing an answer is not sending a request
        return request

    def closed_within(conn: socket.socket, seconds: float) -> bool:
        conn.settimeout(seconds)
        try:
            return conn.recv(1024) == b""
        except TimeoutError:
            return False

    with running(app, request_timeout=1.0) as url:
        port = int(url.rsplit(":", 1)[1])
        connect = functools.partial(socket.create_connection, ("127.0.0.1", port))
        with connect() as silent, connect() as headers, connect() as body:
            headers.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            body.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"a\": ")
            # A client that keeps sending, a byte at a time, is not saved by it: the deadline is for the whole request
            dribble = connect()
            dribble.sendall(b"GET / HTTP/1.1\r\n")
            for _ in range(3):
                time.sleep(0.4)
                try:
                    dribble.sendall(b"X")
                except OSError:
                    break
            for conn in (silent, headers, body, dribble):
                assert closed_within(conn, 5), "the server kept a connection whose request never arrived"
            dribble.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for i in range(2):  # one connection, two requests, each answered after 1.5 s
            conn.request("POST", "/slow", body=json.dumps({"i": i}), headers={"Content-Type": "application/json"})
            assert json.loads(conn.getresponse().read()) == {"i": i}
        # The deadline starts again for the next request on a kept-alive connection: a trickle is cut there too
        conn.sock.sendall(b"GET / HTTP/1.1\r\n")
        assert closed_within(conn.sock, 5)
        conn.close()


def test_a_client_that_stops_reading_its_answer_is_dropped_and_the_answer_stops(caplog):
    """A client that sends a request and then reads nothing held its connection, and the stream
    writing to it, for ever: uvicorn waits for room in the buffers. Once they are full, the client
    has the request timeout (2 s here) to take some; a client that reads slowly is not cut. (At 1 s,
    once in a full suite's run, the slow reader below was cut too: its 0.4 s pauses left too little margin
    on a loaded 2-core machine, where the server's thread and the reading one share the interpreter.)"""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()
    chunk, total = b"x" * 65536, 400  # 26 MB: more than any socket buffers hold
    streams = []

    @app.get("/long")
    async def long() -> StreamingResponse:
        state = {"sent": 0, "ended": False}
        streams.append(state)

        async def body():
            try:
                for _ in range(total):
                    state["sent"] += 1
                    yield chunk
                    await asyncio.sleep(0)
            finally:
                state["ended"] = True

        return StreamingResponse(body(), media_type="text/plain")

    def request(port: int, rcvbuf: int | None = None) -> socket.socket:
        conn = socket.socket()
        if rcvbuf:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connecting: the window is set then
        conn.connect(("127.0.0.1", port))
        conn.sendall(b"GET /long HTTP/1.1\r\nHost: x\r\n\r\n")
        return conn

    with running(app, request_timeout=2.0) as url:
        port = int(url.rsplit(":", 1)[1])
        stalled = request(port, 4096)
        deadline = time.monotonic() + 20
        while not (streams and streams[0]["ended"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert streams[0]["ended"], "the server kept writing to a client that reads nothing"
        assert streams[0]["sent"] < total
        stalled.settimeout(10)
        got = 0
        try:
            while data := stalled.recv(1 << 16):
                got += len(data)
        except ConnectionResetError:
            pass  # dropped: what was still queued is gone
        stalled.close()
        assert got < total * len(chunk)
        # A client that keeps reading, slowly, gets the whole answer
        slow = request(port)
        slow.settimeout(10)
        got, reads = 0, 0
        while data := slow.recv(1 << 16):
            got, reads = got + len(data), reads + 1
            if reads <= 8:
                time.sleep(0.4)  # pauses shorter than the deadline, while the buffers are full
            if got >= total * len(chunk):
                break
        slow.close()
        assert got >= total * len(chunk) and streams[1]["sent"] == total
    assert [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()] == [
        "dropped a connection that took none of its answer for 2 s"]  # the stalled one; the slow one was not
