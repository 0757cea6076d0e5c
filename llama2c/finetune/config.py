"""Fine-tuning settings and the `llama2c finetune` command line (no torch).

Flags are kebab-case (``--lora-rank 8`` or ``--lora-rank=8``); the underscore
spellings parse too (cliargs.Parser), and so do ``--init-from`` (for
``--base``, as `llama2c train --init-from=MODEL` spells it), ``--export-version``
(for ``--version``) and ``--force`` (for ``--overwrite``). A bool flag alone
means true (``--full``), or takes a value (``--packing=false``).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import ClassVar, FrozenSet, Optional, Sequence

from ..cliargs import Parser


def _k(default, section: str, help: str, metavar: Optional[str] = None):
    return dataclasses.field(default=default, metadata={"section": section, "help": help, "metavar": metavar})


@dataclass
class FinetuneConfig:
    # what to train
    base: str = _k("", "model and data", "the model to fine-tune: a .bin (any version), a training "
                   "checkpoint (ckpt.pt) or a Hugging Face Llama folder [required]", "MODEL")
    tokenizer: str = _k("", "model and data", "tokenizer.bin or tokenizer.model (default: beside the model, "
                        "the Hugging Face folder's, or the checkpoint's data)", "T")
    data: str = _k("", "model and data", "training data: .jsonl (messages, prompt/completion, text), text "
                   "files, or a `llama2c data prepare` directory [required]", "DATA")
    val_data: str = _k("", "model and data", "held-out data in the same forms (default: --val-fraction of "
                       "--data)", "DATA")
    val_fraction: float = _k(0.1, "model and data", "share of --data held out when there is no --val-data "
                             "(0: none)", "F")
    chat_template: str = _k("", "model and data", "how {\"messages\"} are rendered: llama-2, chatml, zephyr, "
                            "a Jinja string or file (default: the Hugging Face folder's, else llama-2)", "NAME")
    max_seq_len: int = _k(0, "model and data", "tokens per row (0: the model's context length)", "N")
    packing: str = _k("auto", "model and data", "true: examples end to end in full windows; false: one "
                      "example per row, padded; auto: false for .jsonl, true for text", "auto|true|false")
    # LoRA
    lora_rank: int = _k(8, "LoRA", "rank r of the adapters", "R")
    lora_alpha: float = _k(16.0, "LoRA", "the update is scaled by alpha / r", "A")
    lora_dropout: float = _k(0.0, "LoRA", "dropout on the adapters' input", "P")
    lora_targets: str = _k("wq,wk,wv,wo,w1,w2,w3", "LoRA", "projections to adapt (also q_proj, ...; all, "
                           "attn, mlp)", "LIST")
    full: bool = _k(False, "LoRA", "train every weight instead of adapters (no adapter files)")
    # optimization
    batch_size: int = _k(8, "optimization", "rows per micro-batch (per process)", "N")
    gradient_accumulation_steps: int = _k(1, "optimization", "micro-batches per update (split across "
                                          "processes when it divides)", "N")
    learning_rate: float = _k(0.0, "optimization", "peak AdamW rate (0: 1e-3 with LoRA, 1e-4 with --full)", "LR")
    max_iters: int = _k(200, "optimization", "optimizer steps (total, counting resumed ones)", "N")
    weight_decay: float = _k(0.0, "optimization", "AdamW weight decay (matrices only)", "W")
    beta1: float = _k(0.9, "optimization", "AdamW beta1", "B")
    beta2: float = _k(0.999, "optimization", "AdamW beta2", "B")
    grad_clip: float = _k(1.0, "optimization", "clip the gradient norm to this (0: off)", "C")
    dropout: float = _k(0.0, "optimization", "the model's own dropout while training", "P")
    decay_lr: bool = _k(True, "optimization", "linear warmup, then cosine decay to --min-lr")
    warmup_iters: int = _k(10, "optimization", "warmup iterations", "N")
    lr_decay_iters: int = _k(0, "optimization", "where the decay reaches --min-lr (0: --max-iters)", "N")
    min_lr: float = _k(0.0, "optimization", "floor of the learning rate", "LR")
    # evaluation and outputs
    eval_interval: int = _k(50, "evaluation and outputs", "evaluate (and checkpoint) every N iterations", "N")
    eval_iters: int = _k(0, "evaluation and outputs", "batches per loss estimate (0: the whole held-out "
                         "set; the train estimate uses as many)", "N")
    log_interval: int = _k(10, "evaluation and outputs", "print progress every N iterations", "N")
    out_dir: str = _k("", "evaluation and outputs", "where model.bin, the adapter, ckpt.pt and log.jsonl "
                      "go [required]", "DIR")
    version: str = _k("auto", "evaluation and outputs", "merged model.bin version 0-4, or none (auto: the "
                      "base's own when it stores float32, else float32: 1, or 3 where rope_theta/norm_eps "
                      "need it)", "V")
    hf: bool = _k(False, "evaluation and outputs", "also write the merged model as a Hugging Face folder "
                  "(out_dir/hf)")
    resume: bool = _k(False, "evaluation and outputs", "continue the run in --out-dir from its ckpt.pt")
    overwrite: bool = _k(False, "evaluation and outputs", "replace an earlier run's files in --out-dir")
    # system
    device: str = _k("auto", "system", "auto | cpu | cuda | cuda:N | mps", "D")
    dtype: str = _k("auto", "system", "auto | float32 | bfloat16 | float16 (autocast)", "T")
    compile: bool = _k(False, "system", "torch.compile the model")
    seed: int = _k(1337, "system", "random seed (adapter initialization, dropout, data order)", "N")

    # the knobs the command line gave (None: all of them, e.g. from Python)
    given: ClassVar[Optional[FrozenSet[str]]] = None
    fsdp: ClassVar[bool] = False          # what train's helpers read

    def resolved_lr_decay_iters(self) -> int:
        return self.lr_decay_iters if self.lr_decay_iters > 0 else self.max_iters

    @property
    def lora(self) -> bool:
        return not self.full

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
# what a resume takes from the command line rather than the checkpoint
NOT_RESUMED = ("resume", "out_dir", "overwrite", "device")
# train's knobs that do not apply to a fine-tune (the model's shape is the base's)
TRAIN_ONLY = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "hidden_dim", "vocab_size", "rope_theta",
              "norm_eps", "tie_embeddings", "fsdp", "eval_only", "always_save_checkpoint")


class UsageError(ValueError):
    """A bad command line (status 2)."""


_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _Parser(Parser):
    def error(self, message):
        raise UsageError(message)


def build_parser(prog: str = "llama2c finetune") -> Parser:
    p = _Parser(prog=prog, add_help=False, description=(
        "Fine-tune a model on your data: LoRA adapters (default) or every weight (--full). "
        "out_dir gets model.bin (merged), tokenizer.bin, adapter_config.json + "
        "adapter_model.safetensors (PEFT's format), ckpt.pt and log.jsonl."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
               "  llama2c finetune --base llama2c/models/model.bin --data chats.jsonl --out-dir ft\n"
               "  llama2c finetune --base out/ckpt.pt --data more.txt --out-dir ft2 --full --max-iters 500\n"
               "  llama2c finetune --out-dir ft --resume --max-iters 400\n"
               "  torchrun --nproc_per_node=2 -m llama2c.finetune --base ... --data ... --out-dir ft\n"
               "docs/FINETUNING.md tells more.")
    p.add_argument("-h", "--help", action="help", help="show this help and exit")
    groups = {}
    for name, f in FIELDS.items():
        section = f.metadata["section"]
        if section not in groups:
            groups[section] = p.add_argument_group(section)
        g = groups[section]
        flag = "--" + name.replace("_", "-")
        shown = f.default not in ("", False) and not f.metadata["help"].endswith("[required]")
        kw = dict(dest=name, default=None, help=f"{f.metadata['help']} (default: {f.default})" if shown
                  else f.metadata["help"])
        if isinstance(f.default, bool):
            g.add_argument(flag, nargs="?", const=True, type=_bool, metavar="BOOL", **kw)
        elif name == "packing":
            g.add_argument(flag, nargs="?", const="true", metavar=f.metadata["metavar"], **kw)
        else:
            g.add_argument(flag, type=type(f.default), metavar=f.metadata["metavar"], **kw)
    p.alias("--base", "--init-from", "--init_from")
    p.alias("--version", "--export-version", "--export_version")
    p.alias("--overwrite", "--force")
    return p


def usage(prog: str = "llama2c finetune") -> str:
    return build_parser(prog).format_help()


def parse_args(argv: Sequence[str], prog: str = "llama2c finetune") -> FinetuneConfig:
    """The settings of a command line (UsageError on a bad one); cfg.given
    holds the knobs it named."""
    argv = list(argv)
    for arg in argv:
        if arg.startswith("--"):
            key = arg[2:].partition("=")[0].replace("-", "_")
            if key in TRAIN_ONLY:
                raise UsageError(f"--{key.replace('_', '-')} does not apply to a fine-tune: the model's shape "
                                 "comes from the base model")
    ns = build_parser(prog).parse_args(argv)
    given = {k for k, v in vars(ns).items() if v is not None}
    cfg = FinetuneConfig(**{k: v for k, v in vars(ns).items() if v is not None})
    cfg.given = frozenset(given)
    validate(cfg)
    return cfg


def validate(cfg: FinetuneConfig) -> None:
    if not cfg.out_dir:
        raise UsageError("--out-dir DIR is required")
    if not cfg.resume:
        if not cfg.base:
            raise UsageError("--base MODEL is required (or --resume to continue the run in --out-dir)")
        if not cfg.data:
            raise UsageError("--data is required")
    if cfg.packing not in ("auto", "true", "false"):
        try:
            cfg.packing = "true" if _bool(cfg.packing) else "false"
        except argparse.ArgumentTypeError:
            raise UsageError(f"--packing must be auto, true or false, got {cfg.packing!r}") from None
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}")
    for name in ("batch_size", "gradient_accumulation_steps", "eval_interval", "log_interval", "lora_rank"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("max_iters", "warmup_iters", "lr_decay_iters", "eval_iters", "max_seq_len"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} cannot be negative")
    for name in ("dropout", "lora_dropout"):
        if not 0 <= getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1)")
    if not 0 <= cfg.val_fraction < 1:
        raise UsageError("--val-fraction must be in [0, 1)")
    if cfg.learning_rate < 0:
        raise UsageError("--learning-rate cannot be negative")
    cfg.version = str(cfg.version).strip().lower()
    if cfg.version not in ("auto", "none", "0", "1", "2", "3", "4"):
        raise UsageError(f"--version must be auto, 0-4 or none, got {cfg.version!r}")
    if not cfg.full:
        from ..lora_merge import parse_targets

        try:
            parse_targets(cfg.lora_targets)
        except ValueError as e:
            raise UsageError(f"--lora-targets: {e}") from None

