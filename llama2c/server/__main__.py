"""python -m llama2c.server [MODEL] [flags]: the same as `llama2c serve`."""
import sys

from ..cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
