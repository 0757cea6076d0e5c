"""LoRA adapters in PEFT's format, without torch: read, write and merge them.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
as PEFT saves them for a ``LlamaForCausalLM``: for layer N and projection P
(q_proj, k_proj, v_proj, o_proj under ``self_attn``; gate_proj, up_proj,
down_proj under ``mlp``) the tensors

    base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight   (r, in)
    base_model.model.model.layers.N.self_attn.q_proj.lora_B.weight   (out, r)

and the update of that projection's weight is ``scaling * B @ A`` with
``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).

Our models keep q and k in Meta's layout, Hugging Face's in its rotary layout
(export/hf.py): the rows of q_proj / k_proj are permuted per head. ``A`` is the
same in both; the rows of ``B`` for q and k are permuted like the weights, so
the file holds them in HF's layout and ``LoraAdapter`` keeps them in ours.

    adapter = LoraAdapter.load("out/")                     # any PEFT Llama LoRA adapter
    merge_lora("base.bin", "out/", "merged.bin")           # base + adapter as a .bin
    with open_bin("base.bin") as base:
        src = LoraMergedSource(base, adapter)              # a Source: write_bin / write_hf it

``llama2c.Llama(model, lora=DIR)`` uses ``merged_model_file``. numpy only.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FormatError
from .export import hf
from .export.sources import Source, expected_shape, open_bin
from .outputs import atomic_write, refuse_existing

__all__ = ["TARGETS", "HF_PROJ", "LoraAdapter", "LoraMergedSource", "parse_targets", "peft_name",
           "read_safetensors", "merge_lora", "merged_model_file", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# our projection names, in file order -> the canonical per-layer key
TARGETS = {
    "wq": "attention.wq.weight", "wk": "attention.wk.weight", "wv": "attention.wv.weight",
    "wo": "attention.wo.weight", "w1": "feed_forward.w1.weight", "w2": "feed_forward.w2.weight",
    "w3": "feed_forward.w3.weight",
}
# ours -> Hugging Face's module (under model.layers.N)
HF_PROJ = {
    "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
    "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj",
}
_FROM_HF = {v.split(".")[1]: k for k, v in HF_PROJ.items()}      # q_proj -> wq
PEFT_PREFIX = "base_model.model.model.layers."
_NAME_RE = re.compile(r"(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\."
                      r"lora_(A|B)(?:\.[\w-]+)?\.weight")


def parse_targets(spec) -> list[str]:
    """Target projections from "wq,wk,..." (our names), HF's names (q_proj, ...),
    "all", "attn" or "mlp" (a string or a list); returned in file order."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = set()
    for raw in items:
        name = str(raw).strip().lower()
        if not name:
            continue
        if name == "all":
            out.update(TARGETS)
        elif name in ("attn", "attention"):
            out.update(("wq", "wk", "wv", "wo"))
        elif name in ("mlp", "ffn"):
            out.update(("w1", "w2", "w3"))
        elif name in TARGETS:
            out.add(name)
        elif name in _FROM_HF:
            out.add(_FROM_HF[name])
        else:
            raise ValueError(f"unknown LoRA target {raw!r}: choose from {', '.join(TARGETS)} "
                             f"(or {', '.join(_FROM_HF)}, all, attn, mlp)")
    if not out:
        raise ValueError("no LoRA targets given")
    return [t for t in TARGETS if t in out]


def peft_name(layer: int, target: str, which: str) -> str:
    """PEFT's tensor name: base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight."""
    return f"{PEFT_PREFIX}{layer}.{HF_PROJ[target]}.lora_{which}.weight"


# ---------------------------------------------------------------------------
# safetensors (read with export/safetensors_np.py, written with export/hf.py's writer)
# ---------------------------------------------------------------------------


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict]:
    """All tensors of a .safetensors file (F32, F16 or BF16) as float32 arrays,
    and its metadata (the checked, memory-mapped reader of export/)."""
    from .export.safetensors_np import SafetensorsFile

    with SafetensorsFile(path) as f:
        return {name: np.array(f.get_tensor(name), dtype=np.float32) for name in f.keys()}, dict(f.metadata() or {})


def _write_safetensors(path: Path, tensors: list[tuple[str, np.ndarray]], metadata: dict, force: bool) -> None:
    with atomic_write(path, overwrite=force) as f:
        w = hf.SafetensorsWriter(f, [(n, tuple(a.shape)) for n, a in tensors], metadata=metadata)
        for name, a in tensors:
            w.write(name, a)
        w.finish()


# ---------------------------------------------------------------------------
# the adapter
# ---------------------------------------------------------------------------


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the
    end of the module name (as a regular expression)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class LoraAdapter:
    """A LoRA adapter over a Llama model's projections.

    weights maps (layer, target) -> (A, B): float32 arrays, A (r, in) and
    B (out, r) with B in Meta's layout (our models'); scaling maps the same
    keys to alpha / r. ``n_heads`` / ``n_kv_heads`` are what the q/k rows were
    permuted with."""
    rank: int
    alpha: float
    targets: list[str]
    weights: dict = field(default_factory=dict)
    scaling: dict = field(default_factory=dict)
    dropout: float = 0.0
    base_model: str | None = None

    @property
    def layers(self) -> list[int]:
        return sorted({i for i, _ in self.weights})

    def delta(self, layer: int, target: str) -> np.ndarray | None:
        """scaling * B @ A for one projection (float64), or None when it has no adapter."""
        pair = self.weights.get((layer, target))
        if pair is None:
            return None
        a, b = pair
        return self.scaling[(layer, target)] * (b.astype(np.float64) @ a.astype(np.float64))

    # -- PEFT files --------------------------------------------------------------
    @classmethod
    def load(cls, folder, n_heads: int, n_kv_heads: int) -> "LoraAdapter":
        """Reads a PEFT LoRA adapter folder (or its adapter_config.json) for a
        model with these head counts (for the q/k row permutation)."""
        folder = Path(folder)
        if folder.is_file() and folder.name == ADAPTER_CONFIG:
            folder = folder.parent
        cfg_path, st_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
        if not cfg_path.is_file():
            raise FileNotFoundError(2, f"no {ADAPTER_CONFIG} in {folder} (a PEFT LoRA adapter folder)",
                                    str(cfg_path))
        if not st_path.is_file():
            raise FileNotFoundError(2, f"no {ADAPTER_WEIGHTS} in {folder}", str(st_path))
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise FormatError(f"{cfg_path}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise FormatError(f"{cfg_path}: not an adapter config")
        kind = str(cfg.get("peft_type", "LORA")).upper()
        if kind != "LORA":
            raise FormatError(f"{cfg_path}: peft_type {kind} is not LoRA")
        for flag, why in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out")):
            if cfg.get(flag):
                raise FormatError(f"{cfg_path}: {why} adapters are not supported")
        if cfg.get("modules_to_save"):
            raise FormatError(f"{cfg_path}: modules_to_save ({cfg['modules_to_save']}) is not supported: "
                              "only LoRA on the attention and MLP projections")
        r0 = int(cfg.get("r", 8))
        alpha0 = float(cfg.get("lora_alpha", 8))
        rslora = bool(cfg.get("use_rslora", False))
        tensors, _ = read_safetensors(st_path)
        found: dict = {}
        for name, t in tensors.items():
            m = _NAME_RE.fullmatch(name)
            if not m or m.group(3) not in _FROM_HF or f"{m.group(2)}.{m.group(3)}" != HF_PROJ[_FROM_HF[m.group(3)]]:
                raise FormatError(f"{st_path}: tensor {name} is not a LoRA A/B matrix of a Llama attention or "
                                  "MLP projection")
            key = (int(m.group(1)), _FROM_HF[m.group(3)])
            found.setdefault(key, {})[m.group(4)] = t
        weights, scaling = {}, {}
        ranks = set()
        for (layer, target), ab in sorted(found.items()):
            if set(ab) != {"A", "B"}:
                raise FormatError(f"{st_path}: layer {layer} {HF_PROJ[target]} has lora_{''.join(ab)} only")
            a, b = ab["A"], ab["B"]
            if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
                raise FormatError(f"{st_path}: layer {layer} {HF_PROJ[target]}: lora_A {a.shape} and lora_B "
                                  f"{b.shape} do not multiply")
            r = a.shape[0]
            ranks.add(r)
            module = f"model.layers.{layer}.{HF_PROJ[target]}"
            alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, alpha0))
            if target in ("wq", "wk"):
                n = n_heads if target == "wq" else n_kv_heads
                if b.shape[0] % (2 * n):
                    raise FormatError(f"{st_path}: {module} lora_B has {b.shape[0]} rows, not {n} heads")
                b = hf.hf_to_meta(b, n)
            weights[(layer, target)] = (np.ascontiguousarray(a), np.ascontiguousarray(b))
            scaling[(layer, target)] = alpha / (math.sqrt(r) if rslora else r)
        if not weights:
            raise FormatError(f"{st_path}: no LoRA tensors")
        targets = [t for t in TARGETS if any(k[1] == t for k in weights)]
        return cls(rank=r0 if r0 in ranks or not ranks else max(ranks), alpha=alpha0, targets=targets,
                   weights=weights, scaling=scaling, dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
                   base_model=cfg.get("base_model_name_or_path"))

    def config_json(self) -> dict:
        """adapter_config.json as PEFT writes it for a causal LM."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "r": int(self.rank),
            "lora_alpha": float(self.alpha) if not float(self.alpha).is_integer() else int(self.alpha),
            "lora_dropout": float(self.dropout),
            "target_modules": sorted(HF_PROJ[t].split(".")[1] for t in self.targets),
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": None,
        }

    def save(self, folder, n_heads: int, n_kv_heads: int, *, force: bool = False) -> Path:
        """Writes adapter_config.json and adapter_model.safetensors (PEFT's
        names, float32, q/k lora_B rows in HF's layout) into folder, each
        atomically; existing files are replaced only with force."""
        folder = Path(folder)
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            refuse_existing(folder / name, force)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = []
        for (layer, target) in sorted(self.weights, key=lambda k: (k[0], list(TARGETS).index(k[1]))):
            a, b = self.weights[(layer, target)]
            if target in ("wq", "wk"):
                b = hf.meta_to_hf(np.asarray(b, dtype=np.float32), n_heads if target == "wq" else n_kv_heads)
            tensors.append((peft_name(layer, target, "A"), np.asarray(a, dtype=np.float32)))
            tensors.append((peft_name(layer, target, "B"), np.asarray(b, dtype=np.float32)))
        _write_safetensors(folder / ADAPTER_WEIGHTS, tensors, {"format": "pt"}, force)
        with atomic_write(folder / ADAPTER_CONFIG, overwrite=force) as f:
            f.write((json.dumps(self.config_json(), indent=2) + "\n").encode("utf-8"))
        return folder


# ---------------------------------------------------------------------------
# merging
# ---------------------------------------------------------------------------

_KEY_RE = re.compile(r"layers\.(\d+)\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight")
_TARGET_OF = {v: k for k, v in TARGETS.items()}


class LoraMergedSource(Source):
    """A Source whose projections are the base's plus the adapter's update
    (W + scaling * B @ A, computed in float64 and rounded once to float32)."""

    def __init__(self, base: Source, adapter: LoraAdapter):
        self.base, self.adapter = base, adapter
        self.args = base.args
        self.name = f"{base.name} + LoRA"
        bad = [layer for layer in adapter.layers if layer >= base.args.n_layers]
        if bad:
            raise FormatError(f"the adapter has layer {bad[0]}, the model only {base.args.n_layers} layers")
        for (layer, target), (a, b) in adapter.weights.items():
            out_dim, in_dim = expected_shape(base.args, f"layers.{layer}.{TARGETS[target]}")
            if a.shape[1] != in_dim or b.shape[0] != out_dim:
                raise FormatError(f"the adapter's {HF_PROJ[target]} of layer {layer} is ({b.shape[0]} x "
                                  f"{a.shape[1]}), the model's is ({out_dim} x {in_dim}): not this model's "
                                  "adapter")

    def keys(self) -> list[str]:
        return self.base.keys()

    def _get(self, key: str) -> np.ndarray:
        w = self.base.get(key)
        m = _KEY_RE.fullmatch(key)
        if m is None:
            return w
        delta = self.adapter.delta(int(m.group(1)), _TARGET_OF[f"{m.group(2)}.weight"])
        if delta is None:
            return w
        return (w.astype(np.float64) + delta).astype(np.float32)

    def close(self) -> None:
        self.base.close()


def merged_version(version, args) -> int:
    """The .bin version a merge writes by default: the model's own when it
    stores float32 (0, 1, 3); for an int8 (2) or bf16 (4) model, float32 (1,
    or 3 when rope_theta / norm_eps need it), so that the merged weights are
    the exact sum W + scaling * B @ A (what PEFT computes on the same model)
    rather than that sum rounded back to int8 or bf16."""
    if version in (0, 1, 3):
        return int(version)
    plain = float(np.float32(args.rope_theta)) == 10000.0 and abs(float(args.norm_eps) - 1e-5) < 1e-12
    return 1 if plain else 3


def _open_model(model) -> Source:
    if isinstance(model, Source):
        return model
    return open_bin(model)


def merge_lora(model, adapter, out, version: int | None = None, group_size: int | None = None, *,
               force: bool = False, warn=None) -> Path:
    """Writes ``model`` (a .bin path or a Source) with ``adapter`` (a folder
    or a LoraAdapter) merged in, as a .bin of ``version`` (default:
    merged_version of the model's, 1 for a source that is not a .bin; version
    2 output from a version 2 model keeps its group size). Returns the path
    written."""
    from .export.writers import write_bin

    src = _open_model(model)
    try:
        if not isinstance(adapter, LoraAdapter):
            adapter = LoraAdapter.load(adapter, src.args.n_heads, src.args.n_kv_heads)
        own = getattr(src, "version", None)
        if version is None:
            version = merged_version(own if own is not None else 1, src.args)
        if group_size is None and version == 2 and own == 2:
            group_size = src.group_size
        return write_bin(LoraMergedSource(src, adapter), out, version, group_size=group_size, warn=warn,
                         force=force)
    finally:
        if not isinstance(model, Source):
            src.close()


def _fingerprint(model_path: Path, adapter_dir: Path) -> str:
    h = hashlib.sha256()
    st = model_path.stat()
    h.update(f"{model_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        with open(adapter_dir / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:32]


def merged_model_file(model_path, adapter, cache_dir=None) -> tuple[Path, bool]:
    """The base model with the adapter merged, as a .bin (of the model's own
    version; float32 for an int8 or bf16 model: merged_version), for the C
    engine to open. With ``cache_dir`` it is kept there
    under a name derived from both inputs (and reused next time); without it
    it is a temporary file the caller removes once opened. Returns
    (path, temporary)."""
    model_path, adapter_dir = Path(model_path), Path(adapter)
    if adapter_dir.is_file() and adapter_dir.name == ADAPTER_CONFIG:
        adapter_dir = adapter_dir.parent
    with open(model_path, "rb") as f:
        if f.read(4) == b"GGUF":
            raise FormatError(f"{model_path}: LoRA adapters are merged into .bin models; convert this GGUF "
                              "file's source to a .bin first")
    with contextlib.closing(open_bin(model_path)) as src:
        lora = LoraAdapter.load(adapter_dir, src.args.n_heads, src.args.n_kv_heads)
        if cache_dir is not None:
            cache = Path(cache_dir).expanduser()
            cache.mkdir(parents=True, exist_ok=True)
            path = cache / f"{model_path.stem}-lora-{_fingerprint(model_path, adapter_dir)}.bin"
            if not path.is_file():
                merge_lora(src, lora, path, force=True)
            return path, False
        fd, tmp = tempfile.mkstemp(prefix=f".{model_path.stem}-lora-", suffix=".bin")
        os.close(fd)
        try:
            merge_lora(src, lora, tmp, force=True)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if os.name == "nt":      # a mapped file cannot be removed there: at exit, then
            import atexit

            atexit.register(lambda: os.path.exists(tmp) and os.unlink(tmp))
        return Path(tmp), True
