"""Hugging Face folders in, without torch: ``llama2c.Llama("path/to/hf_folder")``.

A Llama folder (config.json, safetensors shards, tokenizer.model) is converted
once into a .bin the engine maps, in a cache folder, and reused from there:

    bin_path, tokenizer_path = resolve_hf_folder("Llama-2-7b-hf", dtype="bf16")

- dtype: "fp32" (version 3: fp32 with rope_theta / norm_eps), "bf16"
  (version 4), "int8" (version 2, Q8_0 with the default group size) or "q4_0"
  (version 5, llama.cpp's 4-bit blocks); None
  picks bf16 when config.json says the weights are bfloat16 (torch_dtype /
  dtype), else fp32. The q/k permutation of HF's checkpoints is undone on the
  way (export/sources.py, HFSource).
- cache: ``<cache_dir>/<key>/model.bin`` (+ ``tokenizer.bin`` and a small
  ``source.json`` saying where it came from), default cache_dir
  ``$XDG_CACHE_HOME/llama2c/hf`` or ``~/.cache/llama2c/hf``. The key hashes
  the dtype and the names, sizes and modification times of config.json,
  the weight files and tokenizer.model (and config.json's bytes): changing
  any of them converts again; delete the folder to reclaim the space. Every
  file is written atomically (llama2c/outputs.py), so an interrupted
  conversion leaves nothing a later run would take for finished.
- tokenizer: a byte-level BPE tokenizer.json (Llama 3 style, or any
  tokenizer.json without a tokenizer.model beside it) is used as it is,
  through the `tokenizers` library (hf_tokenizer.py, the `hf` extra);
  otherwise the folder's tokenizer.model becomes tokenizer.bin (needs
  sentencepiece). A tokenizer the caller passes wins; a folder without
  one gets none (forward() works, text needs tokenizer=).
- rope scaling: config.json's rope_scaling / rope_parameters of type
  "linear" or "llama3" goes into the .bin header (docs/FORMAT.md); int8
  (version 2) cannot hold it and is refused.

Safetensors are read in numpy (export/safetensors_np.py); only a folder of
pytorch_model*.bin files needs torch. numpy only otherwise.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from .errors import FormatError, InvalidArgumentError, Llama2IOError

__all__ = ["resolve_hf_folder", "llama_inputs", "default_cache_dir", "cache_key", "weight_files", "DTYPES"]

# dtype -> .bin version
DTYPES = {"fp32": 3, "bf16": 4, "int8": 2, "q4_0": 5}
_ALIASES = {"float32": "fp32", "f32": "fp32", "bfloat16": "bf16", "q8_0": "int8", "q4": "q4_0"}
CACHE_FORMAT = "llama2c-hf-cache-1"   # part of the key: bump when the conversion changes


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llama2c" / "hf"


def _config(folder: Path) -> dict:
    cj = folder / "config.json"
    if not cj.is_file():  # a directory that is not a model folder: refused as the engine refuses it
        raise Llama2IOError(f"{folder}: not a regular file (a directory without config.json, so not a "
                            "Hugging Face model folder either)")
    try:
        cfg = json.loads(cj.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{cj}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{cj}: not a JSON object")
    return cfg


def choose_dtype(dtype, cfg: dict) -> str:
    """dtype as one of DTYPES (None: the folder's own, bf16 or fp32)."""
    if dtype is None:
        stored = cfg.get("torch_dtype", cfg.get("dtype"))
        return "bf16" if stored in ("bfloat16", "torch.bfloat16") else "fp32"
    if not isinstance(dtype, str):
        raise InvalidArgumentError(f"dtype must be one of {', '.join(DTYPES)} or None (got {dtype!r})")
    d = _ALIASES.get(dtype.lower(), dtype.lower())
    if d not in DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {', '.join(DTYPES)} or None (got {dtype!r})")
    return d


def weight_files(folder: Path) -> list[Path]:
    """The files a conversion reads: config.json, weights (and their index),
    tokenizer.model."""
    pats = ("config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
            "pytorch_model.bin.index.json", "tokenizer.model")
    return sorted({p for pat in pats for p in folder.glob(pat) if p.is_file()}, key=lambda p: p.name)


def cache_key(folder: Path, dtype: str) -> str:
    """A digest of what the converted files depend on (see the module docstring)."""
    h = hashlib.sha256()
    h.update(f"{CACHE_FORMAT}\0{dtype}\0".encode())
    for p in weight_files(folder):
        st = p.stat()  # follows huggingface_hub's snapshot symlinks to the blobs
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    h.update((folder / "config.json").read_bytes())
    return h.hexdigest()[:32]


def _tokenizer_bin(folder: Path, out: Path) -> Path | None:
    model = folder / "tokenizer.model"
    if not model.is_file():
        return None
    if out.is_file():
        return out
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        raise ImportError(
            f"{model} is a SentencePiece model: converting it to tokenizer.bin needs sentencepiece "
            "(pip install sentencepiece); or pass tokenizer= (a tokenizer.bin) to Llama()",
            name="sentencepiece") from None
    from .export.sources import inside_folder
    from .export.tokenizer_bin import export_tokenizer

    inside_folder(folder, "tokenizer.model", str(folder))
    return export_tokenizer(model, out, force=True)


def bpe_tokenizer_json(folder: Path) -> Path | None:
    """The folder's tokenizer.json when it is the tokenizer to use: a
    byte-level BPE one (Llama 3 style), or any when there is no
    tokenizer.model (SentencePiece, run by the C tokenizer) beside it."""
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        return None
    if not (folder / "tokenizer.model").is_file():
        return tj
    from .hf_tokenizer import is_byte_level

    try:
        spec = json.loads(tj.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{tj}: not valid JSON ({e})") from None
    return tj if isinstance(spec, dict) and is_byte_level(spec) else None


def resolve_hf_folder(folder, dtype: str | None = None, cache_dir=None, *,
                      need_tokenizer: bool = True, quiet: bool = False) -> tuple[Path, Path | None]:
    """(model.bin, tokenizer or None) for a Hugging Face Llama folder,
    converted on first use into the cache (see the module docstring). The
    tokenizer is the folder's own tokenizer.json for byte-level BPE
    vocabularies (read by hf_tokenizer.py, not converted), else tokenizer.bin
    converted from tokenizer.model. need_tokenizer=False: the caller has a
    tokenizer; the folder's is not looked at."""
    folder = Path(folder)
    cfg = _config(folder)
    dt = choose_dtype(dtype, cfg)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key_dir = root / cache_key(folder, dt)
    key_dir.mkdir(parents=True, exist_ok=True)
    # the tokenizer first: a missing sentencepiece / tokenizers fails before minutes of conversion
    tok = bpe_tokenizer_json(folder) if need_tokenizer else None
    if tok is not None:
        from .export.sources import inside_folder
        from .hf_tokenizer import require_tokenizers

        inside_folder(folder, tok.name, str(folder))
        require_tokenizers()
    elif need_tokenizer:
        tok = _tokenizer_bin(folder, key_dir / "tokenizer.bin")
    model = key_dir / "model.bin"
    if not model.is_file():
        _convert(folder, model, dt, quiet)
        _write_source_note(key_dir, folder, dt)
    return model, tok


def _convert(folder: Path, model: Path, dt: str, quiet: bool) -> None:
    from .export.sources import HFSource
    from .export.writers import warn_lossy, write_bin

    try:
        with HFSource(folder) as src:
            a = src.args
            if DTYPES[dt] == 2 and (warn_lossy(a, 2) or a.rope_scaling is not None):
                what = f"{a.rope_scaling.type} rope scaling" if a.rope_scaling is not None else \
                    f"rope_theta {a.rope_theta:g} / norm_eps {a.norm_eps:g}"
                raise InvalidArgumentError(
                    f"dtype='int8' stores a version 2 file, which cannot hold this model's {what}; use "
                    "dtype='fp32' or 'bf16' with quantize=True to run it with the int8 engine")
            if not quiet:
                print(f"llama2c: converting {folder} to {dt} in {model.parent} (once; reused from the cache "
                      "next time)", file=sys.stderr, flush=True)
            write_bin(src, model, DTYPES[dt], force=True)
    except ImportError as e:
        if e.name == "torch":
            raise ImportError(f"{folder} holds pytorch_model*.bin weights: reading them needs torch "
                              "(safetensors folders do not)", name="torch") from None
        raise


def _write_source_note(key_dir: Path, folder: Path, dt: str) -> None:
    from .outputs import atomic_write

    note = {"folder": str(folder.resolve()), "dtype": dt, "version": DTYPES[dt], "format": CACHE_FORMAT}
    with atomic_write(key_dir / "source.json", overwrite=True) as f:
        f.write((json.dumps(note, indent=2) + "\n").encode("utf-8"))


def llama_inputs(model_path, tokenizer, dtype, cache_dir):
    """Llama()'s model_path and tokenizer: a Hugging Face folder becomes its
    cached model.bin (and tokenizer.bin unless a tokenizer is given); a
    file passes unchanged (dtype= / cache_dir= are for folders only)."""
    is_dir = isinstance(model_path, (str, bytes, os.PathLike)) and os.path.isdir(model_path)
    if not is_dir:
        if dtype is not None or cache_dir is not None:
            raise InvalidArgumentError(f"dtype= and cache_dir= are for Hugging Face folders; {model_path!r} "
                                       "is not a folder (quantize=True runs a file with the int8 engine)")
        return model_path, tokenizer
    model, tok = resolve_hf_folder(os.fsdecode(model_path), dtype, cache_dir, need_tokenizer=tokenizer is None)
    return model, tokenizer if tokenizer is not None else tok
