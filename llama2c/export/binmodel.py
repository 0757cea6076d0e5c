"""A whole model file (.bin, versions 0-5) as numpy arrays: `read_model(path)`
returns a `BinModel` with the hyperparameters and every weight under the
names of llama2.c's `TransformerWeights` (token_embedding, rms_att, wq, ...,
wcls). fp32 files are memory-mapped, int8 (version 2) and Q4_0 (version 5) ones dequantized and bf16
(version 4) ones widened to float32. The GGUF writer and `llama2c bench` read
models this way; it is a view over export.sources.BinSource, the one reader of
.bin files in Python. numpy only."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..model_args import ArgsView, ModelArgs
from .binfmt import LAYER_MATRICES as LAYER_KEYS
from .sources import open_bin

# the per-layer matrices in file order
LAYER_MATRICES = tuple(name for name, _ in LAYER_KEYS)


@dataclass
class BinModel(ArgsView):
    """A model file's hyperparameters (a ModelArgs, under the file's names as
    properties) and weights (numpy arrays; fp32 files are memory-mapped, int8
    ones dequantized to float32)."""
    args: ModelArgs
    version: int
    group_size: int = 0
    weights: dict = field(default_factory=dict)

    def matrix_shapes(self) -> dict[str, tuple[int, int]]:
        d, h, kv = self.dim, self.hidden_dim, self.kv_dim
        return {"wq": (d, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, d),
                "w1": (h, d), "w2": (d, h), "w3": (h, d)}


def read_model(path: str | os.PathLike) -> BinModel:
    """Reads a llama2c/llama2.c model file of version 0 to 5 through the one
    .bin reader (export.sources.BinSource: header, dimensions and exact size
    checked there); fp32 weights stay views of the mapping."""
    src = open_bin(path)
    m = BinModel(src.args, version=src.version, group_size=src.group_size or 0)
    w = m.weights
    w["token_embedding"] = src.view("tok_embeddings.weight")
    w["rms_att"] = src.stacked("attention_norm.weight")
    w["rms_ffn"] = src.stacked("ffn_norm.weight")
    for name, key in LAYER_KEYS:
        w[name] = src.stacked(key)
    w["rms_final"] = src.view("norm.weight")
    if not m.shared:
        w["wcls"] = src.view("output.weight")
    return m
