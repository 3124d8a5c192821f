"""Packing: documents -> one token stream per split; windows of it -> batches.

A `Stream` is a 1-D array of ids (in memory or memory-mapped) plus the sorted offsets where
documents start. Window `k` is `tokens[k * seq_len : k * seq_len + seq_len + 1]`: consecutive
windows share one token, so every token but the first is a label exactly once per epoch.
Document ids, positions and masks are derived per window from the start offsets
(`np.searchsorted`), so nothing per token is stored beside the ids.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

BATCH_KEYS = ("tokens", "labels", "mask", "segment_ids", "positions")


@dataclass(frozen=True)
class Stream:
    tokens: np.ndarray  # [n] integer ids (any integer dtype; np.memmap for token files)
    starts: np.ndarray  # [documents] int64, sorted, starts[0] == 0: where each document begins

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def documents(self) -> int:
        return int(self.starts.shape[0])

    def windows(self, seq_len: int) -> int:
        """How many full windows of `seq_len + 1` tokens (stride `seq_len`) the stream holds."""
        return max(0, (len(self) - 1) // seq_len)

    def batch(self, window_ids: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
        return make_batch(self, window_ids, seq_len)

    def padding(self, rows: int, seq_len: int) -> dict[str, np.ndarray]:
        return padding_rows(rows, seq_len)


def stream_dtype(vocab_size: int):
    return np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.int32


def pack(pieces: list[np.ndarray], vocab_size: int) -> Stream:
    """Concatenate non-empty token arrays, one document each, into a `Stream`."""
    pieces = [p for p in pieces if len(p)]
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(pieces) else np.zeros(0, np.int64)
    tokens = np.concatenate(pieces).astype(stream_dtype(vocab_size), copy=False) if pieces else np.zeros(0, np.uint8)
    return Stream(tokens, starts)


def split_documents_at(tokens: np.ndarray, separator: int | None) -> np.ndarray:
    """Document starts of a token array: 0, and one past every `separator` (None: one document)."""
    if separator is None or not len(tokens):
        return np.zeros(1 if len(tokens) else 0, np.int64)
    ends = np.flatnonzero(np.asarray(tokens) == separator).astype(np.int64) + 1
    return np.concatenate([[0], ends[ends < len(tokens)]]).astype(np.int64)


def cut(stream: Stream, at: int) -> tuple[Stream, Stream]:
    """`stream[:at]` and `stream[at:]`; a document spanning `at` becomes two documents."""
    head = Stream(stream.tokens[:at], stream.starts[stream.starts < at])
    tail_starts = stream.starts[stream.starts > at] - at
    tail = Stream(stream.tokens[at:], np.concatenate([[0], tail_starts]).astype(np.int64))
    return head, tail


def tail_size(n: int, fraction: float, seq_len: int) -> int:
    """Tokens held out at the end of a stream: `ceil(fraction * n)`, at least one window; 0 if off."""
    return 0 if fraction <= 0 else min(n, max(math.ceil(fraction * n), seq_len + 1))


def is_validation(key: str, fraction: float) -> bool:
    """Stable (unsalted, machine-independent) assignment of a document key to validation."""
    digest = hashlib.blake2b(key.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2.0**64


def make_batch(stream: Stream, window_ids: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """The rows of `window_ids` as a batch (see `BATCH_KEYS`), each `[rows, seq_len]`.

    - tokens = window[:-1], labels = window[1:] (int32);
    - mask (float32) is 1 where the label belongs to the same document as the token, else 0;
    - segment_ids (int32) number the documents within the row from 0;
    - positions (int32) count from 0 at every document start and at the row start (a document
      that began in an earlier window continues from 0: the model cannot see its beginning).
    """
    rows = np.asarray(window_ids, dtype=np.int64)
    row_start = rows * seq_len
    index = row_start[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
    window = np.asarray(stream.tokens[index.reshape(-1)]).reshape(index.shape).astype(np.int32)
    doc = np.searchsorted(stream.starts, index, side="right") - 1
    doc_start = np.maximum(stream.starts[doc[:, :-1]], row_start[:, None])
    return {
        "tokens": window[:, :-1],
        "labels": window[:, 1:],
        "mask": (doc[:, 1:] == doc[:, :-1]).astype(np.float32),
        "segment_ids": (doc[:, :-1] - doc[:, :1]).astype(np.int32),
        "positions": (index[:, :-1] - doc_start).astype(np.int32),
    }


def padding_rows(rows: int, seq_len: int) -> dict[str, np.ndarray]:
    """Rows that count for nothing (mask 0), to fill the last validation batch to a fixed shape."""
    zeros = np.zeros((rows, seq_len), np.int32)
    return {
        "tokens": zeros,
        "labels": zeros.copy(),
        "mask": np.zeros((rows, seq_len), np.float32),
        "segment_ids": zeros.copy(),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
    }
