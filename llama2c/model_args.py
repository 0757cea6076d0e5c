"""The model's hyperparameters (ModelArgs), shared by the PyTorch model, the
exporters, the trainer and the tools. Plain Python: no torch, no numpy, so
every reader and writer of model files can use it in a torch-free install.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from .rope_scaling import RopeScaling

__all__ = ["ArgsView", "ModelArgs", "ffn_hidden_dim"]


def ffn_hidden_dim(dim: int, multiple_of: int) -> int:
    """llama2.c's default feed-forward width: 2/3 of 4*dim, rounded up to a
    multiple of `multiple_of` (dim 288, multiple_of 32 -> 768)."""
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclasses.dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None      # None: n_heads (multi-head attention)
    vocab_size: int = 32000
    hidden_dim: Optional[int] = None      # None: ffn_hidden_dim(dim, multiple_of)
    multiple_of: int = 32
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    dropout: float = 0.0
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    rope_scaling: Optional[RopeScaling] = None  # linear / llama3 (rope_scaling.py); None: plain RoPE

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = ffn_hidden_dim(self.dim, self.multiple_of)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim",
                     "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelArgs.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads != 0 or (self.dim // self.n_heads) % 2 != 0:
            raise ValueError(f"dim {self.dim} must split into {self.n_heads} heads of even size")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ValueError(f"rope_theta must be finite and positive, got {self.rope_theta}")
        if not (math.isfinite(self.norm_eps) and self.norm_eps > 0):
            raise ValueError(f"norm_eps must be finite and positive, got {self.norm_eps}")
        if isinstance(self.rope_scaling, dict):  # from to_dict() / a checkpoint's model_args
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        elif self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"rope_scaling must be a RopeScaling or None, got {type(self.rope_scaling).__name__}")

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_size * self.n_kv_heads

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        """ModelArgs from a dict such as a checkpoint's "model_args"; unknown
        keys (e.g. llama2.c extras) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ArgsView:
    """For records that hold a ModelArgs as `args` (a model file's reading, the
    engine's config): the hyperparameters under the names model files and
    llama2_config use, so they are declared once, in ModelArgs."""

    args: ModelArgs

    dim = property(lambda self: self.args.dim)
    hidden_dim = property(lambda self: self.args.hidden_dim)
    n_layers = property(lambda self: self.args.n_layers)
    n_heads = property(lambda self: self.args.n_heads)
    n_kv_heads = property(lambda self: self.args.n_kv_heads)
    vocab_size = property(lambda self: self.args.vocab_size)
    seq_len = property(lambda self: self.args.max_seq_len)
    head_size = property(lambda self: self.args.head_size)
    kv_dim = property(lambda self: self.args.kv_dim)
    shared_classifier = property(lambda self: bool(self.args.tie_embeddings))
    shared = shared_classifier
    rope_theta = property(lambda self: self.args.rope_theta)
    norm_eps = property(lambda self: self.args.norm_eps)
    rope_scaling = property(lambda self: self.args.rope_scaling)

