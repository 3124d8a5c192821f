"""`build_data`: read and tokenize a source once, split it, and hand out iterators and batches."""

from __future__ import annotations

import numpy as np

from distill.data.config import DataConfig, fail
from distill.data.iterator import TrainIterator, shard_rows
from distill.data.digits import ImageRows, digits_splits
from distill.data.packing import Stream, cut, is_validation, pack, split_documents_at, tail_size
from distill.data.sources import Document, read_jsonl, read_text, read_tokens, resolve_kind
from distill.data.tokenizers import ByteTokenizer, load_tokenizer


class Data:
    """A tokenized, split corpus. Make it with `build_data`.

    Attributes: `config`, `seed`, `tokenizer`, `vocab_size`, `train` / `validation` (`Stream`s;
    `ImageRows` for the digits source), `steps_per_epoch` (global batches per training epoch),
    `stats` (a JSON-able dict for logging), `documents` (`{"train": [...], "validation": [...]}`:
    the keys of the documents in each split, relative paths, `path#line` for JSONL; a document cut
    by a tail split is in both).
    """

    def __init__(self, config: DataConfig, seed: int, tokenizer, vocab_size: int, train: Stream | ImageRows,
                 validation: Stream | ImageRows, stats: dict, documents: dict[str, list[str]]):
        self.config, self.seed, self.tokenizer, self.vocab_size = config, seed, tokenizer, vocab_size
        self.train, self.validation, self.stats, self.documents = train, validation, stats, documents
        self.steps_per_epoch = train.windows(config.seq_len) // config.batch_size

    def train_iterator(self, shard_index: int = 0, shard_count: int = 1) -> TrainIterator:
        """A fresh infinite iterator at epoch 0; host `shard_index` of `shard_count` gets its rows."""
        return TrainIterator(self.train, seq_len=self.config.seq_len, batch_size=self.config.batch_size,
                             seed=self.seed, shard_index=shard_index, shard_count=shard_count)

    def validation_batches(self, max_batches: int | None = None, *, shard_index: int = 0,
                           shard_count: int = 1) -> list[dict[str, np.ndarray]]:
        """The validation split once, in order, as fixed-shape batches (the last one filled with mask-0
        rows), or its first `max_batches`. Empty when `validation_fraction` is 0."""
        seq_len, batch_size = self.config.seq_len, self.config.batch_size
        rows = shard_rows(batch_size, shard_index, shard_count)
        windows = self.validation.windows(seq_len)
        count = -(-windows // batch_size)
        if max_batches is not None:
            count = min(count, max(0, int(max_batches)))
        batches = []
        for b in range(count):
            ids = np.arange(b * batch_size, min((b + 1) * batch_size, windows))
            batch = self.validation.batch(ids, seq_len)
            if len(ids) < batch_size:
                pad = self.validation.padding(batch_size - len(ids), seq_len)
                batch = {k: np.concatenate([batch[k], pad[k]]) for k in batch}
            batches.append({k: v[rows] for k, v in batch.items()})
        return batches


def _tokenize(docs: list[Document], tokenizer) -> list[np.ndarray]:
    if isinstance(tokenizer, ByteTokenizer):
        return [np.frombuffer(d.data, np.uint8) for d in docs]
    texts = []
    for d in docs:
        try:
            texts.append(d.data.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise fail("tokenizer", tokenizer.name, f"{d.name}: not valid UTF-8 (byte {error.start}); a Hugging "
                                                    "Face tokenizer needs UTF-8 text: fix or leave out the file, "
                                                    "or use data.tokenizer=byte, which takes any bytes") from None
    try:
        return tokenizer.encode_batch(texts)
    except Exception as error:  # e.g. lone surrogates from JSON escapes
        raise fail("tokenizer", tokenizer.name, f"could not encode the text ({error})") from None


def _token_stream(cfg: DataConfig, arrays: list[tuple[str, np.ndarray]], vocab_size: int) -> Stream:
    for path, array in arrays:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= vocab_size:
            bad = high if high >= vocab_size else low
            first = int(np.flatnonzero(np.asarray(array) == bad)[0])
            raise fail("source", cfg.source, f"{path!r} holds token id {bad} (first at index {first}), outside "
                                             f"[0, vocab size {vocab_size}); set data.tokenizer to the "
                                             "tokenizer.json that made the ids, or data.vocab_size above the "
                                             "largest id")
    if len(arrays) == 1:
        tokens = arrays[0][1]
        return Stream(tokens, split_documents_at(tokens, cfg.token_separator))
    offsets = np.cumsum([0] + [len(a) for _, a in arrays])
    starts = np.concatenate([split_documents_at(a, cfg.token_separator) + o for (_, a), o in zip(arrays, offsets)])
    return Stream(np.concatenate([a for _, a in arrays]), starts.astype(np.int64))


def _sides(keys: list[str], lengths: list[int], at: int) -> dict[str, list[str]]:
    """Which documents (in stream order, with these token counts) lie before and after offset `at`."""
    ends = np.cumsum(lengths)
    starts = ends - np.asarray(lengths)
    return {"train": [k for k, s in zip(keys, starts) if s < at],
            "validation": [k for k, e in zip(keys, ends) if e > at]}


def _split_stats(stream: Stream, seq_len: int, text_bytes: int | None) -> dict:
    return {"documents": stream.documents, "bytes": text_bytes, "tokens": len(stream),
            "windows": stream.windows(seq_len)}


def _from_tokens(cfg: DataConfig, vocab_size: int):
    """Token files: always a tail split."""
    arrays = read_tokens(cfg)
    stream = _token_stream(cfg, arrays, vocab_size)
    at = len(stream) - tail_size(len(stream), cfg.validation_fraction, cfg.seq_len)
    train, validation = cut(stream, at)
    documents = _sides([path for path, _ in arrays], [len(a) for _, a in arrays], at)
    return train, validation, "tail", documents, {"files": len(arrays), "train": None, "validation": None}


def _from_documents(cfg: DataConfig, kind: str, tokenizer, vocab_size: int):
    """Text / JSONL: a split by document, or by tail when that leaves a side too small."""
    seq_len, fraction = cfg.seq_len, cfg.validation_fraction
    docs = read_text(cfg) if kind == "text" else read_jsonl(cfg)
    files = len({d.name.rsplit(":", 1)[0] if kind == "jsonl" else d.name for d in docs})
    pieces = _tokenize(docs, tokenizer)
    held = [fraction > 0 and is_validation(d.key, fraction) for d in docs]
    train = pack([p for p, h in zip(pieces, held) if not h], vocab_size)
    validation = pack([p for p, h in zip(pieces, held) if h], vocab_size)
    if fraction == 0 or (validation.windows(seq_len) >= 1 and train.windows(seq_len) >= cfg.batch_size):
        documents = {"train": [d.key for d, h in zip(docs, held) if not h],
                     "validation": [d.key for d, h in zip(docs, held) if h]}
        validation_bytes = sum(len(d.data) for d, h in zip(docs, held) if h)
        split = "document" if fraction > 0 else "none"
    else:  # too few documents to split by document (e.g. one file): hold out the stream's tail
        stream = pack(pieces, vocab_size)
        at = len(stream) - tail_size(len(stream), fraction, seq_len)
        train, validation = cut(stream, at)
        documents = _sides([d.key for d in docs], [len(p) for p in pieces], at)
        validation_bytes = len(tokenizer.decode_bytes(validation.tokens)) if not tokenizer.is_bytes else len(validation)
        split = "tail"
    total = sum(len(d.data) for d in docs)
    return train, validation, split, documents, {"files": files, "train": total - validation_bytes,
                                                 "validation": validation_bytes}


def build_data(cfg: DataConfig, *, seed: int) -> Data:
    """Read, tokenize, split and pack `cfg.source` once (in memory; nothing is cached on disk).

    Raises `DataError` (naming the field and the fix) for any bad input; see docs/data.md.
    """
    tokenizer = load_tokenizer(cfg.tokenizer)
    vocab_size = tokenizer.vocab_size if cfg.vocab_size is None else cfg.vocab_size
    if vocab_size < tokenizer.vocab_size:
        raise fail("vocab_size", cfg.vocab_size, f"smaller than the tokenizer's vocabulary ({tokenizer.vocab_size}); "
                                                 "leave it null or make it larger")
    kind = resolve_kind(cfg)
    if kind == "images":
        train, validation, split, documents, counts = digits_splits(cfg, vocab_size)
    elif kind == "tokens":
        train, validation, split, documents, counts = _from_tokens(cfg, vocab_size)
    else:
        train, validation, split, documents, counts = _from_documents(cfg, kind, tokenizer, vocab_size)
    seq_len, batch_size = cfg.seq_len, cfg.batch_size
    if train.windows(seq_len) < batch_size:
        raise fail("source", cfg.source, f"too small for one batch: the train split has {len(train)} tokens, "
                                         f"{train.windows(seq_len)} windows of seq_len + 1 = {seq_len + 1}, and a "
                                         f"batch needs batch_size = {batch_size}; use more data (data.source, "
                                         "data.max_bytes) or lower data.seq_len, data.batch_size or "
                                         "data.validation_fraction")
    stats = {
        "source": cfg.source, "kind": kind, "tokenizer": tokenizer.name, "vocab_size": vocab_size,
        "files": counts["files"], "split": split,
        "train": {**_split_stats(train, seq_len, counts["train"]), "steps_per_epoch": train.windows(seq_len) // batch_size},
        "validation": {**_split_stats(validation, seq_len, counts["validation"]),
                       "batches": -(-validation.windows(seq_len) // batch_size)},
    }
    return Data(cfg, seed, tokenizer, vocab_size, train, validation, stats, documents)


__all__ = ["Data", "build_data"]
