"""The routes of `llama2c serve` (docs/SERVER.md), a Starlette app over a
Llama and a BatchEngine.

Completions and chat go through the same builders as the Python API
(openai_api.create_completion, openai_chat.create_chat_completion) with the
engine's `run` as their runner; the request fields are checked in
params.py, errors shaped in errors.py, the blocking work driven in
driver.py, access decided in guard.py.

    POST /v1/completions        POST /v1/chat/completions   (stream: SSE)
    POST /v1/embeddings         GET  /v1/models[/{model}]
    GET  /health                POST /tokenize   POST /detokenize
    GET  /                      the chat page (static/index.html)

(each /v1/ route also answers without the /v1 prefix, as llama.cpp's does)
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread
import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import openai_api, openai_chat
from ..scoring import embed_ids
from . import driver, params
from .bodies import DEFAULT_MAX_BODY, dumps, read_json
from .errors import APIError, bad_request, from_exception
from .guard import Guard
from .limits import BUILDERS, SMALL_JOBS, Line

log = logging.getLogger("llama2c.server")

PAGE = Path(__file__).resolve().parent / "static" / "index.html"
MAX_EMBEDDING_INPUTS = 2048


class JSON(JSONResponse):
    def render(self, content) -> bytes:
        return dumps(content).encode("utf-8")


def error_response(err: APIError) -> Response:
    return JSON(err.body(), status_code=err.status, headers=err.headers)


@dataclass
class ServerConfig:
    """What the routes need besides the model and the engine."""
    model_id: str | None = None  # the served model's id (default: its file name)
    api_key: str | None = None
    max_body: int = DEFAULT_MAX_BODY
    bind_host: str = "127.0.0.1"  # for the Host-header check (guard.py)
    allowed_hosts: tuple = ()
    cors_origins: tuple = ()
    max_waiting: int | None = None  # default: the engine's
    extra_model_names: tuple = field(default_factory=tuple)


class Server:
    """The state the routes share: the model, the engine, the limits."""

    def __init__(self, llama, engine, config: ServerConfig):
        self.llama, self.engine, self.config = llama, engine, config
        path = llama.model_path
        self.model_id = config.model_id or os.path.basename(path)
        names = [self.model_id, path, os.path.abspath(path), os.path.realpath(path), *config.extra_model_names]
        self.model_names = tuple(dict.fromkeys(names))
        try:
            self.created = int(os.stat(path).st_mtime)
        except OSError:
            self.created = 0
        waiting = config.max_waiting if config.max_waiting is not None else getattr(engine, "max_waiting", 64)
        self.generation = anyio.CapacityLimiter(BUILDERS)
        self.embeddings = Line(1, waiting, "embedding")
        self.small = anyio.CapacityLimiter(SMALL_JOBS)
        self._hub: driver.Hub | None = None
        llama.tokenizer  # noqa: B018 -- load it now, not in the first requests' threads at once
        self.page, self.page_csp = _page()

    # ---- helpers ----
    async def body(self, request: Request):
        return await read_json(request.headers.get("content-length"), request.stream(), self.config.max_body)

    def check_model(self, body: params.Body) -> None:
        params.check_model(body, self.model_names)

    # ---- generation ----
    def hub(self) -> driver.Hub:
        """The engine's waker for the running event loop."""
        loop = asyncio.get_running_loop()
        if self._hub is None or self._hub.loop is not loop:
            self._hub = driver.Hub(loop)
        return self._hub

    async def generate(self, request: Request, req: params.Request, build, prompt_param: str) -> Response:
        """The builder (in a worker thread: tokenizing, checks) queues the
        request in the engine; its steps then come to the loop (driver.py),
        streamed as events or collected into the whole result. The builder
        always makes a stream: its ChunkStream gives the whole result too."""
        runner = driver.Runner(self.engine, self.hub())
        kwargs = dict(req.kwargs, model=self.model_id, runner=runner, stream=True)
        try:
            stream = await anyio.to_thread.run_sync(lambda: build(self.llama, **kwargs), limiter=self.generation)
        except BaseException as e:
            runner.cancel()
            if not isinstance(e, Exception):
                raise
            return self.fail(e, prompt_param)
        gen = driver.Generation(stream, runner, stream_events=req.stream)
        if req.stream:
            return driver.EventStream(gen, req.include_usage)
        try:
            result = await driver.whole(gen, request.receive)
        except Exception as e:  # noqa: BLE001
            return self.fail(e, prompt_param)
        if result is None:
            return Response(status_code=499)  # nobody is listening
        return JSON(result)

    def fail(self, exc: BaseException, prompt_param: str | None = None) -> Response:
        err = from_exception(exc, prompt_param)
        if err.status >= 500:
            log.error("request failed", exc_info=exc)
        return error_response(err)


def _page() -> tuple[bytes, str]:
    """The chat page and its Content-Security-Policy: its one inline script
    and style allowed by hash, nothing loaded from elsewhere."""
    html = PAGE.read_bytes()

    def hashes(tag: str) -> str:
        found = re.findall(rb"<" + tag.encode() + rb">(.*?)</" + tag.encode() + rb">", html, re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(x).digest()).decode()}'" for x in found)

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, csp


def endpoint(fn):
    """A route whose failures become OpenAI-shaped errors (500s logged, no
    traceback in the body)."""
    async def route(request: Request) -> Response:
        server: Server = request.app.state.server
        try:
            return await fn(server, request)
        except Exception as e:  # noqa: BLE001
            return server.fail(e)
    route.__name__ = fn.__name__
    return route


@endpoint
async def completions(server: Server, request: Request) -> Response:
    body = params.Body(await server.body(request))
    server.check_model(body)
    req = params.completion_request(body.data)
    return await server.generate(request, req, openai_api.create_completion, "prompt")


@endpoint
async def chat_completions(server: Server, request: Request) -> Response:
    body = params.Body(await server.body(request))
    server.check_model(body)
    req = params.chat_request(body.data)
    return await server.generate(request, req, openai_chat.create_chat_completion, "messages")


def _embed(server: Server, inputs: list, fmt: str) -> dict:
    """Texts through Llama.create_embedding (the Python API's); token-id
    inputs through the same pooling over those ids. An input longer than the
    context is a 400 (the Python API would keep its first n_ctx tokens)."""
    llama = server.llama
    n_ctx = llama.n_ctx
    if isinstance(inputs[0], str):
        lengths = [len(llama.tokenize(t)) for t in inputs]
    else:
        vocab = llama.config.vocab_size
        for ids in inputs:
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise bad_request(f"token {bad[0]} out of range [0, {vocab})", "input", "invalid_value")
        lengths = [len(ids) for ids in inputs]
    for i, n in enumerate(lengths):
        if n > n_ctx:
            raise bad_request(f"input {i} is {n} tokens and the context holds {n_ctx}", "input",
                              "context_length_exceeded")
    if isinstance(inputs[0], str):
        result = llama.create_embedding(inputs, model=server.model_id)
    else:
        context = llama._side_context()
        vectors = [embed_ids(context, ids).tolist() for ids in inputs]
        n = sum(lengths)
        result = {"object": "list", "model": server.model_id,
                  "data": [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)],
                  "usage": {"prompt_tokens": n, "total_tokens": n}}
    if fmt == "base64":
        for item in result["data"]:
            item["embedding"] = base64.b64encode(np.asarray(item["embedding"], dtype="<f4").tobytes()).decode()
    return result


@endpoint
async def embeddings(server: Server, request: Request) -> Response:
    data = await server.body(request)
    body = params.Body(data)
    server.check_model(body)
    inputs, _, fmt = params.embedding_inputs(data)
    params.check_dimensions(data, server.llama.config.dim)
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise bad_request(f"at most {MAX_EMBEDDING_INPUTS} inputs per request (got {len(inputs)})", "input",
                          "invalid_value")
    async with server.embeddings.turn():
        result = await anyio.to_thread.run_sync(lambda: _embed(server, inputs, fmt), limiter=server.small)
    return JSON(result)


def _model_card(server: Server) -> dict:
    c = server.llama.config
    return {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "llama2c",
            "meta": {"n_ctx": int(server.llama.n_ctx), "n_ctx_train": c.seq_len, "n_vocab": c.vocab_size,
                     "n_embd": c.dim, "n_params": c.n_params, "weights": c.weights, "size": c.file_size}}


@endpoint
async def models(server: Server, request: Request) -> Response:
    return JSON({"object": "list", "data": [_model_card(server)]})


@endpoint
async def model(server: Server, request: Request) -> Response:
    name = request.path_params["model"]
    if name not in server.model_names:
        raise APIError(404, f"the model '{name}' does not exist: this server serves '{server.model_id}'",
                       param="model", code="model_not_found")
    return JSON(_model_card(server))


@endpoint
async def health(server: Server, request: Request) -> Response:
    stats = server.engine.stats()
    return JSON({"status": "ok", "model": server.model_id, **stats})


def _tokenize(server: Server, data) -> dict:
    body = params.Body(data)
    content = body.data.get("content")
    if not isinstance(content, str):
        raise params._wrong("content", "a string", content)
    ids = server.llama.tokenize(content, bos=body.boolean("add_special", False))
    if body.boolean("with_pieces", False):
        tok = server.llama.tokenizer
        pieces = []
        for t in ids:
            raw = tok.piece(t)
            try:
                piece = raw.decode("utf-8")
            except UnicodeDecodeError:
                piece = list(raw)  # a piece that is not whole UTF-8: its bytes, as llama.cpp gives them
            pieces.append({"id": t, "piece": piece})
        return {"tokens": pieces}
    return {"tokens": ids}


def _detokenize(server: Server, data) -> dict:
    body = params.Body(data)
    tokens = body.data.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise params._wrong("tokens", "an array of token ids", tokens)
    return {"content": server.llama.detokenize(tokens)}


@endpoint
async def tokenize(server: Server, request: Request) -> Response:
    data = await server.body(request)
    return JSON(await anyio.to_thread.run_sync(lambda: _tokenize(server, data), limiter=server.small))


@endpoint
async def detokenize(server: Server, request: Request) -> Response:
    data = await server.body(request)
    return JSON(await anyio.to_thread.run_sync(lambda: _detokenize(server, data), limiter=server.small))


@endpoint
async def page(server: Server, request: Request) -> Response:
    return Response(server.page, media_type="text/html; charset=utf-8",
                    headers={"Content-Security-Policy": server.page_csp, "X-Content-Type-Options": "nosniff",
                             "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"})


async def http_error(request: Request, exc: HTTPException) -> Response:
    """Unknown routes (404) and wrong methods (405), OpenAI-shaped."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return error_response(APIError(exc.status_code, message.get(exc.status_code, str(exc.detail)), code=code,
                                   headers=exc.headers))


def create_app(llama, engine, config: ServerConfig | None = None):
    """The ASGI app serving `llama` through `engine` (a BatchEngine, or
    anything with its run/stats). The caller owns the engine (and closes it)."""
    from .guard import allowed_hosts

    config = config or ServerConfig()
    routes = [Route("/", page, methods=["GET"]), Route("/health", health, methods=["GET"])]
    for prefix in ("/v1", ""):
        routes += [
            Route(f"{prefix}/completions", completions, methods=["POST"]),
            Route(f"{prefix}/chat/completions", chat_completions, methods=["POST"]),
            Route(f"{prefix}/embeddings", embeddings, methods=["POST"]),
            Route(f"{prefix}/models", models, methods=["GET"]),
            Route(f"{prefix}/models/{{model:path}}", model, methods=["GET"]),
        ]
    routes += [Route("/tokenize", tokenize, methods=["POST"]), Route("/detokenize", detokenize, methods=["POST"]),
               Route("/v1/health", health, methods=["GET"])]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.server = Server(llama, engine, config)
    asgi = Guard(app, config.api_key, allowed_hosts(config.bind_host, config.allowed_hosts))
    if config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        asgi = CORSMiddleware(asgi, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                              allow_headers=["Authorization", "Content-Type"])
    asgi.state = app.state  # the tests and the CLI reach the Server through it
    return asgi
