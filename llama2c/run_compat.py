"""`llama2c run`: the `run` program's flags and output, driven from Python.

Same flags, defaults and stdout as csrc/cli.c (and so llama2.c's `run`).
"""
from __future__ import annotations

import sys
import time

from . import _ffi
from ._ffi import ffi, lib
from .errors import new_error, raise_for

USAGE = """usage: llama2c run <model.bin> [options]
  -t <float>  temperature, 0 = greedy (default 1.0)
  -p <float>  top-p (nucleus) threshold in [0,1] (default 0.9)
  -s <int>    random seed; 0 or negative seeds from the clock (default)
  -n <int>    number of steps, 0 = the model's seq_len (default 256)
  -i <string> prompt
  -z <string> tokenizer file (default: tokenizer.bin)
  -m <string> mode: generate or chat (default generate)
  -y <string> system prompt for chat mode
  -c <int>    context length in tokens, 0 = the model's seq_len (default 0)"""


def _usage(why: str) -> int:
    print(f"llama2c run: {why}\n\n{USAGE}", file=sys.stderr)
    return 1


def _c_atoi(s: str) -> int:
    s = s.strip()
    sign, i = 1, 0
    if s[:1] in "+-" and s:
        sign, i = (-1 if s[0] == "-" else 1), 1
    digits = ""
    while i < len(s) and s[i].isdigit():
        digits += s[i]
        i += 1
    return sign * int(digits) if digits else 0


def _to_int32(v: int) -> int:
    """What C's atoi leaves of a larger number on glibc: the low 32 bits, signed."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _c_atof(s: str) -> float:
    s = s.strip()
    for end in range(len(s), 0, -1):
        try:
            return float(s[:end])
        except ValueError:
            continue
    return 0.0


def main(argv: list[str]) -> int:
    from .generate import Llama
    from .sampler import Sampler

    if not argv or argv[0] in ("-h", "--help"):
        return _usage("a model file is required")
    model = argv[0]
    opts = {"t": "1.0", "p": "0.9", "s": "0", "n": "256", "i": None, "z": "tokenizer.bin",
            "m": "generate", "y": None, "c": "0"}
    rest = argv[1:]
    for k in range(0, len(rest), 2):
        flag = rest[k]
        if len(flag) != 2 or flag[0] != "-" or flag[1] not in opts:
            return _usage(f"unknown option {flag}")
        if k + 1 >= len(rest):
            return _usage(f"option {flag} is missing its value")
        opts[flag[1]] = rest[k + 1]
    if opts["m"] not in ("generate", "chat"):
        return _usage("mode must be generate or chat")
    temperature, topp = _c_atof(opts["t"]), _c_atof(opts["p"])
    seed, steps = _to_int32(_c_atoi(opts["s"])), _to_int32(_c_atoi(opts["n"]))
    if seed <= 0:
        seed = int(time.time()) & 0xFFFFFFFF
    temperature = max(temperature, 0.0)
    if not 0.0 <= topp <= 1.0:
        topp = 0.9
    steps = max(steps, 0)
    n_ctx = _to_int32(_c_atoi(opts["c"]))
    if n_ctx < 0:
        return _usage("the context length must be >= 0")

    llama = Llama(model, tokenizer=opts["z"], n_ctx=n_ctx or None)
    context = llama.create_context()
    sampler = Sampler(llama.config.vocab_size, temperature=temperature, topp=topp, seed=seed)
    mode = _ffi.MODE_CHAT if opts["m"] == "chat" else _ffi.MODE_GENERATE
    prompt = (opts["i"] or "").encode() if mode == _ffi.MODE_GENERATE else b""
    out, err = ffi.new("llama2_session **"), new_error()
    raise_for(lib.llama2_session_new_ctx(out, context._ptr, llama.tokenizer._ptr, sampler._ptr, mode,
                                         prompt, len(prompt), steps, err), err)
    session = ffi.gc(out[0], lib.llama2_session_free)
    step = ffi.new("llama2_step *")
    stdout = sys.stdout.buffer
    start, pos, system = None, 0, None
    while True:
        raise_for(lib.llama2_session_step(session, step, err), err)
        pos = step.pos
        if step.kind == _ffi.STEP_DONE:
            break
        if step.kind == _ffi.STEP_NEED_INPUT:
            first = lib.llama2_session_pos(session) == 0
            try:
                if first and opts["y"] is not None:
                    system = opts["y"]
                elif first:
                    try:
                        system = _read("Enter system prompt (optional): ")
                    except EOFError:
                        system = ""  # no input: no system prompt
                user = opts["i"] if first and opts["i"] is not None else _read("User: ")
            except EOFError:
                break
            s = (system or "").encode() if first else b""
            u = user.encode()
            raise_for(lib.llama2_session_chat_input(session, s, len(s), u, len(u), err), err)
            stdout.write(b"Assistant: ")
            stdout.flush()
            continue
        if step.text_len:
            stdout.write(ffi.unpack(step.text, step.text_len))
            stdout.flush()
        if start is None and mode == _ffi.MODE_GENERATE:
            start = time.time()
    stdout.write(b"\n")
    stdout.flush()
    if mode == _ffi.MODE_GENERATE and pos > 1 and start is not None:
        elapsed = max(time.time() - start, 1e-9)
        print(f"achieved tok/s: {(pos - 1) / elapsed:f}", file=sys.stderr)
    return 0


def _read(guide: str) -> str:
    sys.stdout.write(guide)
    sys.stdout.flush()
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line[:-1] if line.endswith("\n") else line
