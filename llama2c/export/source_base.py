"""The Source base class (see sources.py): a model's resolved ModelArgs and
its tensors, one float32 numpy array at a time under canonical keys
(llama2c.model's state_dict names), plus the key list and shapes every
reader shares. Kept apart from sources.py so that readers in other modules
(gguf_source.py) can subclass it while open_source dispatches to them.
numpy only."""
from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import FormatError
from ..model_args import ModelArgs
from . import binfmt

__all__ = ["Source", "canonical_keys", "expected_shape"]


def canonical_keys(args: ModelArgs) -> list[str]:
    """All tensor keys of a model, embedding first, layer by layer, then the
    final norm and (untied only) the classifier."""
    keys = ["tok_embeddings.weight"]
    for i in range(args.n_layers):
        keys.append(f"layers.{i}.attention_norm.weight")
        keys += [binfmt.layer_key(i, k) for _, k in binfmt.LAYER_MATRICES]
        keys.append(f"layers.{i}.ffn_norm.weight")
    keys.append("norm.weight")
    if not args.tie_embeddings:
        keys.append("output.weight")
    return keys


def expected_shape(args: ModelArgs, key: str) -> tuple[int, ...]:
    d, h, kv, V = args.dim, args.hidden_dim, args.kv_dim, args.vocab_size
    if key in ("tok_embeddings.weight", "output.weight"):
        return (V, d)
    if key == "norm.weight" or key.endswith("_norm.weight"):
        return (d,)
    tail = key.split(".", 2)[2]
    return {
        "attention.wq.weight": (d, d), "attention.wk.weight": (kv, d),
        "attention.wv.weight": (kv, d), "attention.wo.weight": (d, d),
        "feed_forward.w1.weight": (h, d), "feed_forward.w2.weight": (d, h),
        "feed_forward.w3.weight": (h, d),
    }[tail]


def _to_numpy(t) -> np.ndarray:
    """A torch tensor (any float dtype) or array as float32 numpy."""
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t, dtype=np.float32)
    import torch

    t = t.detach()
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    return t.cpu().contiguous().numpy()


class Source:
    args: ModelArgs
    name: str = "model"

    def _get(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def keys(self) -> list[str]:
        return canonical_keys(self.args)

    def get(self, key: str) -> np.ndarray:
        """The tensor `key` as a float32 array of its exact shape."""
        a = _to_numpy(self._get(key))
        want = expected_shape(self.args, key)
        if tuple(a.shape) != want:
            raise FormatError(f"{self.name}: {key} has shape {tuple(a.shape)}, expected {want}")
        return a

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def with_max_seq_len(self, n: int) -> "Source":
        self.args = dataclasses.replace(self.args, max_seq_len=int(n))
        return self


def _resolved_args(**kw) -> ModelArgs:
    try:
        return ModelArgs(**kw)
    except ValueError as e:
        raise FormatError(str(e)) from None
