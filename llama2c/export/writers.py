"""Writers: .bin versions 0-5 and Hugging Face folders, from any Source.

Each tensor is read from the source, converted and written before the next
one is read (the progress bar counts tensors), and every file is written to a
temporary file in its destination directory and renamed over the target only
when complete, so a failed export never leaves a partial file behind. An
existing output is replaced only with ``force=True`` (the command's --force).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from ..outputs import atomic_write, refuse_existing
from . import binfmt, hf
from .sources import Source

__all__ = ["atomic_write", "write_bin", "write_hf", "as_source"]


def as_source(obj) -> Source:
    """A Source, a llama2c.model.Transformer, or a path to a .bin file."""
    if isinstance(obj, Source):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        from .sources import BinSource

        return BinSource(obj)
    from .sources import ModelSource

    return ModelSource(obj)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    try:
        from tqdm import tqdm
    except ImportError:          # tqdm is optional: no bar without it
        return contextlib.nullcontext(None)

    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, leave=False)


def _f32(f, a: np.ndarray) -> None:
    a = np.ascontiguousarray(a, dtype="<f4")
    f.write(a.reshape(-1).view(np.uint8))


def warn_lossy(args, version: int) -> str | None:
    """The warning for storing a model whose rope_theta / norm_eps a format
    cannot carry (versions 0-2 imply 10000 and 1e-5)."""
    if version in (0, 1, 2) and (float(np.float32(args.rope_theta)) != 10000.0
                                 or abs(args.norm_eps - 1e-5) > 1e-12):
        return (f"version {version} files carry no rope_theta/norm_eps (readers assume 10000 "
                f"and 1e-5) but this model has rope_theta {args.rope_theta:g}, norm_eps "
                f"{args.norm_eps:g}; use --version 3 to keep them")
    return None


def write_bin(source, path, version: int, group_size: int | None = None, progress: bool = False,
              warn=None, *, force: bool = False) -> Path:
    """Writes `source` (see as_source) as a model file of version 0, 1, 2
    (Q8_0), 3, 4 (bf16 matrices) or 5 (Q4_0 matrices, llama.cpp's reference
    rounding: binfmt.quantize_q4_0; needs dim a multiple of 32; w2 stays fp32
    when hidden_dim is not). group_size (version 2 only): the starting group size,
    halved until it divides dim (default 64). An existing `path` is replaced only
    with force=True (else FileExistsError). Returns the path written."""
    refuse_existing(path, force)
    src = as_source(source)
    a = src.args
    if version not in binfmt.VERSIONS:
        raise ValueError(f"unknown model file version {version} (choose 0, 1, 2, 3, 4 or 5)")
    if a.rope_scaling is not None and version not in (3, 4, 5):  # never dropped silently
        raise ValueError(f"version {version} files cannot carry this model's {a.rope_scaling.type} rope scaling: "
                         "use version 3, 4 or 5")
    msg = warn_lossy(a, version)
    if msg and warn is not None:
        warn(msg)
    params = (a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.max_seq_len)
    binfmt.check_dims(*params)
    if version == 5 and a.dim % binfmt.Q4_BLOCK:
        raise ValueError(f"version 5 (Q4_0) needs dim a multiple of {binfmt.Q4_BLOCK} (got {a.dim})")
    shared = a.tie_embeddings
    L = a.n_layers
    att = [f"layers.{i}.attention_norm.weight" for i in range(L)]
    ffn = [f"layers.{i}.ffn_norm.weight" for i in range(L)]

    def mats(keys):
        return [binfmt.layer_key(i, k) for _, k in keys for i in range(L)]

    gs = None
    if version == 0:
        order = (["tok_embeddings.weight"] + att + mats(binfmt.LAYER_MATRICES[:4]) + ffn
                 + mats(binfmt.LAYER_MATRICES[4:]) + ["norm.weight", "<freq_cis>"])
    else:
        order = att + ffn + ["norm.weight", "tok_embeddings.weight"] + mats(binfmt.LAYER_MATRICES)
    if not shared:
        order.append("output.weight")
    if version == 2:
        if group_size is not None and group_size <= 0:
            raise ValueError(f"group size must be positive, got {group_size}")
        gs = binfmt.default_group_size(a.dim, 64 if group_size is None else group_size)
        if group_size is not None and gs != group_size and warn is not None:
            warn(f"group size {group_size} does not divide dim {a.dim}; using {gs}")
    header = binfmt.pack_header(version, params, shared, gs, a.rope_theta, a.norm_eps, a.rope_scaling)
    q8_keys = set() if version != 2 else {k for k in order if not k.endswith("norm.weight")}
    bf16_keys = set() if version != 4 else {k for k in order if not k.endswith("norm.weight")}
    q4_keys = set() if version != 5 else {
        k for k in order if not k.endswith("norm.weight")
        and (binfmt.v5_w2_is_q4(a.hidden_dim) or not k.endswith("feed_forward.w2.weight"))}
    path = Path(path)
    with atomic_write(path, overwrite=force) as f, _progress(len(order), path.name, progress) as bar:
        f.write(header)
        for key in order:
            if key == "<freq_cis>":
                cos, sin = binfmt.legacy_freq_cis(a.head_size, a.max_seq_len)
                _f32(f, cos)
                _f32(f, sin)
            elif key in bf16_keys:
                f.write(binfmt.to_bf16(src.get(key)).astype("<u2").view(np.uint8))
            elif key in q4_keys:
                try:
                    f.write(binfmt.quantize_q4_0(src.get(key)).reshape(-1))
                except ValueError as e:
                    raise ValueError(f"{key}: {e}") from None
            elif key in q8_keys:
                q, s = binfmt.quantize_q80(src.get(key), gs)
                f.write(q.view(np.uint8))
                _f32(f, s)
            else:
                _f32(f, src.get(key))
            if bar is not None:
                bar.update(1)
    return path


HF_FILES = ("model.safetensors", "config.json", "generation_config.json")
HF_TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def write_hf(source, folder, tokenizer=None, progress: bool = False, *, force: bool = False) -> Path:
    """Writes a Hugging Face LlamaForCausalLM folder: model.safetensors
    (float32, metadata format=pt; q/k permuted to HF's rotary layout),
    config.json, generation_config.json and, given a SentencePiece
    tokenizer.model, that file with tokenizer_config.json and
    special_tokens_map.json. Files of these names already in the folder are
    replaced only with force=True (else FileExistsError, before anything is
    written). Returns the folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a directory")
    for name in HF_FILES + (HF_TOKENIZER_FILES if tokenizer is not None else ()):
        refuse_existing(folder / name, force)
    src = as_source(source)
    a = src.args
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise FileNotFoundError(f"no such tokenizer: {tokenizer}")
    if folder.is_dir():
        # transformers prefers an index or shards over model.safetensors: refuse
        # to leave stale weights beside the new ones
        stale = sorted(p.name for pat in ("model.safetensors.index.json", "model-*-of-*.safetensors",
                                          "pytorch_model*.bin", "pytorch_model.bin.index.json")
                       for p in folder.glob(pat))
        if stale:
            raise FileExistsError(f"{folder} holds other weight files ({', '.join(stale[:3])}); "
                                  "export into an empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    keys = src.keys()
    names = [(hf.hf_name(k), tuple(_shape(src, k))) for k in keys]
    with atomic_write(folder / "model.safetensors", overwrite=force) as f, \
            _progress(len(keys), "model.safetensors", progress) as bar:
        w = hf.SafetensorsWriter(f, names, metadata={"format": "pt"})
        for key, (name, _) in zip(keys, names):
            t = src.get(key)
            n = hf.permuted_heads(key, a.n_heads, a.n_kv_heads)
            if n is not None:
                t = hf.meta_to_hf(t, n)
            w.write(name, t)
            if bar is not None:
                bar.update(1)
        w.finish()
    _write_json(folder / "config.json", hf.config_json(a), force)
    _write_json(folder / "generation_config.json", hf.generation_config_json(), force)
    if tokenizer is not None:
        with atomic_write(folder / "tokenizer.model", overwrite=force) as f, open(tokenizer, "rb") as g:
            shutil.copyfileobj(g, f)
        _write_json(folder / "tokenizer_config.json", hf.tokenizer_config_json(a.max_seq_len), force)
        _write_json(folder / "special_tokens_map.json", hf.special_tokens_map_json(), force)
    return folder


def _shape(src: Source, key: str):
    from .sources import expected_shape

    return expected_shape(src.args, key)


def _write_json(path: Path, obj, force: bool) -> None:
    with atomic_write(path, overwrite=force) as f:
        f.write((json.dumps(obj, indent=2) + "\n").encode("utf-8"))
