"""Text generation from Python: `generate()` for one call, `Llama` for a model
you load once and reuse (generate, stream, chat, tokenize, forward).

The heavy lifting is libllama2's: generate() runs the whole loop in C, and
stream() advances it one token per call. cffi releases the GIL around every
C call, so two Llama objects run in parallel in two threads.
"""
from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from . import _ffi
from ._ffi import ffi, lib
from . import openai_api
from .chat import ChatSession
from .completion import Completer
from .context import Context
from .model_args import ArgsView, ModelArgs
from .errors import ConversionWarning, InvalidArgumentError, new_error, raise_for
from .sampler import SamplingParams
from .scoring import Score, embed_ids, fit_for_embedding, score_ids
from .session import Session
from .tokenizer import BOS, EOS, Tokenizer
from .validate import c_path, check_int, check_threads


@dataclass(frozen=True)
class ModelConfig(ArgsView):
    """What the engine read from a model file: its hyperparameters (a ModelArgs,
    also as properties: dim, hidden_dim, n_layers, n_heads, n_kv_heads,
    vocab_size, seq_len, head_size, kv_dim, shared_classifier, rope_theta,
    norm_eps) and the file's facts."""
    args: ModelArgs
    version: int
    weights: str  # "f32", "bf16", "q8_0" or "q4_0": how the engine runs it
    group_size: int
    file_size: int
    n_params: int
    rope_scaling_type: str = "none"  # "linear", "llama3" or "factors" (a GGUF file's rope_freqs)


class _Count(int):
    """An int that can also be called, so that both `llm.n_ctx` (ours) and
    `llm.n_ctx()` (llama-cpp-python's) work."""

    def __call__(self) -> int:
        return int(self)


# llama-cpp-python's Llama() options that do not change what this engine
# computes, accepted so its users' code runs unchanged
ACCEPTED_OPTIONS = {"verbose", "n_batch", "n_ubatch", "n_threads_batch", "use_mmap", "use_mlock", "logits_all",
                    "embedding", "last_n_tokens_size", "n_gpu_layers", "main_gpu", "offload_kqv", "flash_attn"}


def check_llama_cpp_options(options: dict) -> None:
    unknown = sorted(set(options) - ACCEPTED_OPTIONS)
    if unknown:
        raise TypeError(f"Llama() got unexpected keyword argument(s): {', '.join(unknown)}")


def _rope_scaling_of(c):
    """linear / llama3 as a RopeScaling (a GGUF file's rope_freqs factors have none)."""
    from .rope_scaling import RopeScaling

    if c.rope_scaling == _ffi.ROPE_LINEAR:
        return RopeScaling("linear", float(c.rope_factor))
    if c.rope_scaling == _ffi.ROPE_LLAMA3:
        return RopeScaling("llama3", float(c.rope_factor), float(c.rope_low_freq_factor),
                           float(c.rope_high_freq_factor), int(c.rope_original_ctx))
    return None


def _config_from(c) -> ModelConfig:
    args = ModelArgs(dim=c.dim, hidden_dim=c.hidden_dim, n_layers=c.n_layers, n_heads=c.n_heads,
                     n_kv_heads=c.n_kv_heads, vocab_size=c.vocab_size, max_seq_len=c.seq_len,
                     rope_theta=float(c.rope_theta), norm_eps=float(c.norm_eps),
                     tie_embeddings=bool(c.shared_classifier), rope_scaling=_rope_scaling_of(c))
    return ModelConfig(args=args, version=c.version,
                       weights={_ffi.WEIGHTS_Q8_0: "q8_0", _ffi.WEIGHTS_BF16: "bf16",
                                _ffi.WEIGHTS_Q4_0: "q4_0"}.get(c.weights, "f32"),
                       group_size=c.group_size, file_size=int(c.file_size), n_params=int(c.n_params),
                       rope_scaling_type={_ffi.ROPE_LINEAR: "linear", _ffi.ROPE_LLAMA3: "llama3",
                                          _ffi.ROPE_FACTORS: "factors"}.get(c.rope_scaling, "none"))


class Llama:
    """A model loaded once and reused.

    tokenizer=None uses tokenizer.bin beside the model file (loaded on first
    use, so forward() works without one). quantize=True runs fp32 files with
    the int8 engine (Q8_0, quantized while loading), as `runq` does.
    n_ctx: the context length of every context made here (None or 0: the
    model's seq_len; memory is committed only as positions are reached).

    The weights are loaded once; forward(), generate()/stream() and each chat
    session run in contexts of their own (see create_context), so none of
    them disturbs another's KV cache."""

    def __init__(self, model_path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                 n_threads: int | None = None, quantize: bool = False, n_ctx: int | None = None,
                 chat_format: str | None = None, seed: int | None = None,
                 lora: str | os.PathLike | None = None, dtype: str | None = None,
                 cache_dir: str | os.PathLike | None = None, **llama_cpp_options):
        check_llama_cpp_options(llama_cpp_options)
        from .hf_in import llama_inputs  # a Hugging Face folder: converted once into a cache (hf_in.py)

        model_path, tokenizer = llama_inputs(model_path, tokenizer, dtype, cache_dir)
        raw_path = c_path(model_path)
        self.model_path = os.fsdecode(raw_path)
        threads = check_threads(n_threads) if n_threads is not None else None
        if n_ctx is not None:  # 0: the model's seq_len, as llama-cpp-python reads it
            n_ctx = check_int("n_ctx", n_ctx, 0) or None
        tokenizer_raw = c_path(tokenizer) if tokenizer is not None else None
        err = new_error()
        out = ffi.new("llama2_transformer **")
        flags = _ffi.OPEN_QUANTIZE if quantize else 0
        open_path, merged = raw_path, None
        if lora is not None:  # a PEFT LoRA adapter folder, merged into a temporary copy (lora_merge.py)
            from .lora_merge import merged_model_file

            merged = merged_model_file(self.model_path, lora)[0]
            open_path = c_path(merged)
        try:
            raise_for(lib.llama2_transformer_open(out, open_path, flags, err), err, self.model_path)
        finally:
            if merged is not None and os.name != "nt":  # the engine keeps its mapping of the file
                os.unlink(merged)
        self._ptr = ffi.gc(out[0], lib.llama2_transformer_free)
        self.config = _config_from(lib.llama2_transformer_config(self._ptr))
        notice = lib.llama2_transformer_notice(self._ptr)
        # what loading converted (GGUF tensors dequantized to bf16), or None
        self.notice: str | None = ffi.string(notice).decode("utf-8", "replace") if notice != ffi.NULL else None
        if self.notice:
            warnings.warn(self.notice, ConversionWarning, stacklevel=2)
        if n_ctx is not None and n_ctx > self.config.seq_len:
            raise InvalidArgumentError(f"n_ctx {n_ctx} is larger than the model's seq_len {self.config.seq_len}")
        self.n_ctx: int = _Count(n_ctx or self.config.seq_len)
        if threads is not None:
            lib.llama2_transformer_set_threads(self._ptr, threads)
        self._tokenizer_path = os.fsdecode(tokenizer_raw) if tokenizer_raw is not None else None
        self._tokenizer: Tokenizer | None = None
        self._context: Context | None = None  # forward() / forward_batch()
        self._generator: Session | None = None  # generate() / stream()
        self._making = threading.Lock()  # two threads' first calls make one context, not two
        self._completions: Completer | None = None  # create_completion / create_chat_completion
        self._side: Context | None = None  # score / embed
        self.chat_format = chat_format
        self._chat_template = None
        self.seed = seed  # the seed of calls that give none (None: a fresh one each call)

    def create_context(self, n_ctx: int | None = None) -> Context:
        """A fresh KV cache over this model's weights (n_ctx: default this
        Llama's), with forward() and forward_batch() of its own."""
        return Context(self._ptr, self.n_ctx if n_ctx is None else n_ctx, self.config.vocab_size, owner=self)

    @property
    def context(self) -> Context:
        """The context forward() and forward_batch() run in."""
        with self._making:
            if self._context is None:
                self._context = self.create_context()
            return self._context

    @property
    def tokenizer(self) -> Tokenizer:
        """The C tokenizer (tokenizer.bin, a GGUF SentencePiece vocabulary)
        or, for byte-level BPE vocabularies (tokenizer.json, a GGUF "gpt2"
        one), a BPETokenizer (hf_tokenizer.py); chosen by tokenizer_choice.py."""
        if self._tokenizer is None:
            from .tokenizer_choice import open_tokenizer

            self._tokenizer = open_tokenizer(self._tokenizer_path, self.model_path,
                                             self.config.version == _ffi.VERSION_GGUF, self.config.vocab_size)
        return self._tokenizer

    # ---- tokens ----
    def tokenize(self, text: str | bytes, bos: bool = True, eos: bool = False, *, add_bos: bool | None = None,
                 special: bool = False) -> list[int]:
        """Token ids of text (str, or UTF-8 bytes as llama-cpp-python takes);
        add_bos is llama-cpp-python's name for bos. special (BPE tokenizers):
        text such as "<|eot_id|>" is that special token, as
        llama-cpp-python's special=True."""
        bos = bos if add_bos is None else add_bos
        if getattr(self.tokenizer, "kind", "c") == "bpe":
            return self.tokenizer.encode(text, bos=bos, eos=eos, special=special)
        return self.tokenizer.encode(text, bos=bos, eos=eos)

    def n_vocab(self) -> int:
        return self.config.vocab_size

    def n_embd(self) -> int:
        return self.config.dim

    def _special_id(self, name: str, default: int) -> int:
        try:
            tok = self.tokenizer
        except FileNotFoundError:  # no tokenizer: the Llama 2 ids
            return default
        value = getattr(tok, name, default)
        return -1 if value is None else value  # a BPE vocabulary without one: -1, as llama-cpp-python

    def token_bos(self) -> int:
        return self._special_id("bos_id", BOS)

    def token_eos(self) -> int:
        return self._special_id("eos_id", EOS)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def session(self, n_ctx: int | None = None) -> Session:
        """A generation context of its own: generate(), stream(), forward()
        and forward_batch(), none of which touches another's KV cache."""
        return Session(self, n_ctx)

    def _generation(self) -> Session:
        with self._making:
            if self._generator is None:
                self._generator = self.session()
            return self._generator

    # ---- generation (in a session of this Llama's own) ----
    def generate(self, prompt: str = "", **settings) -> str:
        """The text `run` prints for these settings (prompt included), without
        its final newline: see Session.generate."""
        return self._generation().generate(prompt, **settings)

    def stream(self, prompt: str = "", **settings) -> Iterator[str]:
        """Yields the same text as generate(), piece by piece: see Session.stream."""
        return self._generation().stream(prompt, **settings)

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Logits (float32, vocab_size) for token at position pos in this
        Llama's own context (self.context): its KV cache holds whatever
        positions earlier forward calls filled; generate() and chat sessions
        do not touch it. Calls from several threads are serialized."""
        return self.context.forward(token, pos)

    def forward_batch(self, tokens, pos: int) -> np.ndarray:
        """Runs tokens at positions pos, pos+1, ... in one pass over the weights
        (prompt processing) and returns the last token's logits: bit-identical
        to calling forward() for each token in turn."""
        return self.context.forward_batch(tokens, pos)

    def eval(self, tokens, pos: int = 0) -> np.ndarray:
        """Logits for every token (an (n, vocab_size) array) of tokens run at
        positions pos, pos+1, ... in one pass, in self.context; row i is
        bit-identical to forward(tokens[i], pos + i)."""
        return self.context.forward_batch(tokens, pos, all_logits=True)

    # ---- OpenAI-shaped calls (llama-cpp-python's names, shapes and defaults) ----
    def _completer(self) -> Completer:
        with self._making:
            if self._completions is None:
                self._completions = Completer(self, self.create_context())
            return self._completions

    def _seeded(self, settings: dict) -> dict:
        if settings.get("seed") is None and self.seed is not None:
            settings["seed"] = self.seed
        return settings

    def create_completion(self, prompt: str | list[int], **settings):
        """A completion of prompt (a str, tokenized with BOS, or token ids) as
        llama-cpp-python returns it: {"id", "object": "text_completion",
        "created", "model", "choices": [{"text", "index", "logprobs",
        "finish_reason": "stop" | "length"}], "usage"}; stream=True yields
        chunks of that shape. Arguments as llama-cpp-python's (max_tokens=16
        new tokens, temperature=0.8, top_p=0.95, top_k=40, min_p=0.05,
        repeat_penalty=1.0, stop, seed, logprobs=k, echo, logit_bias,
        presence/frequency_penalty) plus truncate="left" (a prompt that does
        not fit keeps its end instead of raising ContextLengthError).
        logprobs come from the raw logits, before any sampling transform."""
        return openai_api.create_completion(self, prompt, **self._seeded(settings))

    __call__ = create_completion

    def create_chat_completion(self, messages: list[dict], **settings):
        """The assistant's reply to messages, as llama-cpp-python returns it:
        {"object": "chat.completion", "choices": [{"message": {"role":
        "assistant", "content"}, "finish_reason", "logprobs"}], "usage", ...};
        stream=True yields "chat.completion.chunk"s with "delta"s. Rendered
        with this Llama's chat template (chat_format=, default Llama 2) or
        template=; defaults as llama-cpp-python's (temperature=0.2,
        max_tokens=None: until the context is full)."""
        from . import openai_chat

        return openai_chat.create_chat_completion(self, messages, **self._seeded(settings))

    @property
    def chat_template(self):
        """The ChatTemplate of chat calls (chat_format=: a name such as
        "llama-2", "chatml", "zephyr", or a Jinja2 template string; by
        default a GGUF file's own tokenizer.chat_template, else Llama 2)."""
        if self._chat_template is None:
            from .chat_template import ChatTemplate

            embedded = lib.llama2_transformer_chat_template(self._ptr)
            own = None
            if self.chat_format is None and embedded == ffi.NULL:  # a BPE tokenizer's (tokenizer_config.json)
                try:
                    own = getattr(self.tokenizer, "chat_template", None)
                except FileNotFoundError:
                    own = None
            if self.chat_format is None and embedded != ffi.NULL:  # a GGUF file's own template
                self._chat_template = ChatTemplate.from_jinja(ffi.string(embedded).decode("utf-8", "replace"))
            elif own is not None:
                self._chat_template = ChatTemplate.from_jinja(own)
            else:
                self._chat_template = ChatTemplate.get(self.chat_format)
        return self._chat_template

    def _side_context(self) -> Context:
        with self._making:
            if self._side is None:
                self._side = self.create_context()
            return self._side

    def score(self, text: str | list[int], *, window: int | None = None, stride: int | None = None,
              progress=None) -> Score:
        """Per-token log-probabilities of text (tokenized with BOS, or ids)
        under the model, over a sliding window of `window` tokens (default
        n_ctx) moved by `stride` (default window // 2): a Score with
        tokens, token_logprobs, nll and perplexity."""
        ids = self.tokenize(text) if isinstance(text, str) else [check_int("token", t) for t in text]
        return score_ids(self._side_context(), ids, window, stride, progress)

    def perplexity(self, text: str | list[int], **options) -> float:
        """exp(mean negative log-likelihood per token) of text: see score()."""
        return self.score(text, **options).perplexity

    def embed(self, input: str | list[str], *, pooling: str = "mean", normalize: bool = False,
              truncate: bool = True):
        """An embedding (list of dim floats) per text: the final-norm hidden
        states of its tokens (BOS included) averaged ("mean") or the last
        token's ("last"); normalize=True scales it to unit length. A str gives
        one vector, a list of str a list of them. Texts longer than n_ctx
        keep their first n_ctx tokens (truncate=False: ContextLengthError)."""
        texts = [input] if isinstance(input, str) else list(input)
        vectors = []
        for text in texts:
            if not isinstance(text, str):
                raise InvalidArgumentError(f"embed takes str or a list of str (got {type(text).__name__})")
            ids = fit_for_embedding(self.tokenize(text), self.n_ctx, truncate)
            vectors.append(embed_ids(self._side_context(), ids, pooling, normalize).tolist())
        return vectors[0] if isinstance(input, str) else vectors

    def create_embedding(self, input: str | list[str], model: str | None = None, *, pooling: str = "mean",
                         normalize: bool = False):
        """OpenAI's embeddings shape: {"object": "list", "data": [{"object":
        "embedding", "embedding", "index"}], "model", "usage"}."""
        texts = [input] if isinstance(input, str) else list(input)
        data = self.embed(texts, pooling=pooling, normalize=normalize)
        n = sum(min(len(self.tokenize(t)), self.n_ctx) for t in texts)
        return {"object": "list", "model": model or self.model_path,
                "data": [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(data)],
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    # ---- chat ----
    def chat_session(self, system: str | None = None, template=None) -> "ChatSession":
        """A multi-turn conversation with a KV cache (a context) of its own,
        kept between turns; template: a chat template (default this Llama's)."""
        return ChatSession(self, system, template)

    def chat(self, messages: str | list[dict], *, steps: int | None = None, max_tokens: int | None = None,
             system: str | None = None, template=None, stop=None, sampling: SamplingParams | None = None,
             **settings) -> str:
        """The assistant's reply to a conversation: a str (one user message) or
        a list of {"role": "system"|"user"|"assistant", "content": str} ending
        with the user's. Earlier assistant turns are replayed as the template
        renders them. Sampling as in Session.generate (llama2.c's defaults)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        messages = list(messages)
        if system is not None:
            messages = [{"role": "system", "content": system}] + messages
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
            raise InvalidArgumentError("the conversation must end with a user message")
        session = ChatSession(self, None, template)
        session.add_history(messages[:-1])
        return session.send(messages[-1].get("content"), steps=steps, max_tokens=max_tokens, stop=stop,
                            sampling=sampling, **settings)


def generate(model_path: str | os.PathLike | None, prompt: str = "", *,
             tokenizer: str | os.PathLike | None = None, steps: int = 256, temperature: float = 1.0,
             topp: float = 0.9, seed: int | None = None, **extensions) -> str:
    """Loads a model and returns the text `run` prints for these settings,
    prompt included, without the final newline. model_path=None uses the
    model bundled with the package."""
    if model_path is None:
        from .bundled import bundled_model

        model_path, default_tok = bundled_model()
        tokenizer = tokenizer if tokenizer is not None else default_tok
    llama = Llama(model_path, tokenizer=tokenizer, n_ctx=extensions.pop("n_ctx", None))
    return llama.generate(prompt, steps=steps, temperature=temperature, topp=topp, seed=seed, **extensions)
