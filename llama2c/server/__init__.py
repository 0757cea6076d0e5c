"""`llama2c serve`: an OpenAI-compatible HTTP server over a batching engine
(docs/SERVER.md). Needs the `server` extra (starlette, uvicorn)."""
