"""llama2c: Llama 2 models trained in PyTorch, served by a small fast C engine.

Inference needs only numpy and cffi; importing llama2c never imports torch.
"""
from .errors import (ContextLengthError, ConversionWarning, FormatError, InvalidArgumentError, Llama2Error,
                     Llama2IOError, Llama2MemoryError, StateError)
from .chat_template import ChatTemplate
from .generate import ChatSession, Llama, ModelConfig, generate
from .context import Context
from .sampler import Sampler, SamplingParams, random_f32, random_u32
from .session import Session
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "ChatSession", "ChatTemplate", "Context", "ContextLengthError", "ConversionWarning", "FormatError", "InvalidArgumentError", "Llama", "Llama2Error", "Llama2IOError",
    "Llama2MemoryError", "ModelConfig", "Sampler", "SamplingParams", "Session", "StateError", "Tokenizer", "generate",
    "random_f32", "random_u32", "__version__",
]
