"""Sources: the stdlib corpus and its split, text files/directories/globs, JSONL, token files."""

import hashlib
import json
import time

import numpy as np

from distill.data import DataConfig, build_data, stdlib_files


def _stream(data, split="train"):
    return np.asarray(getattr(data, split).tokens).tobytes()


def test_stdlib_split_is_by_file_disjoint_and_stable():
    cfg = DataConfig(max_bytes=3_000_000, seq_len=64, batch_size=8)
    start = time.perf_counter()
    data = build_data(cfg, seed=0)
    assert time.perf_counter() - start < 5
    assert data.vocab_size == 256 and data.tokenizer.is_bytes
    assert data.stats["split"] == "document"
    stats = json.loads(json.dumps(data.stats))
    assert stats["train"]["bytes"] + stats["validation"]["bytes"] == 3_000_000
    assert stats["train"]["tokens"] == len(data.train) and stats["files"] == len(data.documents["train"]) + len(
        data.documents["validation"])
    train, validation = set(data.documents["train"]), set(data.documents["validation"])
    assert train and validation and not train & validation
    assert all(k.endswith(".py") and "site-packages" not in k and "/test/" not in k for k in train | validation)
    assert 0.01 < len(validation) / (len(train) + len(validation)) < 0.15
    # the streams are exactly the files of each split, in sorted order (no document is cut in two)
    files = dict((rel, path) for path, rel in stdlib_files())
    assert _stream(data, "validation") == b"".join(files[k].read_bytes() for k in sorted(validation))
    assert data.stats["validation"]["documents"] == len(validation)
    # stable: another seed and a larger corpus put every shared file on the same side
    more = build_data(DataConfig(max_bytes=4_000_000, seq_len=64, batch_size=8), seed=1)
    assert train <= set(more.documents["train"])
    assert validation <= set(more.documents["validation"])


def test_text_directory_recursive_in_sorted_order_without_hidden_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_bytes(b"second file\n" * 30)
    (tmp_path / "a.md").write_bytes(b"first file\n" * 30)
    (tmp_path / ".hidden").write_bytes(b"never read")
    (tmp_path / "empty.txt").write_bytes(b"")
    data = build_data(DataConfig(source=str(tmp_path), seq_len=16, batch_size=2, validation_fraction=0), seed=0)
    assert _stream(data) == b"first file\n" * 30 + b"second file\n" * 30
    assert data.documents["train"] == ["a.md", "b/two.txt"]
    assert data.stats["files"] == 2 and data.stats["train"]["documents"] == 2


def test_text_glob_and_single_file_with_a_tail_split(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"x" * 500)
    (tmp_path / "y.txt").write_bytes(b"y" * 500)
    (tmp_path / "z.log").write_bytes(b"z" * 500)
    data = build_data(DataConfig(source=str(tmp_path / "*.txt"), seq_len=16, batch_size=2,
                                 validation_fraction=0), seed=0)
    assert _stream(data) == b"x" * 500 + b"y" * 500
    one = build_data(DataConfig(source=str(tmp_path / "z.log"), seq_len=16, batch_size=2,
                                validation_fraction=0.1), seed=0)
    assert one.stats["split"] == "tail"  # one file cannot be split by file
    assert len(one.validation) == 50 and len(one.train) == 450
    assert one.documents == {"train": ["z.log"], "validation": ["z.log"]}


def test_max_bytes_caps_the_corpus_at_a_character_boundary(tmp_path):
    (tmp_path / "a.txt").write_bytes("é".encode() * 100)  # two bytes a character
    data = build_data(DataConfig(source=str(tmp_path / "a.txt"), seq_len=4, batch_size=2,
                                 validation_fraction=0, max_bytes=51), seed=0)
    assert _stream(data) == "é".encode() * 25


def test_jsonl_records_are_documents(tmp_path):
    records = [{"text": f"record {i} " * (i + 3), "id": i} for i in range(40)]
    lines = [json.dumps(r) for r in records]
    lines.insert(5, "   ")  # blank lines are skipped
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    data = build_data(DataConfig(source=str(tmp_path / "a.jsonl"), seq_len=16, batch_size=2,
                                 validation_fraction=0.2), seed=0)
    assert data.stats["kind"] == "jsonl" and data.stats["split"] == "document"
    assert data.stats["train"]["documents"] + data.stats["validation"]["documents"] == 40
    by_key = {f"a.jsonl#{n}": r["text"] for n, r in zip([1, 2, 3, 4, 5] + list(range(7, 42)), records)}
    assert _stream(data, "validation") == "".join(by_key[k] for k in data.documents["validation"]).encode()
    # another field name
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": r["text"]}) for r in records))
    other = build_data(DataConfig(source=str(tmp_path / "b.jsonl"), text_field="body", seq_len=16, batch_size=2,
                                  validation_fraction=0), seed=0)
    assert _stream(other) == "".join(r["text"] for r in records).encode()


def test_npy_tokens_with_documents_split_at_a_separator(tmp_path):
    ids = np.array([5, 6, 7, 0, 8, 9, 0, 1, 2, 3, 4, 5, 6, 7, 0, 3] * 8, dtype=np.int64)
    np.save(tmp_path / "ids.npy", ids)
    data = build_data(DataConfig(source=str(tmp_path / "ids.npy"), seq_len=8, batch_size=2, validation_fraction=0,
                                 token_separator=0), seed=0)
    assert data.stats["kind"] == "tokens"
    np.testing.assert_array_equal(data.train.tokens, ids)
    np.testing.assert_array_equal(data.train.starts, np.flatnonzero(np.append(1, ids[:-1] == 0)))
    batch = next(data.train_iterator())
    window_has_separator = batch["tokens"] == 0
    np.testing.assert_array_equal(batch["mask"] == 0, window_has_separator)  # a label after 0 is a new document


def test_raw_bin_tokens_with_a_dtype_and_a_tail_split(tmp_path):
    ids = (np.arange(3000) * 7 % 1000).astype(np.uint16)
    ids.tofile(tmp_path / "ids.bin")
    data = build_data(DataConfig(source=str(tmp_path / "ids.bin"), token_dtype="uint16", vocab_size=1000,
                                 seq_len=32, batch_size=4), seed=0)
    assert data.vocab_size == 1000 and data.stats["split"] == "tail"
    np.testing.assert_array_equal(np.concatenate([data.train.tokens, data.validation.tokens]), ids)
    assert len(data.validation) == 150
    assert data.validation.starts.tolist() == [0]  # the cut document continues as a new one
    batch = next(data.train_iterator())
    np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
    assert batch["mask"].all()  # one document: every label is real
    ids.astype(np.int32).tofile(tmp_path / "ids32.bin")
    wide = build_data(DataConfig(source=str(tmp_path / "ids32.bin"), token_dtype="int32", vocab_size=1000,
                                 seq_len=32, batch_size=4, validation_fraction=0), seed=0)
    np.testing.assert_array_equal(wide.train.tokens, ids)


def test_split_keys_use_a_stable_unsalted_hash():
    from distill.data.packing import is_validation
    # the rule, restated: blake2b-64 of the key, as a fraction of 2**64, below validation_fraction
    for key in ["json/decoder.py", "a.jsonl#3", "x"]:
        value = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64
        assert is_validation(key, 0.5) == (value < 0.5)
        assert is_validation(key, value + 1e-9) and not is_validation(key, max(0.0, value - 1e-9))
