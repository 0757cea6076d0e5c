"""The training loop: one process, or one per device under torchrun (DDP, or FSDP2
with ``fsdp=True``).

Order of events in iteration ``it`` (0 .. max_iters-1): evaluate and maybe
checkpoint when ``it % eval_interval == 0``; set the learning rate; run
``gradient_accumulation_steps`` micro-batches; clip, step. After the last one,
evaluate, always checkpoint, and export ``model.bin``. A checkpoint written at the
top of iteration ``it`` holds everything needed to run iteration ``it`` exactly as
the uninterrupted run would (weights, optimizer, scaler, RNG states of every rank,
sampler position), so ``init_from=resume`` continues the same loss curve.
"""
from __future__ import annotations

import contextlib
import dataclasses
import filecmp
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from . import checkpoint as ck
from .config import TrainConfig, UsageError
from .loader import NotEnoughData, WindowSampler
from .peak import peak_flops
from .progress import Progress, fmt_duration

PTDTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# ModelArgs fields that fix the shape of the weights: on resume they come from the checkpoint
STRUCTURAL = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "multiple_of",
              "norm_eps", "max_seq_len", "rope_theta", "tie_embeddings")
# knobs a resume never takes from the checkpoint (where and how this run happens)
NOT_RESUMED = ("data", "out_dir", "init_from", "overwrite", "eval_only", "device", "fsdp", "compile", "preset")
EVAL_SEED = 0x5EED


def get_lr(it: int, cfg: TrainConfig) -> float:
    """llama2.c's schedule: linear warmup, cosine decay to min_lr at lr_decay_iters."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    decay_iters = cfg.resolved_lr_decay_iters()
    if it < cfg.warmup_iters:
        return cfg.learning_rate * it / cfg.warmup_iters
    if it > decay_iters or decay_iters <= cfg.warmup_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / (decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


# ---------------------------------------------------------------------------
# processes and devices
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Runtime:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    distributed: bool = False
    device: str = "cpu"
    device_type: str = "cpu"

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_runtime(cfg: TrainConfig) -> Runtime:
    rt = Runtime()
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device={cfg.device}: CUDA is not available in this PyTorch")
    rt.device_type = "cuda" if want.startswith("cuda") else ("mps" if want.startswith("mps") else "cpu")
    rt.device = want
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        import torch.distributed as dist

        rt.rank = int(os.environ["RANK"])
        rt.world_size = int(os.environ["WORLD_SIZE"])
        rt.local_rank = int(os.environ.get("LOCAL_RANK", rt.rank))
        rt.distributed = True
        if rt.device_type == "cuda":
            rt.device = f"cuda:{rt.local_rank}"
            torch.cuda.set_device(rt.device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if rt.device_type == "cuda" else "gloo")
    elif cfg.fsdp:
        raise UsageError("--fsdp needs several processes: launch with torchrun --nproc_per_node=N")
    return rt


def resume_knobs(cfg: TrainConfig, saved: Dict[str, Any]) -> List[str]:
    """On resume, the knobs the command line did not give again take the
    checkpoint's values (batch size, accumulation, learning rate and schedule,
    max_iters, seed, ...), so a resume continues the run it resumes. A
    schedule that decayed over the old max_iters (lr_decay_iters 0) keeps
    doing so when only max_iters is given. Returns a note per knob taken
    whose value is not the default."""
    from .config import KNOBS

    notes = []
    for name, f in KNOBS.items():
        if name in NOT_RESUMED or name in STRUCTURAL or name not in saved or cfg.was_given(name):
            continue
        if getattr(cfg, name) != saved[name]:
            setattr(cfg, name, saved[name])
        if saved[name] != f.default:
            notes.append(f"{name}={saved[name]}")
    if not cfg.was_given("lr_decay_iters") and not saved.get("lr_decay_iters") and \
            saved.get("max_iters") and cfg.max_iters != saved["max_iters"]:
        cfg.lr_decay_iters = int(saved["max_iters"])
        notes.append(f"lr_decay_iters={cfg.lr_decay_iters} (the old max_iters)")
    return notes


def auto_batch(cfg: TrainConfig, rt: Runtime) -> Optional[str]:
    """Resolves batch_size / gradient_accumulation_steps 0 for the device:
    on CUDA llama2.c's 128 x 4; elsewhere (a CPU) 8 sequences and one
    micro-batch per process. Returns a note when it chose."""
    chose = []
    if cfg.batch_size == 0:
        cfg.batch_size = 128 if rt.device_type == "cuda" else 8
        chose.append(f"{cfg.flag('batch_size', cfg.batch_size)}")
    if cfg.gradient_accumulation_steps == 0:
        cfg.gradient_accumulation_steps = 4 if rt.device_type == "cuda" else rt.world_size
        chose.append(f"{cfg.flag('gradient_accumulation_steps', cfg.gradient_accumulation_steps)}")
    if not chose:
        return None
    return f"defaults for {rt.device_type}: {' '.join(chose)}"


def resolve_dtype(cfg: TrainConfig, rt: Runtime) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    if rt.device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    native_bf16 = getattr(model_module(), "cpu_has_native_bf16", None)
    if rt.device_type == "cpu" and native_bf16 is not None and native_bf16():
        return "bfloat16"      # AVX512_BF16 / AMX: bf16 autocast trains several times faster
    return "float32"


# ---------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------

def model_module():
    try:
        from llama2c import model as m
    except ImportError as e:
        raise RuntimeError(f"llama2c.model is not available ({e})") from None
    return m


def model_args_from_config(cfg: TrainConfig, vocab_size: int) -> Dict[str, Any]:
    return dict(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                n_kv_heads=cfg.n_kv_heads or cfg.n_heads, vocab_size=vocab_size,
                hidden_dim=cfg.hidden_dim or None, multiple_of=cfg.multiple_of, norm_eps=cfg.norm_eps,
                max_seq_len=cfg.max_seq_len, dropout=cfg.dropout, rope_theta=cfg.rope_theta,
                tie_embeddings=cfg.tie_embeddings)


def _accepts(fn, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def build_model_args(values: Dict[str, Any]):
    m = model_module()
    known = {f.name for f in dataclasses.fields(m.ModelArgs)}
    return m.ModelArgs(**{k: v for k, v in values.items() if k in known})


def _loss_of(out, raw_model) -> torch.Tensor:
    if isinstance(out, tuple) and len(out) >= 2 and torch.is_tensor(out[1]):
        return out[1]
    loss = getattr(raw_model, "last_loss", None)
    if loss is None:
        raise RuntimeError("the model returned no loss for (tokens, targets)")
    return loss


def _mfu(raw_model, fwdbwd_per_iter: int, dt: float, n_params: int, args, peak: float = 312e12) -> float:
    """Model FLOPs utilization of one process against ``peak`` (the device's:
    see peak.py; llama2.c's A100 bf16 figure by default)."""
    fn = getattr(raw_model, "estimate_mfu", None)
    if fn is not None:
        try:
            return float(fn(fwdbwd_per_iter, dt, peak_flops=peak))
        except TypeError:
            pass
    # PaLM appendix B
    L, H = args.n_layers, args.n_heads
    Q, T = args.dim // args.n_heads, args.max_seq_len
    flops = (6 * n_params + 12 * L * H * Q * T) * T * fwdbwd_per_iter
    return flops / dt / peak


def export_model_bin(state_dict: Dict[str, torch.Tensor], model_args: Dict[str, Any], path: Path,
                     version: int, warn: Optional[Callable[[str], None]] = None) -> Path:
    """Write ``path`` (a llama2c .bin, atomically) from a full state dict with llama2c.export."""
    from llama2c.export import write_bin
    from llama2c.export.sources import StateDictSource

    src = StateDictSource(model_args, ck.clean_state_dict(state_dict), name="trained model",
                          tied=bool(model_args.get("tie_embeddings", True)))
    return write_bin(src, path, version=version, warn=warn, force=True)


def write_tokenizer_bin(data_dir: Path, meta: Dict[str, Any], out_dir: Path, vocab_size: int,
                        overwrite: bool, log: Callable[[str], None]) -> Optional[Path]:
    """out_dir/tokenizer.bin from the tokenizer the data directory knows (the
    copy of tokenizer.model that `llama2c data prepare` keeps beside the shards,
    named in meta.json; else the file it was made from), so that `llama2c
    generate --model out_dir/model.bin` finds it. Written atomically. An
    existing tokenizer.bin is kept when it is the same file; a different one is
    replaced only with ``overwrite`` (--overwrite), else kept with a warning.
    Returns the path when out_dir holds the data's tokenizer.bin, else None
    (after a note saying why)."""
    from llama2c.outputs import commit

    target = Path(out_dir) / "tokenizer.bin"
    names = [meta.get("tokenizer"), meta.get("tokenizer_source")]
    src = next((Path(data_dir) / n for n in names if n and (Path(data_dir) / n).is_file()), None)
    if src is None:
        log(f"note: no tokenizer.bin written: {data_dir} has no tokenizer.model (write one with "
            "`llama2c tokenizer export`)")
        return None
    try:
        from llama2c.export.tokenizer_bin import export_tokenizer, tokenizer_pieces

        n = len(tokenizer_pieces(src)[0])
        if n != vocab_size:
            log(f"note: no tokenizer.bin written: the model's vocab_size {vocab_size} is not the "
                f"{n} pieces of {src}")
            return None
        fd, tmp = tempfile.mkstemp(prefix=".tokenizer.bin.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            export_tokenizer(src, tmp, force=True)
            if target.exists() and filecmp.cmp(tmp, target, shallow=False):
                return target
            if target.exists() and not overwrite:
                log(f"warning: kept {target}, which is not the tokenizer of {data_dir}: "
                    "--overwrite replaces it")
                return None
            commit(tmp, target, overwrite)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    except (ImportError, OSError, ValueError) as e:
        log(f"warning: no tokenizer.bin written: {e}")
        return None
    log(f"wrote {target} (from {src})")
    return target


def refuse_to_overwrite(cfg: TrainConfig) -> bool:
    """A scratch run would replace out_dir's ckpt.pt / model.bin: refuse
    (FileExistsError) unless cfg.overwrite. Returns True when an earlier run is
    being overwritten."""
    if cfg.init_from != "scratch" or cfg.eval_only:
        return False
    out = Path(cfg.out_dir)
    found = [out / name for name in ("ckpt.pt", "model.bin") if (out / name).exists()]
    if found and not cfg.overwrite:
        raise FileExistsError(f"{found[0]} already exists: continue that run with "
                              f"{cfg.flag('init_from', 'resume')}, or start over with --overwrite")
    return bool(found)


# ---------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------

class RunLog:
    """What a run prints and records (rank 0 only): log lines to `log` (or
    stdout) and entries appended to out_dir/log.jsonl; and its random
    states, seeded or restored on resume. Trainer and the fine-tuner
    (llama2c/finetune) share it."""
    rt: "Runtime"
    out_dir: Path

    def __init__(self, log: Optional[Callable[[str], None]] = None):
        self._log = log
        self.history: List[Dict[str, Any]] = []
        self.rt = Runtime()                       # rank 0 until setup knows better
        self.progress = Progress(self.log)        # lines for slow iterations and evals

    def log(self, msg: str) -> None:
        if not self.rt.master:
            return
        if self._log is not None:
            self._log(msg)
        else:
            print(msg, flush=True)

    def record(self, entry: Dict[str, Any]) -> None:
        if not self.rt.master:
            return
        self.history.append(entry)
        with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def _seed(self, seed: int) -> None:
        s = seed + self.rt.rank
        torch.manual_seed(s)
        np.random.seed(s % (2**32))
        random.seed(s)

    def _restore_random(self, states: list, seed: int, iter_num: int) -> None:
        """Each rank's saved random state, or a fresh seed when the number of
        processes changed since the checkpoint."""
        rt = self.rt
        if len(states) == rt.world_size:
            ck.set_rng_state(states[rt.rank], rt.device_type)
        else:
            self.log(f"note: the checkpoint has random states for {len(states)} process(es), "
                     f"this run has {rt.world_size}: reseeding")
            self._seed(seed + 7 * iter_num)

    def _rng_states_of_all_ranks(self) -> list:
        """Every rank's random state, in rank order (collective: every rank calls it)."""
        rng = ck.rng_state(self.rt.device_type)
        if self.rt.world_size == 1:
            return [rng]
        import torch.distributed as dist

        gathered: List[Any] = [None] * self.rt.world_size
        dist.all_gather_object(gathered, rng)
        return gathered

    def _prepare_model(self, raw, compile_model: bool, ddp: bool, dtype: str, accumulation: int) -> None:
        """self.model (raw, compiled and/or wrapped in DDP), self.autocast for
        the dtype, and self.gas: the micro-batches each process runs, the
        accumulation split across processes when it divides (llama2.c)."""
        rt = self.rt
        model = raw
        if compile_model:
            self.log("compiling the model (takes a minute)...")
            model = torch.compile(model)
        if ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
        self.model = model
        if dtype == "float32":
            self.autocast = contextlib.nullcontext
        else:
            ptd = PTDTYPE[dtype]
            self.autocast = lambda: torch.autocast(device_type=rt.device_type, dtype=ptd)
        gas = accumulation
        if rt.world_size > 1 and gas % rt.world_size == 0:
            gas //= rt.world_size
        elif rt.world_size > 1:
            self.log(f"note: gradient_accumulation_steps={gas} is not a multiple of the "
                     f"{rt.world_size} processes: each process runs {gas} micro-batches")
        self.gas = gas


class Trainer(RunLog):
    def __init__(self, cfg: TrainConfig, log: Optional[Callable[[str], None]] = None):
        super().__init__(log)
        self.cfg = cfg

    # -- setup ---------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        overwriting = refuse_to_overwrite(cfg)         # before any process group: every rank refuses
        self.rt = rt = setup_runtime(cfg)
        self.out_dir = Path(cfg.out_dir)
        if rt.master:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if overwriting:                            # --overwrite: the old run's log goes too
                (self.out_dir / "log.jsonl").unlink(missing_ok=True)
        # the knobs first (a resume's from its checkpoint): the dtype and batch follow them
        ckpt = None
        notes = []
        if cfg.init_from == "resume":
            ckpt = ck.load_checkpoint(self.out_dir / "ckpt.pt")
            if not cfg.data:
                cfg.data = ckpt["config"].get("data", "")
            kept = resume_knobs(cfg, ckpt["config"])
            if kept:
                notes.append("resume: from the checkpoint: " + ", ".join(kept))
        else:
            from .config import apply_preset

            apply_preset(cfg)
        chose = auto_batch(cfg, rt)
        if chose:
            notes.append(chose)
        for note in notes:
            self.log(note)
        if ckpt is not None and cfg.max_iters > cfg.resolved_lr_decay_iters() and cfg.decay_lr \
                and cfg.min_lr == 0:
            self.log(f"note: the learning rate decays to 0 at iteration {cfg.resolved_lr_decay_iters()} and "
                     f"stays there until {cfg.flag('max_iters', cfg.max_iters)}: pass "
                     f"{cfg.flag('lr_decay_iters')} (e.g. {cfg.max_iters}) to stretch the decay, or "
                     f"{cfg.flag('min_lr')}")
        self.dtype = resolve_dtype(cfg, rt)
        if cfg.fsdp and self.dtype == "float16":
            raise UsageError("--fsdp trains in float32 or bfloat16 (float16 needs a sharded grad "
                             "scaler): use --dtype=bfloat16")
        if rt.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        elif rt.device_type == "cpu":
            keep = getattr(model_module(), "keep_freed_memory", None)
            if keep is not None:
                keep()    # reuse freed buffers instead of faulting in fresh pages every step

        cfg.data = str(Path(cfg.data).resolve())      # so a resume works from any directory
        self.data_dir = Path(cfg.data)
        from llama2c.data.shards import load_meta, load_split

        self.meta = meta = load_meta(self.data_dir)
        data_vocab = int(meta["vocab_size"])

        if ckpt is not None:
            margs = dict(ckpt["model_args"])
            margs["dropout"] = cfg.dropout
            for key in STRUCTURAL:        # the checkpoint fixes the shapes
                if key in margs:
                    setattr(cfg, key, margs[key] or 0 if key in ("hidden_dim", "n_kv_heads")
                            else margs[key])
        else:
            vocab = cfg.vocab_size or data_vocab
            margs = model_args_from_config(cfg, vocab)
        if margs["vocab_size"] < data_vocab:
            raise UsageError(f"vocab_size {margs['vocab_size']} is smaller than the data's tokenizer "
                             f"({data_vocab} pieces)")
        self.args = build_model_args(margs)
        self.model_args = dataclasses.asdict(self.args)

        # the same initial weights on every rank and for any world size
        torch.manual_seed(cfg.seed)
        m = model_module()
        raw = m.Transformer(self.args)
        if ckpt is not None:
            raw.load_state_dict(ck.clean_state_dict(ckpt["model"]))
        self.n_params = sum(p.numel() for p in raw.parameters())

        if cfg.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            # built on the CPU; fully_shard keeps this rank's shard of each parameter
            # and moves it (and the buffers) to the mesh's device
            mesh = init_device_mesh(rt.device_type, (rt.world_size,))
            for block in raw.layers:
                fully_shard(block, mesh=mesh)
            # the root group holds the embedding, final norm and classifier: a tied
            # embedding/classifier weight stays one parameter
            fully_shard(raw, mesh=mesh)
        else:
            raw.to(rt.device)
        self.raw = raw

        # fused AdamW on a CPU too (one kernel for every parameter: ~3x faster a step)
        opt_kw = {"fused": True} if rt.device_type == "cpu" and not cfg.fsdp and \
            _accepts(raw.configure_optimizers, "fused") else {}
        self.optimizer = raw.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                                  (cfg.beta1, cfg.beta2), rt.device_type, **opt_kw)
        # the loss without the (batch, seq, vocab) logits, which training never reads
        self.fwd_kw = {"return_logits": False} if _accepts(raw.forward, "return_logits") else {}
        self.scaler = torch.amp.GradScaler(rt.device_type if rt.device_type != "mps" else "cpu",
                                           enabled=(self.dtype == "float16"))
        self.iter_num, self.best_val_loss = 0, float("inf")
        if ckpt is not None:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 set_optimizer_state_dict)

            set_optimizer_state_dict(raw, self.optimizer, ckpt["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
            if ckpt.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(ckpt["scaler"])
            self.iter_num = int(ckpt["iter_num"])
            self.best_val_loss = float(ckpt["best_val_loss"])

        self._prepare_model(raw, cfg.compile, rt.distributed and not cfg.fsdp, self.dtype,
                            cfg.gradient_accumulation_steps)
        self.tokens_per_iter = self.gas * rt.world_size * cfg.batch_size * cfg.max_seq_len

        self.train_shards = load_split(self.data_dir, "train")
        self.val_shards = load_split(self.data_dir, "val")
        self.sampler = WindowSampler(self.train_shards, cfg.max_seq_len, cfg.batch_size, rank=rt.rank,
                                     world_size=rt.world_size, seed=cfg.seed, split="train")
        self.has_val = True
        try:
            self._eval_sampler("val")
        except NotEnoughData as e:
            self.has_val = False
            self.log(f"warning: {e}; the train loss stands in for the val loss")

        # random states last: everything above drew from them
        if ckpt is not None:
            self.sampler.load_state_dict(ckpt["sampler"])
            self._restore_random(ckpt.get("rng") or [], cfg.seed, self.iter_num)
            self.log(f"resumed from {self.out_dir / 'ckpt.pt'} at iteration {self.iter_num}")
        else:
            self._seed(cfg.seed)
        self.resumed_at = self.iter_num if ckpt is not None else None
        del ckpt

    # -- evaluation ----------------------------------------------------------
    def _eval_sampler(self, split: str) -> WindowSampler:
        shards = self.train_shards if split == "train" else self.val_shards
        return WindowSampler(shards, self.cfg.max_seq_len, self.cfg.batch_size, rank=self.rt.rank,
                             world_size=self.rt.world_size, seed=EVAL_SEED, split=split)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        if self.rt.device_type == "cuda":
            return x.pin_memory().to(self.rt.device, non_blocking=True)
        return x.to(self.rt.device)

    @torch.no_grad()
    def estimate_loss(self) -> Dict[str, float]:
        out = {}
        self.model.eval()
        for split in ("train", "val"):
            if split == "val" and not self.has_val:
                continue
            sampler = self._eval_sampler(split)
            n = min(self.cfg.eval_iters, sampler.batches_per_pass())
            total = torch.zeros((), dtype=torch.float64, device=self.rt.device
                                if self.rt.device_type != "mps" else "cpu")
            self.progress.begin(f"eval at step {self.iter_num}: {split} batch", n)
            for b in range(n):
                x, y = sampler.next_batch()
                with self.autocast():
                    loss = _loss_of(self.model(self._to_device(x), self._to_device(y), **self.fwd_kw),
                                    self.raw)
                total += loss.detach().double().to(total.device)
                self.progress.step(b + 1)
            self.progress.end()
            total /= n
            if self.rt.world_size > 1:
                import torch.distributed as dist

                dist.all_reduce(total)
                total /= self.rt.world_size
            out[split] = float(total.item())
        if "val" not in out:
            out["val"] = out["train"]
        self.model.train()
        return out

    # -- checkpoints ---------------------------------------------------------
    def full_state(self):
        """(model state, optimizer state), complete on rank 0 (collective under FSDP)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(self.raw, self.optimizer, options=opts)

    def save_checkpoint(self) -> Path:
        """Collective: every rank must call it."""
        model_sd, optim_sd = self.full_state()
        rng_all = self._rng_states_of_all_ranks()
        path = self.out_dir / "ckpt.pt"
        if self.rt.master:
            ckpt = ck.make_checkpoint(
                model_sd=model_sd, optim_sd=optim_sd,
                scaler_sd=self.scaler.state_dict() if self.scaler.is_enabled() else None,
                model_args=self.model_args, config=self.cfg.to_dict(), iter_num=self.iter_num,
                best_val_loss=self.best_val_loss, sampler=self.sampler.state_dict(), rng=rng_all)
            ck.atomic_save(ckpt, path)
        self._last_state = model_sd
        return path

    def export_version(self) -> int:
        v = self.cfg.export_version
        if v == 0:
            default = float(self.args.rope_theta) == 10000.0 and float(self.args.norm_eps) == 1e-5
            v = 1 if default else 3
        return v

    # -- main loop -----------------------------------------------------------
    def evaluate_and_save(self, final: bool) -> Dict[str, float]:
        t0 = time.perf_counter()
        losses = self.estimate_loss()
        self.eval_seconds = time.perf_counter() - t0
        lr = get_lr(self.iter_num, self.cfg)
        self.log(f"step {self.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        self.record({"iter": self.iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                     "lr": lr})
        improved = losses["val"] < self.best_val_loss
        if improved:
            self.best_val_loss = losses["val"]
        if final or (self.iter_num > 0 and (improved or self.cfg.always_save_checkpoint)):
            path = self.save_checkpoint()
            self.log(f"saved checkpoint to {path}")
        return losses

    def train_step(self):
        """One optimizer step; returns (lr, mean loss over the micro-batches as a tensor)."""
        cfg, rt = self.cfg, self.rt
        lr = get_lr(self.iter_num, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=rt.device if rt.device_type != "mps" else "cpu")
        self.progress.begin(f"iter {self.iter_num}: micro-batch", self.gas)
        for micro in range(self.gas):
            last = micro == self.gas - 1
            x, y = self.sampler.next_batch()
            x, y = self._to_device(x), self._to_device(y)
            if rt.distributed and not cfg.fsdp and not last:
                sync = self.model.no_sync()
            else:
                sync = contextlib.nullcontext()
                if cfg.fsdp:
                    self.raw.set_requires_gradient_sync(last)
            with sync:
                with self.autocast():
                    loss = _loss_of(self.model(x, y, **self.fwd_kw), self.raw) / self.gas
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach().float().to(loss_sum.device)
            self.progress.step(micro + 1)
        self.progress.end()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return lr, loss_sum

    def run(self) -> Dict[str, Any]:
        self.setup()
        cfg, rt = self.cfg, self.rt
        mode = "FSDP2" if cfg.fsdp else ("DDP" if rt.distributed else "single process")
        self.log(f"{mode}: {rt.world_size} process(es) on {rt.device}, dtype {self.dtype}; "
                 f"{self.n_params:,} parameters; tokens per iteration {self.tokens_per_iter:,} "
                 f"({self.gas} x {rt.world_size} x {cfg.batch_size} x {cfg.max_seq_len})")
        self.log(f"data: {self.data_dir} ({sum(len(a) for a in self.train_shards):,} train tokens, "
                 f"{sum(len(a) for a in self.val_shards):,} val tokens)")
        self._last_state = None
        if cfg.eval_only:
            self.estimate_and_report()
            return self._finish(export=False)
        peak, how = peak_flops(rt.device_type, self.dtype, rt.device if rt.device_type == "cuda" else "")
        self.log(f"mfu is against {peak / 1e9:,.0f} GFLOP/s per process ({how})")
        if self.iter_num < cfg.max_iters:
            self.log(f"iteration {self.iter_num}: {self.gas} micro-batch(es) of {cfg.batch_size} x "
                     f"{cfg.max_seq_len} tokens per process, up to {cfg.flag('max_iters', cfg.max_iters)}; "
                     f"evaluating every {cfg.eval_interval} ({cfg.eval_iters} batches per split)")

        t0 = time.perf_counter()
        local_iter, since_log, running_mfu = 0, 0, -1.0
        self.eval_seconds, dt_avg = 0.0, None
        while self.iter_num < cfg.max_iters:
            if self.iter_num % cfg.eval_interval == 0 and self.iter_num != self.resumed_at:
                self.evaluate_and_save(final=False)
                t0, since_log = time.perf_counter(), 0
            lr, loss_sum = self.train_step()
            it = self.iter_num
            self.iter_num += 1
            local_iter += 1
            since_log += 1
            if it % cfg.log_interval == 0 or self.iter_num == cfg.max_iters:
                loss = float(loss_sum.item())
                t1 = time.perf_counter()
                dt = (t1 - t0) / since_log
                t0, since_log = t1, 0
                if local_iter >= 5:      # let the first iterations warm up
                    mfu = _mfu(self.raw, cfg.batch_size * self.gas, dt, self.n_params, self.args, peak)
                    running_mfu = mfu if running_mfu < 0 else 0.9 * running_mfu + 0.1 * mfu
                tok_s = self.tokens_per_iter / dt
                dt_avg = dt if dt_avg is None else 0.8 * dt_avg + 0.2 * dt
                left = cfg.max_iters - self.iter_num
                evals_left = len(range(self.iter_num + (-self.iter_num % cfg.eval_interval), cfg.max_iters,
                                       cfg.eval_interval)) + 1
                eta = left * dt_avg + evals_left * self.eval_seconds
                self.log(f"{it} | loss {loss:.4f} | lr {lr:.3e} | {dt * 1000:.1f} ms | "
                         f"{tok_s:,.0f} tok/s | mfu {max(running_mfu, 0.0) * 100:.3g}% | ETA {fmt_duration(eta)}")
                self.record({"iter": it, "loss": loss, "lr": lr, "ms": dt * 1000, "tok_s": tok_s,
                             "mfu": max(running_mfu, 0.0), "eta_s": eta})
        if local_iter == 0:
            self.log(f"nothing to train: at iteration {self.iter_num}, {cfg.flag('max_iters', cfg.max_iters)}")
        self.evaluate_and_save(final=True)
        return self._finish(export=cfg.export_version != -1)

    def estimate_and_report(self) -> None:
        losses = self.estimate_loss()
        self.log(f"step {self.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        self.record({"iter": self.iter_num, "train_loss": losses["train"], "val_loss": losses["val"]})

    def _finish(self, export: bool) -> Dict[str, Any]:
        result = {"iter_num": self.iter_num, "best_val_loss": self.best_val_loss,
                  "out_dir": str(self.out_dir), "ckpt": str(self.out_dir / "ckpt.pt"),
                  "model_bin": None, "tokenizer_bin": None, "history": self.history}
        if export and self.rt.master and self._last_state is not None:
            version = self.export_version()
            path = export_model_bin(self._last_state, self.model_args, self.out_dir / "model.bin",
                                    version, warn=lambda m: self.log(f"warning: {m}"))
            self.log(f"wrote {path} (version {version})")
            result["model_bin"] = str(path)
            tok = write_tokenizer_bin(self.data_dir, self.meta, self.out_dir, int(self.args.vocab_size),
                                      self.cfg.overwrite, self.log)
            result["tokenizer_bin"] = str(tok) if tok else None
        if self.rt.distributed:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
        return result


def train(cfg: TrainConfig, log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Train with ``cfg``; returns {iter_num, best_val_loss, ckpt, model_bin, tokenizer_bin,
    history} (history: the records also appended to out_dir/log.jsonl, rank 0 only;
    tokenizer_bin: out_dir/tokenizer.bin when the data directory had its tokenizer)."""
    return Trainer(cfg, log=log).run()
