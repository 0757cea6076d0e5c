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
    model(tokens, targets, return_logits=False)          # the loss alone (what training uses)
    loss = model.loss(tokens, targets, ignore_index=-100, reduction="sum")
    model = Transformer.from_bin("stories260K.bin")      # any .bin version (v2 dequantized)
    out = model.generate(idx, 100, temperature=0.8, top_k=200, top_p=0.9)   # KV-cached
    out = model.generate(idx, 100, attention_mask=mask)  # rows of different lengths, padded
    new = Engine(model).generate([[1, 5, 9], [1]], 100, temperature=0.0)    # lists of ids

Speed (training): the classifier and its cross-entropy are fused (linear_cross_entropy:
chunks of rows, gradients made during the forward pass, no (tokens x vocab)
array); RoPE is one complex multiplication by a rotation made once per pass;
RMSNorm has a hand-written backward pass (torch's rms_norm under
torch.compile); attention is scaled_dot_product_attention. With bfloat16 autocast the matmuls
run in bfloat16 and the softmax of the loss in float32. cpu_has_native_bf16()
and keep_freed_memory() serve the trainer's CPU settings.

Speed (generation, Engine): the one-token steps of a plain float32 model run
a lean copy of the forward pass (_Decoder: no module calls, one matmul for
q/k/v and one for w1/w3, about half the tensor operations); greedy picks use numpy's
argmax on a CPU; one sequence on a CPU runs each step on torch's thread
count or on one thread, whichever recent steps ran faster (_StepThreads).

This module imports torch; ``import llama2c`` never imports it.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import time
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .model_args import ModelArgs, ffn_hidden_dim

__all__ = ["Engine", "KVCache", "ModelArgs", "Transformer", "RMSNorm", "cpu_has_native_bf16",
           "ffn_hidden_dim", "keep_freed_memory", "linear_cross_entropy", "rope_tables", "sample_next"]


# ---------------------------------------------------------------------------
# the CPU: native bfloat16, and memory reuse for training
# ---------------------------------------------------------------------------

def cpu_has_native_bf16() -> bool:
    """True when this CPU computes in bfloat16 natively (x86 AVX512_BF16 or
    AMX), where bfloat16 autocast trains several times faster than float32;
    without them, bfloat16 matmuls are emulated and slower."""
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(getattr(torch, "cpu", None), name, None)
        if fn is not None:
            try:
                if fn():
                    return True
            except (RuntimeError, TypeError):
                pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


_ALLOCATOR_TUNED = False


def keep_freed_memory(force: bool = False) -> bool:
    """Tells glibc's malloc to serve large blocks from its heap and keep freed
    memory for reuse instead of returning it to the system (mallopt
    M_MMAP_MAX 0, M_TRIM_THRESHOLD 1 GiB). A training step allocates and frees
    the same large activation and gradient buffers every iteration; by
    default each comes back as fresh pages that the kernel must fault in and
    zero again (5-10% of a CPU training step). Process-wide and one-way, so
    it applies only with ``force`` or when LLAMA2C_MALLOC_TUNING=1 (which
    `llama2c train` sets unless the environment says otherwise), on Linux
    with glibc. Returns True when the process runs with it."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    import os
    import sys

    if not (force or os.environ.get("LLAMA2C_MALLOC_TUNING") == "1") or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    _ALLOCATOR_TUNED = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))
    return _ALLOCATOR_TUNED


def rope_tables(head_size: int, seq_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the RoPE angles, (seq_len, head_size/2) float32: entry
    (p, i) is the angle p / theta^(2i / head_size) of pair (2i, 2i+1) at
    position p (docs/FORWARD.md). Computed in float64, rounded once."""
    idx = torch.arange(0, head_size, 2, dtype=torch.float64, device="cpu")
    inv = 1.0 / (float(theta) ** (idx / head_size))
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float64, device="cpu"), inv)
    return torch.cos(ang).float(), torch.sin(ang).float()


def _compiling() -> bool:
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


def rope_rotation(cos: torch.Tensor, sin: torch.Tensor):
    """What the layers get for RoPE: in eager mode the complex rotation cos +
    i sin (made once per forward pass, shared by every layer), under
    torch.compile the (cos, sin) pair."""
    if _compiling():
        return cos, sin
    return torch.complex(cos, sin), None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: Optional[torch.Tensor]) -> torch.Tensor:
    """Rotates the pairs (2i, 2i+1) of the last dimension of x (B, T, heads,
    head_size) by the angles of cos/sin: (T, head_size/2), or (B, T,
    head_size/2) for per-row positions; or, with sin None, by the complex
    rotation cos (rope_rotation). Computed in float32 (one complex
    multiplication in eager mode; the same products written out for
    torch.compile, which fuses them), returned in x's dtype."""
    xf = x.float()
    if sin is None or (not _compiling() and xf.stride(-1) == 1 and
                       all(st % 2 == 0 for st in xf.stride()[:-1])):
        rot = cos if sin is None else torch.complex(cos, sin)
        rot = rot[None, :, None, :] if rot.dim() == 2 else rot[:, :, None, :]
        if xf.stride(-1) != 1 or any(st % 2 for st in xf.stride()[:-1]):
            xf = xf.contiguous()
        xc = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))
        out = torch.view_as_real(xc * rot).flatten(-2)
    else:
        c = cos[None, :, None, :] if cos.dim() == 2 else cos[:, :, None, :]
        s = sin[None, :, None, :] if sin.dim() == 2 else sin[:, :, None, :]
        xp = xf.reshape(*x.shape[:-1], -1, 2)
        x0, x1 = xp[..., 0], xp[..., 1]
        out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return out.type_as(x)


def _plain(*modules: nn.Module) -> bool:
    """True when every module is a plain bias-free nn.Linear, whose weights the
    fast paths may read directly (a LoRA or other wrapper is called instead)."""
    return all(type(m) is nn.Linear and m.bias is None for m in modules)


class _RMSNormFn(torch.autograd.Function):
    """x * rsqrt(mean(x^2) + eps) * weight in float32 with a hand-written
    backward pass (fewer passes over the activations than autograd's)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
        n = x * rstd
        ctx.save_for_backward(n, rstd, weight)
        return n * weight

    @staticmethod
    def backward(ctx, g):
        n, rstd, weight = ctx.saved_tensors
        gw = g * weight
        dx = (gw - n * (gw * n).mean(-1, keepdim=True)) * rstd if ctx.needs_input_grad[0] else None
        dweight = (g * n).sum(dim=tuple(range(g.dim() - 1))) if ctx.needs_input_grad[1] else None
        return dx, dweight, None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32 without autograd (F.rms_norm is slower on a CPU: it
    copies its input)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps)) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if _compiling():                     # inductor fuses it
                return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
            if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
                return _RMSNormFn.apply(x, self.weight, self.eps)
            return _rms_norm(x, self.weight, self.eps)
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

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q (B, T, H, hs) and k, v (B, T, Hkv, hs), q and k rotated."""
        B, T, _ = x.shape
        H, G, hs = self.n_heads, self.n_kv_heads, self.head_size
        q = self.wq(x).view(B, T, H, hs)
        k = self.wk(x).view(B, T, G, hs)
        v = self.wv(x).view(B, T, G, hs)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional["KVCache"] = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        if cache is not None:
            out = self._cached_attention(q, k, v, cache, layer)
        else:
            if self.kv_mul > 1:
                # query head h reads key/value head h // kv_mul
                k = k.repeat_interleave(self.kv_mul, dim=2)
                v = v.repeat_interleave(self.kv_mul, dim=2)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))      # (B, heads, T, hs)
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
            out = out.transpose(1, 2)
        out = out.reshape(B, T, self.n_heads * self.head_size)
        return self.resid_dropout(self.wo(out))

    def _cached_attention(self, q, k, v, cache: "KVCache", layer: int) -> torch.Tensor:
        """Writes k, v at the cache's next slots and attends over every filled
        slot under cache.mask. The kv_mul query heads of a key/value head are
        laid side by side as extra query rows, so grouped-query attention needs
        no copies of the cache. Returns (B, T, H, hs)."""
        B, T, H, hs = q.shape
        G, r = self.n_kv_heads, self.kv_mul
        start, end = cache.pos, cache.pos + T
        kc, vc = cache.k[layer], cache.v[layer]
        kc[:, :, start:end] = k.transpose(1, 2).to(kc.dtype)
        vc[:, :, start:end] = v.transpose(1, 2).to(vc.dtype)
        mask = cache.mask                                                  # (B, 1, T, S) or None
        qg = q.reshape(B, T, G, r, hs).permute(0, 2, 3, 1, 4).reshape(B, G, r * T, hs)
        if r > 1 and mask is not None:
            mask = mask.unsqueeze(2).expand(B, 1, r, T, end).reshape(B, 1, r * T, end)
        out = F.scaled_dot_product_attention(qg.to(kc.dtype), kc[:, :, :end], vc[:, :, :end],
                                             attn_mask=mask)
        return out.to(q.dtype).reshape(B, G, r, T, hs).permute(0, 3, 1, 2, 4)


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional["KVCache"] = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, self.layer_id)
        return h + self.feed_forward(self.ffn_norm(h))


# ---------------------------------------------------------------------------
# the classifier and its cross-entropy, fused
# ---------------------------------------------------------------------------

# rows of logits handled at a time: about this many logits (float32 matmuls: 32 MiB;
# bfloat16 ones, which run several times faster, 8 MiB), so that a chunk's softmax
# stays in cache instead of streaming (tokens x vocab) arrays through memory
CE_CHUNK_ELEMENTS = 1 << 23
CE_CHUNK_ELEMENTS_LOW = 1 << 21


def _compute_dtype(ref: torch.Tensor) -> torch.dtype:
    dev = ref.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (TypeError, RuntimeError, AttributeError):   # an older torch or an odd device
        pass
    return ref.dtype


def _autocast_off(device_type: str):
    try:
        return torch.autocast(device_type, enabled=False)
    except (RuntimeError, ValueError):
        return contextlib.nullcontext()


def _ce_chunks(h, weight, targets, ignore_index: int, want_logits: bool, need_h: bool, need_w: bool,
               scale_by_count: bool, cdt: torch.dtype):
    """The work of linear_cross_entropy on (N, d) h, (V, d) weight and (N,)
    targets, chunk by chunk, the matmuls in cdt (call with autocast off):
    returns (loss, logits or None, dh or None, dW or None), the gradients
    those of the loss (scaled by 1 / valid targets when scale_by_count).

    With E = exp(logits - rowmax), z its row sums, s each row's weight (0 for
    an ignored target) and Y the one-hot targets, d loss / d logits = (E / z -
    Y) * s. Only E goes through the big matmuls, scaled on the small side
    (dh = (E @ W) * s/z - s * W[t], dW = E^T (h * s/z) - scatter(s * h at
    t)), so the (rows x vocab) chunk is touched once after the softmax."""
    N, d = h.shape
    V = weight.shape[0]
    f32 = torch.float32
    dev = h.device
    hc, wc = h.to(cdt), weight.to(cdt)
    valid = targets != ignore_index
    tgt = torch.where(valid, targets, torch.zeros_like(targets)).to(torch.int64)
    count = valid.sum()
    row_scale = valid.to(f32)
    if scale_by_count:
        row_scale = row_scale / count.clamp(min=1).to(f32)
    row_scale = row_scale[:, None]
    grads = need_h or need_w
    per_chunk = CE_CHUNK_ELEMENTS if cdt == f32 else CE_CHUNK_ELEMENTS_LOW
    rows = max(1, min(N, per_chunk // max(V, 1)))
    buf = torch.empty(rows, V, dtype=f32, device=dev)
    low = torch.empty(rows, V, dtype=cdt, device=dev) if cdt != f32 and not want_logits else None
    logits = torch.empty(N, V, dtype=cdt, device=dev) if want_logits else None
    losses = torch.empty(N, dtype=f32, device=dev)
    dh = torch.empty(N, d, dtype=f32, device=dev) if need_h and cdt == f32 else None
    dw = torch.empty(V, d, dtype=f32, device=dev) if need_w and cdt == f32 else None
    g_low = torch.empty(N, V, dtype=cdt, device=dev) if grads and cdt != f32 else None
    inv_z = torch.empty(N, 1, dtype=f32, device=dev) if grads else None
    for s in range(0, N, rows):
        e = min(N, s + rows)
        lg = buf[:e - s]
        if cdt == f32:
            torch.mm(hc[s:e], wc.t(), out=lg)
            if logits is not None:
                logits[s:e].copy_(lg)
        else:
            out = logits[s:e] if logits is not None else low[:e - s]
            torch.mm(hc[s:e], wc.t(), out=out)
            lg.copy_(out)
        m = lg.amax(dim=1, keepdim=True)
        picked = lg.gather(1, tgt[s:e, None])
        lg.sub_(m).exp_()                                     # E
        z = lg.sum(dim=1, keepdim=True)
        losses[s:e] = (m + z.log() - picked)[:, 0]
        if not grads:
            continue
        r = torch.reciprocal(z, out=inv_z[s:e]).mul_(row_scale[s:e])     # s / z
        if cdt == f32:
            if need_h:
                torch.mm(lg, wc, out=dh[s:e]).mul_(r)
            if need_w:
                if s == 0:
                    torch.mm(lg.t(), hc[s:e] * r, out=dw)
                else:
                    dw.addmm_(lg.t(), hc[s:e] * r)
        else:
            torch.mul(lg, r, out=g_low[s:e])                 # E * s / z, rounded to cdt
    if grads and cdt != f32:
        if need_h:
            dh = torch.mm(g_low, wc).to(f32)
        if need_w:
            dw = torch.mm(g_low.t(), hc).to(f32)
    # the one-hot part, on the small side and in float32
    if need_h:
        dh.sub_(weight.to(f32)[tgt] * row_scale)
    if need_w:
        dw.index_add_(0, tgt, h.to(f32) * -row_scale)
    loss = (losses * valid).sum()
    if scale_by_count:
        loss = loss / count.to(f32)
    dw = dw.to(weight.dtype) if need_w else None
    dh = dh.to(h.dtype) if need_h else None
    return loss, logits, dh, dw


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = cross_entropy(h @ weight.T, targets) without a (tokens x vocab)
    array in memory: the gradients are worked out chunk by chunk during the
    forward pass (the loss is a scalar, so the backward pass only scales them).
    Also returns the logits when asked for (differentiable too)."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, want_logits, scale_by_count):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.cdt = cdt = _compute_dtype(weight)
        with _autocast_off(h.device.type):
            loss, logits, dh, dw = _ce_chunks(h, weight, targets, ignore_index, want_logits, need_h,
                                              need_w, scale_by_count, cdt)
        ctx.set_materialize_grads(False)
        ctx.done = False
        ctx.save_for_backward(h, weight, dh, dw)
        if logits is None:
            return loss, None
        return loss, logits

    @staticmethod
    def backward(ctx, g_loss, g_logits):
        if ctx.done:
            raise RuntimeError("linear_cross_entropy: its backward pass can run only once "
                               "(retain_graph is not supported)")
        ctx.done = True
        h, weight, dh, dw = ctx.saved_tensors
        # the gradients were made in the forward pass: scale them in place by
        # d(output)/d(loss) (1 unless the loss was scaled, e.g. for accumulation)
        one = g_loss is not None and g_loss.device.type == "cpu" and float(g_loss) == 1.0
        gh = gw = None
        if ctx.needs_input_grad[0]:
            gh = dh if one else (dh.mul_(g_loss) if g_loss is not None else torch.zeros_like(h))
        if ctx.needs_input_grad[1]:
            gw = dw if one else (dw.mul_(g_loss) if g_loss is not None else torch.zeros_like(weight))
        if g_logits is not None:
            gl = g_logits.to(ctx.cdt)
            if gh is not None:
                gh = gh + torch.mm(gl, weight.to(ctx.cdt)).to(h.dtype)
            if gw is not None:
                gw = gw + torch.mm(gl.t(), h.to(ctx.cdt)).to(weight.dtype)
        return gh, gw, None, None, None, None


def _no_compile(fn):
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


@_no_compile
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = -1, reduction: str = "mean",
                         return_logits: bool = False):
    """cross_entropy(h @ weight.T, targets, ignore_index=ignore_index,
    reduction=reduction) for h (N, d), weight (V, d), targets (N,), computed a
    few hundred rows at a time so no (N, V) array is built, with the gradients
    of h and weight made on the way (the float32 softmax is exact; matmuls run
    in the autocast dtype when autocast is on). Returns (loss, logits), logits
    (N, V) only with return_logits. reduction "mean" (over targets !=
    ignore_index; NaN when there are none, as in F.cross_entropy) or "sum"."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    mean = reduction == "mean"
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        loss, logits = _LinearCrossEntropy.apply(h, weight, targets, int(ignore_index),
                                                 bool(return_logits), mean)
        return loss, logits
    cdt = _compute_dtype(weight)
    with _autocast_off(h.device.type):
        loss, logits, _, _ = _ce_chunks(h, weight, targets, int(ignore_index), bool(return_logits),
                                        False, False, mean, cdt)
    return loss, logits


class Transformer(nn.Module):
    last_loss: Optional[torch.Tensor]
    # from_state_dict builds models at least this large on the meta device
    META_INIT_MIN_PARAMS = 1 << 26

    def __init__(self, params: ModelArgs):
        super().__init__()
        if params.rope_scaling is not None:  # never drop it silently (docs/LLAMA3.md)
            raise ValueError(f"this model has {params.rope_scaling.type} rope scaling, which the PyTorch model "
                             "does not implement: run it with the C engine (llama2c.Llama); training, "
                             "fine-tuning and loading it into llama2c.model are not supported")
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
        dequantized to float32), 3, 4 (bf16, widened) or 5 (Q4_0, dequantized). Versions 0-2 carry no rope_theta /
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

    def hidden_states(self, tokens: torch.Tensor, cache: Optional["KVCache"] = None) -> torch.Tensor:
        """The final normalized hidden states (B, T, dim) for tokens (B, T).
        With a KVCache, the tokens continue the sequences the cache holds (at
        its next slots; the cache advances by T)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, time), got shape {tuple(tokens.shape)}")
        T = tokens.shape[1]
        if cache is None:
            if T > self.params.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {self.params.max_seq_len}")
            cos, sin = self.freqs_cos[:T], self.freqs_sin[:T]
        else:
            pos = cache.begin(T)
            cos, sin = self.freqs_cos[pos], self.freqs_sin[pos]
        cos, sin = rope_rotation(cos, sin)
        h = self.dropout(self.tok_embeddings(tokens))
        for layer in self.layers:
            h = layer(h, cos, sin) if cache is None else layer(h, cos, sin, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                return_logits: bool = True) -> Optional[torch.Tensor]:
        """Logits (B, T, vocab) for tokens (B, T). With targets (B, T), also
        sets self.last_loss to the mean cross-entropy over targets != -1;
        without, self.last_loss is None. The classifier and the loss are fused
        (linear_cross_entropy): ``return_logits=False`` (what the trainer
        passes) skips writing the (B, T, vocab) logits at all and returns None."""
        h = self.hidden_states(tokens)
        if targets is None:
            self.last_loss = None
            return self.output(h)
        if _plain(self.output):
            B, T, d = h.shape
            loss, logits = linear_cross_entropy(h.reshape(B * T, d), self.output.weight,
                                                targets.reshape(-1), ignore_index=-1,
                                                return_logits=return_logits)
            self.last_loss = loss
            return logits.view(B, T, -1) if logits is not None else None
        logits = self.output(h)
        self.last_loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                         targets.reshape(-1), ignore_index=-1)
        return logits if return_logits else None

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -1,
             reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the model's predictions for tokens (B, T) against
        targets (B, T), over the targets != ignore_index: their mean or
        (reduction="sum") their sum. Fused with the classifier, so no (B, T,
        vocab) logits are built; does not touch last_loss."""
        h = self.hidden_states(tokens)
        if _plain(self.output):
            B, T, d = h.shape
            return linear_cross_entropy(h.reshape(B * T, d), self.output.weight, targets.reshape(-1),
                                        ignore_index=ignore_index, reduction=reduction)[0]
        logits = self.output(h)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=ignore_index, reduction=reduction)

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
                             device_type: str, fused: Optional[bool] = None) -> torch.optim.AdamW:
        """AdamW with weight decay on the matrices (parameters of 2 or more
        dimensions: embeddings and linear weights) and none on the norms.
        ``fused`` picks torch's fused implementation (one kernel for all
        parameters; on a CPU about 3x faster than the default): None means on
        CUDA only, as llama2.c does; ignored where this torch has none."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        fused_ok = "fused" in inspect.signature(torch.optim.AdamW).parameters
        want = device_type == "cuda" if fused is None else bool(fused)
        extra = {"fused": True} if fused_ok and want else {}
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
                 top_k: Optional[int] = None, *, top_p: Optional[float] = None,
                 min_p: Optional[float] = None, attention_mask: Optional[torch.Tensor] = None,
                 pad_id: int = 0, stop_tokens: Sequence[int] = (),
                 generator: Optional[torch.Generator] = None, use_cache: bool = True) -> torch.Tensor:
        """Appends max_new_tokens sampled tokens to each row of idx (B, T) and
        returns (B, T + max_new_tokens). temperature 0 is greedy (argmax, first
        maximum); top_k keeps the k most likely tokens, min_p those at least
        min_p times the most likely, top_p the nucleus of what is left
        (sample_next). Runs on a KV cache (Engine); ``use_cache=False`` is the
        plain loop that recomputes the whole context for every token.

        Rows of different lengths come padded, with ``attention_mask`` (B, T)
        1 for real tokens: all left-padded or all right-padded. Each row is
        continued after its own last token; the result keeps the input's
        padding side, ``pad_id`` filling the gaps. A row that samples one of
        ``stop_tokens`` ends there (pad_id after it). The context is cropped to
        the last max_seq_len tokens, as llama2.c does. Call model.eval() first
        when the model has dropout."""
        if attention_mask is None and not stop_tokens and not use_cache:
            return self._generate_uncached(idx, max_new_tokens, temperature, top_k, top_p, min_p,
                                           generator)
        rows, side = _unpad(idx, attention_mask)
        new = Engine(self).generate(rows, max_new_tokens, temperature=temperature, top_k=top_k,
                                    top_p=top_p, min_p=min_p, stop_tokens=stop_tokens,
                                    generator=generator, use_cache=use_cache)
        B, T = idx.shape
        out = torch.full((B, T + max_new_tokens), int(pad_id), dtype=idx.dtype, device=idx.device)
        for b, (row, more) in enumerate(zip(rows, new)):
            if side == "right":
                seq = torch.as_tensor(row + more, dtype=idx.dtype)
                out[b, :len(seq)] = seq
            else:
                out[b, :T] = idx[b]
                if more:
                    out[b, T:T + len(more)] = torch.as_tensor(more, dtype=idx.dtype)
        return out

    def _generate_uncached(self, idx, max_new_tokens, temperature, top_k, top_p, min_p, generator):
        """llama2.c's loop: the whole (cropped) context through the model for
        every new token."""
        for _ in range(max_new_tokens):
            ctx = idx if idx.size(1) <= self.params.max_seq_len else idx[:, -self.params.max_seq_len:]
            logits = self.output(self.hidden_states(ctx)[:, -1, :])
            nxt = sample_next(logits, temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              generator=generator)
            idx = torch.cat((idx, nxt[:, None].to(idx.dtype)), dim=1)
        return idx


# ---------------------------------------------------------------------------
# generation: sampling, the KV cache and the engine
# ---------------------------------------------------------------------------

def sample_next(logits: torch.Tensor, temperature: float = 1.0, *, top_k: Optional[int] = None,
                top_p: Optional[float] = None, min_p: Optional[float] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row of logits (B, vocab), as (B,) int64, with the C
    sampler's settings (docs/SAMPLING.md): temperature <= 0 is greedy (the
    first maximum). Otherwise softmax(logits / temperature), then top_k
    (keep the k most likely), min_p (keep p >= min_p * max p), top_p (the
    smallest set of the most likely tokens whose mass exceeds top_p of what
    is left), and a draw from what remains, from ``generator`` (torch's
    default one when None)."""
    logits = logits.float()
    if not temperature or temperature <= 0:
        if logits.device.type == "cpu" and logits.dim() == 2:
            # numpy's argmax (also the first maximum) is 10-25x faster than torch's on a CPU
            return torch.from_numpy(logits.detach().numpy().argmax(-1)).long()
        return torch.argmax(logits, dim=-1)
    probs = F.softmax(logits / float(temperature), dim=-1)
    V = probs.shape[-1]
    if top_k is not None and 0 < int(top_k) < V:
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep.scatter_(1, torch.topk(probs, int(top_k), dim=-1).indices, True)
        probs = probs.masked_fill(~keep, 0.0)
    if min_p is not None and min_p > 0:
        probs = probs.masked_fill(probs < float(min_p) * probs.amax(dim=-1, keepdim=True), 0.0)
    if top_p is not None and 0 < float(top_p) < 1:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        cum = sorted_p.cumsum(dim=-1)
        total = cum[:, -1:]
        # keep a token while the mass before it is <= top_p of the total: the
        # nucleus ends at the first token where the running sum exceeds top_p
        drop_sorted = (cum - sorted_p) > float(top_p) * total
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


def _unpad(idx: torch.Tensor, attention_mask: Optional[torch.Tensor]):
    """(rows as lists of ints, "left" | "right") from padded tokens and their mask."""
    if idx.dim() != 2:
        raise ValueError(f"idx must be (batch, time), got shape {tuple(idx.shape)}")
    if attention_mask is None:
        return idx.tolist(), "left"
    if attention_mask.shape != idx.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match idx "
                         f"{tuple(idx.shape)}")
    m = attention_mask.to(torch.bool).cpu()
    left = bool((m[:, 1:] >= m[:, :-1]).all())          # 0...0 1...1 in every row
    right = bool((m[:, 1:] <= m[:, :-1]).all())         # 1...1 0...0
    if not (left or right):
        raise ValueError("attention_mask must pad every row on the same side (left or right)")
    rows = [[int(t) for t, keep in zip(r, mk) if keep] for r, mk in zip(idx.tolist(), m.tolist())]
    if any(not r for r in rows):
        raise ValueError("every row needs at least one token (attention_mask has an empty row)")
    return rows, ("left" if left else "right")


class KVCache:
    """Keys and values of B sequences for every layer: ``k``, ``v`` (layers, B,
    kv_heads, capacity, head_size), two halves of one tensor ``kv`` (layers, B,
    2 * kv_heads, capacity, head_size), so a decoding step writes a token's
    keys and values with one copy. Sequence b starts ``pad[b]`` slots in (its
    prompt left-padded), so every sequence's next token goes to the same slot
    ``pos``; slot j of sequence b holds position j - pad[b]. Pad slots are
    masked out as keys (a pad query sees only itself, so nothing is NaN)."""

    def __init__(self, params: ModelArgs, batch: int, capacity: int, pad=None, *,
                 dtype=torch.float32, device="cpu"):
        G = params.n_kv_heads
        self.kv = torch.zeros((params.n_layers, batch, 2 * G, capacity, params.head_size),
                              dtype=dtype, device=device)
        self.k, self.v = self.kv[:, :, :G], self.kv[:, :, G:]
        self.capacity, self.batch, self.pos = int(capacity), int(batch), 0
        pad = torch.zeros(batch, dtype=torch.long) if pad is None else torch.as_tensor(pad, dtype=torch.long)
        self.pad = pad.to(device).view(batch, 1)
        self.padded = bool((pad > 0).any())
        self.slots = torch.arange(capacity, device=device)
        self.mask: Optional[torch.Tensor] = None
        # a decoding step's key mask, (B, 1, 1, capacity): the real slots (a
        # token past the prompt is never a pad slot, so it sees itself)
        self.step_mask = (self.slots[None, :] >= self.pad)[:, None, None, :] if self.padded else None

    def begin(self, T: int) -> torch.Tensor:
        """Prepares a pass over T new tokens: sets ``mask`` (B, 1, T, pos + T;
        None when every slot is visible) and returns their positions (B, T)
        for RoPE."""
        start, end = self.pos, self.pos + T
        if end > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} positions: cannot add {T} "
                             f"after {self.pos}")
        q = self.slots[start:end]
        k = self.slots[:end]
        if T == 1 and not self.padded:          # one new token sees every filled slot
            self.mask = None
            return (q[None, :] - self.pad).clamp(min=0)
        causal = k[None, :] <= q[:, None]                                   # (T, S)
        if self.padded:
            real = k[None, :] >= self.pad                                   # (B, S)
            own = k[None, :] == q[:, None]
            self.mask = (causal[None] & (real[:, None, :] | own[None]))[:, None]
        else:
            self.mask = causal[None, None].expand(self.batch, 1, T, end)
        return (q[None, :] - self.pad).clamp(min=0)

    def advance(self, T: int) -> None:
        self.pos += T


# wq/wk/wv and w1/w3 are concatenated for decoding (one matmul each instead of
# three and two) when the copies take at most this many bytes: small models,
# whose decoding steps are bound by the number of operations
DECODE_CONCAT_MAX_BYTES = 64 << 20


class _Decoder:
    """One-token decoding steps of a plain float32 Transformer (every linear a
    bias-free nn.Linear, the norms RMSNorm, no active dropout), written out
    with the weights read directly: no module calls, the residual stream
    kept as (B, dim), q/k/v and w1/w3 each from one matmul (weights
    concatenated per call, up to DECODE_CONCAT_MAX_BYTES), RoPE on q and k at
    once in place, keys and values written to the cache with one copy, the
    residual additions fused into the wo and w2 matmuls (addmm), no mask or
    position tensors built unless a row is padded. For the 15M shape that is
    226 aten calls a step instead of 409. The arithmetic is the model's
    (RMSNorm, RoPE as one complex multiplication, attention by
    scaled_dot_product_attention over the cache); logits agree with
    hidden_states + output to float32 rounding."""

    def __init__(self, model: "Transformer"):
        P = model.params
        self.n_heads, self.n_kv_heads, self.head_size = P.n_heads, P.n_kv_heads, P.head_size
        self.hidden = P.hidden_dim
        self.emb = model.tok_embeddings.weight
        self.out = model.output.weight
        self.norm = model.norm.weight
        self.eps = [(blk.attention_norm.eps, blk.ffn_norm.eps) for blk in model.layers]
        self.final_eps = model.norm.eps
        self.rot = torch.complex(model.freqs_cos, model.freqs_sin)     # (max_seq_len, head_size/2)
        mats = [m.weight for blk in model.layers
                for m in (blk.attention.wq, blk.attention.wk, blk.attention.wv,
                          blk.feed_forward.w1, blk.feed_forward.w3)]
        concat = sum(w.numel() * w.element_size() for w in mats) <= DECODE_CONCAT_MAX_BYTES
        self.layers = []
        for blk in model.layers:
            a, f = blk.attention, blk.feed_forward
            if concat:
                qkv = (torch.cat((a.wq.weight, a.wk.weight, a.wv.weight)),)
                w13 = (torch.cat((f.w1.weight, f.w3.weight)),)
            else:
                qkv = (a.wq.weight, a.wk.weight, a.wv.weight)
                w13 = (f.w1.weight, f.w3.weight)
            self.layers.append((blk.attention_norm.weight, qkv, a.wo.weight.t(),
                                blk.ffn_norm.weight, w13, f.w2.weight.t()))

    @staticmethod
    def usable(model: "Transformer") -> bool:
        for blk in model.layers:
            a, f = blk.attention, blk.feed_forward
            if not _plain(a.wq, a.wk, a.wv, a.wo, f.w1, f.w2, f.w3) or \
                    type(blk.attention_norm) is not RMSNorm or type(blk.ffn_norm) is not RMSNorm:
                return False
        if not _plain(model.output) or type(model.norm) is not RMSNorm:
            return False
        if model.training and model.params.dropout > 0:
            return False
        return all(p.dtype == torch.float32 for p in model.parameters())

    def step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The logits (B, vocab) of tokens (B,) at the cache's next slot (the
        cache advances by one)."""
        pos = cache.pos
        if pos >= cache.capacity:
            raise ValueError(f"the KV cache holds {cache.capacity} positions: cannot add 1 "
                             f"after {pos}")
        H, G, hs = self.n_heads, self.n_kv_heads, self.head_size
        HG, B, end = H + G, tokens.shape[0], pos + 1
        if cache.padded:
            rot = self.rot[(pos - cache.pad).clamp_(min=0)]                  # (B, 1, hs/2)
            mask = cache.step_mask[..., :end]
        else:
            rot, mask = self.rot[pos], None                                   # (hs/2,)
        x = F.embedding(tokens, self.emb)                                     # (B, d)
        for (an, wqkv, wo_t, fn, w13, w2_t), (eps1, eps2), kv in zip(self.layers, self.eps, cache.kv):
            h = _rms_norm(x, an, eps1)
            if len(wqkv) == 1:
                qkv = F.linear(h, wqkv[0])
            else:
                qkv = torch.cat([F.linear(h, w) for w in wqkv], dim=-1)
            qkv = qkv.view(B, HG + G, hs)
            torch.view_as_complex(qkv[:, :HG].unflatten(-1, (-1, 2))).mul_(rot)   # RoPE on q and k
            kv[:, :, pos] = qkv[:, H:]
            att = F.scaled_dot_product_attention(qkv[:, :H].view(B, G, H // G, hs),
                                                 kv[:, :G, :end], kv[:, G:, :end], attn_mask=mask)
            x = torch.addmm(x, att.reshape(B, H * hs), wo_t)
            h = _rms_norm(x, fn, eps2)
            if len(w13) == 1:
                ab = F.linear(h, w13[0])
                a, b = ab[:, :self.hidden], ab[:, self.hidden:]
            else:
                a, b = F.linear(h, w13[0]), F.linear(h, w13[1])
            x = torch.addmm(x, F.silu(a).mul_(b), w2_t)
        cache.advance(1)
        return F.linear(_rms_norm(x, self.norm, self.final_eps), self.out)


class _StepThreads:
    """The thread count of one-sequence decoding steps on a CPU: torch's own
    (``n``) or one, whichever recent steps ran faster with. A step of a small
    model is a few dozen operations of microseconds each: with several
    threads it reads the weights with more memory bandwidth, but every
    operation hands work to the other threads and waits for them, and when
    other processes keep the cores busy a descheduled worker stalls each of
    those hand-offs (on 2 shared cores, 2-thread steps of 100-200 ms against
    5 ms on one thread). Which wins depends on the load of the moment, so
    the steps are timed: each count runs once, then the faster one (the
    median of its last 3 steps) runs, and the other is tried again for one
    step once RATIO times its last time has gone by in steps of the faster
    one (at most MAX_WAIT seconds), so retries cost at most 1/RATIO of the
    time. The first one-row steps here gave the same logits with 1 and 2
    threads (each output is one dot product, computed by one thread), so
    the choice does not change the tokens; batches keep torch's setting
    (their matmuls are split differently with more threads). torch's thread
    count is process-wide: while a step runs on one thread, so do other
    threads' torch calls."""

    RATIO, WINDOW, MAX_WAIT = 40.0, 3, 5.0

    def __init__(self, n: int):
        from collections import deque

        self.choices = (int(n), 1)
        self.times = {c: deque(maxlen=self.WINDOW) for c in self.choices}
        self.best = int(n)
        self.spent = 0.0            # seconds of steps on the best count since the other one ran
        self.retrying = False

    def _median(self, c: int) -> float:
        t = sorted(self.times[c])
        return t[len(t) // 2] if t else float("inf")

    def _other(self) -> int:
        return self.choices[1] if self.best == self.choices[0] else self.choices[0]

    def next(self) -> int:
        """The thread count for the next step."""
        other = self._other()
        if self.times[self.best] and (not self.times[other] or
                                      self.spent >= min(self.RATIO * self._median(other), self.MAX_WAIT)):
            self.retrying = True
            return other
        return self.best

    def record(self, threads: int, seconds: float) -> None:
        """The time of the step that ran with ``threads`` (as next() said)."""
        if self.retrying:
            self.retrying = False
            self.times[threads].clear()          # its older times may be stale
            self.spent = 0.0
        else:
            self.spent += seconds
        self.times[threads].append(seconds)
        if self._median(self._other()) < self._median(self.best):
            self.best, self.spent = self._other(), 0.0


class Engine:
    """KV-cached generation with a Transformer (in PyTorch, on the model's
    device: CPU or CUDA), for a batch of prompts of different lengths.

        engine = Engine(model.eval())
        new = engine.generate([[1, 403, 9], [1, 77]], 256, temperature=0.0)   # lists of new ids

    The prompts are left-padded into one batch; the first pass runs every
    prompt token at once (prefill), then one token per sequence per pass.
    When a sequence outgrows max_seq_len, its context is cropped to the last
    max_seq_len tokens and recomputed (llama2.c's cropping).

    The one-token steps of a plain float32 model run a lean version of the
    forward pass (_Decoder). With one sequence on a CPU, ``adaptive_threads``
    lets each step run on torch's thread count or on one thread, whichever
    recent steps ran faster (_StepThreads); torch's setting is restored on
    return. ``adaptive_threads=False`` keeps torch's setting throughout."""

    def __init__(self, model: Transformer, *, adaptive_threads: bool = True):
        self.model = model
        self.adaptive_threads = bool(adaptive_threads)
        self.params = model.params
        w = model.tok_embeddings.weight
        self.device, self.dtype = w.device, w.dtype

    def _step(self, decoder: Optional[_Decoder], tokens: torch.Tensor, cache: KVCache,
              threads: Optional[_StepThreads] = None) -> torch.Tensor:
        """The logits (B, vocab) of one more token (B,) per sequence."""
        if decoder is not None:
            if threads is None:
                return decoder.step(tokens, cache)
            n = threads.next()
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            logits = decoder.step(tokens, cache)
            threads.record(n, time.perf_counter() - t0)
            return logits
        h = self.model.hidden_states(tokens[:, None], cache)
        return self.model.output(h[:, -1, :])

    def _prefill(self, contexts: List[List[int]], room: int):
        """A cache holding the contexts (left-padded), with room for ``room``
        more tokens, and the logits (B, vocab) of their last tokens."""
        L = max(len(c) for c in contexts)
        cap = min(self.params.max_seq_len, L + max(room, 0))
        pad = [L - len(c) for c in contexts]
        tokens = torch.zeros(len(contexts), L, dtype=torch.long)
        for b, c in enumerate(contexts):
            tokens[b, pad[b]:] = torch.as_tensor(c, dtype=torch.long)
        cache = KVCache(self.params, len(contexts), cap, pad, dtype=self.dtype, device=self.device)
        h = self.model.hidden_states(tokens.to(self.device), cache)
        return cache, self.model.output(h[:, -1, :])

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 min_p: Optional[float] = None, stop_tokens: Sequence[int] = (),
                 generator: Optional[torch.Generator] = None, use_cache: bool = True) -> List[List[int]]:
        """The new tokens of each prompt (a list of token ids, at least one),
        max_new_tokens of them, or fewer when a stop token is sampled (it is
        included). Sampling settings as in sample_next. ``use_cache=False``
        recomputes every context for each token (for comparisons)."""
        V, S = self.params.vocab_size, self.params.max_seq_len
        seqs = [list(map(int, p)) for p in prompts]
        if not seqs or any(len(p) == 0 for p in seqs):
            raise ValueError("every prompt needs at least one token")
        for p in seqs:
            bad = [t for t in p if not 0 <= t < V]
            if bad:
                raise ValueError(f"token {bad[0]} is outside the vocabulary (0..{V - 1})")
        n = int(max_new_tokens)
        out: List[List[int]] = [[] for _ in seqs]
        if n <= 0:
            return out
        stops = set(int(t) for t in stop_tokens)
        cache, logits = self._prefill([p[-S:] for p in seqs], n if use_cache else 0)
        n_threads = torch.get_num_threads()
        decoder = threads = None
        try:
            if use_cache and n > 1 and _Decoder.usable(self.model):
                if len(seqs) == 1 and self.device.type == "cpu" and n_threads > 1 and self.adaptive_threads:
                    threads = _StepThreads(n_threads)
                    torch.set_num_threads(1)     # copies: as quick on one thread, which never waits for a busy core
                # the weights as the steps read them, taken now (the model may change between calls)
                decoder = _Decoder(self.model)
            self._loop(seqs, out, n, cache, logits, decoder, threads, temperature, top_k, top_p, min_p,
                       stops, generator, use_cache)
        finally:
            if torch.get_num_threads() != n_threads:
                torch.set_num_threads(n_threads)
        return out

    def _loop(self, seqs, out, n, cache, logits, decoder, threads, temperature, top_k, top_p, min_p,
              stops, generator, use_cache) -> None:
        S = self.params.max_seq_len
        done = [False] * len(seqs)
        for step in range(n):
            nxt = sample_next(logits, temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              generator=generator)
            ids = nxt.tolist()
            for b, t in enumerate(ids):
                if not done[b]:
                    out[b].append(t)
                    seqs[b].append(t)
                    done[b] = t in stops
            if all(done) or step == n - 1:
                break
            if use_cache and cache.pos < cache.capacity:
                logits = self._step(decoder, nxt.to(self.device), cache, threads)
            else:        # no cache, or the context outgrew max_seq_len: recompute the cropped context
                if threads is not None:
                    torch.set_num_threads(threads.choices[0])
                cache, logits = self._prefill([p[-S:] for p in seqs], n - step - 1 if use_cache else 0)
