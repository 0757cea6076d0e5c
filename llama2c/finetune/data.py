"""Fine-tuning data: examples with a loss mask, and resumable batches of them.

An example is ``ids`` (token ids) and ``mask`` (``mask[t]``: token ``t`` counts
in the loss, i.e. the model is trained to predict it). Input files:

- ``.jsonl`` (or ``.json``, a list): one record per line, any of
  ``{"messages": [...]}``  OpenAI-style chat, rendered with the chat template;
                           only the assistant turns count;
  ``{"prompt": "...", "completion": "..."}``  plain text: BOS + prompt +
                           completion + EOS, only the completion (and EOS) counts;
  ``{"prompt": [msgs], "completion": [msgs]}``  conversational: the template
                           renders prompt + completion, the completion's
                           assistant turns count;
  ``{"text": "..."}`` (or ``"story"``)  plain text, every token counts.
- any other file: plain text split into stories as ``llama2c data prepare``
  does; BOS + story, every token counts.
- a ``llama2c data prepare`` directory (meta.json): its train / val shards.

Batches: ``PaddedBatches`` puts one example per row (truncated to
max_seq_len + 1 tokens), right-padded to the longest row of the batch with
labels -100; ``PackedBatches`` concatenates the examples (each starts with its
own BOS) and cuts windows of max_seq_len + 1 tokens, as pretraining does. In
both, inputs are tokens 0..T-1 of a row and labels tokens 1..T, with -100 (not
counted) where the mask is off. Rows are dealt to processes by index (row j
to rank j % world_size) and each process visits its own in a fresh random
order every epoch, drawn from (seed, rank, epoch): ``(epoch, pos)`` is the
whole state, so a checkpoint resumes the exact batch sequence. numpy only.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

IGNORE = -100     # labels that are not counted (Hugging Face's convention)
BOS, EOS = 1, 2


class DataError(ValueError):
    """Bad fine-tuning data (the message names the file and line)."""


@dataclass
class Example:
    ids: np.ndarray      # int32 token ids
    mask: np.ndarray     # bool: mask[t] -> token t is a target

    @property
    def n_targets(self) -> int:
        return int(self.mask[1:].sum())


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def chat_example(tokenizer, template, messages, first_counted: int = 0) -> Example:
    """A conversation rendered with ``template`` (a ChatTemplate); the tokens of
    the assistant messages at index >= first_counted are targets. Each
    assistant turn's tokens are found by rendering the conversation up to it
    (with the generation prompt) and up to its end: the tokens after the
    first and up to the second are that turn's (its end-of-turn marker
    included, so the model learns to stop)."""
    full = template.tokenize(tokenizer, messages, add_generation_prompt=False)
    mask = np.zeros(len(full), dtype=bool)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant" or i < first_counted:
            continue
        before = template.tokenize(tokenizer, messages[:i], add_generation_prompt=True) if i else []
        upto = template.tokenize(tokenizer, messages[:i + 1], add_generation_prompt=False)
        start, end = _lcp(before, upto), _lcp(upto, full)
        mask[start:end] = True
    return Example(np.asarray(full, dtype=np.int32), mask)


def prompt_completion_example(tokenizer, prompt: str, completion: str) -> Example:
    """BOS + prompt + completion + EOS, encoded as one text; the tokens past
    the encoding of the prompt alone are targets."""
    before = tokenizer.encode(prompt, bos=True, eos=False)
    full = tokenizer.encode(prompt + completion, bos=True, eos=True)
    mask = np.zeros(len(full), dtype=bool)
    mask[_lcp(before, full):] = True
    return Example(np.asarray(full, dtype=np.int32), mask)


def text_example(tokenizer, text: str) -> Example:
    ids = tokenizer.encode(text, bos=True, eos=False)
    return Example(np.asarray(ids, dtype=np.int32), np.ones(len(ids), dtype=bool))


def record_example(record, tokenizer, template, where: str) -> Example:
    """One JSONL record as an Example (see the module docstring)."""
    from ..errors import InvalidArgumentError

    if isinstance(record, str):
        return text_example(tokenizer, record)
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    try:
        if "messages" in record:
            msgs = record["messages"]
            if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs or []):
                raise DataError(f"{where}: no assistant message to learn from")
            return chat_example(tokenizer, template, msgs)
        if "prompt" in record and "completion" in record:
            p, c = record["prompt"], record["completion"]
            if isinstance(p, str) and isinstance(c, str):
                return prompt_completion_example(tokenizer, p, c)
            if isinstance(p, list) and isinstance(c, list):
                return chat_example(tokenizer, template, p + c, first_counted=len(p))
            raise DataError(f"{where}: prompt and completion must both be strings or both be message lists")
        for key in ("text", "story"):
            if isinstance(record.get(key), str):
                return text_example(tokenizer, record[key])
    except InvalidArgumentError as e:
        raise DataError(f"{where}: {e}") from None
    raise DataError(f"{where}: expected \"messages\", \"prompt\" + \"completion\", or \"text\"")


def read_records(path: Path) -> Iterator[Tuple[object, str]]:
    """(record, "file:line") for every record of a .jsonl / .json file."""
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        for i, item in enumerate(data if isinstance(data, list) else [data]):
            yield item, f"{path}[{i}]"
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line), f"{path}:{n}"
            except ValueError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e})") from None


def is_structured(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".json")


def load_examples(paths, tokenizer, template) -> List[Example]:
    """Every example of the given files (a directory stands for its .jsonl,
    .json and .txt files, in name order)."""
    from ..data.stories import expand_inputs, read_stories

    out: List[Example] = []
    for path in expand_inputs(paths):
        if is_structured(path):
            for record, where in read_records(path):
                ex = record_example(record, tokenizer, template, where)
                if len(ex.ids) >= 2:
                    out.append(ex)
        else:
            out.extend(e for e in (text_example(tokenizer, s) for s in read_stories(path)) if len(e.ids) >= 2)
    if not out:
        raise DataError(f"no examples in {', '.join(map(str, paths)) if not isinstance(paths, (str, Path)) else paths}")
    return out


def split_validation(examples: List[Example], val_fraction: float) -> Tuple[List[Example], List[Example]]:
    """The deterministic split of ``llama2c data prepare``: example 0, then one
    in every 1/val_fraction, goes to validation."""
    from ..data.stories import validation_mask

    if val_fraction <= 0:
        return list(examples), []
    mask = validation_mask(0, len(examples), val_fraction)
    train = [e for e, v in zip(examples, mask) if not v]
    val = [e for e, v in zip(examples, mask) if v]
    return train, val


def digest(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(np.int64(len(e.ids)).tobytes())
        h.update(e.ids.astype("<i4").tobytes())
        h.update(np.packbits(e.mask).tobytes())
    return h.hexdigest()[:24]


# ---------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------

class NotEnoughData(ValueError):
    pass


class EpochOrder:
    """Items 0..n-1 dealt to processes by index (item j to rank j % world_size,
    each rank the same count, the remainder left out) and visited in a new
    random order every epoch, from (seed, rank, epoch)."""

    def __init__(self, n_items: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, what: str = "items"):
        per_rank = n_items // world_size
        if per_rank < 1:
            raise NotEnoughData(f"{n_items} {what}: too few for {world_size} process(es)")
        self.items = rank + world_size * np.arange(per_rank, dtype=np.int64)
        self.n, self.rank, self.seed = per_rank, int(rank), int(seed)
        self.epoch, self.pos = 0, 0
        self._order, self._order_epoch = None, -1

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "n_windows": self.n}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.pos = int(state["pos"]) if int(state.get("n_windows", self.n)) == self.n else 0

    def next_indices(self, k: int) -> List[int]:
        out: List[int] = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
            if self._order_epoch != self.epoch:
                rng = np.random.default_rng([self.seed, self.rank, self.epoch])
                self._order, self._order_epoch = self.items[rng.permutation(self.n)], self.epoch
            take = min(k - len(out), self.n - self.pos)
            out.extend(self._order[self.pos:self.pos + take].tolist())
            self.pos += take
        return out


def _rows_to_batch(rows: List[Tuple[np.ndarray, np.ndarray]], pad_id: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Rows of (ids, mask), each of length >= 2, as (inputs, labels) int64
    arrays (B, T) with T the longest row minus one; padding has label -100."""
    T = max(len(ids) for ids, _ in rows) - 1
    x = np.full((len(rows), T), pad_id, dtype=np.int64)
    y = np.full((len(rows), T), IGNORE, dtype=np.int64)
    for r, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        x[r, :n] = ids[:-1]
        y[r, :n] = np.where(mask[1:], ids[1:], IGNORE)
    return x, y


class PaddedBatches:
    """One example per row, truncated to seq_len + 1 tokens, padded per batch."""

    def __init__(self, examples: List[Example], seq_len: int, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, split: str = "train"):
        self.examples = [Example(e.ids[:seq_len + 1], e.mask[:seq_len + 1]) for e in examples]
        self.truncated = sum(len(e.ids) > seq_len + 1 for e in examples)
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.rank, self.world_size = rank, world_size
        if not self.examples:
            raise NotEnoughData(f"no {split} examples")
        # only the training rows are drawn at random; eval_batches reads a split in order
        self.order = EpochOrder(len(self.examples), rank=rank, world_size=world_size, seed=seed,
                                what=f"{split} examples") if split == "train" else None

    def state_dict(self):
        return self.order.state_dict()

    def load_state_dict(self, state):
        self.order.load_state_dict(state)

    def _row(self, i: int):
        e = self.examples[i]
        return e.ids, e.mask

    def next_batch(self) -> Tuple[np.ndarray, np.ndarray]:
        return _rows_to_batch([self._row(i) for i in self.order.next_indices(self.batch_size)])

    def eval_batches(self, max_batches: int = 0) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """This rank's share (every row j with j % world_size == rank), in order,
        in batches (at most max_batches of them when positive)."""
        mine = list(range(self.rank, self.n_rows, self.world_size))
        for b, start in enumerate(range(0, len(mine), self.batch_size)):
            if max_batches and b >= max_batches:
                return
            yield _rows_to_batch([self._row(i) for i in mine[start:start + self.batch_size]])

    @property
    def n_rows(self) -> int:
        return len(self.examples)

    @property
    def n_tokens(self) -> int:
        return int(sum(len(e.ids) for e in self.examples))


class PackedBatches(PaddedBatches):
    """The examples end to end, cut into windows of seq_len + 1 tokens (stride
    seq_len); every row is a full window."""

    def __init__(self, examples: List[Example], seq_len: int, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, split: str = "train"):
        self.ids = np.concatenate([e.ids for e in examples]) if examples else np.zeros(0, np.int32)
        self.mask = np.concatenate([e.mask for e in examples]) if examples else np.zeros(0, bool)
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.rank, self.world_size = rank, world_size
        self.truncated = 0
        n_windows = max(0, (len(self.ids) - 1) // self.seq_len)
        if n_windows // (world_size if split == "train" else 1) < 1:
            raise NotEnoughData(f"the {split} data has {len(self.ids):,} tokens: too few for one window of "
                                f"max_seq_len+1 = {self.seq_len + 1} tokens per process ({world_size} "
                                "process(es)); lower --max-seq-len or use --packing=false")
        self._n = n_windows
        self.order = EpochOrder(n_windows, rank=rank, world_size=world_size, seed=seed,
                                what=f"{split} windows") if split == "train" else None

    def _row(self, i: int):
        s = i * self.seq_len
        return self.ids[s:s + self.seq_len + 1], self.mask[s:s + self.seq_len + 1]

    @property
    def n_rows(self) -> int:
        return self._n

    @property
    def n_tokens(self) -> int:
        return int(len(self.ids))


class ShardBatches:
    """A ``llama2c data prepare`` split through the training sampler (every
    token counts)."""

    def __init__(self, shards, seq_len: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, split: str = "train"):
        from ..train.loader import WindowSampler

        self.sampler = WindowSampler(shards, seq_len, batch_size, rank=rank, world_size=world_size, seed=seed,
                                     split=split)
        self.shards, self.seq_len, self.batch_size = shards, seq_len, batch_size
        self.rank, self.world_size, self.split = rank, world_size, split
        self.truncated = 0

    def state_dict(self):
        return self.sampler.state_dict()

    def load_state_dict(self, state):
        self.sampler.load_state_dict(state)

    def next_batch(self):
        x, y = self.sampler.next_batch()
        return x.numpy(), y.numpy()

    def eval_batches(self, max_batches: int = 0):
        from ..train.loader import WindowSampler

        s = WindowSampler(self.shards, self.seq_len, self.batch_size, rank=self.rank,
                          world_size=self.world_size, seed=0x5EED, split=self.split)
        n = s.batches_per_pass()
        for _ in range(min(n, max_batches) if max_batches else n):
            x, y = s.next_batch()
            yield x.numpy(), y.numpy()

    @property
    def n_rows(self) -> int:
        return self.sampler.windows_total

    @property
    def n_tokens(self) -> int:
        return int(sum(len(a) for a in self.shards))
