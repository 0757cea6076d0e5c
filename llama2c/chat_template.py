"""Chat templates: a conversation (OpenAI-style messages) as the prompt text
a chat model was trained on, and that text as token ids.

Built in, by name: "llama-2" (the default), "chatml" and "zephyr", rendered
in Python exactly as their Hugging Face `chat_template`s render. Any other
Jinja2 `chat_template` string (tokenizer_config.json, GGUF
`tokenizer.chat_template`) is rendered in jinja2's immutable sandbox;
jinja2 is imported only then. See docs/CHAT.md.
"""
from __future__ import annotations

import heapq
import json
import os
import re
import weakref
from collections.abc import Mapping, Sequence
from typing import Callable

from .errors import InvalidArgumentError
from .tokenizer import BOS, EOS

UNK = 0
ROLES = ("system", "user", "assistant")
# the text of the tokens with fixed ids in a tokenizer.bin vocabulary
SPECIAL_IDS = {"<s>": BOS, "</s>": EOS, "<unk>": UNK}
_SPECIAL_SPLIT = re.compile("(<s>|</s>|<unk>)")

# end-of-turn markers looked for in a Jinja template's source (its stop strings)
_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>", "<|endoftext|>")


def check_messages(messages) -> list[dict]:
    """The messages as a list of plain dicts, each with a known `role` and a
    str `content` (other keys are kept for Jinja templates)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidArgumentError(f"messages must be a list of dicts (got {type(messages).__name__})")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidArgumentError(f"message {i} must be a dict with 'role' and 'content' "
                                       f"(got {type(m).__name__})")
        if "role" not in m:
            raise InvalidArgumentError(f"message {i} has no 'role'")
        if m["role"] not in ROLES:
            raise InvalidArgumentError(f"message {i} has role {m['role']!r}: the roles are {', '.join(ROLES)}")
        if "content" not in m:
            raise InvalidArgumentError(f"message {i} ({m['role']}) has no 'content'")
        if not isinstance(m["content"], str):
            raise InvalidArgumentError(f"message {i} ({m['role']}): content must be a str "
                                       f"(got {type(m['content']).__name__})")
        out.append(dict(m))
    return out


# ---------------------------------------------------------------------------
# the built-in templates
# ---------------------------------------------------------------------------

def _render_llama2(messages: list[dict], add_generation_prompt: bool, bos: str, eos: str) -> str:
    """Llama 2 chat: the system message folded into the first user turn,
    `<s>[INST] user [/INST]` and ` reply </s>`, contents stripped. Nothing
    is added for the generation prompt: a conversation ending with a user
    turn already ends where the reply starts."""
    system = None
    turns = messages
    if messages and messages[0]["role"] == "system":
        system, turns = messages[0]["content"], messages[1:]
    out = []
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            where = "first" if i == 0 else f"after a {turns[i - 1]['role']} message"
            raise InvalidArgumentError(
                "the llama-2 template needs roles alternating user/assistant/user/... after an optional "
                f"first system message: message {i + (system is not None)} is {m['role']!r} ({where})")
        content = m["content"]
        if i == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if expected == "user":
            out.append(f"{bos}[INST] {content.strip()} [/INST]")
        else:
            out.append(f" {content.strip()} {eos}")
    return "".join(out)


def _render_chatml(messages: list[dict], add_generation_prompt: bool, bos: str, eos: str) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _render_zephyr(messages: list[dict], add_generation_prompt: bool, bos: str, eos: str) -> str:
    text = "".join(f"<|{m['role']}|>\n{m['content']}{eos}\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


_BUILTIN: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "llama-2": (_render_llama2, ("</s>",)),
    "chatml": (_render_chatml, ("<|im_end|>",)),
    "zephyr": (_render_zephyr, ("</s>",)),
}
_ALIASES = {"llama2": "llama-2", "llama-2-chat": "llama-2", "llama2-chat": "llama-2"}


# ---------------------------------------------------------------------------
# Jinja2 (imported on first use)
# ---------------------------------------------------------------------------

_MAX_REPEAT = 1 << 20  # longest str/list a template may build with `*`
_jinja_env = None


def _environment():
    global _jinja_env
    if _jinja_env is not None:
        return _jinja_env
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise InvalidArgumentError("a Jinja chat template needs jinja2: pip install 'llama2c[chat]' "
                                   "(or pip install jinja2)") from None

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (marks assistant text for
        training masks in some templates): renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class Environment(ImmutableSandboxedEnvironment):
        # the sandbox keeps templates away from Python internals; these two
        # operators are checked too, so `'x' * 10**12` fails instead of
        # exhausting memory
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(left, int) and isinstance(right, int):
                if right > 4096 or left.bit_length() * max(right, 0) > 1 << 16:
                    raise jinja2.sandbox.SecurityError(f"{left} ** {right} is too large")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_REPEAT:
                        raise jinja2.sandbox.SecurityError("a repeated sequence longer than "
                                                           f"{_MAX_REPEAT} items")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, indent=None, separators=None, sort_keys=False):
        # as in transformers' templates: plain JSON, non-ASCII kept
        return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    _jinja_env = env
    return env


def _compile(source: str):
    env = _environment()
    try:
        return env.from_string(source)
    except Exception as e:  # TemplateSyntaxError and whatever else a bad template raises
        raise InvalidArgumentError(f"chat template error: {e}") from e


def _jinja_stop_strings(source: str) -> tuple[str, ...]:
    stops = [m for m in _END_MARKERS if m in source]
    if "eos_token" in source or "</s>" in source:
        stops.append("</s>")
    return tuple(stops)


# ---------------------------------------------------------------------------
# sentencepiece-style BPE without the dummy prefix (tokenize(legacy=False))
# ---------------------------------------------------------------------------

class _Vocab:
    """A tokenizer's pieces and scores, to encode text with no leading
    dummy space (the C encoder always adds one); the same merges as
    csrc/tokenizer.c (docs/TOKENIZER.md)."""

    def __init__(self, tokenizer):
        n = tokenizer.vocab_size
        self.size = n
        self.pieces = [tokenizer.piece(i) for i in range(n)]
        self.scores = [tokenizer.score(i) for i in range(n)]
        self.lookup: dict[bytes, int] = {}
        for i, p in enumerate(self.pieces):
            self.lookup.setdefault(p, i)

    def encode(self, data: bytes) -> list[int]:
        ids: list[int] = []
        i = 0
        while i < len(data):  # code-point chunks of at most 4 bytes
            j = i + 1
            while j < len(data) and j - i < 4 and data[j] & 0xC0 == 0x80:
                j += 1
            chunk = data[i:j]
            if chunk in self.lookup:
                ids.append(self.lookup[chunk])
            else:
                ids.extend(b + 3 if b + 3 < self.size else UNK for b in chunk)
            i = j
        n = len(ids)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap: list = []

        def push(left):
            right = nxt[left]
            if right >= n:
                return
            merged = self.lookup.get(self.pieces[ids[left]] + self.pieces[ids[right]])
            if merged is not None and self.scores[merged] > -1e10:
                heapq.heappush(heap, (-self.scores[merged], left, ids[left], ids[right], merged))

        for k in range(n - 1):
            push(k)
        while heap:
            _, left, lid, rid, merged = heapq.heappop(heap)
            right = nxt[left]
            if not alive[left] or ids[left] != lid or right >= n or ids[right] != rid:
                continue  # stale: one of the two tokens has changed since
            ids[left] = merged
            alive[right] = False
            nxt[left] = nxt[right]
            if nxt[right] < n:
                prv[nxt[right]] = left
            if prv[left] >= 0:
                push(prv[left])
            push(left)
        return [ids[k] for k in range(n) if alive[k]]


_vocabs: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _no_prefix_encode(tokenizer, text: str) -> list[int]:
    vocab = _vocabs.get(tokenizer)
    if vocab is None:
        vocab = _vocabs[tokenizer] = _Vocab(tokenizer)
    return vocab.encode(text.encode("utf-8"))


# ---------------------------------------------------------------------------
# ChatTemplate
# ---------------------------------------------------------------------------

class ChatTemplate:
    """A chat template: `render` gives the prompt text, `tokenize` its ids.

    name: "llama-2", "chatml", "zephyr" or "jinja"; stop_strings: text that
    ends an assistant turn besides EOS; source: the Jinja source (None for
    the built-in templates). Made with ChatTemplate.get (or from_jinja)."""

    def __init__(self, name: str, renderer: Callable, stop_strings=(), source: str | None = None):
        self.name = name
        self._renderer = renderer
        self.stop_strings = tuple(stop_strings)
        self.source = source

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name!r}, stop_strings={self.stop_strings!r})"

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(_BUILTIN)

    @classmethod
    def get(cls, spec: "str | os.PathLike | ChatTemplate | None" = None) -> "ChatTemplate":
        """None, "llama-2" or "llama2": Llama 2 (the default); "chatml";
        "zephyr"; a string with `{{` or `{%`: a Jinja2 chat_template; a path
        to a tokenizer_config.json (its "chat_template") or to a file holding
        a template (.jinja)."""
        if spec is None:
            spec = "llama-2"
        if isinstance(spec, ChatTemplate):
            return spec
        if isinstance(spec, os.PathLike):
            return cls._from_file(os.fspath(spec))
        if not isinstance(spec, str):
            raise InvalidArgumentError(f"a chat template is a name, a Jinja string or a path "
                                       f"(got {type(spec).__name__})")
        if "{{" in spec or "{%" in spec:
            return cls.from_jinja(spec)
        key = spec.strip().lower().replace("_", "-")
        key = _ALIASES.get(key, key)
        if key in _BUILTIN:
            renderer, stops = _BUILTIN[key]
            return cls(key, renderer, stops)
        if spec and os.path.isfile(spec):
            return cls._from_file(spec)
        raise InvalidArgumentError(f"unknown chat template {spec!r}: the known names are "
                                   f"{', '.join(_BUILTIN)} (or give a Jinja template string, a .jinja file "
                                   "or a tokenizer_config.json)")

    @classmethod
    def from_jinja(cls, source: str, stop_strings=None) -> "ChatTemplate":
        """A Jinja2 chat_template; stop_strings=None guesses them from the
        source (known end-of-turn markers, and "</s>" where it writes EOS)."""
        if not isinstance(source, str):
            raise InvalidArgumentError(f"a Jinja template is a str (got {type(source).__name__})")
        template = _compile(source)

        def render(messages, add_generation_prompt, bos, eos):
            try:
                return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                       bos_token=bos, eos_token=eos, unk_token="<unk>")
            except Exception as e:  # raise_exception, sandbox refusals, a template's own bugs
                raise InvalidArgumentError(f"chat template error: {e}") from e

        stops = _jinja_stop_strings(source) if stop_strings is None else stop_strings
        return cls("jinja", render, stops, source)

    @classmethod
    def _from_file(cls, path: str) -> "ChatTemplate":
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidArgumentError(f"cannot read the chat template {path}: {e}") from e
        if not path.endswith(".json"):
            return cls.from_jinja(text)
        try:
            found = json.loads(text).get("chat_template")
        except (ValueError, AttributeError) as e:
            raise InvalidArgumentError(f"{path}: not a tokenizer_config.json ({e})") from e
        if isinstance(found, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in found if isinstance(t, dict)}
            if "default" not in named:
                raise InvalidArgumentError(f"{path}: no 'default' among its chat templates {sorted(map(str, named))}")
            found = named["default"]
        if not isinstance(found, str):
            raise InvalidArgumentError(f"{path} has no chat_template")
        return cls.from_jinja(found)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, bos_token: str = "<s>",
               eos_token: str = "</s>") -> str:
        """The conversation as prompt text; with add_generation_prompt, what
        opens the assistant's reply is added where the template has it."""
        if not isinstance(bos_token, str) or not isinstance(eos_token, str):
            raise InvalidArgumentError("bos_token and eos_token must be str")
        messages = check_messages(messages)
        if not messages:
            raise InvalidArgumentError("no messages to render")
        return self._renderer(messages, bool(add_generation_prompt), bos_token, eos_token)

    def tokenize(self, tokenizer, messages: list[dict], add_generation_prompt: bool = True, *,
                 legacy: bool = True) -> list[int]:
        """The ids of the rendered conversation: `<s>`, `</s>` and `<unk>` in
        the text become ids 1, 2 and 0, and each piece of text between them
        is encoded by `tokenizer` (a llama2c Tokenizer), as transformers'
        LlamaTokenizer does in apply_chat_template.

        legacy=True (transformers' slow tokenizer default, and what Meta's
        own code gives): each piece of text gets SentencePiece's dummy-prefix
        space. legacy=False (LlamaTokenizer(legacy=False), the fast
        tokenizer, transformers 5's default): only text at the very start
        does."""
        own = getattr(tokenizer, "tokenize_chat", None)
        if own is not None:  # a BPE tokenizer (hf_tokenizer.py): its own BOS / EOS text and special tokens
            return own(self, messages, add_generation_prompt)
        text = self.render(messages, add_generation_prompt)
        ids: list[int] = []
        for k, part in enumerate(_SPECIAL_SPLIT.split(text)):
            if k % 2:
                ids.append(SPECIAL_IDS[part])
            elif part:
                part = part.replace("\u2581", " ")  # SentencePiece reads U+2581 as a space
                if legacy or k == 0:
                    ids.extend(tokenizer.encode(part, bos=False, eos=False))
                else:
                    ids.extend(_no_prefix_encode(tokenizer, part))
        return ids
