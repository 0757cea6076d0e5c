"""llama2c._ffi (cffi ABI mode) must declare exactly what csrc/llama2.h
declares: every function with the same signature, every struct with the same
fields in the same order, and the same constant values. In ABI mode a
mismatch is not caught by any compiler; it corrupts memory at run time."""
from __future__ import annotations

import re

import pytest

from helpers import REPO

import llama2c._ffi as ffi_mod  # noqa: E402

HEADER = (REPO / "csrc" / "llama2.h").read_text()


def strip_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", " ", src, flags=re.S)
    return re.sub(r"//[^\n]*", " ", src)


def norm(decl: str) -> str:
    decl = re.sub(r"\s+", " ", decl).strip()
    decl = re.sub(r"\s*([*(),;\[\]])\s*", r"\1", decl)
    return decl


def functions(src: str) -> dict[str, str]:
    src = strip_comments(src).replace("LLAMA2_API", " ")
    src = re.sub(r"^\s*#.*$", " ", src, flags=re.M)
    out = {}
    for m in re.finditer(r"([A-Za-z_][\w\s\*]*?\b(llama2_\w+)\s*\([^;{)]*\))\s*;", src):
        decl = m.group(1)
        if "typedef" in decl:
            continue
        out[m.group(2)] = norm(decl)
    return out


def structs(src: str) -> dict[str, list[str]]:
    src = strip_comments(src)
    out = {}
    for m in re.finditer(r"typedef\s+struct\s*\{(.*?)\}\s*(\w+)\s*;", src, flags=re.S):
        fields = []
        for stmt in m.group(1).split(";"):
            stmt = norm(stmt)
            if not stmt:
                continue
            # "int a, b, c" -> "int a", "int b", "int c"
            base, _, names = stmt.partition(" ")
            if stmt.startswith(("const ", "unsigned ")):
                w = stmt.split(" ")
                base, names = " ".join(w[:2]), " ".join(w[2:])
            for name in names.split(","):
                fields.append(norm(f"{base} {name}"))
        out[m.group(2)] = fields
    return out


HEADER_FUNCS = functions(HEADER)
FFI_FUNCS = functions(ffi_mod.CDEF)


def test_header_parsed():
    assert len(HEADER_FUNCS) >= 25
    assert "llama2_forward" in HEADER_FUNCS and "llama2_transformer_open" in HEADER_FUNCS


@pytest.mark.parametrize("name", sorted(HEADER_FUNCS))
def test_function_declared_identically(name):
    assert name in FFI_FUNCS, f"{name} is declared in llama2.h but not in llama2c/_ffi.py"
    strip_names = re.compile(r"\b\w+(?=[,)])")  # parameter names may differ
    assert strip_names.sub("", FFI_FUNCS[name]) == strip_names.sub("", HEADER_FUNCS[name])


def test_no_extra_functions():
    assert set(FFI_FUNCS) <= set(HEADER_FUNCS)


@pytest.mark.parametrize("name", sorted(structs(HEADER)))
def test_struct_layout(name):
    ffi_structs = structs(ffi_mod.CDEF)
    assert name in ffi_structs, f"struct {name} missing from llama2c/_ffi.py"
    assert ffi_structs[name] == structs(HEADER)[name]


def test_constants():
    src = strip_comments(HEADER)
    defines = {m.group(1): int(m.group(2).rstrip("uU"))
               for m in re.finditer(r"#define\s+LLAMA2_(\w+)\s+(-?\d+[uU]?)\b", src)}
    enums = {}
    for body in re.findall(r"typedef\s+enum\s*\{(.*?)\}", src, flags=re.S):
        for name, value in re.findall(r"LLAMA2_(\w+)\s*=\s*(-?\d+)", body):
            enums[name] = int(value)
    checked = 0
    for name, value in {**defines, **enums}.items():
        for cand in (name, name.removeprefix("OPEN_"), name.removeprefix("TOKEN_")):
            if hasattr(ffi_mod, cand):
                assert getattr(ffi_mod, cand) == value, name
                checked += 1
                break
    assert checked >= 10
