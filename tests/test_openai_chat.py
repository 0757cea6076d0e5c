"""create_chat_completion (llama-cpp-python's shapes) and chat sessions on
the chat templates: shapes, streaming, logprobs, stops, context limits,
and that a replayed conversation runs the template's tokens."""
from __future__ import annotations

import numpy as np
import pytest

import llama2c
import reference as R
from helpers import greedy_continuation
from llama2c.chat_template import ChatTemplate
from llama2c.errors import ContextLengthError

CHAT = R.Config(dim=64, hidden_dim=172, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=384, seq_len=256)
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def model(make_model):
    return make_model(CHAT, version=1, seed=21)


@pytest.fixture(scope="module")
def llm(model):
    return llama2c.Llama(model.path, tokenizer=model.tokenizer)


def test_chat_completion_shape_and_greedy_reply(llm):
    r = llm.create_chat_completion(messages=MESSAGES, max_tokens=12, temperature=0.0)
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
    (choice,) = r["choices"]
    assert choice["message"]["role"] == "assistant" and choice["logprobs"] is None
    ids = ChatTemplate.get(None).tokenize(llm.tokenizer, MESSAGES)
    new = greedy_continuation(llm, ids, 12)
    assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(new),
                          "total_tokens": len(ids) + len(new)}
    assert choice["message"]["content"] == llm.detokenize(new)
    assert choice["finish_reason"] == ("length" if len(new) == 12 else "stop")


def test_chat_stream_chunks(llm):
    whole = llm.create_chat_completion(messages=MESSAGES, max_tokens=15, seed=4)
    chunks = list(llm.create_chat_completion(messages=MESSAGES, max_tokens=15, seed=4, stream=True))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]


def test_chat_logprobs_shape(llm):
    r = llm.create_chat_completion(messages=MESSAGES, max_tokens=5, temperature=0.0, logprobs=True,
                                   top_logprobs=3)
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"]
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert len(entry["top_logprobs"]) == 3
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])  # greedy
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]


def test_chat_stop_and_template_end_of_turn(llm):
    free = llm.create_chat_completion(messages=MESSAGES, max_tokens=30, temperature=0.0)
    text = free["choices"][0]["message"]["content"]
    if len(text) > 4:
        cut = llm.create_chat_completion(messages=MESSAGES, max_tokens=30, temperature=0.0, stop=text[2:4])
        assert cut["choices"][0]["message"]["content"] == text[:text.index(text[2:4])]
        assert cut["choices"][0]["finish_reason"] == "stop"
    assert "<|im_end|>" in ChatTemplate.get("chatml").stop_strings


def test_chat_that_does_not_fit(model):
    llm = llama2c.Llama(model.path, tokenizer=model.tokenizer, n_ctx=48)
    long = [{"role": "system", "content": "sys"}]
    for i in range(6):
        long += [{"role": "user", "content": f"question number {i} here"},
                 {"role": "assistant", "content": f"answer number {i} there"}]
    long.append({"role": "user", "content": "last one"})
    with pytest.raises(ContextLengthError):
        llm.create_chat_completion(messages=long, max_tokens=4)
    r = llm.create_chat_completion(messages=long, max_tokens=4, truncate="left", temperature=0.0)
    assert r["usage"]["total_tokens"] <= 48
    # what ran: the system message, then the newest turns
    kept = ChatTemplate.get(None).tokenize(llm.tokenizer, [long[0]] + long[-(len(long) - 1):])
    assert r["usage"]["prompt_tokens"] < len(kept)


def test_replayed_conversation_runs_the_template_tokens(llm):
    """Llama.chat with earlier turns: the context holds exactly the
    template's tokens of the conversation, then the reply."""
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello, friend"},
            {"role": "user", "content": "how are you"}]
    session = llm.chat_session()
    session.add_history(conv[:-1])
    reply = session.send(conv[-1]["content"], temperature=0.0, max_tokens=6)
    ids = ChatTemplate.get(None).tokenize(llm.tokenizer, conv)
    assert session._completer.cached[:len(ids)] == ids
    new = greedy_continuation(llm, ids, 6)
    assert session._completer.cached[len(ids):] == new[:-1]  # the last one sampled, not run yet
    assert llm.chat(conv, temperature=0.0, max_tokens=6) == reply


def test_session_turns_follow_the_template_and_reuse_the_cache(llm):
    s = llm.chat_session(system="sys", template="zephyr")
    s.send("one", temperature=0.0, max_tokens=4)
    first = s.pos
    s.send("two", temperature=0.0, max_tokens=4)
    assert s.pos > first and s.turns == 2
    assert s.messages[0] == {"role": "system", "content": "sys"}
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant", "user", "assistant"]
    ids = ChatTemplate.get("zephyr").tokenize(llm.tokenizer, s.messages[:-1])
    assert s._completer.cached[:len(ids)] == ids


def test_chat_format_on_llama(model):
    llm = llama2c.Llama(model.path, tokenizer=model.tokenizer, chat_format="chatml")
    assert llm.chat_template.name == "chatml"
    with pytest.raises(llama2c.InvalidArgumentError, match="chat template"):
        llama2c.Llama(model.path, tokenizer=model.tokenizer, chat_format="nonesuch").chat("hi")


def test_chat_command_template_flag(model, llm):
    import subprocess
    import sys

    args = [sys.executable, "-m", "llama2c", "chat", "--model", str(model.path), "--tokenizer", str(model.tokenizer),
            "-t", "0", "-n", "5"]
    for template in ("chatml", "zephyr"):
        proc = subprocess.run(args + ["--template", template], input="hi\n", capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        reply = llm.chat_session(template=template).send("hi", temperature=0.0, max_tokens=5)
        assert proc.stdout == f"User: Assistant: {reply}\nUser: \n"
    bad = subprocess.run(args + ["--template", "nonesuch"], input="hi\n", capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "chat template" in bad.stderr and bad.stderr.count("\n") == 1


def test_c_conversation_mode_replays_turns_as_the_template(llm):
    """The C library's own chat API (LLAMA2_MODE_CONVERSATION) feeds an
    earlier turn with the same tokens as the Llama 2 template."""
    from llama2c import _ffi
    from llama2c._ffi import ffi, lib
    from llama2c.errors import new_error, raise_for

    cx = llm.create_context()
    sampler = llama2c.SamplingParams(temperature=0.0).sampler(llm.config.vocab_size)
    out, err = ffi.new("llama2_session **"), new_error()
    raise_for(lib.llama2_session_new_ctx(out, cx._ptr, llm.tokenizer._ptr, sampler._ptr, _ffi.MODE_CONVERSATION,
                                         ffi.NULL, 0, 0, err), err)
    ss = ffi.gc(out[0], lib.llama2_session_free)
    step = ffi.new("llama2_step *")
    sys_, user, reply = b"be brief", b"hi", b"hello, friend"
    raise_for(lib.llama2_session_chat_history(ss, sys_, len(sys_), user, len(user), reply, len(reply), err), err)
    while True:
        raise_for(lib.llama2_session_step(ss, step, err), err)
        if step.kind != _ffi.STEP_TOKEN:
            break
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello, friend"}, {"role": "user", "content": "x"}]
    ids = ChatTemplate.get(None).tokenize(llm.tokenizer, conv)
    end = ids.index(2)  # the replayed turn up to its EOS, which the session keeps for the next turn
    assert lib.llama2_session_pos(ss) == end
    # the cache holds exactly those tokens: the next position's logits agree bit for bit
    assert np.array_equal(cx.forward(2, end), llm.create_context().forward_batch(ids[:end + 1], 0))
