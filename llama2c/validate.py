"""Checks on arguments before they reach C: every number a C `int` takes is
range-checked here (so a Python int past 32 bits is an InvalidArgumentError,
not cffi's OverflowError), and paths may not hide a NUL byte (C would
silently read the path only up to it)."""
from __future__ import annotations

import operator
import os

from .errors import InvalidArgumentError

INT_MAX = 2**31 - 1
MAX_THREADS = 256  # as LLAMA2_THREADS / OMP_NUM_THREADS are capped in C


def check_int(name: str, value, lo: int = -INT_MAX - 1, hi: int = INT_MAX) -> int:
    """value as an int in [lo, hi]; bools and floats are refused."""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be an integer (got {value!r})")
    try:
        number = operator.index(value)
    except TypeError:
        raise InvalidArgumentError(f"{name} must be an integer (got {type(value).__name__} {value!r})") from None
    if not lo <= number <= hi:
        raise InvalidArgumentError(f"{name} must be in [{lo}, {hi}] (got {number})")
    return number


def check_threads(n_threads) -> int:
    """A thread count >= 1, capped at MAX_THREADS."""
    return min(check_int("n_threads", n_threads, 1), MAX_THREADS)


def c_path(path) -> bytes:
    """A file path as the bytes C opens; a NUL byte inside is refused."""
    raw = os.fsencode(os.fspath(path))
    if b"\0" in raw:
        raise InvalidArgumentError(f"path contains a NUL byte: {os.fsdecode(raw)!r}")
    return raw


def regular_file(path) -> None:
    """Refuses, before anything opens it, a path that is not a regular file:
    opening a FIFO for reading would wait forever for a writer, and a device
    or a directory is never a model. FileNotFoundError when it is missing."""
    import stat

    from .errors import Llama2IOError

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(2, f"{os.fspath(path)}: no such file", os.fspath(path)) from None
    if not stat.S_ISREG(mode):
        raise Llama2IOError(f"{os.fspath(path)}: not a regular file")
