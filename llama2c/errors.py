"""Exceptions raised by llama2c, and the translation of libllama2 status codes."""
from __future__ import annotations

import errno

from ._ffi import ERR_ARGUMENT, ERR_FORMAT, ERR_IO, ERR_NOMEM, ERR_NOT_FOUND, ERR_STATE, ffi


class Llama2Error(Exception):
    """Base class of every error libllama2 reports."""


class FormatError(Llama2Error, ValueError):
    """A malformed model or tokenizer file: bad magic, unknown version,
    truncated data, impossible or inconsistent dimensions, bad group size."""


class InvalidArgumentError(Llama2Error, ValueError):
    """An argument out of range: token id, position, sampling setting."""


class ContextLengthError(InvalidArgumentError):
    """A prompt (or text to score or embed) that does not fit the context:
    the message states its length in tokens and the context's. A ValueError,
    as llama-cpp-python raises; pass truncate="left" to keep the end."""


class Llama2IOError(Llama2Error, OSError):
    """The file exists but could not be read or mapped."""


class Llama2MemoryError(Llama2Error, MemoryError):
    """An allocation inside the engine failed."""


class StateError(Llama2Error, RuntimeError):
    """A call that is not valid in the object's current state."""


class ConversionWarning(UserWarning):
    """Loading converted the model (a GGUF file's tensors of a type the engine
    does not run, such as Q4_K or Q6_K, dequantized to bf16): it runs, with
    more memory than the file. `Llama.notice` holds the same line."""


def raise_for(code: int, err, path: str | None = None) -> None:
    """Raises the exception matching a non-zero status code."""
    if code == 0:
        return
    message = ffi.string(err.message).decode("utf-8", "replace") if err is not None else ""
    message = message or f"libllama2 error {code}"
    if code == ERR_NOT_FOUND:
        raise FileNotFoundError(errno.ENOENT, message, path)
    if code == ERR_FORMAT:
        raise FormatError(message)
    if code == ERR_ARGUMENT:
        raise InvalidArgumentError(message)
    if code == ERR_IO:
        raise Llama2IOError(message)
    if code == ERR_NOMEM:
        raise Llama2MemoryError(message)
    if code == ERR_STATE:
        raise StateError(message)
    raise Llama2Error(message)


def new_error():
    return ffi.new("llama2_error *")
