"""`python -m llama2c.train` (and torchrun's `-m llama2c.train`).

A torchrun worker leaves with os._exit once its run is over and its output
flushed: torch's C++ teardown of a finished gloo process group sometimes
aborts the process at interpreter exit ("terminate called without an active
exception", SIGABRT), after every checkpoint and model.bin is already on disk,
which made torchrun report a successful run as failed. Plain runs exit
normally."""
import os
import sys

from . import main

code = main(prog="python -m llama2c.train")
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
