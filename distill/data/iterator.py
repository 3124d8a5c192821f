"""The training iterator: a seeded permutation of window indices per epoch and an integer position.

Step `i` of epoch `e` reads windows `perm(seed, e)[i * B : (i + 1) * B]` (B = global batch_size);
host `h` of `H` reads the contiguous rows `[h * B/H, (h + 1) * B/H)` of that global batch. The whole
state is `{"epoch": e, "index": i}`: restoring it reproduces the following batches exactly.
"""

from __future__ import annotations

import numpy as np

from distill.data.config import DataError, fail
from distill.data.digits import ImageRows
from distill.data.packing import Stream

_SALT = 0x5EED_DA7A  # keeps the data-order stream apart from other users of the same seed


def epoch_permutation(seed: int, epoch: int, windows: int) -> np.ndarray:
    """The order of the windows in `epoch`: a function of (seed, epoch) only (numpy PCG64)."""
    rng = np.random.default_rng([_SALT, int(seed) & (2**64 - 1), int(epoch)])
    return rng.permutation(windows)


def shard_rows(batch_size: int, shard_index: int, shard_count: int) -> slice:
    """The contiguous rows of a global batch that host `shard_index` of `shard_count` reads."""
    if not isinstance(shard_count, (int, np.integer)) or shard_count < 1:
        raise DataError(f"shard_count={shard_count!r}: must be an integer >= 1 (the number of hosts)")
    if not isinstance(shard_index, (int, np.integer)) or not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index={shard_index!r}: must be in [0, shard_count={shard_count})")
    if batch_size % shard_count:
        raise fail("batch_size", batch_size, f"not divisible by shard_count={shard_count}; make the global "
                                             "batch a multiple of the number of hosts")
    rows = batch_size // shard_count
    return slice(shard_index * rows, (shard_index + 1) * rows)


class TrainIterator:
    """Infinite iterator of training batches (dicts of numpy arrays `[batch_size / shard_count, seq_len]`).

    Epochs are reshuffled by (seed, epoch); the windows left over after the last full batch of an
    epoch are skipped in that epoch only (the next permutation differs).
    """

    def __init__(self, stream: Stream | ImageRows, *, seq_len: int, batch_size: int, seed: int,
                 shard_index: int = 0, shard_count: int = 1):
        self._stream = stream
        self._seq_len = seq_len
        self._batch_size = batch_size
        self._seed = seed
        self._rows = shard_rows(batch_size, shard_index, shard_count)
        self.windows = stream.windows(seq_len)
        self.steps_per_epoch = self.windows // batch_size
        if self.steps_per_epoch < 1:
            raise fail("batch_size", batch_size, f"the train split has {self.windows} windows of seq_len + 1 "
                                                 "tokens, fewer than one batch; use more data (data.source, "
                                                 "data.max_bytes) or lower data.seq_len, data.batch_size or "
                                                 "data.validation_fraction")
        self._epoch, self._index = 0, 0
        self._perm_epoch, self._perm = None, None

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self._epoch:
            self._perm = epoch_permutation(self._seed, self._epoch, self.windows)
            self._perm_epoch = self._epoch
        return self._perm

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._index >= self.steps_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0
        start = self._index * self._batch_size
        window_ids = self._permutation()[start:start + self._batch_size][self._rows]
        self._index += 1
        return self._stream.batch(window_ids, self._seq_len)

    @property
    def epoch(self) -> int:
        return self._epoch

    def state(self) -> dict[str, int]:
        """JSON-serialisable position: the epoch and the number of its batches already read."""
        return {"epoch": int(self._epoch), "index": int(self._index)}

    def restore(self, state: dict) -> None:
        """Continue from `state()`: the next batch is the one the saved iterator would have given."""
        try:
            epoch, index = int(state["epoch"]), int(state["index"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"iterator state {state!r}: expected {{'epoch': int, 'index': int}} as saved by "
                            "state()") from None
        if epoch < 0 or not 0 <= index <= self.steps_per_epoch:
            raise DataError(f"iterator state {state!r}: out of range for this data ({self.steps_per_epoch} "
                            "steps per epoch); was it saved with another data config?")
        self._epoch, self._index = epoch, index
