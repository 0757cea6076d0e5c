"""Request bodies to builder arguments: every OpenAI field the server takes
is type-checked here (a wrong type is a 400 naming the field), then handed
to openai_api.create_completion / openai_chat.create_chat_completion, which
check the values (ranges, context length) as they do for Python callers.

What happens to a field (docs/SERVER.md, "Request fields"):
- taken: the OpenAI fields below, plus llama.cpp's top_k, min_p,
  repeat_penalty and this library's truncate ("left");
- refused with a 400 unless left at a neutral value: fields that would
  change the output if they were honoured, which this engine cannot honour
  (n != 1, best_of, tools, response_format other than text, grammars,
  llama.cpp samplers it lacks, ...): a client never gets an answer that
  silently ignored what it asked for;
- ignored: anything else (user, metadata, store, service_tier, llama.cpp's
  cache_prompt, ...), as OpenAI's server ignores what it does not know.

Imports nothing from starlette.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import bad_request

MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 4096  # characters in one stop string (held-back text is matched against each)
MAX_LOGPROBS = 20  # alternatives per token (OpenAI: 5 for completions, 20 for chat)
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's

# Fields that change the result but that this engine does not implement:
# accepted only at these neutral values (or null / absent).
REFUSED = {
    "n": (1,), "best_of": (1,), "suffix": ("",), "ignore_eos": (False,),
    "typical_p": (1, 1.0), "tfs_z": (1, 1.0), "mirostat": (0,), "mirostat_mode": (0,),
    "grammar": ("",), "json_schema": (), "response_format": ({"type": "text"},),
    "tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],), "function_call": ("none", "auto"),
    "modalities": (["text"],), "audio": (), "prediction": (), "reasoning_effort": (),
    "web_search_options": (), "n_probs": (0,), "n_predict": (), "penalty_last_n": (),
    "repeat_last_n": (), "dry_multiplier": (0, 0.0), "xtc_probability": (0, 0.0),
    "dynatemp_range": (0, 0.0), "samplers": (), "min_keep": (0,), "top_n_sigma": (-1, -1.0),
}
INSTEAD = {"n_predict": "max_tokens", "n_probs": "logprobs", "penalty_last_n": "repeat_penalty (window 64)",
           "repeat_last_n": "repeat_penalty (window 64)", "best_of": "n=1", "n": "one request per choice"}


def _type_name(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _wrong(name: str, expected: str, value) -> Exception:
    return bad_request(f"'{name}' must be {expected} (got {_type_name(value)})", name, "invalid_type")


class Body:
    """A parsed JSON object and typed getters for its fields: absent or null
    gives the default."""

    def __init__(self, data):
        if not isinstance(data, dict):
            raise bad_request(f"the request body must be a JSON object (got {_type_name(data)})", None,
                              "invalid_type")
        self.data = data

    def number(self, name: str, default):
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong(name, "a number", value)
        return value

    def integer(self, name: str, default, lo: int | None = None, hi: int | None = None):
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong(name, "an integer", value)
        if lo is not None and value < lo:
            raise bad_request(f"'{name}' must be >= {lo} (got {value})", name, "invalid_value")
        if hi is not None and value > hi:
            raise bad_request(f"'{name}' must be <= {hi} (got {value})", name, "invalid_value")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise _wrong(name, "a boolean", value)
        return value

    def string(self, name: str, default=None):
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise _wrong(name, "a string", value)
        return value

    def refuse_unsupported(self) -> None:
        for name, neutral in REFUSED.items():
            value = self.data.get(name)
            if value is None or any(_same(value, v) for v in neutral):
                continue
            hint = f" (use {INSTEAD[name]})" if name in INSTEAD else ""
            raise bad_request(f"'{name}'={value!r} is not supported by this server{hint}", name,
                              "unsupported_parameter")


def _same(a, b) -> bool:
    """JSON equality: true is not 1."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def check_model(body: Body, names: tuple[str, ...]) -> None:
    """The requested model must be the one served (its id, or its path)."""
    model = body.data.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise _wrong("model", "a string", model)
    if model not in names:
        raise bad_request(f"the model '{model}' does not exist: this server serves '{names[0]}'", "model",
                          "model_not_found")


def _stop(body: Body):
    stop = body.data.get("stop")
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _wrong("stop", "a string or an array of strings", stop)
    if len(stops) > MAX_STOP:
        raise bad_request(f"'stop' takes at most {MAX_STOP} strings (got {len(stops)})", "stop", "invalid_value")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise bad_request(f"a stop string may have at most {MAX_STOP_CHARS} characters", "stop", "invalid_value")
    return stop


def _logit_bias(body: Body):
    bias = body.data.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise _wrong("logit_bias", "an object of token ids (strings) to numbers", bias)
    out = {}
    lo, hi = LOGIT_BIAS_RANGE
    for key, value in bias.items():
        try:
            token = int(key, 10)
        except ValueError:
            raise bad_request(f"'logit_bias' keys are token ids (got {key!r})", "logit_bias", "invalid_value") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong("logit_bias", "an object of token ids to numbers", value)
        if not lo <= value <= hi:
            raise bad_request(f"'logit_bias' values must be in [{lo:g}, {hi:g}] (got {value})", "logit_bias",
                              "invalid_value")
        out[token] = float(value)
    return out


def _penalty(body: Body, name: str):
    """OpenAI's range, [-2, 2]."""
    value = body.number(name, None)
    if value is not None and not -2.0 <= value <= 2.0:
        raise bad_request(f"'{name}' must be in [-2, 2] (got {value})", name, "invalid_value")
    return value


def _max_tokens(body: Body, name: str, default):
    """At least 1; null: the default (chat: until the context is full)."""
    return body.integer(name, default, lo=1)


@dataclass
class Request:
    """One generation request, checked: the builder's keyword arguments, and
    what the HTTP layer needs (stream, include_usage)."""
    kwargs: dict
    stream: bool = False
    include_usage: bool = False


def _common(body: Body) -> dict:
    """The sampling fields both endpoints take. Only fields the request gives
    are passed on: an absent (or null) one takes the Python API's default
    (llama-cpp-python's), so a request and the same Python call agree."""
    body.refuse_unsupported()
    given = {
        "temperature": body.number("temperature", None),
        "top_p": body.number("top_p", None),
        "top_k": body.integer("top_k", None),
        "min_p": body.number("min_p", None),
        "repeat_penalty": body.number("repeat_penalty", None),
        "presence_penalty": _penalty(body, "presence_penalty"),
        "frequency_penalty": _penalty(body, "frequency_penalty"),
        "seed": body.integer("seed", None),
        "stop": _stop(body),
        "logit_bias": _logit_bias(body),
        "truncate": body.string("truncate"),
    }
    return {k: v for k, v in given.items() if v is not None}


def _stream(body: Body) -> tuple[bool, bool]:
    stream = body.boolean("stream", False)
    options = body.data.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise _wrong("stream_options", "an object", options)
    usage = options.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise _wrong("stream_options.include_usage", "a boolean", usage)
    return stream, bool(usage) and stream


def _prompt(body: Body):
    """A str, an array of token ids, or an array holding one of those."""
    if "prompt" not in body.data or body.data["prompt"] is None:
        raise bad_request("'prompt' is required", "prompt", "missing_required_parameter")
    prompt = body.data["prompt"]
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) != 1:
            raise bad_request(f"one prompt per request (got {len(prompt)}): send one request for each",
                              "prompt", "unsupported_parameter")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise _wrong("prompt", "a string, a non-empty array of token ids, or an array of one of those", prompt)


def completion_request(data) -> Request:
    """POST /v1/completions."""
    body = Body(data)
    kwargs = _common(body)
    kwargs.update(prompt=_prompt(body), max_tokens=_max_tokens(body, "max_tokens", 16),
                  logprobs=body.integer("logprobs", None, 0, MAX_LOGPROBS), echo=body.boolean("echo", False))
    stream, usage = _stream(body)
    return Request(kwargs, stream, usage)


def _content(i: int, content) -> str:
    """A message's content: a string, or an array of text parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _type_name(part)
                raise bad_request(f"messages[{i}].content: only text parts are supported (got {kind!r})",
                                  "messages", "unsupported_content")
            texts.append(part["text"])
        return "\n".join(texts)
    raise _wrong(f"messages[{i}].content", "a string or an array of text parts", content)


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _messages(body: Body) -> list[dict]:
    messages = body.data.get("messages")
    if messages is None:
        raise bad_request("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array of messages", "messages", "invalid_type")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _wrong(f"messages[{i}]", "an object", m)
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad_request(f"messages[{i}].role must be one of system, developer, user, assistant "
                              f"(got {role!r})", "messages", "invalid_value")
        if m.get("tool_calls") or m.get("function_call"):
            raise bad_request(f"messages[{i}]: tool calls are not supported", "messages", "unsupported_parameter")
        out.append({"role": ROLES[role], "content": _content(i, m.get("content"))})
    return out


def chat_request(data) -> Request:
    """POST /v1/chat/completions."""
    body = Body(data)
    kwargs = _common(body)
    max_tokens = _max_tokens(body, "max_completion_tokens", None)
    max_tokens = _max_tokens(body, "max_tokens", max_tokens)
    logprobs = body.boolean("logprobs", False)
    top = body.integer("top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    kwargs.update(messages=_messages(body), max_tokens=max_tokens, logprobs=logprobs or None, top_logprobs=top)
    stream, usage = _stream(body)
    return Request(kwargs, stream, usage)


def embedding_inputs(data) -> tuple[list[str] | list[list[int]], bool, str]:
    """POST /v1/embeddings: (the inputs: texts or token-id lists, whether the
    input was one item, the encoding "float" | "base64")."""
    body = Body(data)
    if "input" not in body.data or body.data["input"] is None:
        raise bad_request("'input' is required", "input", "missing_required_parameter")
    value = body.data["input"]
    fmt = body.string("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise bad_request(f"'encoding_format' must be 'float' or 'base64' (got {fmt!r})", "encoding_format",
                          "invalid_value")
    if isinstance(value, str):
        return [value], True, fmt

    def token_list(x) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if token_list(value):
        return [value], True, fmt
    if isinstance(value, list) and value and (all(isinstance(x, str) for x in value) or all(map(token_list, value))):
        return value, False, fmt
    raise _wrong("input", "a string, an array of strings, an array of token ids or an array of those", value)


def check_dimensions(data, dim: int) -> None:
    """OpenAI's `dimensions` (shortened embeddings): only the model's own."""
    value = Body(data).integer("dimensions", None)
    if value is not None and value != dim:
        raise bad_request(f"'dimensions' must be the model's {dim} (got {value}): shortened embeddings are not "
                          "supported", "dimensions", "unsupported_parameter")

