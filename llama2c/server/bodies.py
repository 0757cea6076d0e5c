"""JSON bodies in and out: requests read up to a size limit (413 past it,
before the rest is read) and parsed strictly (400 for anything that is not
standard JSON: NaN/Infinity, bad UTF-8, nesting too deep); responses
written as standard JSON (a non-finite float, which JSON cannot hold,
becomes null).

Imports nothing from starlette: read_json takes the request's byte stream.
"""
from __future__ import annotations

import json
import math
from typing import AsyncIterator

from .errors import APIError, bad_request

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB: far more than any prompt a context holds


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                    code="request_too_large")


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes):
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # a lone surrogate (\ud800) is no text
        return data
    except UnicodeEncodeError:
        raise bad_request("the request body holds an unpaired UTF-16 surrogate escape: not text", None,
                          "invalid_json") from None
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not UTF-8: {e}", None, "invalid_json") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply", None, "invalid_json") from None
    except ValueError as e:
        raise bad_request(f"the request body is not valid JSON: {e}", None, "invalid_json") from None


async def read_json(content_length: str | None, chunks: AsyncIterator[bytes], limit: int):
    """The parsed body; a declared or actual size over `limit` is a 413."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise bad_request("Content-Length is not a number", None, "invalid_request") from None
        if declared > limit:
            raise too_large(limit)
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        parts.append(chunk)
    if not size:
        raise bad_request("the request has no body: send a JSON object", None, "invalid_json")
    return parse_json(b"".join(parts))


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(value) -> str:
    """Compact standard JSON (UTF-8 text, not \\u escapes) that encodes as UTF-8."""
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(value), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: escaped, still valid JSON
        text = json.dumps(_finite(value), ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text
