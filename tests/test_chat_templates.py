"""Chat templates (llama2c/chat_template.py): rendering and token ids against
transformers' apply_chat_template, message validation, the Jinja sandbox and
import hygiene. The Llama 2 tokenizer comes from ../shared/data/llama2."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest

import llama2c
from helpers import LLAMA2_TOK, REPO, STRINGS
from llama2c.chat_template import ChatTemplate, _no_prefix_encode
from llama2c.errors import InvalidArgumentError

# The Hugging Face templates, as published: meta-llama/Llama-2-7b-chat-hf,
# ChatML as in teknium/OpenHermes-2.5, HuggingFaceH4/zephyr-7b-beta.
HF_LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
HF_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' "
    "+ '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
HF_ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
# a template of our own, using what templates in the wild use: whitespace
# control, lstrip_blocks indentation, loop.first, namespace, filters, tojson
CUSTOM = """{%- set ns = namespace(n=0) -%}
{% for m in messages %}
    {% if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}
    {% if loop.first %}{{ bos_token }}{% endif %}
    {% if m.role == 'assistant' %}{% set ns.n = ns.n + 1 %}{% endif %}
### {{ m.role | capitalize }}{% if m.role == 'assistant' %} #{{ ns.n }}{% endif %}:
{{ m.content | trim }}
{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}

{% endfor %}
{%- if add_generation_prompt %}### Assistant:{% endif %}
{# meta #}<{{ messages | length }} {{ messages[-1] | tojson }}>"""

S, U, A = "system", "user", "assistant"


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


CONVERSATIONS = {
    "user": msgs((U, "Hello!")),
    "system-user": msgs((S, "You are a helpful assistant."), (U, "What is the capital of France?")),
    "replay-1": msgs((S, "Be brief."), (U, "Hi there"), (A, "Hello! How can I help?"), (U, "2+2?")),
    "replay-2-nosys": msgs((U, "Tell me a joke."), (A, "Why did the llama cross the road?"), (U, "Why?"),
                           (A, "To get to the other side."), (U, "Another one, please.")),
    "replay-3": msgs((S, "You answer in one word."), (U, "Colour of the sky?"), (A, "Blue."),
                     (U, "Grass?"), (A, "Green"), (U, "Snow?"), (A, "White!")),
    "ends-with-assistant": msgs((U, "Say hi"), (A, "hi")),
    "unicode": msgs((S, "Réponds en français 🇫🇷."), (U, "Crème brûlée, naïve café? 日本語 🦙"),
                    (A, "Oui — ça va 😀. Straße ∑√∞"), (U, "Привет, мир! Καλημέρα κόσμε. a\u2581b")),
    "spaces": msgs((S, "  padded system  \n"), (U, "   leading and trailing   "), (A, "\n  reply with newlines \n\n"),
                   (U, "multiple    spaces   between\twords \t")),
    "newlines-code": msgs((U, "def fib(n):\n    if n < 2:\n        return n\n"), (A, "```python\nprint(1)\n```"),
                          (U, "\n\n\n")),
    "empty-contents": msgs((S, ""), (U, "x"), (A, ""), (U, "")),
    "special-text": msgs((U, "What does </s> mean?"), (A, "It ends a turn: <s> starts one. <unk> too"), (U, "ok")),
}
CONV_IDS = list(CONVERSATIONS)


# ---------------------------------------------------------------------------
# transformers' tokenizers, built from the local tokenizer.model
# ---------------------------------------------------------------------------

KINDS = ["slow", "slow-legacy-false", "fast", "fast-legacy"]


@pytest.fixture(scope="session")
def transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")


@pytest.fixture(scope="session")
def llama_tok(shared_data):
    return llama2c.Tokenizer(LLAMA2_TOK / "tokenizer.bin")


def _hf_tokenizer(transformers, kind, model_file, tmp_dir):
    """transformers' tokenizer of one kind, and how it treats SentencePiece's
    dummy prefix: (tokenizer, legacy flag of our tokenize() that matches it,
    caveat). "slow" is the SentencePiece tokenizer with default settings
    (transformers 4's LlamaTokenizer; in transformers 5, where LlamaTokenizer
    is the `tokenizers` one, the same code is SentencePieceBackend)."""
    major = int(transformers.__version__.split(".")[0])
    model_dir = tmp_dir / "llama2-tokenizer"
    if not model_dir.exists():
        model_dir.mkdir()
        shutil.copy(model_file, model_dir / "tokenizer.model")
    vocab, folder = str(model_file), str(model_dir)
    special = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if major < 5:
            from transformers import LlamaTokenizer, LlamaTokenizerFast

            make = {
                "slow": (lambda: LlamaTokenizer(vocab_file=vocab), True, None),
                "slow-legacy-false": (lambda: LlamaTokenizer(vocab_file=vocab, legacy=False), False, None),
                "fast": (lambda: LlamaTokenizerFast.from_pretrained(folder, legacy=False), False, "fast-start"),
                "fast-legacy": (lambda: LlamaTokenizerFast.from_pretrained(folder), True, "fast-start"),
            }[kind]
        else:
            from transformers import LlamaTokenizer
            from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

            make = {
                "slow": (lambda: SentencePieceBackend(vocab_file=vocab, **special), True, None),
                "slow-legacy-false": (lambda: SentencePieceBackend(vocab_file=vocab, legacy=False, **special),
                                      False, "no-prefix"),
                "fast": (lambda: LlamaTokenizer.from_pretrained(folder), False, "fast"),
                "fast-legacy": (lambda: LlamaTokenizer.from_pretrained(folder, legacy=True), True, "fast"),
            }[kind]
        return make[0](), make[1], make[2]


_hf_cache: dict = {}


@pytest.fixture(params=KINDS)
def hf(request, transformers, shared_data, tmp_path_factory):
    """(transformers tokenizer, the legacy flag our tokenize() needs to match it, caveat)"""
    kind = request.param
    if kind not in _hf_cache:
        _hf_cache[kind] = _hf_tokenizer(transformers, kind, LLAMA2_TOK / "tokenizer.model",
                                        tmp_path_factory.getbasetemp())
    return _hf_cache[kind]


def skip_known_differences(caveat, text):
    """Where a tokenizer is known to differ from SentencePiece (docs/CHAT.md):
    - "fast-start" (the `tokenizers` library): no dummy prefix before text
      that already starts with a space;
    - "fast" (the same in transformers 5): also runs of spaces merged
      otherwise ("a  b": SentencePiece and we give ▁a ▁ ▁b, it gives ▁a ▁▁ b);
    - "no-prefix" (transformers 5's SentencePieceBackend(legacy=False)): no
      dummy prefix even at the start of the text."""
    text = text.replace("\u2581", " ")
    if caveat in ("fast", "fast-start") and re.search("(^|<s>|</s>|<unk>) ", text):
        pytest.skip("fast tokenizer: no dummy prefix before a space")
    if caveat == "fast" and "  " in text:
        pytest.skip("fast tokenizer (transformers 5): runs of spaces split unlike SentencePiece")
    if caveat == "no-prefix" and text and not re.match("<s>|</s>|<unk>", text):
        pytest.skip("this tokenizer adds no dummy prefix at the start of the text either")


def hf_render(tok, messages, template, gen):
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=gen)


def hf_ids(tok, messages, template, gen):
    ids = tok.apply_chat_template(messages, chat_template=template, tokenize=True, add_generation_prompt=gen)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


# ---------------------------------------------------------------------------
# Llama 2 against transformers
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("gen", [True, False], ids=["gen", "nogen"])
@pytest.mark.parametrize("conv", CONV_IDS)
def test_llama2_matches_transformers(hf, llama_tok, conv, gen):
    tok, legacy, caveat = hf
    messages = CONVERSATIONS[conv]
    ours = ChatTemplate.get("llama-2")
    assert ours.render(messages, gen) == hf_render(tok, messages, HF_LLAMA2, gen)
    skip_known_differences(caveat, ours.render(messages, gen))
    expected = hf_ids(tok, messages, HF_LLAMA2, gen)
    assert ours.tokenize(llama_tok, messages, gen, legacy=legacy) == expected
    if legacy:
        assert ours.tokenize(llama_tok, messages, gen) == expected  # the default


@pytest.mark.parametrize("conv", ["replay-1", "unicode", "spaces", "special-text"])
def test_llama2_as_jinja_matches(hf, llama_tok, conv):
    """The published Jinja source through our sandbox gives the same text and ids."""
    tok, legacy, caveat = hf
    messages = CONVERSATIONS[conv]
    jinja = ChatTemplate.get(HF_LLAMA2)
    assert jinja.name == "jinja"
    assert jinja.render(messages) == ChatTemplate.get("llama-2").render(messages) == hf_render(tok, messages,
                                                                                                HF_LLAMA2, True)
    skip_known_differences(caveat, jinja.render(messages))
    assert jinja.tokenize(llama_tok, messages, legacy=legacy) == hf_ids(tok, messages, HF_LLAMA2, True)


def test_llama2_replayed_reply_has_no_extra_space_token(llama_tok):
    """The bug this fixes: a replayed reply is `[/INST] reply </s>` encoded as
    one text, so no lone `▁` (29871) comes between `]` and the reply."""
    messages = msgs((U, "Hi"), (A, "Hello"), (U, "x"))
    inst, close, hello = [518, 25580, 29962], [518, 29914, 25580, 29962], 15043  # "▁[INST]", "▁[/INST]", "▁Hello"
    assert ChatTemplate.get(None).tokenize(llama_tok, messages) == (
        [1] + inst + [6324] + close + [hello, 29871, 2] + [1] + inst + [921] + close)


@pytest.mark.parametrize("conv", ["replay-1", "unicode"])
def test_llama2_matches_meta_reference(llama_tok, conv):
    """Meta's own chat code: per exchange, BOS + sp.encode("[INST] user [/INST] reply ") + EOS."""
    sentencepiece = pytest.importorskip("sentencepiece")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(LLAMA2_TOK / "tokenizer.model"))
    messages = CONVERSATIONS[conv]
    system, rest = messages[0]["content"], messages[1:]
    rest = [dict(rest[0], content=f"<<SYS>>\n{system}\n<</SYS>>\n\n{rest[0]['content']}")] + rest[1:]
    expected = []
    for k in range(0, len(rest) - 1, 2):
        text = f"[INST] {rest[k]['content'].strip()} [/INST] {rest[k + 1]['content'].strip()} "
        expected += [1] + sp.encode(text) + [2]
    expected += [1] + sp.encode(f"[INST] {rest[-1]['content'].strip()} [/INST]")
    assert ChatTemplate.get("llama-2").tokenize(llama_tok, messages) == expected


# ---------------------------------------------------------------------------
# ChatML, Zephyr and a custom Jinja template against transformers
# ---------------------------------------------------------------------------

OTHERS = {"chatml": HF_CHATML, "zephyr": HF_ZEPHYR}


@pytest.mark.parametrize("gen", [True, False], ids=["gen", "nogen"])
@pytest.mark.parametrize("conv", CONV_IDS)
@pytest.mark.parametrize("name", list(OTHERS))
def test_builtin_matches_transformers(hf, llama_tok, name, conv, gen):
    tok, legacy, caveat = hf
    messages = CONVERSATIONS[conv]
    ours = ChatTemplate.get(name)
    text = ours.render(messages, gen)
    assert text == hf_render(tok, messages, OTHERS[name], gen)
    assert ChatTemplate.get(OTHERS[name]).render(messages, gen) == text
    skip_known_differences(caveat, text)
    assert ours.tokenize(llama_tok, messages, gen, legacy=legacy) == hf_ids(tok, messages, OTHERS[name], gen)


@pytest.mark.parametrize("gen", [True, False], ids=["gen", "nogen"])
@pytest.mark.parametrize("conv", CONV_IDS)
def test_custom_jinja_matches_transformers(hf, llama_tok, conv, gen):
    tok, legacy, caveat = hf
    messages = CONVERSATIONS[conv]
    ours = ChatTemplate.get(CUSTOM)
    text = ours.render(messages, gen)
    assert text == hf_render(tok, messages, CUSTOM, gen)
    skip_known_differences(caveat, text)
    assert ours.tokenize(llama_tok, messages, gen, legacy=legacy) == hf_ids(tok, messages, CUSTOM, gen)


def test_builtin_rendering_exact():
    m = msgs((S, "sys"), (U, "hi"), (A, "yo"), (U, "q"))
    assert ChatTemplate.get("chatml").render(m) == (
        "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n")
    assert ChatTemplate.get("zephyr").render(m, add_generation_prompt=False) == (
        "<|system|>\nsys</s>\n<|user|>\nhi</s>\n<|assistant|>\nyo</s>\n<|user|>\nq</s>\n")
    assert ChatTemplate.get("llama2").render(m) == (
        "<s>[INST] <<SYS>>\nsys\n<</SYS>>\n\nhi [/INST] yo </s><s>[INST] q [/INST]")
    assert ChatTemplate.get("llama-2").render(m, bos_token="B", eos_token="E") == (
        "B[INST] <<SYS>>\nsys\n<</SYS>>\n\nhi [/INST] yo EB[INST] q [/INST]")


# ---------------------------------------------------------------------------
# the encoder without a dummy prefix (tokenize(legacy=False))
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", [s for s in STRINGS if s], ids=lambda s: repr(s[:16]))
def test_no_prefix_encoder_matches_c(llama_tok, text):
    """The Python BPE with an explicit leading space is the C encoder."""
    assert _no_prefix_encode(llama_tok, " " + text) == llama_tok.encode(text, bos=False)


def test_no_prefix_encoder_on_tok512(shared_data):
    from helpers import STORIES

    tok = llama2c.Tokenizer(STORIES / "tok512.bin")
    for text in STRINGS:
        if text:
            assert _no_prefix_encode(tok, " " + text) == tok.encode(text, bos=False), text


# ---------------------------------------------------------------------------
# names, stop strings, validation
# ---------------------------------------------------------------------------

def test_names_and_default():
    assert ChatTemplate.get(None).name == "llama-2"
    for spec in ("llama-2", "llama2", "LLAMA_2", " Llama2 "):
        assert ChatTemplate.get(spec).name == "llama-2"
    assert ChatTemplate.get("chatml").name == "chatml"
    assert ChatTemplate.get("zephyr").name == "zephyr"
    t = ChatTemplate.get("chatml")
    assert ChatTemplate.get(t) is t
    with pytest.raises(InvalidArgumentError, match="llama-2, chatml, zephyr"):
        ChatTemplate.get("vicuna")
    with pytest.raises(InvalidArgumentError):
        ChatTemplate.get(42)


def test_stop_strings():
    assert ChatTemplate.get("chatml").stop_strings == ("<|im_end|>",)
    assert "</s>" in ChatTemplate.get("zephyr").stop_strings
    assert "</s>" in ChatTemplate.get("llama-2").stop_strings


def test_jinja_stop_strings(jinja2):
    assert "<|im_end|>" in ChatTemplate.get(HF_CHATML).stop_strings
    assert "</s>" in ChatTemplate.get(HF_ZEPHYR).stop_strings
    assert ChatTemplate.from_jinja("{{ messages[0].content }}", stop_strings=["END"]).stop_strings == ("END",)


BAD_MESSAGES = [
    ("not a list", "hello"),
    ("not a dict", ["hello"]),
    ("bad role", [{"role": "robot", "content": "x"}]),
    ("missing role", [{"content": "x"}]),
    ("missing content", [{"role": "user"}]),
    ("None content", [{"role": "user", "content": None}]),
    ("list content", [{"role": "user", "content": [{"type": "text", "text": "x"}]}]),
    ("empty", []),
]


@pytest.mark.parametrize("name", ["llama-2", "chatml", "zephyr", "jinja"])
@pytest.mark.parametrize("what,messages", BAD_MESSAGES, ids=[b[0] for b in BAD_MESSAGES])
def test_bad_messages(name, what, messages):
    if name == "jinja":
        pytest.importorskip("jinja2")
    t = ChatTemplate.get(HF_CHATML if name == "jinja" else name)
    with pytest.raises(InvalidArgumentError):
        t.render(messages)


@pytest.mark.parametrize("roles", [(A, U), (U, U), (U, A, A), (U, S), (S, S, U), (U, A, S, U), (S, A)])
def test_llama2_alternation(roles):
    messages = [{"role": r, "content": "x"} for r in roles]
    with pytest.raises(InvalidArgumentError, match="alternating"):
        ChatTemplate.get("llama-2").render(messages)
    ChatTemplate.get("chatml").render(messages)  # ChatML and Zephyr take any order
    ChatTemplate.get("zephyr").render(messages)


def test_hf_llama2_template_raises_too():
    pytest.importorskip("jinja2")
    with pytest.raises(InvalidArgumentError, match="alternate"):
        ChatTemplate.get(HF_LLAMA2).render(msgs((U, "a"), (U, "b")))


def test_system_only_and_extra_keys():
    assert ChatTemplate.get("llama-2").render(msgs((S, "s"))) == ""  # as the Hugging Face template
    m = [{"role": "user", "content": "hi", "name": "bob"}]
    assert ChatTemplate.get("chatml").render(m) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------------------
# Jinja: files, errors, the sandbox
# ---------------------------------------------------------------------------

@pytest.fixture
def jinja2():
    return pytest.importorskip("jinja2", reason="jinja2 is not installed (pip install jinja2)")


def test_template_files(jinja2, tmp_path):
    m = msgs((U, "hi"))
    expected = ChatTemplate.get("chatml").render(m)
    (tmp_path / "t.jinja").write_text(HF_CHATML)
    assert ChatTemplate.get(str(tmp_path / "t.jinja")).render(m) == expected
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"bos_token": "<s>", "chat_template": HF_CHATML}))
    assert ChatTemplate.get(cfg).render(m) == expected
    cfg.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "x"},
                                                 {"name": "default", "template": HF_CHATML}]}))
    assert ChatTemplate.get(str(cfg)).render(m) == expected
    cfg.write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(InvalidArgumentError, match="no chat_template"):
        ChatTemplate.get(str(cfg))


def test_template_errors(jinja2):
    with pytest.raises(InvalidArgumentError, match="chat template error"):
        ChatTemplate.get("{% for m in messages %}{{ m.content }")
    with pytest.raises(InvalidArgumentError, match="custom failure"):
        ChatTemplate.get("{{ raise_exception('custom failure') }}").render(msgs((U, "x")))
    with pytest.raises(InvalidArgumentError, match="chat template error"):
        ChatTemplate.get("{{ 1 / 0 }}").render(msgs((U, "x")))


def test_loopcontrols_generation_tag_and_helpers(jinja2):
    t = ChatTemplate.get("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                         "{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
                         "{{ strftime_now('%Y') | length }}{{ unk_token }}")
    assert t.render(msgs((U, "a"), (A, "b"))) == "[a]4<unk>"
    assert ChatTemplate.get("{{ messages[0] | tojson }}").render(msgs((U, "é<>&"))) == \
        '{"role": "user", "content": "é<>&"}'


HOSTILE = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__['__builtins__']['open']('/etc/passwd').read() }}",
    "{{ lipsum.__globals__['os'].popen('echo pwned').read() }}",
    "{{ cycler.__init__.__globals__.os.popen('echo pwned').read() }}",
    "{{ self.__init__.__globals__.__builtins__.__import__('os').popen('echo pwned').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ messages[0].content.__class__.__mro__ }}",
    "{{ ''.format.__self__.__class__ }}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{{ strftime_now.__globals__ }}",
    "{% set x = messages.append({'role': 'user', 'content': 'injected'}) %}",
    "{% set x = messages[0].update({'content': 'injected'}) %}",
    "{% set x = messages.pop() %}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}",
    "{{ range(10**9) | list }}",
    "{{ 'x' * 10**9 }}",
    "{{ 7 ** 7 ** 7 ** 7 }}",
]


@pytest.mark.parametrize("source", HOSTILE)
def test_sandbox(jinja2, source):
    messages = msgs((U, "hi"))
    snapshot = json.dumps(messages)
    try:
        out = ChatTemplate.get(source).render(messages)
    except InvalidArgumentError:
        out = ""
    assert "class" not in out and "function" not in out and "module" not in out and "pwned" not in out
    assert "root:" not in out and len(out) < 1000
    assert json.dumps(messages) == snapshot  # the caller's messages are untouched


def test_sandbox_refuses_with_a_message(jinja2):
    with pytest.raises(InvalidArgumentError, match="unsafe"):
        ChatTemplate.get(HOSTILE[0]).render(msgs((U, "hi")))
    with pytest.raises(InvalidArgumentError, match="unsafe"):
        ChatTemplate.get("{% set x = messages.append(1) %}").render(msgs((U, "hi")))


# ---------------------------------------------------------------------------
# import hygiene
# ---------------------------------------------------------------------------

def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_import_needs_neither_jinja2_nor_torch():
    proc = _python("""
        import sys
        import llama2c, llama2c.chat_template
        from llama2c.chat_template import ChatTemplate
        for name in ("llama-2", "chatml", "zephyr"):
            ChatTemplate.get(name).render([{"role": "user", "content": "hi"}])
        assert "jinja2" not in sys.modules, "jinja2 imported"
        assert "torch" not in sys.modules, "torch imported"
        assert "transformers" not in sys.modules, "transformers imported"
    """)
    assert proc.returncode == 0, proc.stderr


def test_jinja_without_jinja2_says_what_to_install():
    proc = _python("""
        import sys
        sys.modules["jinja2"] = None
        from llama2c.chat_template import ChatTemplate
        from llama2c.errors import InvalidArgumentError
        print(ChatTemplate.get("chatml").render([{"role": "user", "content": "hi"}]))
        try:
            ChatTemplate.get("{{ messages }}")
        except InvalidArgumentError as e:
            print("refused:", e)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "refused:" in proc.stdout and "pip install" in proc.stdout
