"""OpenAI-shaped error responses: {"error": {"message", "type", "param",
"code"}} with the HTTP status that goes with them, and the translation of
library exceptions into them (docs/SERVER.md, "Errors").

Imports nothing from starlette: the app turns an APIError into a response.
"""
from __future__ import annotations

from ..errors import ContextLengthError, InvalidArgumentError, Llama2Error, StateError
from .engine import QueueFull

INVALID = "invalid_request_error"


class APIError(Exception):
    """A request the server answers with an error body instead of a result."""

    def __init__(self, status: int, message: str, *, type: str = INVALID, param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def queue_full(message: str, retry_after: int = 1) -> APIError:
    """429 with Retry-After: the client should come back, not queue here."""
    return APIError(429, message, type="rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(retry_after)})


def internal_error() -> APIError:
    """What a client sees of a bug: no traceback, no internals (they go to the log)."""
    return APIError(500, "internal server error (see the server's log)", type="server_error", code="internal_error")


# where a library message names the field it is about (first match wins)
_PARAMS = (("logit bias", "logit_bias"), ("logit_bias", "logit_bias"), ("max_tokens", "max_tokens"),
           ("temperature", "temperature"), ("top_p", "top_p"), ("topp", "top_p"), ("top_k", "top_k"),
           ("min_p", "min_p"), ("repeat_penalty", "repeat_penalty"), ("repetition_penalty", "repeat_penalty"),
           ("presence_penalty", "presence_penalty"), ("frequency_penalty", "frequency_penalty"),
           ("top_logprobs", "top_logprobs"), ("logprobs", "logprobs"), ("seed", "seed"), ("stop", "stop"),
           ("truncate", "truncate"), ("prompt", "prompt"), ("message", "messages"), ("template", "messages"),
           ("token", "prompt"))


def _param_of(message: str) -> str | None:
    for needle, param in _PARAMS:
        if message.startswith(needle) or f" {needle}" in message or f"{needle}=" in message:
            return param
    return None


def from_exception(exc: BaseException, prompt_param: str | None = None) -> APIError:
    """The APIError for an exception raised while serving a request:
    - APIError: itself;
    - QueueFull (every slot busy, the waiting line full): 429;
    - ContextLengthError: 400, code context_length_exceeded, its message
      naming the prompt's length and the context's;
    - InvalidArgumentError (and the ValueErrors the library's checks of
      Python values raise): 400 with the library's message;
    - anything else: 500, without details."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFull):
        return queue_full(str(exc) or "the server is busy: try again later")
    if isinstance(exc, ContextLengthError):
        return bad_request(str(exc), prompt_param, "context_length_exceeded")
    if isinstance(exc, (InvalidArgumentError, StateError)):
        return bad_request(str(exc), _param_of(str(exc)))
    if isinstance(exc, (ValueError, OverflowError)) and not isinstance(exc, Llama2Error):
        # the library's own checks of Python values raise these; a TypeError is a bug: 500
        return bad_request(str(exc) or type(exc).__name__, _param_of(str(exc)))
    return internal_error()
