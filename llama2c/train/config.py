"""Training settings: llama2.c's train.py knobs, set on the command line as
``--key=value`` (``--key value`` and ``--key`` alone for true also work).
Keys are kebab-case (``--max-seq-len``) like every llama2c flag; llama2.c's
underscore spelling (``--max_seq_len``) is the same knob. Messages name a knob
the way the command line spelled its knobs (underscores for the Python API,
whose fields are the underscore names)."""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from typing import ClassVar, List, Optional, Sequence


def _k(default, section: str, help: str):
    """A knob: its default, its --help section and text (fields keep --help's order)."""
    return dataclasses.field(default=default, metadata={"section": section, "help": help})


@dataclass
class TrainConfig:
    # I/O
    data: str = _k("", "I/O", "prepared data directory (`llama2c data prepare` output) [required]")
    out_dir: str = _k("out", "I/O", "where ckpt.pt, model.bin and log.jsonl go")
    eval_interval: int = _k(2000, "I/O", "evaluate train/val loss (and maybe checkpoint) every N iterations")
    log_interval: int = _k(1, "I/O", "print progress every N iterations")
    eval_iters: int = _k(100, "I/O", "batches per loss estimate (capped at one pass over the split)")
    eval_only: bool = _k(False, "I/O", "evaluate once and exit")
    always_save_checkpoint: bool = _k(False, "I/O", "checkpoint at every eval, not only when val loss improves")
    init_from: str = _k("scratch", "I/O", "scratch | resume (continue from out_dir/ckpt.pt, with its knobs "
                                          "unless given again) | a model to fine-tune (llama2c finetune)")
    overwrite: bool = _k(False, "I/O", "let a scratch run replace the checkpoint, model.bin and log "
                                       "already in out_dir")
    preset: str = _k("", "I/O", "llama2.c's model table: 260K | 15M | 42M | 110M sets the shape, context "
                                "and training knobs not given")
    # data
    batch_size: int = _k(0, "data", "sequences per micro-batch, per process (0: 8 on a CPU, 128 on CUDA)")
    max_seq_len: int = _k(256, "data", "context length in tokens")
    vocab_size: int = _k(0, "data", "model vocabulary (0: the tokenizer's, from the data's meta.json)")
    # model
    dim: int = _k(288, "model", "embedding width")
    n_layers: int = _k(6, "model", "transformer blocks")
    n_heads: int = _k(6, "model", "attention heads")
    n_kv_heads: int = _k(0, "model", "key/value heads for GQA (0: n_heads)")
    multiple_of: int = _k(32, "model", "the FFN hidden size is rounded up to a multiple of this")
    hidden_dim: int = _k(0, "model", "FFN hidden size (0: from dim and multiple_of, as llama2.c)")
    dropout: float = _k(0.0, "model", "dropout rate while training")
    rope_theta: float = _k(10000.0, "model", "RoPE base (not 10000 -> model.bin is version 3)")
    norm_eps: float = _k(1e-5, "model", "RMSNorm epsilon (not 1e-5 -> model.bin is version 3)")
    tie_embeddings: bool = _k(True, "model", "share the token embedding with the classifier")
    # optimizer
    gradient_accumulation_steps: int = _k(0, "optimizer",
                                          "micro-batches per update, split across processes when it divides "
                                          "(0: 1 per process on a CPU, 4 on CUDA)")
    learning_rate: float = _k(5e-4, "optimizer", "peak learning rate (AdamW)")
    max_iters: int = _k(100000, "optimizer", "optimizer steps to train for (total, counting resumed ones)")
    weight_decay: float = _k(1e-1, "optimizer", "AdamW weight decay (matrices only)")
    beta1: float = _k(0.9, "optimizer", "AdamW beta1")
    beta2: float = _k(0.95, "optimizer", "AdamW beta2")
    grad_clip: float = _k(1.0, "optimizer", "clip the gradient norm to this (0: off)")
    # learning rate schedule
    decay_lr: bool = _k(True, "schedule", "linear warmup then cosine decay (false: constant rate)")
    warmup_iters: int = _k(1000, "schedule", "warmup iterations")
    lr_decay_iters: int = _k(0, "schedule", "iteration where decay reaches min_lr (0: max_iters)")
    min_lr: float = _k(0.0, "schedule", "floor of the learning rate")
    # system
    device: str = _k("auto", "system", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = _k("auto", "system", "auto | float32 | bfloat16 | float16 (autocast; auto: bf16 on "
                                      "CUDA that has it, else fp16 on CUDA; on a CPU bf16 where it is "
                                      "native (AVX512_BF16/AMX), else fp32)")
    compile: bool = _k(False, "system", "torch.compile the model")
    seed: int = _k(1337, "system", "random seed (each process adds its rank)")
    fsdp: bool = _k(False, "system", "under torchrun, shard the model with FSDP2 instead of DDP")
    export_version: int = _k(0, "system", "model.bin version at the end: 1, 3, or 0 = auto (1 unless "
                                          "rope_theta/norm_eps need 3); -1: no export")

    # how messages spell knobs: --max-seq-len (True) or llama2.c's --max_seq_len
    # (set by parse_args from the command line; not a knob, not in to_dict)
    dashes: ClassVar[bool] = False
    # the knobs the command line named (set by parse_args; None from Python, where a
    # knob counts as given when it differs from its default)
    given: ClassVar[Optional[frozenset]] = None

    def was_given(self, name: str) -> bool:
        if self.given is not None:
            return name in self.given
        return getattr(self, name) != KNOBS[name].default

    def flag(self, name: str, value=None) -> str:
        """The command-line spelling of knob ``name`` (``--init-from``, or
        ``--init_from`` unless the command line used dashes), with ``=value``."""
        key = name.replace("_", "-") if self.dashes else name
        return f"--{key}" if value is None else f"--{key}={value}"

    def resolved_lr_decay_iters(self) -> int:
        return self.lr_decay_iters if self.lr_decay_iters > 0 else self.max_iters

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


KNOBS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# llama2.c's model table (README): shape and context; the 260K row also has the
# training knobs of its published command line. Batch size and accumulation are
# left to the device defaults (--batch-size / --gradient-accumulation-steps).
PRESETS = {
    "260K": dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, multiple_of=4, max_seq_len=512,
                 learning_rate=1e-3, dropout=0.05, weight_decay=0.01, beta2=0.99, warmup_iters=1000),
    "15M": dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=0, max_seq_len=256),
    "42M": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=0, max_seq_len=1024),
    "110M": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=0, max_seq_len=1024),
}


def apply_preset(cfg: "TrainConfig") -> None:
    """Sets the preset's knobs that were not given (cfg.preset names it)."""
    if not cfg.preset:
        return
    key = next((k for k in PRESETS if k.lower() == cfg.preset.strip().lower()), None)
    if key is None:
        raise UsageError(f"--preset must be one of {', '.join(PRESETS)}, got {cfg.preset!r}")
    cfg.preset = key
    given = {name for name in KNOBS if name != "preset" and cfg.was_given(name)}
    for name, value in PRESETS[key].items():
        if name not in given:
            setattr(cfg, name, value)


class UsageError(ValueError):
    """A bad command line or setting (the CLI exits with status 2 on it)."""

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def _convert(name: str, text: str, key: Optional[str] = None):
    """text as knob ``name``'s type (``key``: the name as typed, for messages)."""
    key = key or name
    f = KNOBS[name]
    kind = type(f.default)
    if kind is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise UsageError(f"--{key}: expected true or false, got {text!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise UsageError(f"--{key}: expected an integer, got {text!r}") from None
            if not value.is_integer():
                raise UsageError(f"--{key}: expected an integer, got {text!r}")
            return int(value)
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise UsageError(f"--{key}: expected a number, got {text!r}") from None
    return text


def kebab(name: str) -> str:
    """A knob's flag: max_seq_len -> --max-seq-len."""
    return "--" + name.replace("_", "-")


def usage(prog: str = "llama2c train") -> str:
    lines = [f"usage: {prog} --data DIR [--key=value ...]", "",
             "Train a Llama 2 model on `llama2c data prepare` output; under torchrun, one "
             "process per device (DDP, or FSDP2 with --fsdp).", ""]
    section = None
    heads = {name: f"{kebab(name)}={f.default}" for name, f in KNOBS.items()}
    width = max(len(h) for h in heads.values()) + 2
    for name, f in KNOBS.items():
        if f.metadata["section"] != section:
            section = f.metadata["section"]
            lines.append(f"{section}:")
        lines.append(f"  {heads[name]:<{width}}{f.metadata['help']}")
    lines += ["", "--key value and --key (for true) work too. llama2.c's underscore spellings are the",
              "same knobs: --gradient_accumulation_steps=4 is --gradient-accumulation-steps=4.",
              "At the end, out_dir gets model.bin and, when the data directory has its tokenizer",
              "(`llama2c data prepare` copies it there), tokenizer.bin beside it.",
              "", "Examples:",
              "  llama2c train --data=data/tok512 --dim=64 --n-layers=4 --n-heads=4 --batch-size=32 \\",
              "      --max-seq-len=128 --max-iters=2000 --eval-interval=200 --warmup-iters=100",
              "  llama2c train --data=data/tok512 --preset=260K --max-iters=2000",
              "  torchrun --nproc_per_node=2 -m llama2c.train --data=data/tok512 ...",
              "  llama2c train --init-from=resume --out-dir=out --max-iters=4000   # other knobs: the checkpoint's",
              "  llama2c train --init-from=model.bin --data=chats.jsonl --out-dir=ft   # = llama2c finetune"]
    return "\n".join(lines)


class HelpRequested(Exception):
    pass


def parse_args(argv: Sequence[str], base: Optional[TrainConfig] = None) -> TrainConfig:
    """Parse ``--key=value`` style arguments over the defaults (or ``base``)."""
    values = dataclasses.asdict(base) if base is not None else {}
    args: List[str] = list(argv)
    keys = [a[2:].partition("=")[0] for a in args if a.startswith("--")]
    # messages follow the command line's spelling; dashes unless it used only underscores
    dashes = any("-" in k for k in keys) or not any("_" in k for k in keys)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("-h", "--help"):
            raise HelpRequested()
        if not arg.startswith("--") or arg == "--":
            raise UsageError(f"unexpected argument {arg!r} (knobs are --key=value)")
        key, eq, value = arg[2:].partition("=")
        name = key.replace("-", "_")
        if name not in KNOBS:
            close = difflib.get_close_matches(name, list(KNOBS), n=3)
            spell = (lambda c: "--" + c) if "_" in key else kebab     # as the user spelled it
            hint = f" (did you mean {', '.join(spell(c) for c in close)}?)" if close else ""
            raise UsageError(f"unknown option --{key}{hint}")
        if not eq:
            if isinstance(KNOBS[name].default, bool):
                nxt = args[i].lower() if i < len(args) else ""
                if nxt in _TRUE or nxt in _FALSE:
                    value = args[i]
                    i += 1
                else:
                    value = "true"
            else:
                if i >= len(args):
                    raise UsageError(f"--{key} needs a value")
                value = args[i]
                i += 1
        values[name] = _convert(name, value, key)
    named = {a[2:].partition("=")[0].replace("-", "_") for a in args if a.startswith("--")}
    cfg = TrainConfig(**values)
    cfg.dashes = dashes
    cfg.given = frozenset(n for n in named if n in KNOBS) | (base.given or frozenset() if base else frozenset())
    apply_preset(cfg)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    f = cfg.flag
    if not cfg.data and cfg.init_from != "resume":
        raise UsageError("--data DIR is required (the output of `llama2c data prepare`)")
    if cfg.init_from not in ("scratch", "resume") and not os.path.exists(cfg.init_from):
        raise UsageError(f"{f('init_from')} must be scratch, resume or a model to fine-tune, got "
                         f"{cfg.init_from!r} (no such file)")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}")
    for name in ("max_seq_len", "dim", "n_layers", "n_heads", "eval_interval", "log_interval", "eval_iters",
                 "multiple_of"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"{f(name)} must be at least 1")
    for name in ("max_iters", "warmup_iters", "vocab_size", "n_kv_heads", "batch_size",
                 "gradient_accumulation_steps"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"{f(name)} cannot be negative")
    if cfg.dim % cfg.n_heads:
        raise UsageError(f"{f('dim', cfg.dim)} is not a multiple of {f('n_heads', cfg.n_heads)}")
    if (cfg.dim // cfg.n_heads) % 2:
        raise UsageError(f"head size dim/n_heads = {cfg.dim // cfg.n_heads} must be even for RoPE")
    kv = cfg.n_kv_heads or cfg.n_heads
    if cfg.n_heads % kv:
        raise UsageError(f"{f('n_heads', cfg.n_heads)} is not a multiple of {f('n_kv_heads', kv)}")
    if not 0 <= cfg.dropout < 1:
        raise UsageError("--dropout must be in [0, 1)")
    if cfg.export_version not in (-1, 0, 1, 3):
        raise UsageError(f"{f('export_version')} must be 1, 3, 0 (auto) or -1 (none)")
