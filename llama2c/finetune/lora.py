"""LoRA on a llama2c.model.Transformer (imports torch).

``add_lora(model, rank, alpha, targets)`` replaces each targeted projection
(``nn.Linear`` wq, wk, wv, wo, w1, w2, w3 of every layer) by a ``LoRALinear``
that keeps the same ``weight`` parameter (so state_dict names are unchanged)
and adds ``lora_A`` (r x in, Kaiming-uniform) and ``lora_B`` (out x r, zero):

    y = x W^T + scaling * (dropout(x) A^T) B^T,   scaling = alpha / r

B starts at zero, so the adapted model starts as the base model. Every other
parameter is frozen (requires_grad False); only A and B train.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..lora_merge import TARGETS, LoraAdapter

# our projection name -> (submodule of a block, attribute)
_WHERE = {"wq": ("attention", "wq"), "wk": ("attention", "wk"), "wv": ("attention", "wv"),
          "wo": ("attention", "wo"), "w1": ("feed_forward", "w1"), "w2": ("feed_forward", "w2"),
          "w3": ("feed_forward", "w3")}


class LoRALinear(nn.Module):
    """A frozen bias-free linear layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dt))
        # A as nn.Linear initializes its weight (Kaiming uniform, a = sqrt(5)); B zero
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        return out + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta(self) -> torch.Tensor:
        """scaling * B @ A (out x in), float32."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}"


def add_lora(model: nn.Module, rank: int, alpha: float, targets: Iterable[str], dropout: float = 0.0,
             seed: int | None = None) -> List[str]:
    """Freezes every parameter of ``model`` and wraps the targeted projections
    of every layer in LoRALinear. ``seed`` (when given) seeds the A
    initialization, so it does not depend on what drew random numbers
    before. Returns the names of the trainable parameters."""
    targets = [t for t in TARGETS if t in set(targets)]
    for p in model.parameters():
        p.requires_grad_(False)
    gen_state = None
    if seed is not None:
        gen_state = torch.get_rng_state()
        torch.manual_seed(seed)
    try:
        for layer in model.layers:
            for t in targets:
                parent_name, attr = _WHERE[t]
                parent = getattr(layer, parent_name)
                base = getattr(parent, attr)
                if isinstance(base, LoRALinear):
                    raise ValueError(f"layer {layer.layer_id} {t} already has a LoRA adapter")
                setattr(parent, attr, LoRALinear(base, rank, alpha, dropout))
    finally:
        if gen_state is not None:
            torch.set_rng_state(gen_state)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def lora_modules(model: nn.Module) -> Dict[Tuple[int, str], LoRALinear]:
    """(layer, target) -> its LoRALinear."""
    out = {}
    for i, layer in enumerate(model.layers):
        for t, (parent_name, attr) in _WHERE.items():
            m = getattr(getattr(layer, parent_name), attr)
            if isinstance(m, LoRALinear):
                out[(i, t)] = m
    return out


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter tensors (names ending in lora_A / lora_B), detached, on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if k.endswith(("lora_A", "lora_B"))}


def base_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's own tensors without the adapters (names as the plain model's)."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith(("lora_A", "lora_B"))}


def merged_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The base weights with every adapter's update added (float32, CPU)."""
    sd = {k: v.detach().float().cpu().clone() for k, v in base_state_dict(model).items()}
    for (i, t), m in lora_modules(model).items():
        key = f"layers.{i}.{TARGETS[t]}"
        sd[key] = (sd[key].double() + m.delta().double().cpu()).float()
    return sd


def to_adapter(model: nn.Module, base_model: str | None = None) -> LoraAdapter:
    """The model's adapters as a LoraAdapter (numpy; B in Meta's layout)."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters")
    first = next(iter(mods.values()))
    weights = {k: (m.lora_A.detach().float().cpu().numpy().copy(), m.lora_B.detach().float().cpu().numpy().copy())
               for k, m in mods.items()}
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    return LoraAdapter(rank=first.rank, alpha=first.alpha, targets=sorted({t for _, t in mods},
                                                                          key=list(TARGETS).index),
                       weights=weights, scaling={k: m.scaling for k, m in mods.items()}, dropout=dropout,
                       base_model=base_model)
