"""GGUF files in (llama.cpp's format) as a Source: `llama2c export OUT --version N
--gguf IN.gguf`, and ``open_source("gguf", path)``.

    from llama2c.export.gguf_source import GGUFSource
    with GGUFSource("model-Q4_K_M.gguf") as src:
        write_bin(src, "model.bin", version=3)
        src.write_tokenizer_bin("tokenizer.bin")

What is read (GGUF versions 2 and 3, architecture ``llama``):
  - hyperparameters from the ``llama.*`` metadata: embedding_length (dim),
    block_count, feed_forward_length, attention.head_count (and _kv),
    context_length (default 2048), rope.freq_base (default 10000),
    attention.layer_norm_rms_epsilon (default 1e-5); the vocabulary size is
    the row count of token_embd;
  - tensors by llama.cpp's names (token_embd, blk.N.attn_norm / attn_q / attn_k /
    attn_v / attn_output / ffn_norm / ffn_gate / ffn_down / ffn_up,
    output_norm, output: absent means a shared classifier), each returned
    as float32: F32, F16 and BF16 directly, every other type the installed
    ``gguf`` package can dequantize (Q8_0, Q4_0, Q4_1, Q5_x, K-quants,
    IQ*) through ``gguf.quants.dequantize``;
  - the SentencePiece vocabulary (tokenizer.ggml.tokens / scores, BOS / EOS
    ids), written as a llama2.c tokenizer.bin exactly as the C engine builds
    it from the same file (U+2581 -> space, BOS / EOS as "\\n<s>\\n" / "\\n</s>\\n").

wq / wk need no permutation: GGUF ``llama`` tensors are in Meta's layout
(rotary pairs (2i, 2i+1)), the one our .bin files use; llama.cpp's Hugging Face
converter undoes HF's permutation when it writes them.

The header is parsed here, not with ``gguf.GGUFReader``: every count, length,
dimension and offset is checked against the file before it is used (the
package's reader loops for as long as an array's claimed length, so a
hostile 100-byte file can hang it). Anything this engine cannot express
(another architecture, rope scaling other than linear, mixture of experts, partial rotary,
biases or other extra tensors, missing tensors) is a FormatError naming it.
numpy only; ``gguf`` is imported only to dequantize quantized types.
"""
from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import FormatError
from ..rope_scaling import RopeScaling
from ..validate import regular_file
from . import binfmt
from .source_base import Source, _resolved_args

__all__ = ["GGUFSource", "GGUFFile", "gguf_name", "GGUF_MAGIC"]

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20
MAX_ARRAY_DEPTH = 4
MAX_ELEMENTS = 1 << 40

# metadata value types: (struct code, size) of the scalars
_STRING, _ARRAY = 8, 9
_SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4), 6: ("f", 4),
            7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
_NP_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
               10: "<u8", 11: "<i8", 12: "<f8"}

# ggml tensor types read without the gguf package: id -> (name, block values, block bytes)
_F32, _F16, _BF16, _F64 = 0, 1, 30, 28
# (block values, block bytes) of every ggml type, as ggml defines them; a type
# missing here (a newer one) is looked up in the gguf package, if installed
_GGML_SIZES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
}

# canonical per-layer key -> GGUF per-layer name
_LAYER_NAMES = {
    "attention_norm.weight": "attn_norm", "attention.wq.weight": "attn_q", "attention.wk.weight": "attn_k",
    "attention.wv.weight": "attn_v", "attention.wo.weight": "attn_output", "ffn_norm.weight": "ffn_norm",
    "feed_forward.w1.weight": "ffn_gate", "feed_forward.w2.weight": "ffn_down",
    "feed_forward.w3.weight": "ffn_up",
}
_TOP_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "output.weight": "output.weight"}


def gguf_name(key: str) -> str:
    """The GGUF tensor name of a canonical key ("layers.3.attention.wq.weight"
    -> "blk.3.attn_q.weight")."""
    if key in _TOP_NAMES:
        return _TOP_NAMES[key]
    parts = key.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _LAYER_NAMES:
        return f"blk.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.weight"
    raise KeyError(key)


def ggml_type_info(t: int) -> tuple[str, int, int] | None:
    """(name, block values, block bytes) of a ggml type id, None if unknown."""
    info = _GGML_SIZES.get(t)
    if info is not None:
        return info
    try:
        import gguf

        qt = gguf.GGMLQuantizationType(t)
        block, size = gguf.GGML_QUANT_SIZES[qt]
        return qt.name, int(block), int(size)
    except (ImportError, ValueError, KeyError, AttributeError):
        return None


class _Tensor:
    __slots__ = ("name", "ne", "type", "offset", "nbytes")

    def __init__(self, name, ne, type_, offset):
        self.name, self.ne, self.type, self.offset, self.nbytes = name, ne, type_, offset, None


class GGUFFile:
    """The header of a GGUF file (v2 / v3, little-endian), parsed with every
    length and offset checked: ``fields`` (key -> value: int / float / bool /
    str, a numpy array for numeric arrays, a list for others; strings of
    tokenizer.ggml.tokens stay bytes), ``tensors`` (name -> _Tensor with its
    absolute data offset) and ``data`` (the memory map)."""

    def __init__(self, path):
        self.path = Path(path)
        self.where = str(path)
        size = os.path.getsize(self.path)
        if size < 24:
            raise FormatError(f"{self.where}: too short for a GGUF header ({size} bytes)")
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.size = size
        self._buf = memoryview(self.data)
        self._pos = 0
        if bytes(self._buf[:4]) != GGUF_MAGIC:
            raise FormatError(f"{self.where}: not a GGUF file (magic {bytes(self._buf[:4])!r})")
        self._pos = 4
        self.version = self._scalar(4)
        if self.version not in (2, 3):
            raise FormatError(f"{self.where}: GGUF version {self.version} is not supported (2 and 3 are)")
        n_tensors, n_kv = self._scalar(10), self._scalar(10)
        if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
            raise FormatError(f"{self.where}: GGUF header claims {n_tensors} tensors and {n_kv} metadata "
                              "entries: implausible")
        self.fields: dict = {}
        for i in range(n_kv):
            key = self._string(f"metadata entry {i}").decode("utf-8", "replace")
            vtype = self._scalar(4, f"metadata {key}")
            if key in self.fields:
                raise FormatError(f"{self.where}: GGUF metadata key {key!r} appears twice")
            self.fields[key] = self._value(vtype, key, 0)
        self.tensors: dict[str, _Tensor] = {}
        for i in range(n_tensors):
            raw = self._string(f"tensor {i}")
            name = raw.decode("utf-8", "replace")
            if len(raw) > 256:
                raise FormatError(f"{self.where}: GGUF tensor {i} has a name of {len(raw)} bytes")
            n_dims = self._scalar(4, f"tensor {name}")
            if not 1 <= n_dims <= 4:
                raise FormatError(f"{self.where}: GGUF tensor {name} has {n_dims} dimensions")
            ne, count = [], 1
            for _ in range(n_dims):
                d = self._scalar(10, f"tensor {name}")
                if d < 1 or count * d > MAX_ELEMENTS:
                    raise FormatError(f"{self.where}: GGUF tensor {name} has an implausible dimension {d}")
                ne.append(d)
                count *= d
            ttype = self._scalar(4, f"tensor {name}")
            offset = self._scalar(10, f"tensor {name}")
            if name in self.tensors:
                raise FormatError(f"{self.where}: GGUF tensor {name} appears twice")
            self.tensors[name] = _Tensor(name, tuple(ne), ttype, offset)
        align = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or isinstance(align, bool) or align < 1 or align & (align - 1) \
                or align > 1 << 16:
            raise FormatError(f"{self.where}: GGUF general.alignment {align!r} is not a power of two")
        start = -(-self._pos // align) * align
        self.data_start = start
        for t in self.tensors.values():
            info = ggml_type_info(t.type)
            if info is None:          # refused when the model needs it
                continue
            tname, block, bsize = info
            if t.ne[0] % block:
                raise FormatError(f"{self.where}: GGUF tensor {t.name}: rows of {t.ne[0]} values do not fill "
                                  f"{tname} blocks of {block}")
            nbytes = math.prod(t.ne) // block * bsize
            if t.offset % align or start + t.offset + nbytes > size:
                raise FormatError(f"{self.where}: GGUF tensor {t.name} ({nbytes} bytes at offset {t.offset}) "
                                  "lies outside the file")
            t.nbytes = nbytes
            t.offset = start + t.offset

    # ---- the byte reader: every read checks the bytes left ----
    def _take(self, n: int, what: str) -> memoryview:
        if n > self.size - self._pos:
            raise FormatError(f"{self.where}: GGUF {what} runs past the end of the file")
        b = self._buf[self._pos:self._pos + n]
        self._pos += n
        return b

    def _scalar(self, vtype: int, what: str = "header"):
        code, n = _SCALARS[vtype]
        return struct.unpack("<" + code, self._take(n, what))[0]

    def _string(self, what: str) -> bytes:
        n = self._scalar(10, what)
        return bytes(self._take(n, what))

    def _value(self, vtype: int, key: str, depth: int):
        if vtype in _SCALARS:
            return self._scalar(vtype, f"metadata {key}")
        if vtype == _STRING:
            raw = self._string(f"metadata {key}")
            return raw if key == "tokenizer.ggml.tokens" else raw.decode("utf-8", "replace")
        if vtype != _ARRAY:
            raise FormatError(f"{self.where}: GGUF metadata {key} has unknown value type {vtype}")
        if depth >= MAX_ARRAY_DEPTH:
            raise FormatError(f"{self.where}: GGUF metadata {key} nests arrays too deep")
        etype = self._scalar(4, f"metadata {key}")
        count = self._scalar(10, f"metadata {key}")
        left = self.size - self._pos
        if etype in _SCALARS:
            n = _SCALARS[etype][1]
            if count > left // n:
                raise FormatError(f"{self.where}: GGUF metadata {key} ({count} values) runs past the end of "
                                  "the file")
            a = np.frombuffer(self._take(count * n, f"metadata {key}"), dtype=_NP_SCALARS[etype]).copy()
            return a.astype(bool) if etype == 7 else a
        if etype not in (_STRING, _ARRAY):
            raise FormatError(f"{self.where}: GGUF metadata {key} has unknown element type {etype}")
        if count > left // 8:          # a string or an array takes 8 bytes at least
            raise FormatError(f"{self.where}: GGUF metadata {key} ({count} values) runs past the end of the file")
        return [self._value(etype, key, depth + 1) for _ in range(count)]

    def tensor_bytes(self, t: _Tensor) -> np.ndarray:
        return self.data[t.offset:t.offset + t.nbytes]

    def close(self) -> None:
        self._buf = None
        self.data = None


def _number(fields: dict, key: str, where: str, default=None, integer: bool = True):
    v = fields.get(key)
    if v is None:
        if default is None:
            raise FormatError(f"{where}: GGUF metadata {key} is missing")
        return default
    if isinstance(v, np.ndarray) and v.size >= 1 and (v == v.flat[0]).all():
        v = v.flat[0].item()          # a per-layer array with one value
    if isinstance(v, (bool, str, list, np.ndarray, bytes)):
        raise FormatError(f"{where}: GGUF metadata {key} = {v!r:.60} is not a single number")
    if integer:
        if v != int(v) or not 1 <= v <= 1 << 24:
            raise FormatError(f"{where}: GGUF metadata {key} = {v} is out of range")
        return int(v)
    v = float(v)
    if not (math.isfinite(v) and v > 0):
        raise FormatError(f"{where}: GGUF metadata {key} = {v} is out of range")
    if float(np.float32(v)) == v:   # stored as float32: its shortest decimal (1e-05, not 9.99999974e-06)
        v = float(str(np.float32(v)))
    return v


class GGUFSource(Source):
    """A GGUF file of the ``llama`` architecture (see the module docstring),
    its tensors dequantized to float32 one at a time."""

    def __init__(self, path, max_seq_len: int | None = None):
        regular_file(path)
        self.path = Path(path)
        self.name = str(path)
        self.file = g = GGUFFile(path)
        where, f = self.name, g.fields
        arch = f.get("general.architecture")
        if arch != "llama":
            raise FormatError(f"{where}: GGUF architecture {arch!r} is not supported (llama2c reads 'llama')")
        scaling = f.get("llama.rope.scaling.type")
        if scaling not in (None, "none", "linear"):
            raise FormatError(f"{where}: GGUF rope scaling {scaling!r} is not supported")
        rope_scaling = None
        if scaling == "linear":
            rope_scaling = RopeScaling("linear", _number(f, "llama.rope.scaling.factor", where, integer=False))
        if "rope_freqs.weight" in g.tensors:  # the engine runs the file itself (csrc/gguf.c)
            raise FormatError(f"{where}: GGUF tensor rope_freqs.weight (llama3 rope scaling as per-frequency "
                              "factors) has no .bin equivalent: run the GGUF file directly (Llama(path), ./run)")
        experts = f.get("llama.expert_count")
        if experts not in (None, 0):
            raise FormatError(f"{where}: GGUF llama.expert_count {experts!r}: mixture-of-experts models are "
                              "not supported")
        dim = _number(f, "llama.embedding_length", where)
        n_layers = _number(f, "llama.block_count", where)
        hidden = _number(f, "llama.feed_forward_length", where)
        n_heads = _number(f, "llama.attention.head_count", where)
        n_kv = _number(f, "llama.attention.head_count_kv", where, default=n_heads)
        seq = _number(f, "llama.context_length", where, default=2048)
        theta = _number(f, "llama.rope.freq_base", where, default=10000.0, integer=False)
        eps = _number(f, "llama.attention.layer_norm_rms_epsilon", where, default=1e-5, integer=False)
        if n_heads > dim or dim % n_heads:
            raise FormatError(f"{where}: GGUF embedding_length {dim} does not split into {n_heads} heads")
        head = dim // n_heads
        for key in ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"):
            v = f.get(key)
            if v is not None and _number(f, key, where) != head:
                raise FormatError(f"{where}: GGUF {key} = {v} differs from the head size {head} "
                                  "(not supported)")
        emb = g.tensors.get("token_embd.weight")
        if emb is None:
            raise FormatError(f"{where}: GGUF file has no tensor token_embd.weight")
        if len(emb.ne) < 2:
            raise FormatError(f"{where}: GGUF tensor token_embd.weight has shape {emb.ne}")
        vocab = emb.ne[1]
        tied = "output.weight" not in g.tensors
        try:
            binfmt.check_dims(dim, hidden, n_layers, n_heads, n_kv, vocab, seq, where=where)
        except ValueError as e:
            raise FormatError(str(e)) from None
        self.args = _resolved_args(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads,
                                   n_kv_heads=n_kv, vocab_size=vocab, max_seq_len=seq, rope_theta=theta,
                                   norm_eps=eps, tie_embeddings=tied, rope_scaling=rope_scaling)
        wanted = {gguf_name(k) for k in self.keys()}
        missing = [gguf_name(k) for k in self.keys() if gguf_name(k) not in g.tensors]
        if missing:
            raise FormatError(f"{where}: GGUF file has no tensor {', '.join(missing[:4])}"
                              + (f" (and {len(missing) - 4} more)" if len(missing) > 4 else ""))
        extra = sorted(set(g.tensors) - wanted)
        if extra:
            raise FormatError(f"{where}: GGUF tensor {', '.join(extra[:4])} is not part of a Llama 2 model "
                              "(not supported)")
        if max_seq_len:
            self.with_max_seq_len(max_seq_len)

    def tensor_type(self, key: str) -> str:
        """The ggml type name of the tensor behind a canonical key ("Q4_K")."""
        t = self.file.tensors[gguf_name(key)]
        info = ggml_type_info(t.type)
        return info[0] if info else f"type {t.type}"

    def _get(self, key: str) -> np.ndarray:
        if key == "output.weight" and self.args.tie_embeddings:
            key = "tok_embeddings.weight"
        name = gguf_name(key)
        t = self.file.tensors[name]
        info = ggml_type_info(t.type)
        if info is None or t.nbytes is None:
            raise FormatError(f"{self.name}: GGUF tensor {name} has unknown ggml type {t.type}")
        # GGUF lists dimensions innermost first: ne = (cols, rows, 1, 1)
        if any(d != 1 for d in t.ne[2:]):
            raise FormatError(f"{self.name}: GGUF tensor {name} has shape {t.ne}")
        cols = t.ne[0]
        rows = t.ne[1] if len(t.ne) > 1 else 1
        raw = self.file.tensor_bytes(t)
        tname = info[0]
        if t.type == _F32:
            a = raw.view("<f4").astype(np.float32)
        elif t.type == _F16:
            a = raw.view("<f2").astype(np.float32)
        elif t.type == _BF16:
            a = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        elif t.type == _F64:
            a = raw.view("<f8").astype(np.float32)
        elif tname.startswith("I"):
            raise FormatError(f"{self.name}: GGUF tensor {name} is {tname}, an integer type, not weights")
        else:
            a = _dequantize(raw, t.type, tname, rows, self.name, name)
        a = a.reshape(-1)
        if key.endswith("norm.weight"):
            if rows != 1:
                raise FormatError(f"{self.name}: GGUF tensor {name} has shape {t.ne}, expected a vector")
            return a
        return a.reshape(rows, cols)

    def vocab_pieces(self) -> tuple[list[bytes], list[float], int, int] | None:
        """The SentencePiece ("llama") vocabulary: (tokens as UTF-8 bytes with
        U+2581 for spaces, scores, bos id, eos id), or None when the file holds
        another kind of vocabulary (or none)."""
        f = self.file.fields
        if f.get("tokenizer.ggml.model") != "llama":
            return None
        tokens = f.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or len(tokens) < 3 or not all(isinstance(t, bytes) for t in tokens):
            return None
        scores = f.get("tokenizer.ggml.scores")
        if scores is None:
            scores = np.zeros(len(tokens), np.float32)
        if not isinstance(scores, np.ndarray) or len(scores) != len(tokens):
            raise FormatError(f"{self.name}: GGUF vocabulary has {len(tokens)} tokens and "
                              f"{len(scores) if hasattr(scores, '__len__') else scores!r} scores")

        def token_id(key, default):
            v = f.get(key, default)
            return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else default

        return (tokens, [float(s) for s in scores.astype(np.float32)],
                token_id("tokenizer.ggml.bos_token_id", 1), token_id("tokenizer.ggml.eos_token_id", 2))

    def tokenizer_bin_bytes(self) -> bytes | None:
        """The vocabulary as llama2.c's tokenizer.bin (docs/FORMAT.md), byte
        for byte what the C engine builds from this file; None without a
        SentencePiece vocabulary."""
        v = self.vocab_pieces()
        if v is None:
            return None
        tokens, scores, bos, eos = v
        pieces = []
        for i, t in enumerate(tokens):
            if i == bos:
                pieces.append(b"\n<s>\n")
            elif i == eos:
                pieces.append(b"\n</s>\n")
            else:
                pieces.append(t.replace("\u2581".encode("utf-8"), b" "))
        out = [struct.pack("<I", max([1] + [len(p) for p in pieces]))]
        for p, s in zip(pieces, scores):
            out.append(struct.pack("<fi", s, len(p)))
            out.append(p)
        return b"".join(out)

    def write_tokenizer_bin(self, path, *, force: bool = False) -> Path | None:
        """Writes tokenizer_bin_bytes() to path atomically (an existing file
        is replaced only with force=True, or when it already holds exactly
        these bytes). Returns the path, or None when the file has no
        SentencePiece vocabulary."""
        from ..outputs import atomic_write, refuse_existing

        data = self.tokenizer_bin_bytes()
        if data is None:
            return None
        path = Path(path)
        if path.is_file() and path.read_bytes() == data:
            return path
        refuse_existing(path, force)
        with atomic_write(path, overwrite=force) as out:
            out.write(data)
        return path

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _dequantize(raw: np.ndarray, ttype: int, tname: str, rows: int, where: str, name: str) -> np.ndarray:
    try:
        import gguf
        from gguf import quants
    except ImportError as e:
        raise ImportError(f"{where}: tensor {name} is {tname}; dequantizing it needs the gguf package "
                          "(pip install gguf)", name="gguf") from e
    try:
        qtype = gguf.GGMLQuantizationType(ttype)
        return np.asarray(quants.dequantize(np.ascontiguousarray(raw).reshape(rows, -1), qtype),
                          dtype=np.float32)
    except (NotImplementedError, ValueError, KeyError) as e:
        version = getattr(gguf, "__version__", None)
        raise FormatError(f"{where}: GGUF tensor {name} is {tname}, which the installed gguf package"
                          f"{' ' + version if version else ''} cannot dequantize ({e})") from None
