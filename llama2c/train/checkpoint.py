"""ckpt.pt: written atomically, read with ``torch.load(weights_only=True)``.

Contents (all tensors or plain Python values, so the safe loader accepts them)::

    format        "llama2c-train", version 1
    model         state_dict (fp32, CPU, unwrapped names)
    optimizer     full optimizer state keyed by parameter name
                  (torch.distributed.checkpoint.state_dict layout: the same for a
                  single process, DDP and FSDP2, so a run can resume in another mode)
    scaler        GradScaler state (float16 training) or None
    model_args    the ModelArgs fields
    config        the TrainConfig the run was started with
    iter_num, best_val_loss
    sampler       {"epoch", "pos", "n_windows"} of the training batches
    rng           one entry per rank: {"torch", "cuda", "numpy", "python"}
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

FORMAT = "llama2c-train"
VERSION = 1


def rng_state(device_type: str = "cpu") -> Dict[str, Any]:
    """This process's random states as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": None,
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(py_version), "state": [int(v) for v in py_state],
                   "gauss_next": py_gauss},
    }
    if device_type == "cuda" and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any], device_type: str = "cpu") -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device_type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def atomic_save(obj: Any, path: os.PathLike) -> Path:
    """torch.save to a temporary file in the same directory, fsync, then os.replace:
    a reader sees the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def load_checkpoint(path: os.PathLike) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise ValueError(f"{path}: not a llama2c training checkpoint")
    return ckpt


def clean_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop the prefixes torch.compile / DDP add to parameter names."""
    out = {}
    for k, v in sd.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def make_checkpoint(*, model_sd, optim_sd, scaler_sd, model_args: Dict, config: Dict, iter_num: int,
                    best_val_loss: float, sampler: Dict, rng: List[Dict]) -> Dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": clean_state_dict(model_sd),
        "optimizer": optim_sd,
        "scaler": scaler_sd,
        "model_args": dict(model_args),
        "config": dict(config),
        "iter_num": int(iter_num),
        "best_val_loss": float(best_val_loss),
        "sampler": dict(sampler),
        "rng": list(rng),
    }
