"""The model to fine-tune, and its tokenizer (no torch).

``open_base(path)`` reads any model we can read: a .bin of any version, a
training checkpoint (``.pt``; also a fine-tune's full checkpoint), a Hugging
Face Llama folder, a GGUF file or Meta's folder. ``find_tokenizer`` picks the
tokenizer to encode the data with.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Tuple


def base_kind(path) -> str:
    """'hf' (a folder with config.json), 'meta' (a folder with params.json),
    'gguf', 'checkpoint' (a PyTorch zip / pickle) or 'bin' (anything else:
    the .bin reader checks it)."""
    p = Path(path)
    if p.is_dir():
        if (p / "config.json").is_file():
            return "hf"
        if (p / "params.json").is_file():
            return "meta"
        raise FileNotFoundError(2, f"{p} is a folder without config.json (not a Hugging Face model) or "
                                   "params.json (Meta's)", str(p))
    if not p.exists():
        raise FileNotFoundError(2, f"no such model: {p}", str(p))
    with open(p, "rb") as f:
        head = f.read(4)
    if head == b"GGUF":
        return "gguf"
    if head[:2] == b"PK" or head[:1] == b"\x80" or p.suffix in (".pt", ".pth"):
        return "checkpoint"
    return "bin"


def open_base(path):
    """(Source, kind) for the model at ``path``."""
    from ..export.sources import open_source

    kind = base_kind(path)
    return open_source(kind, path), kind


def tensors_digest(arrays) -> str:
    """A short sha256 over (name, shape, bytes) of float32 arrays."""
    h = hashlib.sha256()
    for name, a in arrays:
        h.update(name.encode())
        h.update(repr(tuple(a.shape)).encode())
        h.update(memoryview(a.astype("<f4", copy=False).reshape(-1)).cast("B"))
    return h.hexdigest()[:24]


def _is_sentencepiece(path: Path) -> bool:
    return path.suffix == ".model"


def find_tokenizer(explicit: str, base: str, kind: str, data: str = "",
                   extra: Tuple[Path, ...] = ()) -> Optional[Path]:
    """The tokenizer file to use (tokenizer.bin or a SentencePiece .model), or
    None: --tokenizer; else tokenizer.bin beside a .bin or checkpoint (train's
    out_dir has one); a Hugging Face folder's tokenizer.model; the tokenizer
    a prepared data directory keeps (or, for a training checkpoint, the one of
    the data it was trained on); then ``extra``."""
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise FileNotFoundError(2, f"no such tokenizer: {p}", str(p))
        return p
    b = Path(base) if base else None
    candidates = []
    if b is not None:
        if kind == "hf":
            candidates += [b / "tokenizer.bin", b / "tokenizer.model"]
        elif kind == "meta":           # Meta's release keeps tokenizer.model beside the model folders
            candidates += [b / "tokenizer.model", b.parent / "tokenizer.model"]
        else:
            candidates.append(b.parent / "tokenizer.bin")
    for d in [Path(data)] if data else []:
        if d.is_dir() and (d / "meta.json").is_file():
            candidates += _meta_tokenizers(d)
    if b is not None and kind == "checkpoint":
        with contextlib.suppress(Exception):
            import torch

            ck = torch.load(b, map_location="cpu", weights_only=True, mmap=True)
            ddir = (ck.get("config") or {}).get("data") if isinstance(ck, dict) else None
            if ddir and Path(ddir).is_dir():
                candidates += _meta_tokenizers(Path(ddir))
    candidates += list(extra)
    return next((c for c in candidates if c.is_file()), None)


def _meta_tokenizers(d: Path):
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError):
        return []
    return [d / n for n in (meta.get("tokenizer"), meta.get("tokenizer_source")) if n]


def tokenizer_bin(path: Path) -> Tuple[Path, bool]:
    """A tokenizer.bin for ``path``: itself, or a SentencePiece model exported
    to a temporary file (needs sentencepiece). Returns (path, temporary)."""
    if not _is_sentencepiece(path):
        return path, False
    from ..export.tokenizer_bin import export_tokenizer

    fd, tmp = tempfile.mkstemp(prefix=".tokenizer.", suffix=".bin")
    os.close(fd)
    try:
        export_tokenizer(path, tmp, force=True)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp), True


def hf_chat_template(folder: Path) -> Optional[str]:
    """The chat_template of a Hugging Face folder's tokenizer_config.json (or
    chat_template.jinja), if any."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        try:
            found = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError):
            return None
        if isinstance(found, str):
            return found
        if isinstance(found, list):
            named = {t.get("name"): t.get("template") for t in found if isinstance(t, dict)}
            return named.get("default")
    return None


__all__ = ["base_kind", "open_base", "tensors_digest", "find_tokenizer", "tokenizer_bin",
           "hf_chat_template"]
