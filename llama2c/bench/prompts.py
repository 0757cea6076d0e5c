"""What both engines are fed: BOS (decode starts after it) and the random
prompt of the prefill measurement."""
from __future__ import annotations

import numpy as np

BOS = 1


def prompt_tokens(n: int, vocab_size: int, seed: int = 7) -> list[int]:
    """BOS then n-1 random ordinary tokens (ids >= 3)."""
    rng = np.random.default_rng(seed)
    return [BOS] + [int(t) for t in rng.integers(3, vocab_size, n - 1)]
