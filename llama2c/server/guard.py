"""Who may talk to the server: an ASGI middleware in front of every route.

- API key (--api-key): every route but the chat page (/) and /health needs
  `Authorization: Bearer KEY`, else 401. The key is compared as SHA-256
  digests with hmac.compare_digest: constant time, whatever the lengths.
- Host header: a server bound to a loopback address answers only requests
  addressed to a loopback name (localhost, 127.0.0.1, [::1], plus any
  --allowed-host), so a web page cannot reach it through DNS rebinding
  (a name of the attacker's that resolves to 127.0.0.1). Elsewhere, only
  the --allowed-host names when some are given.
Refusals are OpenAI-shaped error bodies.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress

from .bodies import dumps
from .errors import APIError

OPEN_PATHS = frozenset({"/", "/health", "/v1/health"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a Host header, without the port ('[::1]:8000' -> '::1')."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def allowed_hosts(bind_host: str, extra=()) -> frozenset | None:
    """The Host names to answer (None: any)."""
    extra = frozenset(h.lower().strip("[]") for h in extra)
    if is_loopback(bind_host):
        return LOOPBACK_NAMES | extra
    return extra or None


async def send_error(send, err: APIError) -> None:
    body = dumps(err.body()).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class Guard:
    def __init__(self, app, api_key: str | None = None, hosts: frozenset | None = None):
        self.app = app
        self.key_digest = _digest(api_key.encode("utf-8")) if api_key else None
        self.hosts = hosts

    def _authorized(self, headers: dict) -> bool:
        given = headers.get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        ok = hmac.compare_digest(_digest(token.strip()), self.key_digest)
        return ok and scheme.lower() == b"bearer"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        if self.hosts is not None and b"host" in headers:
            name = host_name(headers[b"host"].decode("latin-1"))
            if name not in self.hosts:
                return await send_error(send, APIError(
                    400, f"this server does not answer for the host {name!r} (see --allowed-host)",
                    code="invalid_host"))
        if self.key_digest is not None and scope.get("path") not in OPEN_PATHS and scope.get("method") != "OPTIONS":
            if not self._authorized(headers):
                missing = b"authorization" not in headers
                return await send_error(send, APIError(
                    401, "missing API key: send 'Authorization: Bearer KEY'" if missing else "invalid API key",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
        return await self.app(scope, receive, send)
