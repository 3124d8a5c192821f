"""The offline logit cache: a frozen teacher's top-k log-probabilities per token, written once by
`distill cache`, read by student runs with `teacher.source: cache` instead of running the teacher.

A cache directory holds `meta.json` and, per split (`train`: one entry per training step, in the
run's batch order; `eval`: one per validation batch), `.npy` arrays read as memory maps:

    SPLIT.indices         [n, batch, seq, k]  uint16 or int32  top-k token ids, most probable first
    SPLIT.log_probs       [n, batch, seq, k]  float32          their log-probabilities (T = 1)
    SPLIT.label_log_prob  [n, batch, seq]     float32          log-probability of the label
    SPLIT.tail_mass       [n, batch, seq]     float32          1 - sum(exp(log_probs)), the mass left out
    SPLIT.tokens          [n, batch, seq]     int32            the input tokens (a run checks it reads these)
    SPLIT.mask            [n, batch, seq]     uint8            1 on real tokens (0: padding)

`label_log_prob` makes the teacher's cross-entropy (eval/teacher/bpb) exact at any k. A write
records how far it got in meta.json and resumes there; nothing in a directory holding another
cache (other teacher, data, k or batch geometry) is overwritten.

This module reads a cache (`TeacherCache`, `read_meta`); `teacher.cache_writer` writes one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from distill.data.iterator import shard_rows
from distill.errors import ConfigError

FORMAT = 1
FIELDS = ("indices", "log_probs", "label_log_prob", "tail_mass", "tokens", "mask")
BATCH_FIELDS = {"indices": "teacher_indices", "log_probs": "teacher_log_probs",
                "label_log_prob": "teacher_label_log_prob"}
"""Cache arrays a training or evaluation batch carries, under these batch keys."""


def index_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32)


def load_arrays(directory: Path, split: str, mode: str) -> dict[str, np.memmap]:
    """The split's arrays as memory maps (`r`: read-only, `r+`: to write into)."""
    return {name: np.load(directory / f"{split}.{name}.npy", mmap_mode=mode) for name in FIELDS}


class TeacherCache:
    """A complete cache, opened read-only: the entries of a step's (or validation batch's) rows."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = complete_meta(path)
        self.k = int(self.meta["k"])
        self._arrays = {split: load_arrays(self.path, split, "r") for split in ("train", "eval")}

    def entries(self, split: str, index: int, tokens: np.ndarray, shard_index: int = 0, shard_count: int = 1) -> dict:
        """The cache's batch keys for `split` entry `index`, rows of host `shard_index` of
        `shard_count`; `tokens` (the batch the run read) must be the ones the cache was written for."""
        fields = self._arrays[split]
        if index >= len(fields["tokens"]):
            raise ConfigError(f"teacher.path={str(self.path)!r}: the cache holds {len(fields['tokens'])} {split} "
                              f"batches; this run reads more (train.eval_batches or train.steps too large)")
        rows = shard_rows(fields["tokens"].shape[1], shard_index, shard_count)
        if not np.array_equal(fields["tokens"][index, rows], tokens):
            raise ConfigError(f"teacher.path={str(self.path)!r}: {split} batch {index} of the cache is not the batch "
                              "this run reads; the data source changed since the cache was written: write it again")
        out = {key: np.asarray(fields[name][index, rows]) for name, key in BATCH_FIELDS.items()}
        out["teacher_indices"] = out["teacher_indices"].astype(np.int32)
        return out


def read_meta(path: str | Path) -> dict:
    """A cache's meta.json (k, the teacher's ModelConfig fields, the batches it holds)."""
    meta_file = Path(path) / "meta.json"
    if not meta_file.is_file():
        raise ConfigError(f"teacher.path={str(path)!r}: no meta.json; expected a teacher cache written by "
                          "`distill cache`")
    return json.loads(meta_file.read_text())


def complete_meta(path: str | Path) -> dict:
    """The meta.json of a complete cache this version reads; a ConfigError naming the fix otherwise."""
    meta = read_meta(path)
    if meta.get("format") != FORMAT:
        raise ConfigError(f"teacher.path={str(path)!r}: cache format {meta.get('format')}, this version "
                          f"reads {FORMAT}; write it again with `distill cache`")
    if not meta["complete"]:
        written = meta["written"]
        raise ConfigError(f"teacher.path={str(path)!r}: the cache is incomplete ({written['train']} of "
                          f"{meta['steps']} steps, {written['eval']} of {meta['eval_batches']} "
                          "validation batches); run the same `distill cache` command again to finish it")
    return meta


def with_entries(cache: TeacherCache | None, split: str, index: int, batch: dict,
                 shard: tuple[int, int] = (0, 1)) -> dict:
    """`batch` (entry `index` of `split`, rows of host `shard` = (index, count)) with a cached
    teacher's entries for it; unchanged without a cache."""
    return {**batch, **cache.entries(split, index, batch["tokens"], *shard)} if cache else batch
