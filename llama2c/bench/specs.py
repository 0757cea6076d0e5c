"""What a benchmark run measures: `ModelSpec` (our model file, its tokenizer,
the weight type our engine runs and the vocabulary for its GGUF copy), made
from a standard shape (`shape_models`: random-weight files written once into
the cache directory) or from a model file (`file_model`), and the GGUF copy
llama.cpp runs (`gguf_for`, also cached)."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .weights import SHAPE_LABELS, SHAPES, write_int8_from_fp32, write_random_fp32


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/llama2c/bench (default ~/.cache/llama2c/bench)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llama2c" / "bench"


@dataclass
class ModelSpec:
    """One model to benchmark: our file, its tokenizer, and how to make the GGUF."""
    label: str
    path: Path
    tokenizer: Path | None
    quant: str                 # "fp32", "int8", "bf16" or "q4_0" (how our engine runs it)
    vocab: str | None = None   # for the GGUF: "synthetic", a tokenizer path, or None (beside)


def shape_models(shape: str, quants, cache_dir: Path, seed: int = 1234, log=print) -> list[ModelSpec]:
    """The cached random-weight models of a standard shape (written when missing)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r} (one of {', '.join(SHAPES)})")
    from ..export.vocab import synthetic_vocab, write_tokenizer_bin

    params = SHAPES[shape]
    d = cache_dir / shape
    d.mkdir(parents=True, exist_ok=True)
    tok = d / "tokenizer.bin"
    if not tok.exists():
        write_tokenizer_bin(tok, synthetic_vocab(params[5]))
    fp32 = d / "model-fp32.bin"
    if not fp32.exists():
        log(f"writing {fp32} (random weights, shape {shape})")
        write_random_fp32(fp32, params, seed)
    out = []
    for q in quants:
        if q == "fp32":
            out.append(ModelSpec(SHAPE_LABELS[shape], fp32, tok, "fp32", "synthetic"))
        elif q == "int8":
            int8 = d / "model-int8.bin"
            if not int8.exists():
                log(f"writing {int8}")
                write_int8_from_fp32(fp32, int8)
            out.append(ModelSpec(SHAPE_LABELS[shape], int8, tok, "int8", "synthetic"))
        elif q == "bf16":
            bf16 = d / "model-bf16.bin"
            if not bf16.exists():
                log(f"writing {bf16}")
                from ..export.sources import open_bin
                from ..export.writers import write_bin
                with open_bin(fp32) as src:
                    write_bin(src, bf16, 4)
            out.append(ModelSpec(SHAPE_LABELS[shape], bf16, tok, "bf16", "synthetic"))
        elif q == "q4_0":
            q4 = d / "model-q4_0.bin"
            if not q4.exists():
                log(f"writing {q4}")
                from ..export.sources import open_bin
                from ..export.writers import write_bin
                with open_bin(fp32) as src:
                    write_bin(src, q4, 5)
            out.append(ModelSpec(SHAPE_LABELS[shape], q4, tok, "q4_0", "synthetic"))
        else:
            raise ValueError(f"unknown weight type {q!r} (fp32, int8, bf16 or q4_0)")
    return out


def file_model(path: str, tokenizer: str | None) -> ModelSpec:
    """A model file to benchmark; its tokenizer defaults to tokenizer.bin beside it."""
    from ..export.binmodel import read_model

    p = Path(path)
    m = read_model(p)  # header check (and the version decides the row's weight type)
    tok = Path(tokenizer) if tokenizer else p.resolve().parent / "tokenizer.bin"
    if not tok.exists():
        tok = None
    return ModelSpec(p.name, p, tok, {2: "int8", 4: "bf16", 5: "q4_0"}.get(m.version, "fp32"),
                     os.fspath(tok) if tok else "synthetic")


def gguf_for(spec: ModelSpec, ref_type: str, cache_dir: Path, log=print) -> Path:
    """The GGUF copy of spec's weights (made once, kept beside the cache; remade
    when the model file is newer)."""
    from ..export.gguf import export_gguf

    st = spec.path.stat()
    key = hashlib.sha1(f"{spec.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{spec.vocab}".encode()).hexdigest()[:12]
    if spec.path.resolve().is_relative_to(cache_dir.resolve()):
        out = spec.path.with_name(f"{spec.path.stem}-{ref_type}.gguf")
    else:
        (cache_dir / "gguf").mkdir(parents=True, exist_ok=True)
        out = cache_dir / "gguf" / f"{spec.path.stem}-{key}-{ref_type}.gguf"
    if not out.exists() or out.stat().st_mtime_ns < st.st_mtime_ns:
        log(f"writing {out}")
        export_gguf(spec.path, out, ref_type, vocab=spec.vocab, force=True)
    return out
