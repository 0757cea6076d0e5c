"""`python -m llama2c.bench ...`: the same as `llama2c bench ...`."""
import sys

from .cli import main

sys.exit(main())
