"""ckpt.pt: written atomically, read with ``torch.load(weights_only=True)``
(torch>=2.6: earlier versions' safe loader can be bypassed, CVE-2025-32434).
A save or a resume first removes the temporaries an interrupted save left behind.

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
import re
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


def _temp_pattern(path: Path) -> "re.Pattern[str]":
    """The names mkstemp gives atomic_save's temporaries of ``path``:
    ``.NAME.`` + 8 random characters + ``.tmp``."""
    return re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}" + re.escape(".tmp"))


def remove_stale_temporaries(path: os.PathLike) -> List[Path]:
    """Deletes the temporaries an interrupted atomic_save of ``path`` left in its
    directory (regular files named as atomic_save names them, nothing else).
    Returns what was removed."""
    path = Path(path)
    pattern = _temp_pattern(path)
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:      # another process got there first
                continue
            removed.append(Path(entry.path))
    return removed


def atomic_save(obj: Any, path: os.PathLike) -> Path:
    """torch.save to a temporary file in the same directory, fsync, then os.replace:
    a reader sees the old file or the new one, never a partial one. Temporaries
    left by an earlier, interrupted save of the same path are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: unreadable, refused by the safe loader,
    or not a llama2c training checkpoint (the message is one line)."""


def _why(e: Exception) -> str:
    """One short line for a torch.load failure (its messages run to several lines)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        detail = m.group(1).split(" was not an allowed global")[0].strip() if m else ""
        return "refused by torch.load(weights_only=True)" + (f": {detail}" if detail else "")
    why = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return why if len(why) <= 160 else why[:157] + "..."


# what a resume reads from the checkpoint
REQUIRED = ("model", "model_args", "optimizer", "iter_num", "best_val_loss", "sampler", "config")


def load_checkpoint(path: os.PathLike) -> Dict[str, Any]:
    """Reads ``path`` with ``torch.load(weights_only=True)`` for a resume (after
    removing temporaries an interrupted save left beside it). Raises
    FileNotFoundError or CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    remove_stale_temporaries(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # bad zip, truncated pickle, objects the safe loader refuses
        raise CheckpointError(f"{path}: not a readable checkpoint ({_why(e)})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a llama2c training checkpoint")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a llama2c training checkpoint (no {', '.join(missing)})")
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
