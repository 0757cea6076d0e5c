"""create_chat_completion: OpenAI's chat.completion shape (and its stream of
chat.completion.chunk deltas) over the completion loop, the messages
rendered by a chat template (llama2c/chat_template.py).

A conversation that does not fit the context is a ContextLengthError; with
truncate="left" the oldest turns go (a system message stays) until it fits.
"""
from __future__ import annotations

from .chat_template import ChatTemplate
from .completion import fit_prompt
from .errors import ContextLengthError
from .openai_api import ChunkStream, _now_id, check_max_tokens, refuse_unsupported, sampling_of
from .sampler import as_float
from .validate import check_int


def chat_ids(llama, template: ChatTemplate, messages: list[dict], max_tokens, truncate) -> list[int]:
    """The conversation's token ids, ready for a reply: they fit n_ctx with
    room for a new token, oldest turns dropped first with truncate="left"."""
    messages = list(messages)
    while True:
        ids = template.tokenize(llama.tokenizer, messages, add_generation_prompt=True)
        try:
            return fit_prompt(ids, llama.n_ctx, max_tokens, None)
        except ContextLengthError:
            if truncate != "left":
                if truncate is not None:
                    fit_prompt(ids, llama.n_ctx, max_tokens, truncate)  # names a bad mode
                raise
            first = 1 if messages and messages[0].get("role") == "system" else 0
            if len(messages) - first <= 1:
                raise
            # drop the oldest exchange (a user turn and the reply after it)
            drop = 2 if len(messages) - first > 2 and messages[first + 1].get("role") == "assistant" else 1
            del messages[first:first + drop]


def token_entry(token_text: str, raw: bytes, logprob: float) -> dict:
    return {"token": token_text, "logprob": logprob, "bytes": list(raw)}


def create_chat_completion(llama, messages: list[dict], functions=None, function_call=None, tools=None,
                           tool_choice=None, temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40,
                           min_p: float = 0.05, typical_p: float = 1.0, stream: bool = False, stop=None,
                           seed: int | None = None, response_format=None, max_tokens: int | None = None,
                           presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                           repeat_penalty: float = 1.0, tfs_z: float = 1.0, mirostat_mode: int = 0,
                           mirostat_tau: float = 5.0, mirostat_eta: float = 0.1, model: str | None = None,
                           logits_processor=None, grammar=None, logit_bias=None, logprobs: bool | None = None,
                           top_logprobs: int | None = None, truncate: str | None = None, template=None,
                           runner=None):
    """See Llama.create_chat_completion (runner: as create_completion's)."""
    refuse_unsupported(functions=functions, function_call=function_call, tools=tools, tool_choice=tool_choice,
                       typical_p=typical_p, response_format=response_format, tfs_z=tfs_z,
                       mirostat_mode=mirostat_mode, logits_processor=logits_processor, grammar=grammar)
    sampling = sampling_of(temperature, top_p, top_k, min_p, repeat_penalty, seed, logit_bias)
    max_tokens = check_max_tokens(max_tokens)
    k = (check_int("top_logprobs", top_logprobs or 0, 0, 20)) if logprobs else None
    tmpl = ChatTemplate.get(template) if template is not None else llama.chat_template
    ids = chat_ids(llama, tmpl, messages, max_tokens, truncate)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    steps = (runner or llama._completer().run)(ids, max_tokens=max_tokens, sampling=sampling,
                                   stop=list(tmpl.stop_strings) + stops, logprobs=k, reply=True,
                                   presence_penalty=as_float("presence_penalty", presence_penalty),
                                   frequency_penalty=as_float("frequency_penalty", frequency_penalty))
    cid, created = _now_id("chatcmpl")
    shape = _ChatShape(llama, cid, created, model or llama.model_path, len(ids), k)
    return ChunkStream(shape, steps) if stream else shape.whole(steps)


class _ChatShape:
    def __init__(self, llama, cid, created, model, n_prompt, k):
        self.llama, self.cid, self.created, self.model, self.n_prompt, self.k = llama, cid, created, model, n_prompt, k
        self.n_completion = 0

    def _entry(self, step) -> dict | None:
        if self.k is None or step.token is None:
            return None
        tok = self.llama.tokenizer
        top = []
        for t, lp in step.top:
            raw = tok.token_bytes(0, t)
            top.append(token_entry(raw.decode("utf-8", errors="replace"), raw, lp))
        entry = token_entry(step.token_text, step.token_bytes, step.logprob)
        entry["top_logprobs"] = top
        return entry

    def _head(self, obj: str) -> dict:
        return {"id": self.cid, "object": obj, "created": self.created, "model": self.model}

    def whole(self, steps) -> dict:
        text, finish, entries = "", None, []
        for step in steps:
            text += step.text
            finish = step.finish_reason or finish
            if step.token is not None:
                self.n_completion += 1
            entry = self._entry(step)
            if entry is not None:
                entries.append(entry)
        body = self._head("chat.completion")
        body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text},
                            "logprobs": {"content": entries} if self.k is not None else None,
                            "finish_reason": finish}]
        body["usage"] = {"prompt_tokens": self.n_prompt, "completion_tokens": self.n_completion,
                         "total_tokens": self.n_prompt + self.n_completion}
        return body

    def _chunk(self, delta: dict, logprobs, finish) -> dict:
        body = self._head("chat.completion.chunk")
        body["choices"] = [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
        return body

    def first_chunks(self) -> list[dict]:
        return [self._chunk({"role": "assistant"}, None, None)]

    def step_chunks(self, step) -> list[dict]:
        out = []
        entry = self._entry(step)
        logprobs = {"content": [entry]} if entry is not None else None
        if step.text or entry is not None:
            out.append(self._chunk({"content": step.text}, logprobs, None))
        if step.finish_reason:
            out.append(self._chunk({}, None, step.finish_reason))
        return out
