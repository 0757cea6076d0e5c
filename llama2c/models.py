"""The old name of llama2c/bundled.py (where the bundled model lives), kept
because code written against it (tests/test_bundled_model.py among it)
imports `llama2c.models.bundled_model`. Not to be confused with llama2c/models/, the
folder of the bundled files, or llama2c/model.py, the PyTorch model."""
from __future__ import annotations

from .bundled import MODELS_DIR, bundled_model

__all__ = ["MODELS_DIR", "bundled_model"]
