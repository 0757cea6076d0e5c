"""The Llama 2 transformer in PyTorch, numerically the model of docs/FORWARD.md.

Weights use Meta's layout (no q/k permutation) and llama2.c's parameter names,
so a state_dict here is a llama2.c training checkpoint's ``"model"``:

    tok_embeddings.weight                      (vocab, dim)
    layers.{i}.attention_norm.weight           (dim,)
    layers.{i}.attention.wq|wk|wv|wo.weight    (dim|kv_dim, dim) / (dim, dim)
    layers.{i}.ffn_norm.weight                 (dim,)
    layers.{i}.feed_forward.w1|w3.weight       (hidden, dim)
    layers.{i}.feed_forward.w2.weight          (dim, hidden)
    norm.weight                                (dim,)
    output.weight                              (vocab, dim), the embedding itself when tied

API in one place:

    model = Transformer(ModelArgs(dim=288, n_layers=6, n_heads=6, vocab_size=32000))
    logits = model(tokens)              # tokens (B, T) long -> logits (B, T, vocab)
    logits = model(tokens, targets)     # same logits; model.last_loss = mean cross-entropy
                                        # over targets != -1 (None after a call without targets)
    model = Transformer.from_bin("stories260K.bin")      # any .bin version (v2 dequantized)
    out = model.generate(idx, 100, temperature=0.8, top_k=200)

This module imports torch; ``import llama2c`` never imports it.
"""
from __future__ import annotations

import inspect
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .model_args import ModelArgs, ffn_hidden_dim

__all__ = ["ModelArgs", "Transformer", "RMSNorm", "ffn_hidden_dim", "rope_tables"]


def rope_tables(head_size: int, seq_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the RoPE angles, (seq_len, head_size/2) float32: entry
    (p, i) is the angle p / theta^(2i / head_size) of pair (2i, 2i+1) at
    position p (docs/FORWARD.md). Computed in float64, rounded once."""
    idx = torch.arange(0, head_size, 2, dtype=torch.float64, device="cpu")
    inv = 1.0 / (float(theta) ** (idx / head_size))
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float64, device="cpu"), inv)
    return torch.cos(ang).float(), torch.sin(ang).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the pairs (2i, 2i+1) of the last dimension of x (B, T, heads,
    head_size) by the angles of cos/sin (T, head_size/2)."""
    xp = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xp[..., 0], xp[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_size = args.head_size
        self.kv_mul = args.n_heads // args.n_kv_heads
        self.wq = nn.Linear(args.dim, args.dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_dim, bias=False)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_size)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_size)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_size)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if self.kv_mul > 1:
            # query head h reads key/value head h // kv_mul
            k = k.repeat_interleave(self.kv_mul, dim=2)
            v = v.repeat_interleave(self.kv_mul, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))      # (B, heads, T, hs)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_size)
        return self.resid_dropout(self.wo(out))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    last_loss: Optional[torch.Tensor]
    # from_state_dict builds models at least this large on the meta device
    META_INIT_MIN_PARAMS = 1 << 26

    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.dropout = nn.Dropout(params.dropout)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        self.tie_weights()
        # RoPE tables: derived from params, so not part of the state_dict
        self.register_buffer("freqs_cos", torch.empty(0), persistent=False)
        self.register_buffer("freqs_sin", torch.empty(0), persistent=False)
        self.init_rope()
        self.last_loss = None
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_weights()   # a meta-device model is initialized once materialized

    # -- construction helpers ------------------------------------------------

    def tie_weights(self) -> None:
        """Shares the classifier with the embedding when params.tie_embeddings
        (needed again after to_empty(), which unties parameters)."""
        if self.params.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def init_rope(self) -> None:
        """(Re)computes the RoPE tables on the device of the parameters (call
        after materializing a model built on the meta device)."""
        device = self.tok_embeddings.weight.device
        p = self.params
        if device.type == "meta":
            shape = (p.max_seq_len, p.head_size // 2)
            self.freqs_cos = torch.empty(shape, device="meta")
            self.freqs_sin = torch.empty(shape, device="meta")
            return
        cos, sin = rope_tables(p.head_size, p.max_seq_len, p.rope_theta)
        self.freqs_cos, self.freqs_sin = cos.to(device), sin.to(device)

    @torch.no_grad()
    def init_weights(self) -> None:
        """llama2.c-style initialization: every Linear and the embedding
        normal(0, 0.02), the residual projections (wo, w2) normal(0,
        0.02 / sqrt(2 * n_layers)), norms ones."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        resid_std = 0.02 / math.sqrt(2 * self.params.n_layers)
        for layer in self.layers:
            nn.init.normal_(layer.attention.wo.weight, mean=0.0, std=resid_std)
            nn.init.normal_(layer.feed_forward.w2.weight, mean=0.0, std=resid_std)

    @classmethod
    def _empty(cls, params: ModelArgs, device) -> "Transformer":
        """A model whose weights are about to be overwritten. Large models
        are built on the meta device and materialized uninitialized; small
        ones directly (cheaper than the one-time cost of meta-device init)."""
        d, h, kv, V, L = params.dim, params.hidden_dim, params.kv_dim, params.vocab_size, params.n_layers
        n = V * d * (1 if params.tie_embeddings else 2) + L * (2 * d * d + 2 * kv * d + 3 * h * d)
        if n < cls.META_INIT_MIN_PARAMS:
            return cls(params).to(device)
        with torch.device("meta"):
            model = cls(params)
        model.to_empty(device=device)
        model.tie_weights()
        return model

    @classmethod
    def from_state_dict(cls, params: ModelArgs, state_dict: dict, device="cpu") -> "Transformer":
        """A model holding exactly these weights (float32), built without
        spending time on random initialization. A tied model needs only
        tok_embeddings.weight (output.weight, if present, must be equal)."""
        model = cls._empty(params, device)
        sd = dict(state_dict)
        if params.tie_embeddings:
            out = sd.pop("output.weight", None)
            if out is not None and out is not sd.get("tok_embeddings.weight") and \
                    not torch.equal(out, sd["tok_embeddings.weight"]):
                raise ValueError("tie_embeddings is set but output.weight differs from "
                                 "tok_embeddings.weight")
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not (params.tie_embeddings and k == "output.weight")]
        if missing or unexpected:
            raise ValueError(f"state_dict does not match the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        model.init_rope()
        return model

    @classmethod
    def from_bin(cls, path, device="cpu") -> "Transformer":
        """Loads a llama2c/llama2.c model file of version 0, 1, 2 (Q8_0,
        dequantized to float32), 3 or 4 (bf16, widened). Versions 0-2 carry no rope_theta /
        norm_eps: they get 10000 / 1e-5."""
        from .export.sources import open_bin
        with open_bin(path) as src:
            return cls.from_source(src, device=device)

    @classmethod
    def from_source(cls, src, device="cpu") -> "Transformer":
        """A Transformer holding the weights of an export Source (any reader in
        llama2c.export.sources: .bin, checkpoint, Meta, Hugging Face)."""
        import numpy as np

        sd = {k: torch.from_numpy(np.array(src.get(k), dtype=np.float32)) for k in src.keys()}
        return cls.from_state_dict(src.args, sd, device=device)

    @classmethod
    def from_checkpoint(cls, path, device="cpu") -> "Transformer":
        """Loads a training checkpoint (a dict with "model" and "model_args",
        read with weights_only=True)."""
        from .export.sources import CheckpointSource
        with CheckpointSource(path) as src:
            return cls.from_source(src, device=device)

    # -- forward -------------------------------------------------------------

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final normalized hidden states (B, T, dim) for tokens (B, T)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, time), got shape {tuple(tokens.shape)}")
        T = tokens.shape[1]
        if T > self.params.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {self.params.max_seq_len}")
        h = self.dropout(self.tok_embeddings(tokens))
        cos, sin = self.freqs_cos[:T], self.freqs_sin[:T]
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens (B, T). With targets (B, T), also
        sets self.last_loss to the mean cross-entropy over targets != -1;
        without, self.last_loss is None."""
        logits = self.output(self.hidden_states(tokens))
        if targets is not None:
            self.last_loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                             targets.reshape(-1), ignore_index=-1)
        else:
            self.last_loss = None
        return logits

    # -- training helpers ----------------------------------------------------

    def get_num_params(self, non_embedding: bool = False) -> int:
        """Parameters (a tied classifier counted once); non_embedding leaves
        out the token embedding (and the untied classifier)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_embeddings.weight.numel()
            if not self.params.tie_embeddings:
                n -= self.output.weight.numel()
        return n

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas,
                             device_type: str) -> torch.optim.AdamW:
        """AdamW with weight decay on the matrices (parameters of 2 or more
        dimensions: embeddings and linear weights) and none on the norms;
        the fused implementation on CUDA when this torch has it."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        fused_ok = "fused" in inspect.signature(torch.optim.AdamW).parameters
        extra = {"fused": True} if fused_ok and device_type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(betas), **extra)

    def flops_per_token(self) -> float:
        """Forward + backward FLOPs per token (PaLM appendix B): 6N plus the
        attention term 12 * layers * heads * head_size * seq_len."""
        p = self.params
        return 6 * self.get_num_params() + 12 * p.n_layers * p.n_heads * p.head_size * p.max_seq_len

    def estimate_mfu(self, fwdbwd_per_iter: float, dt: float, peak_flops: float = 312e12) -> float:
        """Model FLOPs utilization: achieved FLOP/s over `peak_flops` (default
        an A100's bf16 peak) when one iteration runs `fwdbwd_per_iter`
        sequences of max_seq_len tokens forward and backward in `dt` seconds."""
        flops_per_iter = self.flops_per_token() * self.params.max_seq_len * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    # -- sampling ------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None) -> torch.Tensor:
        """Appends max_new_tokens sampled tokens to idx (B, T) and returns
        (B, T + max_new_tokens). temperature 0 is greedy (argmax, first
        maximum); top_k keeps the k most likely tokens. The context is cropped
        to the last max_seq_len tokens. Call model.eval() first when the model
        has dropout."""
        for _ in range(max_new_tokens):
            ctx = idx if idx.size(1) <= self.params.max_seq_len else idx[:, -self.params.max_seq_len:]
            logits = self.output(self.hidden_states(ctx)[:, -1, :]).float()
            if temperature == 0.0:
                nxt = torch.argmax(logits, dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k > 0:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, nxt.to(idx.dtype)), dim=1)
        return idx
