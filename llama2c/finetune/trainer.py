"""The fine-tuning loop: one process, or one per device under torchrun (DDP).

Iteration ``it`` (0 .. max_iters-1): evaluate (and checkpoint, from the second
eval on) when ``it % eval_interval == 0``; set the learning rate; draw the
``gradient_accumulation_steps`` micro-batches of this process; run them; clip,
step. The loss of a step is the mean over every counted token of the step (all
micro-batches of all processes), whatever the padding: each micro-batch adds
its summed cross-entropy divided by the step's token count. After the last
iteration: evaluate, checkpoint, write model.bin (merged), the adapter and
tokenizer.bin.

A checkpoint written at the top of iteration ``it`` holds the trainable
tensors (the adapters, or every weight with --full), the optimizer, the
scaler, every process's random states and the data position, so ``--resume``
continues the same loss curve. A LoRA checkpoint does not hold the base
weights: it names the base model and a digest of its tensors, checked on
resume.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..lora_merge import LoraMergedSource, merged_version, parse_targets
from ..train import checkpoint as ck
from ..train.peak import peak_flops
from ..train.progress import fmt_duration
from ..train.trainer import RunLog, get_lr, resolve_dtype, setup_runtime
from . import data as D
from .base import find_tokenizer, hf_chat_template, open_base, tensors_digest, tokenizer_bin
from .config import FIELDS, NOT_RESUMED, FinetuneConfig, UsageError
from .lora import add_lora, lora_state_dict, to_adapter

FORMAT = "llama2c-finetune"
VERSION = 1
LORA_LR, FULL_LR = 1e-3, 1e-4


class FinetuneError(ValueError):
    """A run that cannot start or resume (one-line message)."""


def load_finetune_checkpoint(path: Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, f"{path}: no checkpoint to resume from", str(path))
    ck.remove_stale_temporaries(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # bad zip, refused objects, truncated files
        raise FinetuneError(f"{path}: not a readable checkpoint ({ck._why(e)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise FinetuneError(f"{path}: not a llama2c fine-tuning checkpoint (a training run's resumes with "
                            "`llama2c train --init-from=resume`)")
    return state


def merged_config(cfg: FinetuneConfig, saved: Dict[str, Any]) -> List[str]:
    """On resume: every knob the command line did not give comes from the
    checkpoint (cfg.given None: the ones equal to their defaults). Returns
    the names taken from the checkpoint whose value differs from the default."""
    given = cfg.given
    kept = []
    for name, f in FIELDS.items():
        if name in NOT_RESUMED or name not in saved:
            continue
        explicit = name in given if given is not None else getattr(cfg, name) != f.default
        if not explicit:
            setattr(cfg, name, saved[name])
            if saved[name] != f.default:
                kept.append(name)
    lr_given = "lr_decay_iters" in given if given is not None else cfg.lr_decay_iters != 0
    if not lr_given and not saved.get("lr_decay_iters") and saved.get("max_iters") and \
            cfg.max_iters != saved["max_iters"]:
        cfg.lr_decay_iters = int(saved["max_iters"])       # the schedule stays the checkpoint's
        kept.append("lr_decay_iters")
    return kept


class Finetuner(RunLog):
    def __init__(self, cfg: FinetuneConfig, log: Optional[Callable[[str], None]] = None):
        super().__init__(log)
        self.cfg = cfg
        self._temps: List[Path] = []

    # -- setup -----------------------------------------------------------------
    def _refuse_to_overwrite(self) -> bool:
        out = self.out_dir
        found = [out / n for n in ("ckpt.pt", "model.bin", "adapter_model.safetensors", "adapter_config.json")
                 if (out / n).exists()]
        if found and not self.cfg.overwrite:
            raise FileExistsError(17, f"{found[0]} already exists: continue that run with --resume, or start "
                                      "over with --overwrite", str(found[0]))
        return bool(found)

    def setup(self) -> None:
        cfg = self.cfg
        self.out_dir = Path(cfg.out_dir)
        state = None
        kept: List[str] = []
        if cfg.resume:
            state = load_finetune_checkpoint(self.out_dir / "ckpt.pt")
            kept = merged_config(cfg, state["config"])
            cfg.resume = True
        else:
            overwriting = self._refuse_to_overwrite()
        self.rt = rt = setup_runtime(cfg)
        if rt.master:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if state is None and overwriting:        # --overwrite: the old run's files go
                for name in ("log.jsonl", "adapter_config.json", "adapter_model.safetensors"):
                    (self.out_dir / name).unlink(missing_ok=True)
        if kept:
            self.log("resume: from the checkpoint: " + ", ".join(f"{k}={getattr(cfg, k)}" for k in kept))
        self.dtype = resolve_dtype(cfg, rt)
        if not cfg.learning_rate:
            cfg.learning_rate = LORA_LR if cfg.lora else FULL_LR

        # the base model
        src, kind = open_base(cfg.base)
        self.base_source, self.base_kind = src, kind
        args = src.args
        arrays = [(k, src.get(k)) for k in src.keys()]
        self.base_digest = tensors_digest(arrays)
        if state is not None and state["base"]["digest"] != self.base_digest and cfg.lora:
            raise FinetuneError(f"{cfg.base} is not the base model the checkpoint was trained on "
                                "(its weights differ)")
        self.model_args = dataclasses.replace(args, dropout=cfg.dropout)
        if cfg.max_seq_len > args.max_seq_len:
            raise UsageError(f"--max-seq-len {cfg.max_seq_len} is longer than the model's context "
                             f"({args.max_seq_len})")
        self.seq_len = cfg.max_seq_len or args.max_seq_len

        # tokenizer and chat template
        data_path = Path(cfg.data)
        self.prepared = data_path.is_dir() and (data_path / "meta.json").is_file()
        tok_file = find_tokenizer(cfg.tokenizer, cfg.base, kind, cfg.data,
                                  extra=(self.out_dir / "tokenizer.bin",))
        if tok_file is None and hasattr(src, "tokenizer_bin_bytes"):    # a GGUF file carries its own
            blob = src.tokenizer_bin_bytes()
            if blob:
                import tempfile

                fd, name = tempfile.mkstemp(prefix=".tokenizer.", suffix=".bin")
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                tok_file = Path(name)
                self._temps.append(tok_file)
        self.tok_source = tok_file
        self.tokenizer = None
        if tok_file is not None:
            from ..tokenizer import Tokenizer

            path, temp = tokenizer_bin(tok_file)
            if temp:
                self._temps.append(path)
            self.tok_bin = path
            try:
                n = Tokenizer(path).vocab_size
            except Exception as e:
                raise FinetuneError(f"{tok_file}: not a tokenizer ({e})") from None
            if n != args.vocab_size:
                raise FinetuneError(f"{tok_file} has {n} tokens, the model {args.vocab_size}: not its tokenizer "
                                    "(pass --tokenizer)")
            self.tokenizer = Tokenizer(path, vocab_size=args.vocab_size)
        elif not self.prepared:
            raise FinetuneError("no tokenizer found beside the model: pass --tokenizer (tokenizer.bin or "
                                "tokenizer.model)")
        from ..chat_template import ChatTemplate

        spec = cfg.chat_template or (hf_chat_template(Path(cfg.base)) if kind == "hf" else None) or "llama-2"
        self.template = ChatTemplate.get(spec)

        # data
        self._load_data(data_path)

        # the model
        torch.manual_seed(cfg.seed)
        from ..model import Transformer

        sd = {k: torch.from_numpy(a if a.flags.writeable else a.copy()) for k, a in arrays}
        del arrays
        if state is not None and not cfg.lora:
            sd = {k: v for k, v in state["model"].items()}
        raw = Transformer.from_state_dict(self.model_args, sd)
        del sd
        if cfg.lora:
            self.targets = parse_targets(cfg.lora_targets)
            trainable = add_lora(raw, cfg.lora_rank, cfg.lora_alpha, self.targets, cfg.lora_dropout,
                                 seed=cfg.seed)
            if state is not None:
                missing = set(trainable) - set(state["trainable"])
                if missing:
                    raise FinetuneError(f"the checkpoint lacks adapter tensors ({sorted(missing)[0]}, ...)")
                raw.load_state_dict(state["trainable"], strict=False)
        else:
            self.targets = []
            trainable = [n for n, p in raw.named_parameters() if p.requires_grad]
        raw.to(rt.device)
        self.raw = raw
        self.trainable = trainable
        self.n_params = sum(p.numel() for p in raw.parameters())
        self.n_trainable = sum(p.numel() for p in raw.parameters() if p.requires_grad)

        params = [p for p in raw.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        extra = {"fused": True} if rt.device_type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), **extra)
        self.scaler = torch.amp.GradScaler(rt.device_type if rt.device_type != "mps" else "cpu",
                                           enabled=(self.dtype == "float16"))
        self.iter_num, self.best_val_loss = 0, float("inf")
        self.first_val_loss = None
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(state["scaler"])
            self.iter_num = int(state["iter_num"])
            self.best_val_loss = float(state["best_val_loss"])
            self.first_val_loss = state.get("first_val_loss")

        self._prepare_model(raw, cfg.compile, rt.distributed, self.dtype, cfg.gradient_accumulation_steps)

        if state is not None:
            if state.get("data_digest") != self.data_digest:
                self.log("warning: the training data differ from the checkpoint's: its order restarts "
                         "in the same epoch")
                self.train_batches.load_state_dict({**state["sampler"], "n_windows": -1})
            else:
                self.train_batches.load_state_dict(state["sampler"])
            self._restore_random(state.get("rng") or [], cfg.seed, self.iter_num)
            self.log(f"resumed from {self.out_dir / 'ckpt.pt'} at iteration {self.iter_num}")
        else:
            self._seed(cfg.seed)
        self.resumed_at = self.iter_num if state is not None else None
        del state
        if rt.master and self.tokenizer is not None:
            self._write_tokenizer()

    def _load_data(self, data_path: Path) -> None:
        cfg, rt = self.cfg, self.rt
        kw = dict(rank=rt.rank, world_size=rt.world_size, seed=cfg.seed)
        self.val_batches = None
        if self.prepared:
            from ..data.shards import load_meta, load_split
            from ..train.loader import NotEnoughData

            meta = load_meta(data_path)
            if int(meta["vocab_size"]) > self.model_args.vocab_size:
                raise FinetuneError(f"{data_path} was tokenized with {meta['vocab_size']} pieces, the model has "
                                    f"{self.model_args.vocab_size}")
            train = load_split(data_path, "train")
            self.train_batches = D.ShardBatches(train, self.seq_len, cfg.batch_size, split="train", **kw)
            try:
                self.val_batches = D.ShardBatches(load_split(data_path, "val"), self.seq_len, cfg.batch_size,
                                                  split="val", **kw)
            except NotEnoughData as e:
                self.log(f"warning: {e}; no held-out loss")
            self.data_digest = json.dumps(meta, sort_keys=True)[:2000]
            self.packed = True
            return
        train = D.load_examples(cfg.data, self.tokenizer, self.template)
        if cfg.val_data:
            val = D.load_examples(cfg.val_data, self.tokenizer, self.template)
        else:
            everything = train
            train, val = D.split_validation(everything, cfg.val_fraction)
            if len(train) < rt.world_size:        # too few to hold any out
                self.log(f"warning: {len(everything)} example(s): too few to hold some out; no held-out loss")
                train, val = everything, []
        structured = all(D.is_structured(p) for p in _files(cfg.data))
        packed = cfg.packing == "true" or (cfg.packing == "auto" and not structured)
        self.packed = packed
        kind = D.PackedBatches if packed else D.PaddedBatches
        self.train_batches = kind(train, self.seq_len, cfg.batch_size, split="train", **kw)
        if val:
            try:
                self.val_batches = kind(val, self.seq_len, cfg.batch_size, split="val", **kw)
            except D.NotEnoughData as e:
                self.log(f"warning: {e}; no held-out loss")
        self.n_examples = (len(train), len(val))
        self.data_digest = D.digest(train)
        counted = sum(e.n_targets for e in train)
        total = sum(len(e.ids) for e in train)
        self.data_note = (f"{len(train):,} train / {len(val):,} held-out examples, {total:,} train tokens, "
                          f"{counted:,} of them counted in the loss; "
                          + ("packed into windows" if packed else "one example per row, padded"))
        truncated = getattr(self.train_batches, "truncated", 0)
        if truncated:
            self.data_note += f"; {truncated} example(s) cut to {self.seq_len + 1} tokens"
            empty = sum(not e.mask[1:].any() for e in self.train_batches.examples)
            if empty:
                self.data_note += f", {empty} of them with nothing left to learn (raise --max-seq-len?)"
                if empty == len(self.train_batches.examples):
                    raise FinetuneError(f"no training example has a counted token within the first "
                                        f"{self.seq_len + 1} tokens: raise --max-seq-len or use --packing")

    def _write_tokenizer(self) -> None:
        from ..outputs import atomic_write

        target = self.out_dir / "tokenizer.bin"
        if Path(self.tok_bin).resolve() == target.resolve():
            return
        data = Path(self.tok_bin).read_bytes()
        if target.exists() and target.read_bytes() == data:
            return
        with atomic_write(target, overwrite=True) as f:
            f.write(data)

    # -- loss --------------------------------------------------------------------
    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        if self.rt.device_type == "cuda":
            return t.pin_memory().to(self.rt.device, non_blocking=True)
        return t.to(self.rt.device)

    def _loss_sum(self, model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            logits = model(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                               ignore_index=D.IGNORE, reduction="sum")

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.rt.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    @torch.no_grad()
    def estimate_loss(self) -> Dict[str, float]:
        """Mean cross-entropy per counted token: the held-out set (all of it, or
        eval_iters batches) and as many batches of the training set."""
        out = {}
        self.raw.eval()
        n_val = 0
        splits = []
        if self.val_batches is not None:
            n_val = _n_batches(self.val_batches, self.cfg.eval_iters)
            splits.append(("val", self.val_batches, n_val))
        n_train = self.cfg.eval_iters or max(n_val, 1)
        splits.append(("train", self.train_batches, min(n_train, _n_batches(self.train_batches, 0))))
        for split, batches, n in splits:
            acc = torch.zeros(2, dtype=torch.float64)
            self.progress.begin(f"eval at step {self.iter_num}: {split} batch", n)
            for b, (x, y) in enumerate(batches.eval_batches(n)):
                s = self._loss_sum(self.raw, self._to_device(x), self._to_device(y))
                acc += torch.tensor([float(s), float((y != D.IGNORE).sum())], dtype=torch.float64)
                self.progress.step(b + 1)
            self.progress.end()
            acc = self._all_reduce(acc.to(self.rt.device if self.rt.device_type == "cuda" else "cpu")).cpu()
            out[split] = float(acc[0] / max(float(acc[1]), 1.0))
        self.raw.train()
        return out

    def train_step(self):
        cfg, rt = self.cfg, self.rt
        lr = get_lr(self.iter_num, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = [self.train_batches.next_batch() for _ in range(self.gas)]
        count = torch.tensor([float(sum(int((y != D.IGNORE).sum()) for _, y in batches))], dtype=torch.float64)
        count = self._all_reduce(count.to(rt.device if rt.device_type == "cuda" else "cpu")).item()
        scale = rt.world_size / max(count, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64)
        self.progress.begin(f"iter {self.iter_num}: micro-batch", self.gas)
        for m, (x, y) in enumerate(batches):
            last = m == self.gas - 1
            sync = self.model.no_sync() if rt.distributed and not last else contextlib.nullcontext()
            with sync:
                s = self._loss_sum(self.model, self._to_device(x), self._to_device(y))
                self.scaler.scale(s * scale).backward()
            loss_sum += s.detach().double().cpu()
            self.progress.step(m + 1)
        self.progress.end()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in self.raw.parameters() if p.requires_grad], cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = self._all_reduce(loss_sum.to(rt.device if rt.device_type == "cuda" else "cpu")).cpu()
        tokens = sum(x.size for x, _ in batches) * rt.world_size
        flops = sum(x.size * (self.flops_per_token + self.attn_flops * x.shape[1]) for x, _ in batches)
        return lr, float(loss_sum) / max(count, 1.0), tokens, flops * rt.world_size

    # -- checkpoints and outputs --------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Collective: every process calls it."""
        rng_all = self._rng_states_of_all_ranks()
        path = self.out_dir / "ckpt.pt"
        if self.rt.master:
            state = {
                "format": FORMAT, "version": VERSION, "mode": "lora" if self.cfg.lora else "full",
                "model_args": dataclasses.asdict(self.model_args),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "config": self.cfg.to_dict(), "iter_num": self.iter_num, "best_val_loss": self.best_val_loss,
                "first_val_loss": self.first_val_loss,
                "sampler": self.train_batches.state_dict(), "rng": rng_all, "data_digest": self.data_digest,
                "base": {"path": str(Path(self.cfg.base).resolve()), "kind": self.base_kind,
                         "digest": self.base_digest},
            }
            if self.cfg.lora:
                state["trainable"] = lora_state_dict(self.raw)
                state["lora"] = {"rank": self.cfg.lora_rank, "alpha": self.cfg.lora_alpha,
                                 "targets": self.targets, "dropout": self.cfg.lora_dropout}
            else:
                state["model"] = {k: v.detach().float().cpu().clone() for k, v in self.raw.state_dict().items()}
            ck.atomic_save(state, path)
        return path

    def export_version(self) -> int:
        """--version, or: the base's own .bin version when it stores float32
        (an int8 or bf16 base gives float32, the exact merge: merged_version);
        1 (3 when rope_theta / norm_eps need it) for other bases."""
        if self.cfg.version == "none":
            return -1
        if self.cfg.version != "auto":
            return int(self.cfg.version)
        own = getattr(self.base_source, "version", None)
        return merged_version(1 if own is None else own, self.model_args)

    def write_outputs(self) -> Dict[str, Optional[str]]:
        from ..export.sources import StateDictSource
        from ..export.writers import write_bin, write_hf

        out: Dict[str, Optional[str]] = {"model_bin": None, "adapter": None, "hf": None, "tokenizer_bin": None}
        warn = lambda m: self.log(f"warning: {m}")  # noqa: E731
        a = self.model_args
        if self.cfg.lora:
            adapter = to_adapter(self.raw, base_model=str(Path(self.cfg.base).resolve()))
            adapter.save(self.out_dir, a.n_heads, a.n_kv_heads, force=True)
            out["adapter"] = str(self.out_dir)
            self.log(f"wrote {self.out_dir / 'adapter_model.safetensors'} and adapter_config.json "
                     f"({self.n_trainable:,} parameters)")
            merged = LoraMergedSource(self.base_source, adapter)
        else:
            sd = {k: v.detach().float().cpu() for k, v in self.raw.state_dict().items()}
            merged = StateDictSource(dataclasses.asdict(a), sd, name="fine-tuned model",
                                     tied=bool(a.tie_embeddings))
        version = self.export_version()
        if version >= 0:
            group = getattr(self.base_source, "group_size", None) if version == 2 else None
            path = write_bin(merged, self.out_dir / "model.bin", version, group_size=group, warn=warn, force=True)
            out["model_bin"] = str(path)
            self.log(f"wrote {path} (version {version})")
        if self.cfg.hf:
            tok = self.tok_source if self.tok_source is not None and str(self.tok_source).endswith(".model") \
                else None
            folder = write_hf(merged, self.out_dir / "hf", tokenizer=tok, force=True)
            out["hf"] = str(folder)
            self.log(f"wrote {folder}/ (Hugging Face LlamaForCausalLM)")
        if self.tokenizer is not None:
            out["tokenizer_bin"] = str(self.out_dir / "tokenizer.bin")
        return out

    # -- the loop -------------------------------------------------------------------
    def evaluate(self, final: bool) -> Dict[str, float]:
        t0 = time.perf_counter()
        losses = self.estimate_loss()
        self.eval_seconds = time.perf_counter() - t0
        val = losses.get("val", losses["train"])
        text = f"step {self.iter_num}: train loss {losses['train']:.4f}"
        if "val" in losses:
            text += f", val loss {losses['val']:.4f}"
        self.log(text)
        self.record({"iter": self.iter_num, "train_loss": losses["train"], "val_loss": losses.get("val"),
                     "lr": get_lr(self.iter_num, self.cfg)})
        if self.first_val_loss is None:
            self.first_val_loss = val
        self.best_val_loss = min(self.best_val_loss, val)
        if final or self.iter_num > (self.resumed_at or 0):
            path = self.save_checkpoint()
            self.log(f"saved checkpoint to {path}")
        return losses

    def run(self) -> Dict[str, Any]:
        try:
            return self._run()
        finally:
            for p in self._temps:
                with contextlib.suppress(OSError):
                    os.unlink(p)
            src = getattr(self, "base_source", None)
            if src is not None:
                src.close()

    def _run(self) -> Dict[str, Any]:
        self.setup()
        cfg, rt = self.cfg, self.rt
        mode = "DDP" if rt.distributed else "single process"
        what = (f"LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha:g} on {','.join(self.targets)}" if cfg.lora
                else "full fine-tune")
        self.log(f"{mode}: {rt.world_size} process(es) on {rt.device}, dtype {self.dtype}; {what}: "
                 f"{self.n_trainable:,} of {self.n_params:,} parameters train")
        self.log(f"base: {cfg.base} ({self.base_kind}); lr {cfg.learning_rate:g}, {cfg.max_iters} iterations of "
                 f"{self.gas} x {rt.world_size} x {cfg.batch_size} rows of up to {self.seq_len} tokens")
        if hasattr(self, "data_note"):
            self.log(f"data: {self.data_note}")
        peak, how = peak_flops(rt.device_type, self.dtype, rt.device if rt.device_type == "cuda" else "")
        self.log(f"mfu is against {peak / 1e9:,.0f} GFLOP/s ({how})")
        # forward + backward FLOPs per token: 6N for full training; with LoRA the frozen
        # weights need no weight gradients (4N) plus the adapters' 6 per parameter
        # (and PaLM's attention term, 12 * layers * dim per token per position of the row)
        n_frozen = self.n_params - self.n_trainable
        a = self.model_args
        self.flops_per_token = 4 * n_frozen + 6 * self.n_trainable
        self.attn_flops = 12 * a.n_layers * a.n_heads * a.head_size
        self.eval_seconds = 0.0
        t_last = time.perf_counter()
        since, local, dt_avg = 0, 0, None
        n_evals_left = lambda: (cfg.max_iters - 1 - self.iter_num) // cfg.eval_interval + 1  # noqa: E731
        tokens_acc = flops_acc = 0
        while self.iter_num < cfg.max_iters:
            if self.iter_num % cfg.eval_interval == 0 and self.iter_num != self.resumed_at:
                self.evaluate(final=False)
                t_last, since, tokens_acc, flops_acc = time.perf_counter(), 0, 0, 0
            lr, loss, tokens, flops = self.train_step()
            it = self.iter_num
            self.iter_num += 1
            since += 1
            local += 1
            tokens_acc += tokens
            flops_acc += flops
            if it % cfg.log_interval == 0 or self.iter_num == cfg.max_iters:
                now = time.perf_counter()
                dt = (now - t_last) / since
                tok_s = tokens_acc / (now - t_last)
                mfu = flops_acc / (now - t_last) / peak if peak > 0 else 0.0
                t_last, since, tokens_acc, flops_acc = now, 0, 0, 0
                dt_avg = dt if dt_avg is None else 0.7 * dt_avg + 0.3 * dt
                left = cfg.max_iters - self.iter_num
                eta = left * dt_avg + (n_evals_left() if left else 0) * self.eval_seconds + self.eval_seconds
                self.log(f"{it} | loss {loss:.4f} | lr {lr:.3e} | {dt * 1000:.1f} ms | {tok_s:,.0f} tok/s | "
                         f"mfu {mfu * 100:.3g}% | ETA {fmt_duration(eta)}")
                self.record({"iter": it, "loss": loss, "lr": lr, "ms": dt * 1000, "tok_s": tok_s, "mfu": mfu,
                             "eta_s": eta})
        if local == 0:
            self.log(f"nothing to train: at iteration {self.iter_num}, --max-iters={cfg.max_iters}")
        losses = self.evaluate(final=True)
        result = {"iter_num": self.iter_num, "out_dir": str(self.out_dir), "ckpt": str(self.out_dir / "ckpt.pt"),
                  "history": self.history, "val_loss_before": self.first_val_loss,
                  "val_loss_after": losses.get("val", losses["train"]), "train_loss_after": losses["train"]}
        if rt.master:
            result.update(self.write_outputs())
            if self.first_val_loss is not None:
                self.log(f"{'held-out' if 'val' in losses else 'train'} loss: {self.first_val_loss:.4f} before, "
                         f"{result['val_loss_after']:.4f} after")
        if rt.distributed:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
        return result


def _files(spec) -> List[Path]:
    from ..data.stories import expand_inputs

    return expand_inputs(spec)


def _n_batches(batches, limit: int) -> int:
    rows = len(range(batches.rank, batches.n_rows, batches.world_size)) if not isinstance(batches, D.ShardBatches) \
        else -(-batches.sampler.n_windows // batches.batch_size)
    n = -(-rows // batches.batch_size) if not isinstance(batches, D.ShardBatches) else rows
    return min(n, limit) if limit else n


def finetune(cfg: FinetuneConfig, log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Fine-tune with ``cfg``; returns {iter_num, ckpt, model_bin, adapter, hf, tokenizer_bin,
    val_loss_before, val_loss_after, history}."""
    return Finetuner(cfg, log=log).run()


__all__ = ["finetune", "Finetuner", "FinetuneError", "load_finetune_checkpoint"]
