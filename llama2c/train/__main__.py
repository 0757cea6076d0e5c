import sys

from . import main

sys.exit(main(prog="python -m llama2c.train"))
