"""Batches of token windows out of a prepared split, sharded by rank, resumable.

Each shard is cut into non-overlapping windows of ``seq_len + 1`` tokens (stride
``seq_len``; inputs are the first ``seq_len``, targets the last). Window j of the
whole split belongs to rank ``j % world_size`` (every rank gets the same number,
so ranks stay in step), and each rank visits its windows in a fresh random order
every epoch, drawn from ``(seed, rank, epoch)``. The position in that order,
``(epoch, pos)``, is the whole sampler state, so a checkpoint can resume the exact
same batch sequence.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch


class NotEnoughData(ValueError):
    pass


class WindowSampler:
    def __init__(self, shards: Sequence[np.ndarray], seq_len: int, batch_size: int, *,
                 rank: int = 0, world_size: int = 1, seed: int = 0, split: str = "train"):
        self.shards = list(shards)
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        counts = np.array([max(0, (len(a) - 1) // self.seq_len) for a in self.shards], dtype=np.int64)
        total = int(counts.sum())
        self.windows_total = total
        per_rank = total // self.world_size
        if per_rank < 1:
            tokens = sum(len(a) for a in self.shards)
            raise NotEnoughData(
                f"the {split} split has {tokens:,} tokens: too few for one window of "
                f"max_seq_len+1 = {self.seq_len + 1} tokens per process ({self.world_size} "
                f"process(es)); prepare more text or lower --max-seq-len")
        global_ids = self.rank + self.world_size * np.arange(per_rank, dtype=np.int64)
        ends = np.cumsum(counts)
        shard_of = np.searchsorted(ends, global_ids, side="right")
        first = ends - counts
        self._shard = shard_of.astype(np.int32)
        self._start = (global_ids - first[shard_of]) * self.seq_len
        self.n_windows = per_rank
        self.epoch, self.pos = 0, 0
        self._order = None
        self._order_epoch = -1

    # -- state ---------------------------------------------------------------
    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "n_windows": self.n_windows}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if int(state.get("n_windows", self.n_windows)) != self.n_windows:
            # different data or process count: keep the epoch, restart its order
            self.epoch, self.pos = int(state["epoch"]), 0
        else:
            self.epoch, self.pos = int(state["epoch"]), int(state["pos"])

    # -- sampling ------------------------------------------------------------
    def _current_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.rank, self.epoch])
            self._order = rng.permutation(self.n_windows)
            self._order_epoch = self.epoch
        return self._order

    def next_indices(self, n: int) -> List[int]:
        out = []
        while len(out) < n:
            if self.pos >= self.n_windows:
                self.epoch += 1
                self.pos = 0
            order = self._current_order()
            take = min(n - len(out), self.n_windows - self.pos)
            out.extend(order[self.pos:self.pos + take].tolist())
            self.pos += take
        return out

    def window(self, i: int) -> np.ndarray:
        s = int(self._start[i])
        return self.shards[int(self._shard[i])][s:s + self.seq_len + 1]

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = self.next_indices(self.batch_size)
        block = np.stack([self.window(i) for i in idx]).astype(np.int64)
        t = torch.from_numpy(block)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def batches_per_pass(self) -> int:
        return -(-self.n_windows // self.batch_size)
