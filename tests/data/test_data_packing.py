"""Packing: labels are the tokens shifted by one; mask, segment ids and positions follow documents."""

import string

import numpy as np

from distill.data import DataConfig, Stream, build_data, make_batch

LETTERS = (string.ascii_letters + string.digits).encode()


def _letter_corpus(tmp_path, lengths):
    """One file per document, each a run of its own letter, so a document boundary is exactly where
    the byte changes (neighbouring documents in sorted order have different letters)."""
    for i, n in enumerate(lengths):
        (tmp_path / f"doc{i:03d}.txt").write_bytes(LETTERS[i:i + 1] * n)
    return DataConfig(source=str(tmp_path), seq_len=32, batch_size=4, validation_fraction=0)


def _reference(tokens_row, labels_row):
    """Mask, segment ids and positions of one row, from the letters alone."""
    mask = (labels_row == tokens_row).astype(np.float32)
    segments = np.concatenate([[0], np.cumsum(tokens_row[1:] != tokens_row[:-1])])
    positions = np.zeros_like(tokens_row)
    for i in range(1, len(tokens_row)):
        positions[i] = positions[i - 1] + 1 if tokens_row[i] == tokens_row[i - 1] else 0
    return mask, segments, positions


def test_batches_match_a_reference_built_from_document_letters(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 90, size=len(LETTERS))
    data = build_data(_letter_corpus(tmp_path, lengths), seed=3)
    it = data.train_iterator()
    boundaries = 0
    for _ in range(data.steps_per_epoch * 2):
        batch = next(it)
        assert set(batch) == {"tokens", "labels", "mask", "segment_ids", "positions"}
        assert batch["tokens"].dtype == batch["labels"].dtype == np.int32
        assert batch["segment_ids"].dtype == batch["positions"].dtype == np.int32
        assert batch["mask"].dtype == np.float32
        for key in batch:
            assert batch[key].shape == (4, 32), key
        # labels are the next tokens: inside a row by shifting, and the row's last label is the
        # token after the window (same letter as the last token unless a document ends there)
        np.testing.assert_array_equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
        for row in range(4):
            mask, segments, positions = _reference(batch["tokens"][row], batch["labels"][row])
            np.testing.assert_array_equal(batch["mask"][row], mask)
            np.testing.assert_array_equal(batch["segment_ids"][row], segments)
            np.testing.assert_array_equal(batch["positions"][row], positions)
            boundaries += int((mask == 0).sum())
    assert boundaries > 0  # the corpus is built so that rows do cross documents


def test_make_batch_against_per_token_document_ids():
    n, seq_len = 200, 16
    starts = np.array([0, 5, 6, 40, 41, 120, 199])
    doc = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, n)))
    stream = Stream(np.arange(n, dtype=np.int64), starts)
    windows = np.array([0, 3, 7, 11, 2])
    batch = make_batch(stream, windows, seq_len)
    for row, w in enumerate(windows):
        idx = np.arange(w * seq_len, w * seq_len + seq_len + 1)
        np.testing.assert_array_equal(batch["tokens"][row], idx[:-1])  # ids are absolute offsets here
        np.testing.assert_array_equal(batch["labels"][row], idx[1:])
        np.testing.assert_array_equal(batch["mask"][row], doc[idx[1:]] == doc[idx[:-1]])
        np.testing.assert_array_equal(batch["segment_ids"][row], doc[idx[:-1]] - doc[idx[0]])
        first = np.array([max(starts[doc[i]], idx[0]) for i in idx[:-1]])
        np.testing.assert_array_equal(batch["positions"][row], idx[:-1] - first)
        # positions are 0 exactly at document starts and at the row start
        np.testing.assert_array_equal(batch["positions"][row] == 0,
                                      np.isin(idx[:-1], starts) | (idx[:-1] == idx[0]))


def test_windows_overlap_by_one_token_so_every_label_is_used_once_per_epoch(tmp_path):
    tokens = np.arange(1, 1 + 16 * 8 + 1, dtype=np.int32)  # 16 windows of seq_len 8, all ids distinct
    np.save(tmp_path / "t.npy", tokens)
    data = build_data(DataConfig(source=str(tmp_path / "t.npy"), seq_len=8, batch_size=4, validation_fraction=0,
                                 vocab_size=1000), seed=0)
    it = data.train_iterator()
    labels = np.concatenate([next(it)["labels"].reshape(-1) for _ in range(data.steps_per_epoch)])
    np.testing.assert_array_equal(np.sort(labels), tokens[1:])
