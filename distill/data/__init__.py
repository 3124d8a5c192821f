"""Data: corpora, tokenizers, packing, and a checkpointable, sharded batch iterator.

```python
from distill.data import DataConfig, build_data
data = build_data(DataConfig(seq_len=128, batch_size=16, max_bytes=8_000_000), seed=0)
it = data.train_iterator()              # infinite; it.state() / it.restore(state)
batch = next(it)                        # tokens, labels, mask, segment_ids, positions: [rows, seq_len]
                                        # (+ images [rows, 1, 8, 8, 1] for source "digits")
evals = data.validation_batches(10)
```
See docs/data.md.
"""

from distill.data.config import DataConfig, DataError
from distill.data.iterator import TrainIterator, epoch_permutation, shard_rows
from distill.data.packing import BATCH_KEYS, Stream, make_batch
from distill.data.pipeline import Data, build_data
from distill.data.sources import STDLIB_SKIP, stdlib_files
from distill.data.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "BATCH_KEYS", "ByteTokenizer", "Data", "DataConfig", "DataError", "HFTokenizer", "STDLIB_SKIP", "Stream",
    "TrainIterator", "build_data", "epoch_permutation", "load_tokenizer", "make_batch", "shard_rows",
    "stdlib_files",
]
