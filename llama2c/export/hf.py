"""Hugging Face Llama layout: tensor names, the q/k permutation, config.json
both ways and a streaming safetensors writer. numpy only."""
from __future__ import annotations

import json
import re
import struct

import numpy as np

from ..rope_scaling import RopeScaling

# canonical (llama2.c) per-layer key -> Hugging Face per-layer key
_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")


def hf_name(key: str) -> str:
    """The Hugging Face name of a canonical tensor key."""
    if key in _TOP:
        return _TOP[key]
    m = _LAYER_RE.fullmatch(key)
    if not m or m.group(2) not in _LAYER:
        raise KeyError(key)
    return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"


def permuted_heads(key: str, n_heads: int, n_kv_heads: int) -> int | None:
    """How many heads the q/k permutation of this tensor uses (None: not permuted)."""
    if key.endswith("attention.wq.weight"):
        return n_heads
    if key.endswith("attention.wk.weight"):
        return n_kv_heads
    return None


def meta_to_hf(w: np.ndarray, n: int) -> np.ndarray:
    """Meta's interleaved rotary pairs (2i, 2i+1) -> HF's halves (i, i + hs/2),
    per head, for a (n * head_size, d_in) projection."""
    d_out, d_in = w.shape
    return np.ascontiguousarray(w.reshape(n, d_out // n // 2, 2, d_in).transpose(0, 2, 1, 3)
                                .reshape(d_out, d_in))


def hf_to_meta(w: np.ndarray, n: int) -> np.ndarray:
    """The inverse of meta_to_hf."""
    d_out, d_in = w.shape
    return np.ascontiguousarray(w.reshape(n, 2, d_out // n // 2, d_in).transpose(0, 2, 1, 3)
                                .reshape(d_out, d_in))


def config_json(args) -> dict:
    """config.json of a LlamaForCausalLM with these ModelArgs."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_size,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": float(args.norm_eps),
        "rope_theta": float(args.rope_theta),
        "rope_scaling": args.rope_scaling.to_hf() if args.rope_scaling is not None else None,
        "tie_word_embeddings": bool(args.tie_embeddings),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def generation_config_json() -> dict:
    return {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2}


def tokenizer_config_json(max_len: int) -> dict:
    return {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": int(max_len),
        "sp_model_kwargs": {},
    }


def special_tokens_map_json() -> dict:
    return {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def args_from_config(cfg: dict, where: str = "config.json") -> dict:
    """ModelArgs fields from a Hugging Face Llama config.json; rejects what
    the Llama 2 architecture here cannot express."""
    mt = cfg.get("model_type", "llama")
    if mt != "llama":
        raise ValueError(f"{where}: model_type {mt!r} is not supported (only 'llama')")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{where}: hidden_act {act!r} is not supported (only silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ValueError(f"{where}: {flag} is not supported")
    try:
        dim = int(cfg["hidden_size"])
        n_heads = int(cfg["num_attention_heads"])
        args = dict(
            dim=dim,
            hidden_dim=int(cfg["intermediate_size"]),
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            vocab_size=int(cfg["vocab_size"]),
            max_seq_len=int(cfg.get("max_position_embeddings") or 2048),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        )
    except KeyError as e:
        raise ValueError(f"{where}: missing {e.args[0]}") from None
    head_dim = cfg.get("head_dim")
    if head_dim is not None and int(head_dim) * n_heads != dim:
        raise ValueError(f"{where}: head_dim {head_dim} x {n_heads} heads != hidden_size {dim} "
                         "is not supported")
    # rope: transformers 4 writes rope_theta (+ rope_scaling), 5 writes rope_parameters
    theta, scaling = cfg.get("rope_theta"), None
    for extra in ("rope_parameters", "rope_scaling"):
        rp = cfg.get(extra)
        if not rp:
            continue
        if not isinstance(rp, dict):
            raise ValueError(f"{where}: {extra} must be an object")
        found = RopeScaling.from_hf(rp, where)  # linear / llama3; others refused
        scaling = scaling or found
        if theta is None and rp.get("rope_theta") is not None:
            theta = rp["rope_theta"]
    args["rope_theta"] = float(theta if theta is not None else 10000.0)
    args["rope_scaling"] = scaling
    args["tie_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    return args


class SafetensorsWriter:
    """Writes a .safetensors file tensor by tensor into an open binary file:
    the header (names, float32 shapes, offsets) first, then each tensor's
    bytes as it arrives, in the declared order."""

    def __init__(self, f, tensors: list[tuple[str, tuple[int, ...]]], metadata: dict | None = None):
        self.f = f
        self.order = [name for name, _ in tensors]
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        off = 0
        self.sizes = {}
        for name, shape in tensors:
            n = 4 * int(np.prod(shape, dtype=np.int64))
            header[name] = {"dtype": "F32", "shape": [int(s) for s in shape],
                            "data_offsets": [off, off + n]}
            self.sizes[name] = n
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        self.next = 0

    def write(self, name: str, a: np.ndarray) -> None:
        if self.next >= len(self.order) or self.order[self.next] != name:
            raise RuntimeError(f"safetensors: {name} written out of order")
        a = np.ascontiguousarray(a, dtype="<f4")
        if a.nbytes != self.sizes[name]:
            raise RuntimeError(f"safetensors: {name} has {a.nbytes} bytes, declared {self.sizes[name]}")
        self.f.write(a.reshape(-1).view(np.uint8))
        self.next += 1

    def finish(self) -> None:
        if self.next != len(self.order):
            raise RuntimeError(f"safetensors: {len(self.order) - self.next} tensors never written")
