"""`llama2c serve`: loads the model, starts the engine and runs the app
under uvicorn (docs/SERVER.md). The CLI's `serve` subcommand calls serve();
`python -m llama2c.server` is the same command."""
from __future__ import annotations

import sys

from ..cliargs import Parser


def add_arguments(p: Parser) -> None:
    """The serve flags (kebab-case, as every llama2c subcommand)."""
    p.add_argument("model", nargs="?", default=None, help="model .bin (default: the bundled model)")
    p.add_argument("--tokenizer", "-z", default=None, help="tokenizer.bin (default: beside the model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; see docs/SERVER.md before "
                        "binding 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--n-ctx", "-c", type=int, default=None, metavar="N",
                   help="context length of each request's slot (default: the model's seq_len)")
    p.alias("--n-ctx", "--ctx")  # the other subcommands' spelling
    p.add_argument("--parallel", type=int, default=None, metavar="N",
                   help="requests generated at once (default: the engine's choice for this machine)")
    p.add_argument("--queue", type=int, default=64, metavar="N",
                   help="requests that may wait for a slot; one more gets 429 (default 64)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (default: the LLAMA2C_API_KEY environment "
                        "variable, else none)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="threads (default: all cores)")
    p.add_argument("--chat-format", default=None, metavar="NAME|JINJA|FILE",
                   help="chat template: llama-2 (default), chatml, zephyr, a Jinja2 string or file")
    p.add_argument("--quantize", action="store_true", help="run fp32 weights as int8 (Q8_0)")
    p.add_argument("--model-id", default=None, metavar="ID",
                   help="the model's id in the API (default: the model file's name)")
    p.add_argument("--max-body", type=int, default=None, metavar="BYTES",
                   help="largest request body; larger ones get 413 (default 1 MiB)")
    p.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                   help="also answer requests addressed to this host name (repeatable; see docs/SERVER.md)")
    p.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="let web pages from ORIGIN call the API (repeatable; default none)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info)")


def _need_server_extra() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"llama2c serve needs the server extra: pip install 'llama2c[server]' ({e})") from None


def build(args):
    """(llama, engine, app) for parsed serve flags."""
    import os

    from ..bundled import bundled_model
    from ..generate import Llama
    from .app import ServerConfig, create_app
    from .bodies import DEFAULT_MAX_BODY
    from .engine import BatchEngine

    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in [1, 65535] (got {args.port})")
    for flag, value in (("--parallel", args.parallel), ("--max-body", args.max_body)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1 (got {value})")
    if args.queue < 0:
        raise ValueError(f"--queue must be >= 0 (got {args.queue})")
    model, tokenizer = args.model, args.tokenizer
    if model is None:
        model, default_tok = bundled_model()
        tokenizer = tokenizer or default_tok
    llama = Llama(model, tokenizer=tokenizer, n_threads=args.threads, quantize=args.quantize, n_ctx=args.n_ctx,
                  chat_format=args.chat_format)
    llama.chat_template  # noqa: B018 -- a bad --chat-format fails now, not at the first request
    engine = BatchEngine(llama, parallel=args.parallel, max_waiting=args.queue)
    api_key = args.api_key if args.api_key is not None else os.environ.get("LLAMA2C_API_KEY") or None
    config = ServerConfig(model_id=args.model_id, api_key=api_key, max_body=args.max_body or DEFAULT_MAX_BODY,
                          bind_host=args.host, allowed_hosts=tuple(args.allowed_host or ()),
                          cors_origins=tuple(args.cors_origin or ()), max_waiting=args.queue)
    return llama, engine, create_app(llama, engine, config)


def serve(args) -> int:
    _need_server_extra()
    import uvicorn

    from .guard import is_loopback

    llama, engine, app = build(args)
    server = app.state.server
    if not is_loopback(args.host) and not server.config.api_key:
        print(f"llama2c serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              "address can use the model", file=sys.stderr)
    stats = engine.stats()
    print(f"llama2c serve: {server.model_id} (n_ctx {int(llama.n_ctx)}, {stats['parallel']} slots, "
          f"queue {args.queue}) on http://{_url_host(args.host)}:{args.port}/  (API: /v1, chat page: /)",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5, server_header=False,
                            limit_concurrency=max(256, 4 * (stats["parallel"] + args.queue)))
    try:
        uvicorn.Server(config).run()
    finally:
        engine.close()
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
