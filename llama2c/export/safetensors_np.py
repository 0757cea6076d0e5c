"""A safetensors reader in numpy (no torch, no safetensors package).

The format: an 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]},
"__metadata__": {str: str}}`` (offsets relative to the byte after the
header), then the raw little-endian tensor data.

The file is memory-mapped and a tensor is read only when asked for. F32,
F16 and BF16 tensors come back as float32 (bf16 widened exactly by shifting
its bits into the top half of a float32); other dtypes are listed (so a
file that also holds, say, int64 buffers opens) but refused when read.

This reads untrusted files: the header length, every offset and every
shape is checked against the file before anything is mapped, and any
inconsistency (a header past the end, offsets out of order, overlapping or
outside the data, a shape that does not match its byte count, an unknown
dtype, duplicate names) is a FormatError naming the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import FormatError

__all__ = ["SafetensorsFile", "MAX_HEADER_BYTES", "DTYPE_BYTES", "FLOAT_DTYPES"]

MAX_HEADER_BYTES = 100 * 2**20      # as the safetensors library: a header is small
MAX_DIMS = 8

# every dtype the format defines, with its size in bytes (sub-byte types are refused)
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
FLOAT_DTYPES = ("F32", "F16", "BF16")   # what get() turns into float32


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class SafetensorsFile:
    """One .safetensors file: ``keys()``, ``metadata()``, ``dtype(name)``,
    ``shape(name)`` and ``get_tensor(name)`` (a float32 numpy array for
    F32 / F16 / BF16). Usable as a context manager; close() drops the map."""

    def __init__(self, path):
        self.path = Path(path)
        where = str(self.path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{where}: not a safetensors file ({size} bytes, shorter than its 8-byte "
                                  "header length)")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise FormatError(f"{where}: safetensors header length {n} runs past the end of the file "
                                  f"({size} bytes)")
            if n > MAX_HEADER_BYTES:
                raise FormatError(f"{where}: safetensors header of {n} bytes is implausibly large")
            raw = f.read(n)
        if len(raw) != n:
            raise FormatError(f"{where}: safetensors header is cut short")
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise FormatError(f"{where}: safetensors header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise FormatError(f"{where}: safetensors header is not a JSON object")
        meta = header.pop("__metadata__", None)
        if meta is not None and not (isinstance(meta, dict)
                                     and all(isinstance(v, str) for v in meta.values())):
            raise FormatError(f"{where}: safetensors __metadata__ is not a map of strings")
        self._metadata = meta
        self._data_start = 8 + n
        data_len = size - self._data_start
        self._tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        spans = []
        for name, info in header.items():
            self._tensors[name] = self._check_entry(where, name, info, data_len)
            _, _, begin, end = self._tensors[name]
            if end > begin:
                spans.append((begin, end, name))
        spans.sort()
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise FormatError(f"{where}: safetensors tensors {n0!r} and {n1!r} overlap "
                                  f"(bytes {b0}-{e0} and {b1}-{e1})")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size > self._data_start else None

    @staticmethod
    def _check_entry(where: str, name: str, info, data_len: int):
        if not isinstance(info, dict):
            raise FormatError(f"{where}: safetensors entry {name!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise FormatError(f"{where}: tensor {name!r} has unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(_int(d) and d >= 0 for d in shape)):
            raise FormatError(f"{where}: tensor {name!r} has a bad shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_int(o) for o in offsets)):
            raise FormatError(f"{where}: tensor {name!r} has bad data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise FormatError(f"{where}: tensor {name!r} has data_offsets {offsets} out of order")
        if end > data_len:
            raise FormatError(f"{where}: tensor {name!r} (bytes {begin}-{end}) lies past the end of the data "
                              f"({data_len} bytes)")
        count = 1
        for d in shape:          # Python ints: a huge shape cannot overflow
            count *= d
        if count * DTYPE_BYTES[dtype] != end - begin:
            raise FormatError(f"{where}: tensor {name!r} of shape {shape} {dtype} needs "
                              f"{count * DTYPE_BYTES[dtype]} bytes, its offsets span {end - begin}")
        return dtype, tuple(shape), begin, end

    # ---- the header ----
    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name) -> bool:
        return name in self._tensors

    def metadata(self) -> dict | None:
        return None if self._metadata is None else dict(self._metadata)

    def dtype(self, name: str) -> str:
        return self._entry(name)[0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def _entry(self, name: str):
        e = self._tensors.get(name)
        if e is None:
            raise KeyError(name)
        return e

    # ---- the data ----
    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes (a read-only view of the mapping)."""
        _, _, begin, end = self._entry(name)
        if end == begin:
            return np.zeros(0, dtype=np.uint8)
        if self._map is None:
            raise ValueError(f"{self.path}: closed")
        return self._map[self._data_start + begin:self._data_start + end]

    def get_tensor(self, name: str) -> np.ndarray:
        """The tensor as a float32 array of its shape (a copy)."""
        dtype, shape, _, _ = self._entry(name)
        if dtype not in FLOAT_DTYPES:
            raise FormatError(f"{self.path}: tensor {name!r} is {dtype}; llama2c reads F32, F16 and BF16 "
                              "safetensors")
        b = self.raw(name)
        if dtype == "F32":
            a = b.view("<f4").astype(np.float32)
        elif dtype == "F16":
            a = b.view("<f2").astype(np.float32)
        else:   # bf16: the top 16 bits of a float32
            a = (b.view("<u2").astype(np.uint32) << 16).view(np.float32)
        return a.reshape(shape)

    def close(self) -> None:
        self._map = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
