"""Reading stories out of the input formats the data tools accept.

Formats (chosen per input):
- ``.json``: a list of objects with a ``"story"`` (or ``"text"``) field, as in the
  TinyStories archive, or a list of strings;
- ``.jsonl``: one JSON object (``"story"`` / ``"text"``) or string per line;
- ``.parquet``: the rows of a text column (``"text"`` or ``"story"``, or the only
  string column), read in batches with pyarrow (``pip install pyarrow``);
- a folder written by Hugging Face ``datasets`` (``save_to_disk``: it holds
  ``dataset_info.json`` and ``state.json``, or ``dataset_dict.json`` over splits),
  and ``hf:NAME``, a dataset ``datasets.load_dataset`` finds by name or path
  (which may download it): both need the ``datasets`` package; ``split`` picks the
  split (default "train");
- anything else is UTF-8 text: when a line holding only ``<|endoftext|>`` appears,
  the stories are the pieces between those lines; otherwise, when the text has blank
  lines, the stories are the blocks between blank lines; otherwise each non-empty line
  is a story.

``text_field`` names the field or column that holds the text in the structured
formats (JSON, JSONL, Parquet, datasets); every record must have it as a string.
A directory given as an input stands for its ``*.json``, ``*.jsonl``, ``*.parquet``
and ``*.txt`` files in name order (unless it is a saved dataset). Every story is
stripped of surrounding whitespace; empty ones are dropped.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]

ENDOFTEXT = "<|endoftext|>"
_BLANK_LINE = re.compile(r"\n[ \t\f\v]*\n")
_DIR_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")
_DEFAULT_FIELDS = ("story", "text")
HF_PREFIX = "hf:"
BATCH_ROWS = 4096            # rows read at a time from Parquet files and datasets


class HFDataset:
    """An input that is a Hugging Face dataset: ``hf:NAME`` (load_dataset) or
    a folder written by ``save_to_disk`` (load_from_disk)."""

    def __init__(self, spec: str, folder: bool = False):
        self.spec, self.folder = spec, folder

    def resolve(self) -> "HFDataset":
        return self

    @property
    def name(self) -> str:
        return self.spec

    def __str__(self) -> str:
        return self.spec if self.folder else HF_PREFIX + self.spec

    def __repr__(self) -> str:
        return f"HFDataset({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, HFDataset) and (self.spec, self.folder) == (other.spec, other.folder)

    def __hash__(self) -> int:
        return hash((self.spec, self.folder))


Input = Union[Path, HFDataset]


def is_saved_dataset(path: Path) -> bool:
    """A folder written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or
                              ((path / "dataset_info.json").is_file() and (path / "state.json").is_file()))


def expand_inputs(inputs: Union[PathLike, Sequence[PathLike]]) -> List[Input]:
    """The inputs, in order: directories expand to their data files (sorted); a
    saved Hugging Face dataset folder and ``hf:NAME`` stay whole (HFDataset)."""
    if isinstance(inputs, (str, os.PathLike, HFDataset)):
        inputs = [inputs]
    files: List[Input] = []
    for item in inputs:
        if isinstance(item, HFDataset):
            files.append(item)
            continue
        if isinstance(item, str) and item.startswith(HF_PREFIX):
            name = item[len(HF_PREFIX):].strip()
            if not name:
                raise ValueError(f"{item!r}: give a dataset name after {HF_PREFIX}")
            files.append(HFDataset(name))
            continue
        p = Path(item)
        if is_saved_dataset(p):
            files.append(HFDataset(str(p), folder=True))
        elif p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in _DIR_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{p}: no .json, .jsonl, .parquet or .txt files in this directory")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    if not files:
        raise ValueError("no input files given")
    return files


def _story_of(item, where: str, text_field: Optional[str] = None) -> str:
    if isinstance(item, str) and text_field is None:
        return item
    if isinstance(item, dict):
        for key in ((text_field,) if text_field else _DEFAULT_FIELDS):
            value = item.get(key)
            if isinstance(value, str):
                return value
    if text_field:
        raise ValueError(f"{where}: expected an object with a {text_field!r} string "
                         f"(--text-field {text_field})")
    raise ValueError(f"{where}: expected a string or an object with a \"story\" or \"text\" string "
                     "(--text-field names another field)")


def split_text(text: str) -> List[str]:
    """Split plain text into stories (see the module docstring for the rules)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if any(line.strip() == ENDOFTEXT for line in lines):
        pieces, current = [], []
        for line in lines:
            if line.strip() == ENDOFTEXT:
                pieces.append("\n".join(current))
                current = []
            else:
                current.append(line)
        pieces.append("\n".join(current))
    elif _BLANK_LINE.search(text.strip()):
        pieces = _BLANK_LINE.split(text)
    else:
        pieces = lines
    return [s for s in (p.strip() for p in pieces) if s]


def _clean(raw: Iterable[str]) -> Iterator[str]:
    for r in raw:
        r = r.strip()
        if r:
            yield r


def _json_stories(path: Path, text_field: Optional[str]) -> Iterator[str]:
    with open(path, "r", encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of stories")
    for i, item in enumerate(data):
        yield _story_of(item, f"{path}[{i}]", text_field)


def _jsonl_stories(path: Path, text_field: Optional[str]) -> Iterator[str]:
    with open(path, "r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            yield _story_of(item, f"{path}:{n}", text_field)


def _pick_column(where: str, columns: dict, text_field: Optional[str]) -> str:
    """The text column among {name: is_string}: text_field, else "text" or
    "story", else the only string column."""
    if text_field:
        if text_field not in columns:
            raise ValueError(f"{where}: no column {text_field!r} (columns: {', '.join(columns)})")
        if not columns[text_field]:
            raise ValueError(f"{where}: column {text_field!r} does not hold strings")
        return text_field
    for name in ("text", "story"):
        if columns.get(name):
            return name
    strings = [n for n, is_str in columns.items() if is_str]
    if len(strings) == 1:
        return strings[0]
    raise ValueError(f"{where}: which column holds the text? pass --text-field "
                     f"(columns: {', '.join(columns) or 'none'})")


def _checked(values, where: str, column: str, start: int) -> Iterator[str]:
    for i, v in enumerate(values):
        if v is None:
            continue             # a null cell: no story
        if not isinstance(v, str):
            raise ValueError(f"{where}: row {start + i}: {column!r} is not a string")
        yield v


def _parquet_stories(path: Path, text_field: Optional[str]) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow, which is not installed "
                         "(pip install pyarrow, or llama2c[data])") from None
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    schema = pf.schema_arrow
    columns = {f.name: pa.types.is_string(f.type) or pa.types.is_large_string(f.type) for f in schema}
    column = _pick_column(str(path), columns, text_field)
    row = 0
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=[column]):
        values = batch.column(0).to_pylist()
        yield from _checked(values, str(path), column, row)
        row += len(values)


def _load_hf(src: HFDataset, split: Optional[str]):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{src}: reading a Hugging Face dataset needs the datasets package, which "
                         "is not installed (pip install datasets, or llama2c[data])") from None
    if src.folder:
        try:
            ds = datasets.load_from_disk(src.spec)
        except (OSError, ValueError, FileNotFoundError) as e:
            raise ValueError(f"{src}: not a dataset saved by datasets ({e})") from None
    else:
        try:
            ds = datasets.load_dataset(src.spec, split=split or "train")
        except Exception as e:      # noqa: BLE001 (hub, network and builder errors have many types)
            lines = [x for x in str(e).strip().splitlines() if x.strip()]
            raise ValueError(f"{src}: datasets could not load it "
                             f"({lines[0] if lines else type(e).__name__})") from None
    if isinstance(ds, datasets.DatasetDict):
        want = split or "train"
        if want not in ds:
            raise ValueError(f"{src}: no split {want!r} (splits: {', '.join(ds)}): pass --split")
        ds = ds[want]
    elif split and src.folder and getattr(ds, "split", None) not in (None, split):
        raise ValueError(f"{src}: holds the {ds.split} split, not {split!r}")
    return ds


def _hf_stories(src: HFDataset, text_field: Optional[str], split: Optional[str]) -> Iterator[str]:
    ds = _load_hf(src, split)
    features = getattr(ds, "features", None) or {}
    columns = {name: getattr(f, "dtype", None) in ("string", "large_string") for name, f in features.items()}
    column = _pick_column(str(src), columns, text_field)
    ds = ds.select_columns([column])
    for start in range(0, len(ds), BATCH_ROWS):
        values = ds[start:start + BATCH_ROWS][column]
        yield from _checked(values, str(src), column, start)


def iter_file_stories(path: Union[PathLike, HFDataset], text_field: Optional[str] = None,
                      split: Optional[str] = None) -> Iterator[str]:
    """The stories of one input (a file or an HFDataset), lazily where the
    format allows (JSONL, Parquet and datasets are read a batch at a time)."""
    if isinstance(path, str) and path.startswith(HF_PREFIX):
        path = expand_inputs(path)[0]
    elif not isinstance(path, HFDataset) and is_saved_dataset(Path(path)):
        path = HFDataset(str(path), folder=True)
    if isinstance(path, HFDataset):
        yield from _clean(_hf_stories(path, text_field, split))
        return
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        yield from _clean(_json_stories(path, text_field))
    elif suffix == ".jsonl":
        yield from _clean(_jsonl_stories(path, text_field))
    elif suffix == ".parquet":
        yield from _clean(_parquet_stories(path, text_field))
    else:
        with open(path, "r", encoding="utf-8", newline="") as f:
            try:
                text = f.read()
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text ({e})") from None
        yield from split_text(text)


def read_stories(path: Union[PathLike, HFDataset], text_field: Optional[str] = None,
                 split: Optional[str] = None) -> List[str]:
    """All stories of one input (see iter_file_stories)."""
    return list(iter_file_stories(path, text_field, split))


def iter_stories(inputs: Union[PathLike, Sequence[PathLike]], text_field: Optional[str] = None,
                 split: Optional[str] = None) -> Iterator[str]:
    for path in expand_inputs(inputs):
        yield from iter_file_stories(path, text_field, split)


def is_validation(index: int, val_fraction: float) -> bool:
    """The deterministic split: story 0, then one story in every 1/val_fraction
    (story i is a validation story when floor(i*f) > floor((i-1)*f))."""
    if val_fraction <= 0:
        return False
    if index == 0:
        return True
    import math

    return math.floor(index * val_fraction) > math.floor((index - 1) * val_fraction)


def validation_mask(start: int, count: int, val_fraction: float):
    """is_validation for stories start .. start+count-1, as a numpy bool array."""
    import numpy as np

    idx = np.arange(start, start + count, dtype=np.float64)
    if val_fraction <= 0:
        return np.zeros(count, dtype=bool)
    mask = np.floor(idx * val_fraction) > np.floor((idx - 1) * val_fraction)
    mask |= idx == 0
    return mask


def write_corpus(stories: Iterable[str], out) -> int:
    """Write stories one after another (each ends with a newline); returns the count."""
    n = 0
    for s in stories:
        out.write(s)
        out.write("\n")
        n += 1
    return n
