"""Readers: a model's hyperparameters and its weights, one tensor at a time.

Every reader is a `Source`: `.args` (a resolved ModelArgs: hidden_dim and
n_kv_heads set, tie_embeddings telling whether the classifier is the
embedding) and `.get(key)`, a float32 numpy array in Meta layout for a
canonical key (llama2c.model's state_dict names). Nothing is read before it
is asked for, so writers can stream a 7B model through a few hundred MB.

- BinSource: this project's / llama2.c's .bin files, versions 0-5 (v2 and
  v5 dequantized), memory-mapped.
- CheckpointSource: a training checkpoint {"model": state_dict,
  "model_args": dict}, torch.load(weights_only=True, mmap=True).
- StateDictSource / ModelSource: tensors already in memory (a Transformer).
- MetaSource: Meta's consolidated.*.pth shards + params.json.
- HFSource: a Hugging Face Llama folder (safetensors or pytorch_model*.bin,
  sharded or not), with HF's q/k permutation undone.
- GGUFSource (gguf_source.py): a llama.cpp GGUF file, every tensor type the
  gguf package dequantizes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import FormatError
from ..validate import regular_file
from ..model_args import ModelArgs
from ..rope_scaling import RopeScaling
from . import binfmt, hf
from .source_base import Source, _resolved_args, _to_numpy, canonical_keys, expected_shape  # noqa: F401

__all__ = ["Source", "BinSource", "CheckpointSource", "StateDictSource", "ModelSource", "MetaSource",
           "HFSource", "open_bin", "open_source", "canonical_keys", "expected_shape"]


# ---------------------------------------------------------------------------
# .bin files
# ---------------------------------------------------------------------------


class BinSource(Source):
    """A model file of version 0 to 5 (see docs/FORMAT.md). The file
    is memory-mapped and its header and exact size are checked on open."""

    def __init__(self, path):
        self.path = Path(path)
        self.name = str(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(binfmt.HEADER_BYTES)
        if len(head) < binfmt.LEGACY_HEADER_BYTES:
            raise FormatError(f"{path}: file too short for a model header ({size} bytes)")
        magic = struct.unpack_from("<I", head, 0)[0]
        theta, eps, gs, scaling = 10000.0, 1e-5, None, None
        if magic == binfmt.MAGIC:
            if len(head) < binfmt.HEADER_BYTES:
                raise FormatError(f"{path}: truncated header ({size} bytes)")
            version = struct.unpack_from("<i", head, 4)[0]
            if version not in (1, 2, 3, 4, 5):
                raise FormatError(f"{path}: unsupported model file version {version}")
            p = list(struct.unpack_from("<7i", head, 8))
            shared = head[36] != 0
            if version == 2:
                gs = struct.unpack_from("<i", head, 37)[0]
            if version in (3, 4, 5):
                theta, eps = (float(v) for v in struct.unpack_from("<ff", head, 40))
                try:
                    scaling = RopeScaling.unpack(head, str(path))
                except ValueError as e:
                    raise FormatError(str(e)) from None
            body = binfmt.HEADER_BYTES
        else:
            version = 0
            p = list(struct.unpack_from("<7i", head, 0))
            shared = p[5] > 0
            p[5] = abs(p[5])
            body = binfmt.LEGACY_HEADER_BYTES
        dim, hidden, L, H, KV, V, S = p
        try:
            binfmt.check_dims(*p, where=str(path))
            binfmt.check_float_param("rope_theta", theta, str(path))
            binfmt.check_float_param("norm_eps", eps, str(path))
        except ValueError as e:
            raise FormatError(str(e)) from None
        if version == 2 and (gs <= 0 or dim % gs != 0):
            raise FormatError(f"{path}: bad group_size {gs} for dim {dim}")
        if version == 5 and dim % binfmt.Q4_BLOCK != 0:
            raise FormatError(f"{path}: version 5 (Q4_0) needs dim a multiple of {binfmt.Q4_BLOCK} (got {dim})")
        self.version, self.group_size = version, gs
        self.args = _resolved_args(dim=dim, hidden_dim=hidden, n_layers=L, n_heads=H, n_kv_heads=KV,
                                   vocab_size=V, max_seq_len=S, rope_theta=theta, norm_eps=eps,
                                   tie_embeddings=shared, rope_scaling=scaling)
        self._layout, end = self._plan(body)
        if end != size:
            what = "truncated" if size < end else "trailing bytes"
            raise FormatError(f"{path}: {what}: the header implies {end} bytes, the file has {size}")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")

    def _plan(self, off: int):
        """key -> (offset, shape) of fp32 tensors, or (offset, shape, kind) with
        kind 'q8', 'bf16' or 'q4'."""
        a = self.args
        L, d, V = a.n_layers, a.dim, a.vocab_size
        lay: dict = {}
        per_layer = {k: expected_shape(a, binfmt.layer_key(0, k)) for _, k in binfmt.LAYER_MATRICES}

        def f32_stack(key_fn, shape):
            nonlocal off
            n = int(np.prod(shape))
            for i in range(L):
                lay[key_fn(i)] = (off, shape)
                off += 4 * n

        def f32(key, shape):
            nonlocal off
            lay[key] = (off, shape)
            off += 4 * int(np.prod(shape))

        def norms_att():
            f32_stack(lambda i: f"layers.{i}.attention_norm.weight", (d,))

        def norms_ffn():
            f32_stack(lambda i: f"layers.{i}.ffn_norm.weight", (d,))

        if self.version == 0:
            f32("tok_embeddings.weight", (V, d))
            norms_att()
            for name, k in binfmt.LAYER_MATRICES[:4]:
                f32_stack(lambda i, k=k: binfmt.layer_key(i, k), per_layer[k])
            norms_ffn()
            for name, k in binfmt.LAYER_MATRICES[4:]:
                f32_stack(lambda i, k=k: binfmt.layer_key(i, k), per_layer[k])
            f32("norm.weight", (d,))
            off += 2 * 4 * a.max_seq_len * (a.head_size // 2)      # freq_cis tables
            if not a.tie_embeddings:
                f32("output.weight", (V, d))
            return lay, off
        norms_att()
        norms_ffn()
        f32("norm.weight", (d,))
        gs = self.group_size
        kinds = {1: ("f32", lambda n: 4 * n), 3: ("f32", lambda n: 4 * n),
                 4: ("bf16", lambda n: 2 * n),
                 2: ("q8", lambda n: n + 4 * (n // gs)),
                 5: ("q4", binfmt.q4_0_bytes)}
        kind, nbytes = kinds[self.version]

        def matrix(key, shape, kind=kind, nbytes=nbytes):
            nonlocal off
            lay[key] = (off, shape) if kind == "f32" else (off, shape, kind)
            off += nbytes(int(np.prod(shape)))

        matrix("tok_embeddings.weight", (V, d))
        for _, k in binfmt.LAYER_MATRICES:
            fp32_w2 = self.version == 5 and k == "feed_forward.w2.weight" and not binfmt.v5_w2_is_q4(a.hidden_dim)
            for i in range(L):
                if fp32_w2:     # version 5: w2 rows that are not whole blocks stay fp32
                    matrix(binfmt.layer_key(i, k), per_layer[k], *kinds[1])
                else:
                    matrix(binfmt.layer_key(i, k), per_layer[k])
        if not a.tie_embeddings:
            matrix("output.weight", (V, d))
        return lay, off

    def _get(self, key: str) -> np.ndarray:
        entry = self._layout[key]
        off, shape = entry[0], entry[1]
        n = int(np.prod(shape))
        if len(entry) == 2:
            return np.frombuffer(self._map, dtype="<f4", count=n, offset=off).reshape(shape).copy()
        if entry[2] == "bf16":
            return binfmt.from_bf16(np.frombuffer(self._map, dtype="<u2", count=n, offset=off)).reshape(shape)
        if entry[2] == "q4":
            return binfmt.dequantize_q4_0(self.q4_tensor(key), shape)
        gs = self.group_size
        q = np.frombuffer(self._map, dtype=np.int8, count=n, offset=off)
        s = np.frombuffer(self._map, dtype="<f4", count=n // gs, offset=off + n)
        return binfmt.dequantize_q80(q, s, gs).reshape(shape)

    def view(self, key: str) -> np.ndarray:
        """The tensor `key` as float32: a read-only view of the mapping for
        fp32 tensors (no copy), else the widened / dequantized array."""
        entry = self._layout[key]
        if len(entry) != 2:
            return self.get(key)
        off, shape = entry
        return np.frombuffer(self._map, dtype="<f4", count=int(np.prod(shape)), offset=off).reshape(shape)

    def stacked(self, name: str) -> np.ndarray:
        """Every layer's `name` tensor (e.g. "attention.wq.weight") as one
        (n_layers, ...) float32 array: a view of the mapping when the layers
        are consecutive fp32 tensors (versions 0, 1, 3), else stacked copies."""
        entries = [self._layout[binfmt.layer_key(i, name)] for i in range(self.args.n_layers)]
        off0, shape = entries[0][0], entries[0][1]
        n = int(np.prod(shape))
        if all(len(e) == 2 and e[0] == off0 + 4 * n * i for i, e in enumerate(entries)):
            return np.frombuffer(self._map, dtype="<f4", count=n * len(entries), offset=off0).reshape(
                (len(entries), *shape))
        return np.stack([self.get(binfmt.layer_key(i, name)) for i in range(len(entries))])

    def q8_tensor(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """The stored int8 values and scales of a version 2 matrix."""
        off, shape, _ = self._layout[key]
        n = int(np.prod(shape))
        q = np.frombuffer(self._map, dtype=np.int8, count=n, offset=off).copy()
        s = np.frombuffer(self._map, dtype="<f4", count=n // self.group_size, offset=off + n).copy()
        return q, s

    def q4_tensor(self, key: str) -> np.ndarray:
        """The stored Q4_0 blocks of a version 5 matrix (uint8, 18 bytes per 32 values)."""
        entry = self._layout[key]
        if len(entry) != 3 or entry[2] != "q4":
            raise KeyError(f"{key} is not a Q4_0 tensor")
        off, shape, _ = entry
        return np.frombuffer(self._map, dtype=np.uint8, count=binfmt.q4_0_bytes(int(np.prod(shape))), offset=off)

    def close(self) -> None:
        self._map = None


def open_bin(path) -> BinSource:
    regular_file(path)
    return BinSource(path)


# ---------------------------------------------------------------------------
# in-memory tensors and training checkpoints
# ---------------------------------------------------------------------------


def _strip_prefixes(sd: dict) -> dict:
    """Drops the wrappers' prefixes: torch.compile (_orig_mod.), DDP (module.)."""
    out = {}
    for k, v in sd.items():
        for pre in ("_orig_mod.", "module."):
            while k.startswith(pre):
                k = k[len(pre):]
        out[k] = v
    return out


def _same_tensor(a, b) -> bool:
    import torch

    if a is b:
        return True
    if a.shape != b.shape:
        return False
    try:
        if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
            return True
    except RuntimeError:
        pass
    return bool(torch.equal(a, b))


class StateDictSource(Source):
    """Tensors already loaded: a llama2c.model state_dict and its ModelArgs
    (or a dict of them). tie_embeddings is decided by the tensors: tied when
    output.weight is absent or equal to the embedding (like llama2.c's
    export), unless `tied` forces it."""

    def __init__(self, args, state_dict: dict, name: str = "model", tied: bool | None = None):
        self.name = name
        sd = _strip_prefixes(state_dict)
        if "tok_embeddings.weight" not in sd:
            raise FormatError(f"{name}: no tok_embeddings.weight in the state_dict")
        emb = sd["tok_embeddings.weight"]
        fields = dataclasses.asdict(args) if isinstance(args, ModelArgs) else dict(args)
        fields = {k: v for k, v in fields.items() if k in {f.name for f in dataclasses.fields(ModelArgs)}}
        if tied is None:
            out = sd.get("output.weight")
            tied = out is None or _same_tensor(out, emb)
        fields["tie_embeddings"] = bool(tied)
        fields["vocab_size"] = int(emb.shape[0])
        w1 = sd.get("layers.0.feed_forward.w1.weight")
        if w1 is not None:
            fields["hidden_dim"] = int(w1.shape[0])
        self.args = _resolved_args(**fields)
        if fields.get("dim", emb.shape[1]) != emb.shape[1]:
            raise FormatError(f"{name}: model_args dim {fields['dim']} but the embedding has "
                              f"{emb.shape[1]} columns")
        self.sd = sd

    def _get(self, key: str):
        if key == "output.weight" and self.args.tie_embeddings:
            key = "tok_embeddings.weight"
        if key not in self.sd:
            raise FormatError(f"{self.name}: missing tensor {key}")
        return self.sd[key]


class ModelSource(StateDictSource):
    """A llama2c.model.Transformer."""

    def __init__(self, model):
        model = getattr(model, "_orig_mod", model)
        model = getattr(model, "module", model)
        super().__init__(model.params, model.state_dict(), name="model",
                         tied=model.params.tie_embeddings)


def _torch_load(path):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zip" not in str(e):
            raise
        # legacy (non-zip) serialization cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


class CheckpointSource(StateDictSource):
    """A PyTorch training checkpoint: a dict with "model" (the state_dict)
    and "model_args" (ModelArgs fields; llama2.c's keys work), loaded with
    weights_only=True and memory-mapped."""

    def __init__(self, path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such checkpoint: {path}")
        try:
            ckpt = _torch_load(path)
        except Exception as e:  # pickle errors, bad zip files, refused globals
            raise FormatError(f"{path}: not a readable PyTorch checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
            raise FormatError(f"{path}: a training checkpoint is a dict with 'model' and 'model_args'")
        margs = dict(ckpt["model_args"])
        super().__init__(margs, ckpt["model"], name=str(path), tied=margs.get("tie_embeddings"))
        self.checkpoint = ckpt


# ---------------------------------------------------------------------------
# files of a model folder
# ---------------------------------------------------------------------------


def inside_folder(folder: Path, name, where: str) -> Path:
    """``folder / name``, refused with a FormatError when it resolves (``..``, an
    absolute path, symlinks) outside ``folder``. One exception: huggingface_hub's
    cache links ``snapshots/REV/*`` to ``../../blobs/*`` of the same repository."""
    if not isinstance(name, str) or not name:
        raise FormatError(f"{where}: bad file name {name!r}")
    path = folder / name
    root, real = folder.resolve(), path.resolve()
    if root in real.parents:
        return path
    if root.parent.name == "snapshots" and real.parent == root.parent.parent / "blobs":
        return path
    raise FormatError(f"{where}: {name!r} resolves outside {folder}; refusing to read it")


# ---------------------------------------------------------------------------
# Meta Llama 2 checkpoints
# ---------------------------------------------------------------------------

# how model-parallel shards split each tensor: concatenation dim, or None (replicated)
def _meta_concat_dim(key: str) -> int | None:
    if key.endswith("norm.weight"):
        return None
    if key == "tok_embeddings.weight" or key.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1
    return 0


class MetaSource(Source):
    """Meta's Llama 2 release layout: params.json plus consolidated.NN.pth
    model-parallel shards (each loaded memory-mapped with weights_only=True;
    a tensor is concatenated from the shards only when it is asked for).
    seq_len comes from params.json's max_seq_len when present, else 2048 like
    llama2.c's exporter (use --max-seq-len to change it). Symlinks leading out of
    the folder are refused (see inside_folder)."""

    def __init__(self, folder, max_seq_len: int | None = None):
        folder = Path(folder)
        self.name = str(folder)
        pj = folder / "params.json"
        if not pj.is_file():
            raise FileNotFoundError(f"no params.json in {folder}")
        shards = sorted(folder.glob("consolidated.*.pth"))
        if not shards:
            raise FileNotFoundError(f"no consolidated.*.pth in {folder}")
        for s in [pj] + shards:
            inside_folder(folder, s.name, str(folder))
        params = json.loads(pj.read_text())
        self.shards = []
        for s in shards:
            try:
                self.shards.append(_strip_prefixes(_torch_load(s)))
            except Exception as e:
                raise FormatError(f"{s}: not a readable PyTorch checkpoint ({type(e).__name__})") from None
        first = self.shards[0]
        if "tok_embeddings.weight" not in first:
            raise FormatError(f"{shards[0]}: no tok_embeddings.weight")
        vocab = int(first["tok_embeddings.weight"].shape[0])
        hidden = sum(int(s["layers.0.feed_forward.w1.weight"].shape[0]) for s in self.shards)
        n_heads = int(params["n_heads"])
        tied = "output.weight" not in first
        try:
            seq = max_seq_len or int(params.get("max_seq_len") or 2048)
            self.args = _resolved_args(
                dim=int(params["dim"]), n_layers=int(params["n_layers"]), n_heads=n_heads,
                n_kv_heads=int(params.get("n_kv_heads") or n_heads), vocab_size=vocab,
                hidden_dim=hidden, max_seq_len=seq, norm_eps=float(params.get("norm_eps", 1e-5)),
                rope_theta=float(params.get("rope_theta", 10000.0)), tie_embeddings=tied)
        except KeyError as e:
            raise FormatError(f"{pj}: missing {e.args[0]}") from None

    def _get(self, key: str):
        import torch

        parts = []
        for s in self.shards:
            if key not in s:
                raise FormatError(f"{self.name}: a shard lacks {key}")
            parts.append(s[key])
        dim = _meta_concat_dim(key)
        if dim is None or len(parts) == 1:
            return parts[0]
        return torch.cat([p.to(torch.float32) for p in parts], dim=dim)

    def close(self) -> None:
        self.shards = []


# ---------------------------------------------------------------------------
# Hugging Face folders
# ---------------------------------------------------------------------------

def _safetensors_tensor(h, name: str):
    """A tensor of a SafetensorsFile: F32 / F16 / BF16 in numpy; another
    dtype (F64, FP8...) through the safetensors package and torch when they
    are installed, else the reader's FormatError naming the dtype."""
    from .safetensors_np import FLOAT_DTYPES

    if h.dtype(name) in FLOAT_DTYPES:
        return h.get_tensor(name)
    try:
        import torch  # noqa: F401
        from safetensors import safe_open
    except ImportError:
        return h.get_tensor(name)  # raises: the dtype is not supported
    with safe_open(str(h.path), framework="pt") as f:
        return f.get_tensor(name)


class HFSource(Source):
    """A Hugging Face Llama folder: config.json and model.safetensors,
    model-0000x-of-0000y.safetensors (+ index), pytorch_model.bin or
    pytorch_model-0000x-of-0000y.bin (+ index; loaded with weights_only=True,
    memory-mapped). safetensors files are read by safetensors_np (numpy,
    memory-mapped, no torch). q_proj / k_proj are un-permuted with n_heads /
    n_kv_heads.
    Every file read must lie inside the folder (see inside_folder)."""

    def __init__(self, folder):
        folder = Path(folder)
        self.name = str(folder)
        cj = folder / "config.json"
        if not cj.is_file():
            raise FileNotFoundError(f"no config.json in {folder}")
        inside_folder(folder, cj.name, str(folder))
        try:
            fields = hf.args_from_config(json.loads(cj.read_text()), str(cj))
        except ValueError as e:
            raise FormatError(str(e)) from None
        self.folder = folder
        self._files: dict[str, object] = {}
        self.weight_map = self._index()
        prefix = "model." if "model.embed_tokens.weight" in self.weight_map else ""
        if prefix + "embed_tokens.weight" not in self.weight_map:
            raise FormatError(f"{folder}: no model.embed_tokens.weight among the weights")
        self.prefix = prefix
        if "lm_head.weight" not in self.weight_map:
            fields["tie_embeddings"] = True
        self.args = _resolved_args(**fields)

    def _index(self) -> dict[str, str]:
        f = self.folder
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (f / index).is_file():
                inside_folder(f, index, str(f))
                wm = json.loads((f / index).read_text()).get("weight_map")
                if not isinstance(wm, dict):
                    raise FormatError(f"{f / index}: no weight_map")
                for fname in set(wm.values()):
                    inside_folder(f, fname, f"{f / index}: weight file")
                return dict(wm)
        st = sorted(p.name for p in f.glob("*.safetensors"))
        if st:
            names = ["model.safetensors"] if "model.safetensors" in st else st
            return {k: n for n in names for k in self._open(n).keys()}
        pt = sorted(p.name for p in f.glob("pytorch_model*.bin"))
        if pt:
            names = ["pytorch_model.bin"] if "pytorch_model.bin" in pt else pt
            return {k: n for n in names for k in self._open(n).keys()}
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {f}")

    def _open(self, fname: str):
        h = self._files.get(fname)
        if h is None:
            path = inside_folder(self.folder, fname, str(self.folder))
            if not path.is_file():
                raise FileNotFoundError(f"missing weight file {path}")
            if fname.endswith(".safetensors"):   # numpy, memory-mapped: no torch (safetensors_np.py)
                from .safetensors_np import SafetensorsFile

                h = SafetensorsFile(path)
            else:
                try:
                    h = _torch_load(path)
                except Exception as e:
                    raise FormatError(f"{path}: not a readable PyTorch file ({type(e).__name__})") from None
            self._files[fname] = h
        return h

    def _get(self, key: str):
        if key == "output.weight" and self.args.tie_embeddings:
            key = "tok_embeddings.weight"
        name = hf.hf_name(key)
        if not name.startswith("lm_head"):
            name = self.prefix + name[len("model."):]
        fname = self.weight_map.get(name)
        if fname is None:
            raise FormatError(f"{self.name}: missing tensor {name}")
        h = self._open(fname)
        if hasattr(h, "get_tensor") and name not in h:
            raise FormatError(f"{self.name}: {fname} has no tensor {name}")
        t = _safetensors_tensor(h, name) if hasattr(h, "get_tensor") else h[name]
        n = hf.permuted_heads(key, self.args.n_heads, self.args.n_kv_heads)
        if n is None:
            return t
        a = _to_numpy(t)
        if a.ndim != 2 or a.shape[0] % (2 * n) != 0:
            raise FormatError(f"{self.name}: {name} has shape {a.shape}")
        return hf.hf_to_meta(a, n)

    def close(self) -> None:
        self._files = {}


# ---------------------------------------------------------------------------


def open_source(kind: str, path, max_seq_len: int | None = None) -> Source:
    """kind: 'bin', 'checkpoint', 'meta', 'hf' or 'gguf'."""
    if kind == "checkpoint":
        regular_file(path)
    if kind == "bin":
        src = open_bin(path)
    elif kind == "checkpoint":
        src = CheckpointSource(path)
    elif kind == "meta":
        src = MetaSource(path, max_seq_len=max_seq_len)
    elif kind == "hf":
        src = HFSource(path)
    elif kind == "gguf":
        from .gguf_source import GGUFSource

        src = GGUFSource(path)
    else:
        raise ValueError(f"unknown source kind {kind!r}")
    if max_seq_len:
        src.with_max_seq_len(max_seq_len)
    return src
