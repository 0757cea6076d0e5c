"""How long idle OpenMP threads of a training process spin before they sleep.

PyTorch's CPU kernels run on libgomp, whose idle workers by default spin for
about 300,000 polls before sleeping. On an idle machine that is fastest; on a
busy one a spinning worker holds a core another process (or this one's other
worker, descheduled) needs, and small models train several times slower. Fully
passive workers (OMP_WAIT_POLICY=PASSIVE) avoid that but pay a sleep and wake-up
on every parallel region, which costs small models a third of their speed on an
idle machine. A short spin (GOMP_SPINCOUNT=3000) keeps most of both: measured on
a 2-core Xeon, a 230K-parameter model took 71 ms a step (default spin 64,
PASSIVE 98) idle and 167 ms (default 765, PASSIVE 138) with the other core busy;
the 15M model was level with PASSIVE either way (docs/TRAINING.md).

Must run before torch is imported (libgomp reads its environment once); an
OMP_WAIT_POLICY or GOMP_SPINCOUNT already set wins.
"""
from __future__ import annotations

import os

TRAINING_SPIN_COUNT = "3000"


def set_training_wait_policy(environ=None) -> None:
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env:
        return
    env["GOMP_SPINCOUNT"] = TRAINING_SPIN_COUNT
