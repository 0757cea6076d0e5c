"""`llama2c serve` (llama2c/server/, docs/SERVER.md) over loopback: the
official openai client against it, raw HTTP for the errors, disconnects,
a full queue, a load test with flat memory, and the chat page in a real
headless browser.

Each server runs under uvicorn in a background thread on a free
127.0.0.1 port; every loop and wait here is bounded.
"""
from __future__ import annotations

import base64
import concurrent.futures as futures
import gc
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the server extra is not installed: pip install 'llama2c[server]'")
uvicorn = pytest.importorskip("uvicorn", reason="the server extra is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (the test extra)")
openai = pytest.importorskip("openai", reason="the openai client is not installed (the test extra)")

import reference as R  # noqa: E402
from helpers import GQA, REPO  # noqa: E402

from llama2c import Llama  # noqa: E402
from llama2c.sampler import SamplingParams  # noqa: E402
from llama2c.server.app import ServerConfig, create_app  # noqa: E402
from llama2c.server.engine import BatchEngine  # noqa: E402

# tests/helpers.py's GQA shape with room for a chat template's tokens
TINY = R.Config(dim=64, hidden_dim=172, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=384, seq_len=128)
# a small model with a long context: generations that last (disconnects, full queues),
# with BOS and EOS banned so that they run to max_tokens
LONG = R.Config(dim=32, hidden_dim=64, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=320, seq_len=512)
NO_END = {"logit_bias": {"1": -100, "2": -100}}


# ---------------------------------------------------------------------------
# running a server
# ---------------------------------------------------------------------------

class ServerThread:
    """uvicorn serving `app` in a thread on a free loopback port."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive(), "the server thread died"
            assert time.monotonic() < deadline, "the server did not start in 20 s"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        assert not self.thread.is_alive(), "the server did not stop in 15 s"

    @property
    def state(self):
        return self.app.state.server

    def client(self, **kw) -> "openai.OpenAI":
        kw.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=60, **kw)

    def wait_idle(self, timeout: float = 10) -> dict:
        """Polls /health until no slot is active and nothing waits."""
        deadline = time.monotonic() + timeout
        while True:
            stats = httpx.get(self.url + "/health", timeout=5).json()
            if stats["active"] == 0 and stats["waiting"] == 0:
                return stats
            assert time.monotonic() < deadline, f"slots still busy after {timeout} s: {stats}"
            time.sleep(0.05)


class SlowTokenizer:
    """A model's tokenizer whose token_bytes (called once per new token, in
    whatever thread generates) takes `delay` seconds: the engine then makes
    about one token per `delay`, a generation that lasts. Counts the tokens."""

    def __init__(self, tokenizer, delay: float):
        self._tokenizer, self.delay, self.made = tokenizer, delay, 0

    def token_bytes(self, prev: int, token: int) -> bytes:
        time.sleep(self.delay)
        self.made += 1
        return self._tokenizer.token_bytes(prev, token)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def slow_llama(model_file, delay: float) -> tuple[Llama, SlowTokenizer]:
    llama = Llama(model_file.path, tokenizer=model_file.tokenizer)
    slow = SlowTokenizer(llama.tokenizer, delay)
    llama._tokenizer = slow
    return llama, slow


class NoEndEngine:
    """A BatchEngine whose requests never sample BOS or EOS (for a client,
    such as the chat page, that cannot send logit_bias): replies run to max_tokens."""

    def __init__(self, engine: BatchEngine):
        self.engine = engine
        self.parallel, self.max_waiting = engine.parallel, engine.max_waiting

    def run(self, ids, **settings):
        bias = dict(settings["sampling"].logit_bias)
        bias.update({1: -100.0, 2: -100.0})
        settings["sampling"] = SamplingParams.of(settings["sampling"], logit_bias=bias)
        return self.engine.run(ids, **settings)

    def stats(self) -> dict:
        return self.engine.stats()


class FailingEngine:
    """An engine whose requests fail with an internal error after `after` steps."""

    def __init__(self, engine: BatchEngine, after: int):
        self.engine, self.after = engine, after
        self.parallel, self.max_waiting = engine.parallel, engine.max_waiting

    def run(self, ids, **settings):
        return FailingSteps(self.engine.run(ids, **settings), self.after)

    def stats(self) -> dict:
        return self.engine.stats()


class FailingSteps:
    """A request's steps (the server take()s them) that fail after `after` steps."""

    def __init__(self, steps, after: int):
        self.steps, self.after, self.seen = steps, after, 0

    def take(self):
        steps, end = self.steps.take()
        if self.seen + len(steps) > self.after:
            steps = steps[:self.after - self.seen]
            self.seen += len(steps)
            self.steps.close()
            return steps, RuntimeError("secret internal detail /etc/llama2c")
        self.seen += len(steps)
        return steps, end

    def close(self) -> None:
        self.steps.close()


def serve(llama, engine=None, **config) -> ServerThread:
    engine = engine or BatchEngine(llama, parallel=config.pop("parallel", 2))
    return ServerThread(create_app(llama, engine, ServerConfig(**config)))


@pytest.fixture(scope="module")
def tiny(make_model) -> Llama:
    m = make_model(TINY, version=1, shared=True, seed=3)
    return Llama(m.path, tokenizer=m.tokenizer)


@pytest.fixture(scope="module")
def long_model(make_model):
    return make_model(LONG, version=1, shared=True, seed=4)


@pytest.fixture(scope="module")
def tiny_server(tiny):
    with serve(tiny, parallel=4) as s:
        yield s


@pytest.fixture(scope="module")
def bundled() -> Llama:
    from llama2c.bundled import bundled_model

    try:
        model, tok = bundled_model()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return Llama(model, tokenizer=tok)


def events(response) -> list:
    """The data of each server-sent event of a streamed response ('[DONE]' as a str)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------
# the openai client: completions, chat, streams, embeddings
# ---------------------------------------------------------------------------

def test_openai_completion_equals_the_python_api(tiny, tiny_server):
    client = tiny_server.client()
    model = tiny_server.state.model_id
    for prompt, settings in [("hello world", {"temperature": 0}),
                             ("abc", {"temperature": 0, "max_tokens": 7, "stop": ["zz"]}),
                             ("seeded", {"temperature": 0.9, "top_p": 0.8, "seed": 1234, "max_tokens": 10}),
                             ([1, 40, 41, 42], {"temperature": 0, "max_tokens": 5})]:
        got = client.completions.create(model=model, prompt=prompt, **settings)
        want = tiny.create_completion(prompt, **settings)
        assert got.choices[0].text == want["choices"][0]["text"], (prompt, settings)
        assert got.choices[0].finish_reason == want["choices"][0]["finish_reason"]
        assert got.usage.prompt_tokens == want["usage"]["prompt_tokens"]
        assert got.usage.completion_tokens == want["usage"]["completion_tokens"]
        assert got.object == "text_completion" and got.model == model
    # logprobs and echo come through too
    got = client.completions.create(model=model, prompt="the sky", max_tokens=4, temperature=0, logprobs=3, echo=True)
    want = tiny.create_completion("the sky", max_tokens=4, temperature=0, logprobs=3, echo=True)
    lp, wlp = got.choices[0].logprobs, want["choices"][0]["logprobs"]
    assert got.choices[0].text == want["choices"][0]["text"]
    assert lp.tokens == wlp["tokens"] and lp.text_offset == wlp["text_offset"]
    assert lp.token_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:], wlp["token_logprobs"][1:], rtol=1e-9)
    assert [sorted(t) for t in lp.top_logprobs[1:]] == [sorted(t) for t in wlp["top_logprobs"][1:]]


def test_openai_completion_stream(tiny, tiny_server):
    client = tiny_server.client()
    stream = client.completions.create(prompt="once", model=tiny_server.state.model_id, max_tokens=12,
                                       temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    want = tiny.create_completion("once", max_tokens=12, temperature=0)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want["choices"][0]["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want["choices"][0]["finish_reason"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want["usage"]["completion_tokens"]
    assert chunks[-1].usage.prompt_tokens == want["usage"]["prompt_tokens"]


def test_openai_chat_and_chat_stream(tiny, tiny_server):
    client = tiny_server.client()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    got = client.chat.completions.create(model=tiny_server.state.model_id, messages=messages, max_tokens=9,
                                         temperature=0)
    want = tiny.create_chat_completion(messages, max_tokens=9, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want["choices"][0]["message"]["content"]
    assert got.choices[0].finish_reason == want["choices"][0]["finish_reason"]
    assert got.usage.total_tokens == want["usage"]["total_tokens"]

    stream = client.chat.completions.create(model=tiny_server.state.model_id, messages=messages, max_tokens=9,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want["choices"][0]["message"]["content"]
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == want["choices"][0]["finish_reason"]
    assert chunks[-1].usage.completion_tokens == want["usage"]["completion_tokens"]

    # logprobs, text content parts and the developer role
    got = client.chat.completions.create(
        model=tiny_server.state.model_id, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
        messages=[{"role": "developer", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "hello there"}]}])
    want = tiny.create_chat_completion(messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    assert got.choices[0].message.content == want["choices"][0]["message"]["content"]
    assert [e.token for e in got.choices[0].logprobs.content] == \
        [e["token"] for e in want["choices"][0]["logprobs"]["content"]]
    assert all(len(e.top_logprobs) == 2 for e in got.choices[0].logprobs.content)


def test_openai_embeddings(tiny, tiny_server):
    client = tiny_server.client()
    got = client.embeddings.create(model=tiny_server.state.model_id, input=["first text", "second"])
    want = tiny.create_embedding(["first text", "second"])
    assert [d.index for d in got.data] == [0, 1]
    for g, w in zip(got.data, want["data"]):  # (the client may ask for base64: float32)
        np.testing.assert_allclose(g.embedding, w["embedding"], rtol=1e-6)
    assert got.usage.prompt_tokens == want["usage"]["prompt_tokens"]
    floats = httpx.post(tiny_server.url + "/v1/embeddings", json={"input": ["first text", "second"]}).json()
    assert floats["data"] == want["data"] and floats["usage"] == want["usage"]
    # base64 (the float32 bytes) and token-id input give the same vectors
    b64 = client.embeddings.create(model=tiny_server.state.model_id, input="first text", encoding_format="base64")
    raw = httpx.post(tiny_server.url + "/v1/embeddings",
                     json={"input": "first text", "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, want["data"][0]["embedding"], rtol=1e-6)
    vec = np.frombuffer(base64.b64decode(b64.data[0].embedding), dtype="<f4")  # asked for: the client leaves it
    np.testing.assert_allclose(vec, want["data"][0]["embedding"], rtol=1e-6)
    ids = tiny.tokenize("first text")
    by_ids = client.embeddings.create(model=tiny_server.state.model_id, input=ids)
    np.testing.assert_allclose(by_ids.data[0].embedding, want["data"][0]["embedding"], rtol=1e-6)


def test_models_health_tokenize_detokenize(tiny, tiny_server):
    client = tiny_server.client()
    models = client.models.list()
    assert [m.id for m in models.data] == [Path(tiny.model_path).name]
    assert client.models.retrieve(Path(tiny.model_path).name).id == Path(tiny.model_path).name
    health = httpx.get(tiny_server.url + "/health").json()
    assert health["status"] == "ok" and health["parallel"] == 4 and {"active", "waiting"} <= set(health)
    r = httpx.post(tiny_server.url + "/tokenize", json={"content": "hello world"})
    assert r.json() == {"tokens": tiny.tokenize("hello world", bos=False)}
    r = httpx.post(tiny_server.url + "/tokenize", json={"content": "hello", "add_special": True, "with_pieces": True})
    assert [t["id"] for t in r.json()["tokens"]] == tiny.tokenize("hello")
    ids = tiny.tokenize("hello world")
    r = httpx.post(tiny_server.url + "/detokenize", json={"tokens": ids})
    assert r.json() == {"content": tiny.detokenize(ids)}
    # the model may be named by its path too
    r = httpx.post(tiny_server.url + "/v1/completions", json={"model": tiny.model_path, "prompt": "a",
                                                              "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_greedy_over_http_equals_generate_alone_and_concurrently(bundled):
    prompts = ["Once upon a time", "The cat", "Lily and Tom went", "One day, a little", "Tim had a red",
               "The sun was"]
    want = {p: bundled.generate(p, temperature=0, max_tokens=30, stop_at_eos=True) for p in prompts}
    with serve(bundled, parallel=4) as s:
        def complete(p):
            r = httpx.post(s.url + "/v1/completions", json={"prompt": p, "max_tokens": 30, "temperature": 0},
                           timeout=60)
            assert r.status_code == 200, r.text
            return p + r.json()["choices"][0]["text"]

        assert complete(prompts[0]) == want[prompts[0]]  # alone
        with futures.ThreadPoolExecutor(len(prompts)) as pool:  # all at once
            for p, got in zip(prompts, pool.map(complete, prompts)):
                assert got == want[p], p
        s.wait_idle()


# ---------------------------------------------------------------------------
# bad requests: OpenAI-shaped errors
# ---------------------------------------------------------------------------

BAD = [
    # (path, body (bytes: sent as is), status, param, code)
    ("/v1/completions", b"{bad json", 400, None, "invalid_json"),
    ("/v1/completions", b"", 400, None, "invalid_json"),
    ("/v1/completions", b"[1, 2]", 400, None, "invalid_type"),
    ("/v1/completions", b'{"prompt": "a", "temperature": NaN}', 400, None, "invalid_json"),
    ("/v1/completions", b"\xff\xfe", 400, None, "invalid_json"),
    ("/v1/completions", b"[" * 100000 + b"]" * 100000, 400, None, "invalid_json"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "missing_required_parameter"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt", "invalid_type"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "invalid_type"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", "unsupported_parameter"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": "a", "max_tokens": -1}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"prompt": "a", "max_tokens": "5"}, 400, "max_tokens", "invalid_type"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 2.5}, 400, "max_tokens", "invalid_type"),
    ("/v1/completions", {"prompt": "a", "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ("/v1/completions", {"prompt": "a", "temperature": -1}, 400, "temperature", None),
    ("/v1/completions", {"prompt": "a", "top_p": 7}, 400, "top_p", None),
    ("/v1/completions", {"prompt": "a", "stream": "yes"}, 400, "stream", "invalid_type"),
    ("/v1/completions", {"prompt": "a", "stop": 5}, 400, "stop", "invalid_type"),
    ("/v1/completions", {"prompt": "a", "stop": ["x"] * 17}, 400, "stop", "invalid_value"),
    ("/v1/completions", {"prompt": "a", "stop": "x" * 5000}, 400, "stop", "invalid_value"),
    ("/v1/completions", {"prompt": "a", "logprobs": 99}, 400, "logprobs", "invalid_value"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"x": 1}}, 400, "logit_bias", "invalid_value"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"5": 500}}, 400, "logit_bias", "invalid_value"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"99999": 5}}, 400, "logit_bias", None),
    ("/v1/completions", {"prompt": "a", "presence_penalty": 1e300}, 400, "presence_penalty", "invalid_value"),
    ("/v1/completions", b'{"prompt": "\\ud800abc"}', 400, None, "invalid_json"),
    ("/v1/completions", b'{"prompt": "a", "model": "\\ud800"}', 400, None, "invalid_json"),
    ("/v1/completions", {"prompt": "a", "seed": 2 ** 1100}, 400, "seed", None),
    ("/v1/completions", {"prompt": "a", "model": "gpt-4"}, 400, "model", "model_not_found"),
    ("/v1/completions", {"prompt": "a", "model": 5}, 400, "model", "invalid_type"),
    ("/v1/completions", {"prompt": "a", "n": 2}, 400, "n", "unsupported_parameter"),
    ("/v1/completions", {"prompt": "a", "best_of": 3}, 400, "best_of", "unsupported_parameter"),
    ("/v1/completions", {"prompt": "a", "suffix": "end"}, 400, "suffix", "unsupported_parameter"),
    ("/v1/completions", {"prompt": "a", "n_predict": 5}, 400, "n_predict", "unsupported_parameter"),
    ("/v1/completions", {"prompt": "a", "truncate": "middle"}, 400, "truncate", None),
    ("/v1/chat/completions", {"model": "x"}, 400, "model", "model_not_found"),
    ("/v1/chat/completions", {}, 400, "messages", "missing_required_parameter"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "invalid_type"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "invalid_type"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content",
     "invalid_type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages",
     "unsupported_content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, "tools", "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, 400, "response_format",
     "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}, 400, "max_tokens",
     "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs", "invalid_value"),
    ("/v1/embeddings", {}, 400, "input", "missing_required_parameter"),
    ("/v1/embeddings", {"input": [1, "a"]}, 400, "input", "invalid_type"),
    ("/v1/embeddings", {"input": "a", "encoding_format": "hex"}, 400, "encoding_format", "invalid_value"),
    ("/v1/embeddings", {"input": "a", "dimensions": 3}, 400, "dimensions", "unsupported_parameter"),
    ("/v1/embeddings", {"input": "a " * 400}, 400, "input", "context_length_exceeded"),
    ("/tokenize", {"content": 5}, 400, "content", "invalid_type"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens", "invalid_type"),
    ("/detokenize", {"tokens": [99999]}, 400, "-", None),
]


def _post(url, body, **kw):
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30, **kw)
    return httpx.post(url, json=body, timeout=30, **kw)


def check_error(r, status, param="-", code="-") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    if status == 400:
        assert err["type"] == "invalid_request_error"
    if param != "-":
        assert err["param"] == param, err
    if code != "-":
        assert err["code"] == code, err
    return err


@pytest.mark.parametrize("path,body,status,param,code", BAD,
                         ids=[f"{i}-{p.rsplit('/', 1)[1]}" for i, (p, *_rest) in enumerate(BAD)])
def test_bad_requests_are_openai_shaped_400s(tiny_server, path, body, status, param, code):
    check_error(_post(tiny_server.url + path, body), status, param, code)


def test_prompt_longer_than_the_context_names_the_numbers(tiny, tiny_server):
    n = tiny.n_ctx
    ids = [1] + [50] * (n + 4)
    err = check_error(_post(tiny_server.url + "/v1/completions", {"prompt": ids, "max_tokens": 2}), 400,
                      code="context_length_exceeded")
    assert str(len(ids)) in err["message"] and str(n) in err["message"]
    err = check_error(_post(tiny_server.url + "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "word " * 200}]}), 400,
                      param="messages", code="context_length_exceeded")
    assert str(n) in err["message"]
    # truncate="left" (this library's extension) keeps the end instead
    r = _post(tiny_server.url + "/v1/completions", {"prompt": ids, "max_tokens": 2, "truncate": "left"})
    assert r.status_code == 200, r.text


def test_unknown_fields_are_ignored_and_neutral_ones_accepted(tiny, tiny_server):
    r = _post(tiny_server.url + "/v1/completions",
              {"prompt": "abc", "max_tokens": 5, "temperature": 0, "user": "me", "metadata": {"a": 1},
               "cache_prompt": True, "n": 1, "best_of": 1, "typical_p": 1.0, "some_new_field": [1, 2]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == tiny.create_completion("abc", max_tokens=5, temperature=0)[
        "choices"][0]["text"]
    r = _post(tiny_server.url + "/v1/chat/completions",
              {"messages": [{"role": "user", "content": "x", "name": "bob"}], "max_tokens": 3,
               "response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "parallel_tool_calls": True})
    assert r.status_code == 200, r.text


def test_unknown_routes_and_methods(tiny_server):
    check_error(httpx.get(tiny_server.url + "/v1/nothing"), 404, code="not_found")
    check_error(httpx.get(tiny_server.url + "/v1/completions"), 405, code="method_not_allowed")
    check_error(httpx.get(tiny_server.url + "/v1/models/gpt-4"), 404, code="model_not_found")


def test_internal_errors_are_500s_without_details(tiny):
    with serve(tiny, engine=FailingEngine(BatchEngine(tiny, parallel=1), after=2)) as s:
        err = check_error(_post(s.url + "/v1/completions", {"prompt": "a", "max_tokens": 8}), 500,
                          code="internal_error")
        assert err["type"] == "server_error"
        assert "secret" not in json.dumps(err) and "Traceback" not in json.dumps(err)
        # mid-stream: an error event after the chunks so far, no [DONE]; the openai client raises
        with httpx.stream("POST", s.url + "/v1/completions",
                          json={"prompt": "a", "max_tokens": 8, "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200
            got = events(r)
        assert len(got) == 3 and got[-1]["error"]["code"] == "internal_error" and "[DONE]" not in got
        assert "secret" not in json.dumps(got[-1])
        with pytest.raises(openai.APIError):
            list(s.client().completions.create(model=s.state.model_id, prompt="a", max_tokens=8,
                                               stream=True))
        s.wait_idle()


# ---------------------------------------------------------------------------
# limits: body size, API key, host, full queue
# ---------------------------------------------------------------------------

def test_body_over_the_limit_is_413(tiny):
    with serve(tiny, max_body=2048) as s:
        url = s.url + "/v1/completions"
        ok = {"prompt": "a" * 1000, "max_tokens": 1}
        assert _post(url, ok).status_code in (200, 400)  # under the limit: read and answered
        big = json.dumps({"prompt": "a" * 5000, "max_tokens": 1}).encode()
        check_error(_post(url, big), 413, code="request_too_large")

        def chunked():  # no Content-Length: counted as it arrives
            for i in range(0, len(big), 512):
                yield big[i:i + 512]
        check_error(httpx.post(url, content=chunked(), timeout=30), 413, code="request_too_large")
        check_error(_post(s.url + "/v1/embeddings", {"input": "b" * 4000}), 413)
        check_error(_post(s.url + "/tokenize", {"content": "b" * 4000}), 413)


def test_api_key(tiny):
    key = "s3cret-key"
    with serve(tiny, api_key=key) as s:
        url = s.url + "/v1/completions"
        body = {"prompt": "a", "max_tokens": 2}
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {key}"},
                        {"Authorization": key}, {"Authorization": f"Bearer {key}x"}, {"Authorization": "Bearer"},
                        {"Authorization": f"bearer  {key[:-1]}"}]:
            r = httpx.post(url, json=body, headers=headers)
            check_error(r, 401, code="invalid_api_key")
            assert r.headers["www-authenticate"] == "Bearer"
        for path in ("/v1/models", "/tokenize"):
            check_error(httpx.request("GET" if "models" in path else "POST", s.url + path, json={"content": "a"}),
                        401)
        assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200  # open: load balancers probe it
        assert httpx.get(s.url + "/").status_code == 200  # the page asks for the key itself
        assert s.client(api_key=key).completions.create(model=s.state.model_id, prompt="a", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="nope").completions.create(model=s.state.model_id, prompt="a", max_tokens=2)


def test_host_header_checked_on_loopback(tiny_server):
    r = httpx.get(tiny_server.url + "/v1/models", headers={"Host": "attacker.example"})
    check_error(r, 400, code="invalid_host")
    for host in (f"localhost:{tiny_server.port}", "127.0.0.1", f"[::1]:{tiny_server.port}"):
        assert httpx.get(tiny_server.url + "/v1/models", headers={"Host": host}).status_code == 200, host


def test_full_queue_is_429_with_retry_after(long_model):
    llama, _ = slow_llama(long_model, delay=0.02)
    with serve(llama, engine=BatchEngine(llama, parallel=1, max_waiting=1)) as s:
        body = {"prompt": "a", "max_tokens": 400, "temperature": 0, "stream": True, **NO_END}
        with httpx.Client(timeout=30) as c1, httpx.Client(timeout=30) as c2:
            with c1.stream("POST", s.url + "/v1/completions", json=body) as first:
                lines = first.iter_lines()
                assert next(lines).startswith("data: ")  # generating: the slot is taken
                with c2.stream("POST", s.url + "/v1/completions", json=body) as second:  # waits in line
                    assert second.status_code == 200
                    deadline = time.monotonic() + 10
                    while s.state.engine.stats()["waiting"] < 1:
                        assert time.monotonic() < deadline
                        time.sleep(0.01)
                    for path, extra in (("/v1/completions", {}), ("/v1/chat/completions", {})):
                        payload = {"prompt": "a"} if "chat" not in path else {
                            "messages": [{"role": "user", "content": "a"}]}
                        r = httpx.post(s.url + path, json={**payload, "max_tokens": 2, **extra})
                        check_error(r, 429, code="queue_full")
                        assert int(r.headers["retry-after"]) >= 1
                    with pytest.raises(openai.RateLimitError):
                        s.client().completions.create(model=s.state.model_id, prompt="a", max_tokens=2)
        s.wait_idle()  # both closed mid-stream: slots and line free again
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200


# ---------------------------------------------------------------------------
# disconnects cancel the generation
# ---------------------------------------------------------------------------

def test_disconnect_mid_stream_frees_the_slot(long_model):
    llama, slow = slow_llama(long_model, delay=0.02)
    with serve(llama, parallel=2) as s:
        for path, payload in (("/v1/completions", {"prompt": "a"}),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]})):
            before = slow.made
            with httpx.Client(timeout=30) as c:
                with c.stream("POST", s.url + path, json={**payload, "max_tokens": 400, "temperature": 0.5,
                                                          "stream": True, **NO_END}) as r:
                    lines = r.iter_lines()
                    for _ in range(6):  # a few events, then hang up
                        next(lines)
                    assert s.state.engine.stats()["active"] == 1
            s.wait_idle(timeout=5)
            made = slow.made - before
            time.sleep(0.3)
            assert slow.made - before == made, "the generation went on after the slot was freed"
            assert made < 100, f"{made} steps: the generation was not cancelled"  # 400 asked, ~8 s of steps


def test_disconnect_while_waiting_for_a_whole_result(long_model):
    llama, slow = slow_llama(long_model, delay=0.02)
    with serve(llama, parallel=1) as s:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", json={"prompt": "a", "max_tokens": 400, **NO_END}, timeout=0.5)
        s.wait_idle(timeout=5)
        assert slow.made < 100, f"{slow.made} steps: the generation was not cancelled"


# ---------------------------------------------------------------------------
# load: many streaming clients, no errors, no leaked slots, flat memory
# ---------------------------------------------------------------------------

def _load_round(http: "httpx.Client", url: str, n_clients: int, n_requests: int, want: dict) -> list[str]:
    """n_clients threads, each streaming n_requests greedy completions; the
    errors seen (a status, a stream without [DONE], a text that is not the
    one the Python API gives alone)."""
    prompts = sorted(want)
    errors: list[str] = []

    def client(i: int) -> None:
        for j in range(n_requests):
            prompt = prompts[(i + j) % len(prompts)]
            with http.stream("POST", url + "/v1/completions",
                             json={"prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": True}) as r:
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.read()!r}")
                    continue
                got = events(r)
            if not got or got[-1] != "[DONE]":
                errors.append(f"no [DONE]: {got[-2:]}")
                continue
            text = "".join(e["choices"][0]["text"] for e in got[:-1])
            if text != want[prompt]:
                errors.append(f"{prompt!r}: {text!r} != {want[prompt]!r}")

    with futures.ThreadPoolExecutor(n_clients) as pool:
        for f in [pool.submit(client, i) for i in range(n_clients)]:
            f.result(timeout=300)
    return errors


def test_load_32_clients_x_5_streams_flat_memory(tiny):
    prompts = ["hello", "the cat", "abc def", "once upon"]
    want = {p: tiny.create_completion(p, max_tokens=16, temperature=0)["choices"][0]["text"] for p in prompts}
    # one client for every thread and round: each new httpx.Client builds an SSL context (a few
    # hundred KB of C memory, freed only by the cycle collector) that would blur the server's memory
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    with serve(tiny, parallel=4) as s, httpx.Client(timeout=60, limits=limits) as http:
        rss, threads = [], []
        for _ in range(3):  # the first round warms up (thread pools, allocator); the next two must not grow
            assert _load_round(http, s.url, 32, 5, want) == []
            stats = s.wait_idle(timeout=10)
            assert stats["active"] == 0 and stats["waiting"] == 0
            gc.collect()  # cyclic garbage is not a leak: what stays after a collection is
            rss.append(rss_bytes())
            threads.append(threading.active_count())
        growth = rss[2] - rss[1]
        assert growth < 8 << 20, f"RSS grew by {growth / 2**20:.1f} MiB from round 2 to round 3: {rss}"
        assert threads[2] <= threads[1], f"threads leak: {threads}"


# ---------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_llama2c_serve_command(make_model):
    m = make_model(GQA, version=1, shared=True, seed=3)
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "llama2c", "serve", str(m.path), "--tokenizer", str(m.tokenizer),
                             "--port", str(port), "--parallel", "2", "--n-ctx", "24", "--api-key", "k",
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "llama2c serve did not answer in 30 s"
                time.sleep(0.1)
        assert health["parallel"] == 2 and health["model"] == m.path.name
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert client.models.list().data[0].meta["n_ctx"] == 24
        out = client.chat.completions.create(model=m.path.name, messages=[{"role": "user", "content": "x"}],
                                             max_tokens=3)
        assert out.choices[0].message.role == "assistant"
    finally:
        proc.terminate()
        proc.wait(15)
    # bad flags: one error line, status != 0; the default bind is loopback
    r = subprocess.run([sys.executable, "-m", "llama2c", "serve", str(m.path), "--port", "0"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--port" in r.stderr
    r = subprocess.run([sys.executable, "-m", "llama2c", "serve", "--help"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "127.0.0.1" in r.stdout and "--api-key" in r.stdout
    assert not re.findall(r"--[a-z0-9]+_[a-z0-9_]+", r.stdout), r.stdout  # kebab-case flags only


def test_import_llama2c_does_not_import_the_server_stack():
    code = ("import sys, llama2c, llama2c.cli; llama2c.cli.build_parser(); "
            "bad = [m for m in ('starlette', 'uvicorn', 'anyio', 'llama2c.server.app') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------
# the chat page, in a real headless browser
# ---------------------------------------------------------------------------

def _browser():
    """A headless Chromium driven by selenium, or a skip with the reason."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("no chromium + chromedriver (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--disable-extensions", "--window-size=1000,800"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        return webdriver.Chrome(service=Service(driver_path), options=options)
    except Exception as e:  # noqa: BLE001 -- a browser that cannot start here
        pytest.skip(f"chromium did not start: {str(e).splitlines()[0]}")


def test_chat_page_streams_a_reply_in_a_browser(long_model):
    from selenium.webdriver.common.by import By

    llama, _ = slow_llama(long_model, delay=0.03)  # a reply that visibly streams, 40 tokens long
    with serve(llama, engine=NoEndEngine(BatchEngine(llama, parallel=1)), api_key="page-key") as s:
        browser = _browser()
        try:
            browser.set_page_load_timeout(30)
            browser.get(s.url + "/")
            assert "llama2c" in browser.title
            browser.find_element(By.ID, "key").send_keys("page-key")
            max_tokens = browser.find_element(By.ID, "max-tokens")
            max_tokens.clear()
            max_tokens.send_keys("40")
            browser.find_element(By.ID, "input").send_keys("tell me a story")
            browser.find_element(By.ID, "send").click()
            lengths, deadline = [], time.monotonic() + 60
            while True:
                replies = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
                status = browser.find_element(By.ID, "status").text
                if replies:
                    lengths.append(len(replies[-1].text))
                if status.startswith("finished") or browser.find_elements(By.CSS_SELECTOR, ".msg.error"):
                    break
                assert time.monotonic() < deadline, f"no finished reply in 60 s: {status!r}"
                time.sleep(0.05)
            errors = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".msg.error")]
            assert not errors, errors
            assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "tell me a story"
            reply = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text
            assert reply.strip(), "no assistant text"
            growing = sorted({n for n in lengths if 0 < n < len(reply)})
            assert len(growing) >= 2, f"the reply did not appear piece by piece: {lengths}"
            assert status.startswith("finished: length, 40 tokens"), status
            # (the page's first /v1/models, before the key was typed, is a 401: expected)
            problems = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"
                        and "favicon" not in e["message"] and "status of 401" not in e["message"]]
            assert not problems, problems  # e.g. a Content-Security-Policy refusal
        finally:
            browser.quit()
        s.wait_idle()
