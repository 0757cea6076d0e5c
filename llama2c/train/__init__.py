"""Training Llama 2 models in PyTorch (imports torch; ``import llama2c`` never does).

    llama2c train --data DIR [--key=value ...]
    torchrun --nproc_per_node=N -m llama2c.train --data DIR [--fsdp] [--key=value ...]
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

from ..omp_wait import set_training_wait_policy
from .config import HelpRequested, TrainConfig, UsageError, parse_args, usage


def train(cfg: TrainConfig, log=None):
    """Run training with ``cfg`` (see llama2c.train.trainer.train). An
    ``init_from`` naming a model fine-tunes it (llama2c.finetune, LoRA; the
    knobs both share carry over)."""
    if cfg.init_from not in ("scratch", "resume"):
        from ..finetune import finetune
        from ..finetune.config import FIELDS, FinetuneConfig

        from .config import KNOBS

        shared = {k: getattr(cfg, k) for k in FIELDS if k in KNOBS and cfg.was_given(k)}
        version = {0: "auto", -1: "none"}.get(cfg.export_version, str(cfg.export_version))
        ft = FinetuneConfig(**{**shared, "base": cfg.init_from, "overwrite": cfg.overwrite,
                               "version": version, "out_dir": cfg.out_dir})
        return finetune(ft, log=log)
    from .trainer import train as _train

    return _train(cfg, log=log)


def _flag_value(argv: List[str], names) -> Optional[str]:
    """The value of the last of ``names`` on a command line (--key=v or --key v)."""
    value = None
    for i, a in enumerate(argv):
        for name in names:
            if a == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif a.startswith(name + "="):
                value = a[len(name) + 1:]
    return value


def _is_finetune_checkpoint(path: str) -> bool:
    """Whether ``path`` is a checkpoint `llama2c finetune` wrote (read without torch)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            return name is not None and b"llama2c-finetune" in z.read(name)
    except (OSError, zipfile.BadZipFile):
        return False


def finetune_argv(argv: List[str]) -> Optional[List[str]]:
    """`llama2c train --init-from=MODEL ...` (or a resume of a fine-tune's
    out_dir) as `llama2c finetune`'s command line; None for a training run."""
    init = _flag_value(argv, ("--init-from", "--init_from"))
    if init is None or init == "scratch":
        return None
    if init == "resume":
        out = _flag_value(argv, ("--out-dir", "--out_dir")) or "out"
        if not _is_finetune_checkpoint(os.path.join(out, "ckpt.pt")):
            return None
        rest, skip = [], False
        for i, a in enumerate(argv):
            if skip:
                skip = False
                continue
            if a in ("--init-from", "--init_from"):
                skip = True
                continue
            if not a.startswith(("--init-from=", "--init_from=")):
                rest.append(a)
        return rest + ["--resume", "--out-dir", out]
    argv = list(argv)
    for i, a in enumerate(argv):       # train's --export-version: 0 is auto, -1 none
        for name in ("--export-version", "--export_version"):
            if a == name and i + 1 < len(argv) and argv[i + 1] in ("0", "-1"):
                argv[i + 1] = {"0": "auto", "-1": "none"}[argv[i + 1]]
            elif a in (f"{name}=0", f"{name}=-1"):
                argv[i] = f"{name}={'auto' if a.endswith('=0') else 'none'}"
    if _flag_value(argv, ("--out-dir", "--out_dir")) is None:
        argv += ["--out-dir", "out"]          # train's default out_dir
    return argv


def main(argv: Optional[List[str]] = None, prog: str = "llama2c train") -> int:
    """Command line entry: parse ``--key=value`` knobs and train."""
    # idle OpenMP threads spin only briefly before sleeping (llama2c.omp_wait)
    set_training_wait_policy()
    # a training process keeps freed memory for its next step (llama2c.model.keep_freed_memory)
    os.environ.setdefault("LLAMA2C_MALLOC_TUNING", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    ft = finetune_argv(argv) if not any(a in ("-h", "--help") for a in argv) else None
    if ft is not None:                       # --init-from=MODEL: a fine-tune
        from ..finetune import main as finetune_main

        return finetune_main(ft, prog=prog)
    try:
        cfg = parse_args(argv)
    except HelpRequested:
        print(usage(prog))
        return 0
    except UsageError as e:
        print(f"{prog}: error: {e}\n(see {prog} --help)", file=sys.stderr)
        return 2
    try:
        train(cfg)
    except (UsageError, ValueError, OSError, RuntimeError) as e:
        msg = str(e)
        if isinstance(e, OSError) and e.filename and e.strerror:
            msg = f"{e.filename}: {e.strerror}"
        lines = [x for x in msg.strip().splitlines() if x.strip()]   # errors are one line
        print(f"{prog}: error: {lines[0] if lines else type(e).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


__all__ = ["TrainConfig", "main", "parse_args", "train", "usage"]
