"""The TinyStories pipeline of llama2.c: download, train_vocab, pretokenize.

    download(data_dir)                      -> data_dir/TinyStories_all_data/data*.json
    train_vocab(data_dir, vocab_size)       -> data_dir/tok{N}.model
    pretokenize(data_dir, vocab_size)       -> data_dir/tok{N}/ (a `prepare` directory)

The download continues a partial file (``*.part``) with an HTTP Range request, retries
after a dropped connection, shows a progress bar, then extracts the archive.
"""
from __future__ import annotations

import http.client
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional

from .shards import prepare
from .stories import PathLike
from .tokenizer_train import train_tokenizer

DEFAULT_HF_URL = ("https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
                  "TinyStories_all_data.tar.gz")
ARCHIVE = "TinyStories_all_data.tar.gz"
EXTRACT_DIR = "TinyStories_all_data"
_BLOCK = 1 << 20


class DownloadError(OSError):
    pass


def _content_range_total(value: Optional[str]) -> Optional[int]:
    # "bytes 100-199/200" or "bytes */200"
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _content_range_start(value: Optional[str]) -> Optional[int]:
    if not value:
        return None
    try:
        unit, rest = value.split(None, 1)
        first = rest.split("-", 1)[0]
        return int(first) if unit.lower() == "bytes" and first.isdigit() else None
    except ValueError:
        return None


def download_file(url: str, dest: PathLike, *, retries: int = 5, timeout: float = 60.0,
                  progress: bool = True, retry_wait: float = 1.0) -> Path:
    """Download ``url`` to ``dest``. Bytes arrive in ``dest + '.part'``; an existing
    partial file is continued with ``Range: bytes=N-`` (a server that ignores the range
    makes it start over). A dropped connection is retried up to ``retries`` times, each
    time from where it stopped. ``dest`` appears (renamed) only once complete."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = Path(str(dest) + ".part")
    bar = None
    attempt = 0
    try:
        while True:
            have = part.stat().st_size if part.exists() else 0
            req = urllib.request.Request(url, headers={"User-Agent": "llama2c"})
            if have:
                req.add_header("Range", f"bytes={have}-")
            try:
                resp = urllib.request.urlopen(req, timeout=timeout)
            except urllib.error.HTTPError as e:
                if e.code == 416 and have:
                    total = _content_range_total(e.headers.get("Content-Range"))
                    if total is None or total == have:
                        break               # the partial file is already complete
                    part.unlink()           # it is longer than the file: start over
                    continue
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                attempt += 1
                if attempt > retries:
                    raise DownloadError(f"{url}: {getattr(e, 'reason', e)}") from None
                time.sleep(retry_wait)
                continue
            with resp:
                status = resp.status
                if status == 206 and have:
                    start = _content_range_start(resp.headers.get("Content-Range"))
                    if start != have:
                        raise DownloadError(f"{url}: the server answered range {start}, "
                                            f"asked for {have}")
                    total = _content_range_total(resp.headers.get("Content-Range"))
                    mode = "ab"
                else:                       # 200: the whole file (range ignored)
                    have = 0
                    length = resp.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                    mode = "wb"
                if progress:
                    if bar is None:
                        from tqdm import tqdm

                        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                   unit_divisor=1024, desc=dest.name, file=sys.stderr,
                                   dynamic_ncols=True)
                    else:
                        bar.reset(total=total)
                        bar.update(have)
                got = have
                try:
                    with open(part, mode) as f:
                        while True:
                            block = resp.read(_BLOCK)
                            if not block:
                                break
                            f.write(block)
                            got += len(block)
                            if bar is not None:
                                bar.update(len(block))
                except (OSError, ValueError, http.client.HTTPException) as e:   # dropped mid-body
                    attempt += 1
                    if attempt > retries:
                        raise DownloadError(f"{url}: connection lost after {got} bytes "
                                            f"({e}); run again to continue") from None
                    time.sleep(retry_wait)
                    continue
            if total is not None and got < total:
                attempt += 1
                if attempt > retries:
                    raise DownloadError(f"{url}: got {got} of {total} bytes; run again to continue")
                time.sleep(retry_wait)
                continue
            break
    finally:
        if bar is not None:
            bar.close()
    os.replace(part, dest)
    return dest


def _safe_extract(archive: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            path = (root / m.name).resolve()
            if path != root and root not in path.parents:
                raise DownloadError(f"{archive}: member {m.name!r} would land outside {target}")
            if not (m.isfile() or m.isdir()):
                raise DownloadError(f"{archive}: member {m.name!r} is not a plain file")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(target, members=members, filter="data")
        else:  # pragma: no cover - Python < 3.12 without the backported filter
            tar.extractall(target, members=members)


def download(data_dir: PathLike = "data", url: str = DEFAULT_HF_URL, *, progress: bool = True,
             retries: int = 5, timeout: float = 60.0, retry_wait: float = 1.0) -> Path:
    """Download the TinyStories archive into ``data_dir`` (resuming a partial download)
    and extract it to ``data_dir/TinyStories_all_data``. Returns that directory."""
    data_dir = Path(data_dir)
    archive = download_file(url, data_dir / ARCHIVE, retries=retries, timeout=timeout,
                            progress=progress, retry_wait=retry_wait)
    target = data_dir / EXTRACT_DIR
    done = target / ".extracted"
    if not done.exists():
        if progress:
            print(f"extracting {archive} -> {target}", file=sys.stderr)
        tmp = data_dir / (EXTRACT_DIR + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        _safe_extract(archive, tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        done.write_text("ok\n")
    return target


def shard_files(data_dir: PathLike) -> List[Path]:
    """The extracted JSON shards, in name order."""
    target = Path(data_dir) / EXTRACT_DIR
    files = sorted(target.rglob("*.json"))
    if not files:
        raise FileNotFoundError(f"{target}: no .json shards: run `llama2c data tinystories download` first")
    return files


def tokenizer_path(data_dir: PathLike, vocab_size: int) -> Path:
    return Path(data_dir) / f"tok{vocab_size}.model"


def train_vocab(data_dir: PathLike = "data", vocab_size: int = 4096, num_shards: int = 10,
                **kwargs) -> Path:
    """Train a tokenizer on the stories of the first ``num_shards`` shards (as llama2.c
    does) and write it to ``data_dir/tok{vocab_size}.model`` (replacing an earlier
    one, as llama2.c does: the name is the pipeline's, not the user's)."""
    if vocab_size <= 0:
        raise ValueError("train_vocab needs --vocab-size > 0 (0 means the Llama 2 tokenizer)")
    files = shard_files(data_dir)[:max(1, num_shards)]
    kwargs.setdefault("force", True)
    return train_tokenizer(files, vocab_size, tokenizer_path(data_dir, vocab_size), **kwargs)


def pretokenize(data_dir: PathLike = "data", vocab_size: int = 0, tokenizer: Optional[PathLike] = None,
                out_dir: Optional[PathLike] = None, workers: Optional[int] = None,
                val_fraction: float = 0.05, progress: bool = True) -> Path:
    """Tokenize every shard with ``data_dir/tok{vocab_size}.model`` (or ``tokenizer``;
    vocab_size 0 needs an explicit one, e.g. the Llama 2 tokenizer.model) into
    ``out_dir`` (default ``data_dir/tok{vocab_size}``), ready for ``llama2c train --data``."""
    if tokenizer is None:
        if vocab_size <= 0:
            raise ValueError("pretokenize with vocab_size 0 (the Llama 2 tokenizer) needs "
                             "--tokenizer PATH/tokenizer.model")
        tokenizer = tokenizer_path(data_dir, vocab_size)
        if not Path(tokenizer).is_file():
            raise FileNotFoundError(f"{tokenizer}: not found: run `llama2c data tinystories "
                                    f"train_vocab --vocab-size {vocab_size}` first")
    if out_dir is None:
        out_dir = Path(data_dir) / f"tok{vocab_size}"
    prepare(shard_files(data_dir), tokenizer, out_dir, val_fraction=val_fraction, workers=workers,
            progress=progress)
    return Path(out_dir)
