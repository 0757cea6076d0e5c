"""`python -m llama2c.finetune` (and torchrun's `-m llama2c.finetune`).

Like llama2c.train's: a torchrun worker leaves with os._exit once its output is
flushed (torch's teardown of a finished gloo group can abort at exit)."""
import os
import sys

from . import main

code = main(prog="python -m llama2c.finetune")
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
