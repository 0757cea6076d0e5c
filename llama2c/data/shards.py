"""Turning stories into uint16 token shards for training.

Layout of a prepared directory::

    meta.json          vocab_size, tokenizer, counts, shard lists
    tokenizer.model    a copy of the SentencePiece model used
    train_0000.bin ... raw little-endian uint16 token ids
    val_0000.bin ...

Each story becomes BOS followed by the SentencePiece ids of ``story.strip()``;
stories follow each other in input order. Story i (counting over all inputs) goes to
the validation split when ``llama2c.data.stories.is_validation(i, val_fraction)``:
story 0 and then one story in every ``1/val_fraction``, so the split does not
depend on the number of workers or the order the chunks finish in.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .stories import PathLike, expand_inputs, iter_file_stories, validation_mask

META = "meta.json"
TOKENIZER = "tokenizer.model"
MAX_VOCAB = 65536            # ids must fit in uint16
DEFAULT_SHARD_TOKENS = 1 << 27
CHUNK_STORIES = 2000
BATCH_CHARS = 64 << 20       # text handed to the workers at a time
PARALLEL_CHARS = 4 << 20     # below this much text, worker processes cost more than they save

_SP = None                   # the SentencePiece processor of a worker process
_BOS = 1


def _load_sp(model_path: str):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(model_path))


def _init_worker(model_path: str) -> None:
    global _SP, _BOS
    _SP = _load_sp(model_path)
    _BOS = _SP.bos_id()


def _encode_chunk(task: Tuple[int, List[str], float]):
    """(first story index, stories, val_fraction) -> (train ids, val ids, n_train, n_val)."""
    start, stories, val_fraction = task
    ids = _SP.encode(stories)
    mask = validation_mask(start, len(stories), val_fraction)
    out = []
    for want in (False, True):
        parts = [np.asarray([_BOS] + seq, dtype=np.uint16)
                 for seq, is_val in zip(ids, mask) if bool(is_val) == want]
        out.append(np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16))
    n_val = int(mask.sum())
    return out[0], out[1], len(stories) - n_val, n_val


class _ShardWriter:
    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.shards: List[Dict] = []
        self.tokens = 0
        self.stories = 0
        self._f = None
        self._in_shard = 0

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):04d}.bin"
        self._f = open(self.out_dir / name, "wb")
        self.shards.append({"file": name, "tokens": 0})
        self._in_shard = 0

    def write(self, arr: np.ndarray, n_stories: int) -> None:
        self.stories += n_stories
        if arr.size == 0:
            return
        if self._f is None or self._in_shard >= self.shard_tokens:
            if self._f is not None:
                self._f.close()
            self._open()
        self._f.write(arr.astype("<u2", copy=False).tobytes())
        self._in_shard += arr.size
        self.shards[-1]["tokens"] += int(arr.size)
        self.tokens += int(arr.size)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _tasks_by_batch(files: List[Path], val_fraction: float, chunk_stories: int,
                    text_field: Optional[str] = None, split: Optional[str] = None):
    """Yield (tasks, characters) batches, each holding about BATCH_CHARS of text."""
    index = 0
    batch, chars = [], 0
    for path in files:
        stories = iter_file_stories(path, text_field, split)
        while True:
            chunk = list(itertools.islice(stories, chunk_stories))
            if not chunk:
                break
            batch.append((index, chunk, val_fraction))
            index += len(chunk)
            chars += sum(len(s) for s in chunk)
            if chars >= BATCH_CHARS:
                yield batch, chars
                batch, chars = [], 0
    if batch:
        yield batch, chars


def prepare(inputs: Union[PathLike, Sequence[PathLike]], tokenizer_model: PathLike,
            out_dir: PathLike, val_fraction: float = 0.05, workers: Optional[int] = None, *,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, chunk_stories: int = CHUNK_STORIES,
            parallel_threshold: int = PARALLEL_CHARS, progress: bool = True,
            text_field: Optional[str] = None, split: Optional[str] = None) -> Dict:
    """Tokenize the stories of ``inputs`` into ``out_dir`` (see the module docstring).
    ``inputs`` are files and directories in any format of llama2c.data.stories
    (text, JSON, JSONL, Parquet, a saved Hugging Face dataset, ``hf:NAME``);
    ``text_field`` names the field/column holding the text, ``split`` the split
    of a Hugging Face dataset (default "train").
    ``workers`` processes encode in parallel (default: the number of CPUs).
    Worker processes start only once there is more than ``parallel_threshold``
    characters of text (smaller inputs encode faster in this process).
    The new set is built in a temporary directory beside ``out_dir`` and swapped in
    only when it is complete: on any error the previous set stays as it was.
    Returns the metadata also written to ``out_dir/meta.json``."""
    tokenizer_model = Path(tokenizer_model)
    if not tokenizer_model.is_file():
        raise FileNotFoundError(f"{tokenizer_model}: no such tokenizer model")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    try:
        sp = _load_sp(str(tokenizer_model))
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{tokenizer_model}: not a SentencePiece model ({e})") from None
    vocab_size = sp.vocab_size()
    if vocab_size > MAX_VOCAB:
        raise ValueError(f"vocab_size {vocab_size} does not fit the uint16 token shards "
                         f"(at most {MAX_VOCAB} ids, 0..65535): use a smaller tokenizer")
    if sp.bos_id() < 0:
        raise ValueError(f"{tokenizer_model}: the tokenizer has no BOS token")
    files = expand_inputs(inputs)
    workers = max(1, int(workers or os.cpu_count() or 1))

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    staging = _staging_dir(out)
    try:
        shutil.copyfile(tokenizer_model, staging / TOKENIZER)
        writers = _tokenize(files, str(tokenizer_model), staging, val_fraction, workers, shard_tokens,
                            chunk_stories, parallel_threshold, progress, text_field, split)
        if writers["train"].stories + writers["val"].stories == 0:
            raise ValueError("the inputs hold no stories")
        meta = {
            "format": "llama2c-tokens",
            "version": 1,
            "dtype": "uint16",
            "vocab_size": vocab_size,
            "bos_id": sp.bos_id(),
            "eos_id": sp.eos_id(),
            "tokenizer": TOKENIZER,
            "tokenizer_source": str(tokenizer_model.resolve()),
            "inputs": [str(p.resolve()) for p in files],
            **({"text_field": text_field} if text_field else {}),
            **({"split": split} if split else {}),
            "val_fraction": val_fraction,
            "splits": {name: {"stories": w.stories, "tokens": w.tokens, "shards": w.shards}
                       for name, w in writers.items()},
        }
        (staging / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


def _tokenize(files: List[Path], tokenizer_model: str, out: Path, val_fraction: float, workers: int,
              shard_tokens: int, chunk_stories: int, parallel_threshold: int,
              progress: bool, text_field: Optional[str] = None,
              split: Optional[str] = None) -> Dict[str, _ShardWriter]:
    """Encodes the stories of ``files`` into shards in ``out``; returns the writers."""
    writers = {"train": _ShardWriter(out, "train", shard_tokens),
               "val": _ShardWriter(out, "val", shard_tokens)}
    bar = None
    pool = None
    local_ready = False
    try:
        for batch, chars in _tasks_by_batch(files, val_fraction, chunk_stories, text_field, split):
            n_batch = sum(len(t[1]) for t in batch)
            if progress and bar is None:
                from tqdm import tqdm

                bar = tqdm(total=n_batch, unit=" stories", desc="tokenizing", file=sys.stderr,
                           dynamic_ncols=True)
            elif bar is not None:
                bar.total += n_batch
                bar.refresh()
            if workers > 1 and len(batch) > 1 and pool is None and chars > parallel_threshold:
                import multiprocessing as mp

                ctx = mp.get_context("spawn")
                pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_model,))
            if pool is not None:
                results = pool.imap(_encode_chunk, batch)
            else:
                if not local_ready:
                    _init_worker(tokenizer_model)
                    local_ready = True
                results = map(_encode_chunk, batch)
            for train_ids, val_ids, n_train, n_val in results:
                writers["train"].write(train_ids, n_train)
                writers["val"].write(val_ids, n_val)
                if bar is not None:
                    bar.update(n_train + n_val)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        for w in writers.values():
            w.close()
        if bar is not None:
            bar.close()
    return writers


def _staging_dir(out: Path) -> Path:
    """A new hidden directory beside ``out`` (same filesystem, so files move by rename)."""
    real = out.resolve()
    real.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent))


def _swap_in(staging: Path, out: Path) -> None:
    """Replaces the prepared set in ``out`` by the complete one in ``staging``:
    the old meta.json goes first (a half-swapped directory is never taken for a
    valid set), then the old shards; the new meta.json comes last. Other files
    in ``out`` are left alone."""
    out.mkdir(parents=True, exist_ok=True)
    old = [out / META] + sorted(out.glob("train_*.bin")) + sorted(out.glob("val_*.bin"))
    for path in old:
        if path.is_file() or path.is_symlink():
            path.unlink()
    for path in sorted(staging.iterdir()):
        if path.name != META:
            os.replace(path, out / path.name)
    os.replace(staging / META, out / META)


def load_meta(data_dir: PathLike) -> Dict:
    path = Path(data_dir) / META
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found: is {data_dir} the output of "
                                "`llama2c data prepare`?")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != "llama2c-tokens" or meta.get("dtype") != "uint16":
        raise ValueError(f"{path}: not a llama2c token directory")
    return meta


def load_split(data_dir: PathLike, split: str) -> List[np.ndarray]:
    """The shards of one split ("train" or "val") as read-only uint16 memmaps."""
    meta = load_meta(data_dir)
    if split not in meta["splits"]:
        raise ValueError(f"{data_dir}: no split {split!r}")
    arrays = []
    for shard in meta["splits"][split]["shards"]:
        path = Path(data_dir) / shard["file"]
        n = path.stat().st_size // 2
        if n != shard["tokens"]:
            raise ValueError(f"{path}: {n} tokens on disk, meta.json says {shard['tokens']}")
        if n:
            arrays.append(np.memmap(path, dtype="<u2", mode="r", shape=(n,)))
    return arrays
