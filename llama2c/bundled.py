"""Where the bundled model lives: the small story model shipped inside the
package as data files, llama2c/models/model.bin and llama2c/models/tokenizer.bin
(docs/BUNDLED_MODEL.md). `bundled_model()` returns their paths; `Llama(None)`,
`generate(None, ...)` and the CLI without --model use it."""
from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"


def bundled_model() -> tuple[Path, Path]:
    """(model.bin, tokenizer.bin) of the bundled model."""
    model, tok = MODELS_DIR / "model.bin", MODELS_DIR / "tokenizer.bin"
    if not model.is_file() or not tok.is_file():
        raise FileNotFoundError(2, "this build of llama2c ships no bundled model; pass a model path",
                                str(model))
    return model, tok
