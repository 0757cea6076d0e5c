"""Reading stories out of the input formats the data tools accept.

Formats (chosen per file):
- ``.json``: a list of objects with a ``"story"`` (or ``"text"``) field, as in the
  TinyStories archive, or a list of strings;
- ``.jsonl``: one JSON object (``"story"`` / ``"text"``) or string per line;
- anything else is UTF-8 text: when a line holding only ``<|endoftext|>`` appears,
  the stories are the pieces between those lines; otherwise, when the text has blank
  lines, the stories are the blocks between blank lines; otherwise each non-empty line
  is a story.

A directory given as an input stands for its ``*.json``, ``*.jsonl`` and ``*.txt``
files in name order. Every story is stripped of surrounding whitespace; empty ones
are dropped.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]

ENDOFTEXT = "<|endoftext|>"
_BLANK_LINE = re.compile(r"\n[ \t\f\v]*\n")
_DIR_SUFFIXES = (".json", ".jsonl", ".txt")


def expand_inputs(inputs: Union[PathLike, Sequence[PathLike]]) -> List[Path]:
    """The input files, in order: directories expand to their data files (sorted)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: List[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in _DIR_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{p}: no .json, .jsonl or .txt files in this directory")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    if not files:
        raise ValueError("no input files given")
    return files


def _story_of(item, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in ("story", "text"):
            value = item.get(key)
            if isinstance(value, str):
                return value
    raise ValueError(f"{where}: expected a string or an object with a \"story\" or \"text\" string")


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


def read_stories(path: PathLike) -> List[str]:
    """All stories of one input file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        with open(path, "r", encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of stories")
        raw = [_story_of(item, f"{path}[{i}]") for i, item in enumerate(data)]
    elif suffix == ".jsonl":
        raw = []
        with open(path, "r", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
                raw.append(_story_of(item, f"{path}:{n}"))
    else:
        with open(path, "r", encoding="utf-8", newline="") as f:
            try:
                text = f.read()
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text ({e})") from None
        return split_text(text)
    return [s for s in (r.strip() for r in raw) if s]


def iter_stories(inputs: Union[PathLike, Sequence[PathLike]]) -> Iterator[str]:
    for path in expand_inputs(inputs):
        yield from read_stories(path)


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
