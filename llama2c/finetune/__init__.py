"""Fine-tuning: LoRA adapters (default) or every weight, from any model we can read.

    llama2c finetune --base MODEL --data DATA --out-dir DIR [--lora-rank 8 ...| --full]
    llama2c train --init-from=MODEL ...            (the same command)
    torchrun --nproc_per_node=N -m llama2c.finetune ...

See docs/FINETUNING.md. Importing this package imports no torch; running does.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from ..omp_wait import set_training_wait_policy
from .config import FinetuneConfig, UsageError, parse_args, usage


def finetune(cfg: FinetuneConfig, log=None):
    """Run a fine-tune with ``cfg`` (see llama2c.finetune.trainer.finetune)."""
    from .trainer import finetune as _finetune

    return _finetune(cfg, log=log)


def main(argv: Optional[List[str]] = None, prog: str = "llama2c finetune") -> int:
    """The command line: one-line errors, status 2 for a bad command line, 1 for a failed run."""
    set_training_wait_policy()      # as llama2c train (llama2c.omp_wait)
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage(prog))
        return 0
    try:
        cfg = parse_args(argv, prog=prog)
    except UsageError as e:
        print(f"{prog}: error: {e}\n(see {prog} --help)", file=sys.stderr)
        return 2
    try:
        finetune(cfg)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError) as e:
        msg = str(e)
        if isinstance(e, OSError) and e.filename and e.strerror:
            msg = e.strerror if str(e.filename) in e.strerror else f"{e.filename}: {e.strerror}"
        lines = [x for x in msg.strip().splitlines() if x.strip()]
        print(f"{prog}: error: {lines[0] if lines else type(e).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


__all__ = ["FinetuneConfig", "finetune", "main", "parse_args", "usage"]
