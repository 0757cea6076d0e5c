"""Training Llama 2 models in PyTorch (imports torch; ``import llama2c`` never does).

    llama2c train --data DIR [--key=value ...]
    torchrun --nproc_per_node=N -m llama2c.train --data DIR [--fsdp] [--key=value ...]
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

from .config import HelpRequested, TrainConfig, UsageError, parse_args, usage


def train(cfg: TrainConfig, log=None):
    """Run training with ``cfg`` (see llama2c.train.trainer.train)."""
    from .trainer import train as _train

    return _train(cfg, log=log)


def main(argv: Optional[List[str]] = None, prog: str = "llama2c train") -> int:
    """Command line entry: parse ``--key=value`` knobs and train."""
    # Idle OpenMP threads sleep instead of spinning: on a busy CPU, spinning threads
    # slow small-model training several times over (takes effect when torch is not
    # imported yet; an explicit OMP_WAIT_POLICY wins).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
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
