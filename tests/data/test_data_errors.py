"""Bad input: one DataError (a ValueError) naming the field, the file (and line), and the fix."""

import json
import os

import numpy as np
import pytest

from distill.data import DataConfig, DataError, build_data


def _build(**fields):
    return build_data(DataConfig(**{"seq_len": 8, "batch_size": 2, "validation_fraction": 0, **fields}), seed=0)


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


@pytest.mark.parametrize("fields, message", [
    (dict(seq_len=0), r"data\.seq_len=0: must be an integer >= 1"),
    (dict(seq_len=-3), r"data\.seq_len=-3: must be an integer >= 1"),
    (dict(batch_size=0), r"data\.batch_size=0: must be an integer >= 1"),
    (dict(validation_fraction=1.0), r"data\.validation_fraction=1\.0: must be in \[0, 1\)"),
    (dict(kind="csv"), r"data\.kind='csv': allowed values are auto, text, jsonl, tokens"),
    (dict(kind="tokens"), r'data\.kind=\'tokens\': the "stdlib" source is text'),
    (dict(token_dtype="float32"), r"data\.token_dtype='float32': must be a numpy integer dtype"),
    (dict(max_bytes=0), r"data\.max_bytes=0: must be an integer >= 1"),
    (dict(source=""), r"data\.source='': must be"),
    (dict(text_field=""), r"data\.text_field='': must be a non-empty JSON key"),
])
def test_config_fields_are_validated_on_construction(fields, message):
    with pytest.raises(DataError, match=message):
        DataConfig(**fields)


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"data\.source=.*nowhere.*no such file or directory"):
        _build(source=str(tmp_path / "nowhere"))


def test_empty_directory_and_empty_file(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match=r"data\.source=.*the directory holds no files"):
        _build(source=str(tmp_path / "d"))
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match=r"data\.source=.*every file is empty"):
        _build(source=str(tmp_path / "empty.txt"))


def test_unreadable_file(tmp_path):
    os.symlink(tmp_path / "gone.txt", tmp_path / "link.txt")  # a dangling link: listed, cannot be opened
    (tmp_path / "ok.txt").write_text("x" * 100)
    with pytest.raises(DataError, match=r"data\.source=.*cannot read .*link\.txt"):
        _build(source=str(tmp_path / "*.txt"))
    (tmp_path / "junk.npy").write_bytes(b"this is not a numpy file")
    with pytest.raises(DataError, match=r"data\.source=.*cannot read token file .*junk\.npy"):
        _build(source=str(tmp_path / "junk.npy"))


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(DataError, match=r"data\.source=.*\*\.txt.*the glob matched no files"):
        _build(source=str(tmp_path / "*.txt"))


def test_jsonl_line_without_the_text_field_names_file_and_line(tmp_path):
    lines = [json.dumps({"text": "fine " * 20}), json.dumps({"text": "also fine"}), json.dumps({"body": "x"})]
    (tmp_path / "a.jsonl").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"data\.text_field='text': .*a\.jsonl:3 has no 'text' key "
                                        r"\(it has: \['body'\]\); set data\.text_field"):
        _build(source=str(tmp_path / "a.jsonl"))
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "ok"}) + "\n{broken\n")
    with pytest.raises(DataError, match=r"data\.source=.*b\.jsonl:2: not a JSON object"):
        _build(source=str(tmp_path / "b.jsonl"))
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": 5}))
    with pytest.raises(DataError, match=r"c\.jsonl:1: the value is a int, not a string"):
        _build(source=str(tmp_path / "c.jsonl"))


def test_token_ids_at_or_above_the_vocab_size(tmp_path):
    ids = np.arange(100, dtype=np.uint16)
    ids[42] = 256
    np.save(tmp_path / "ids.npy", ids)
    with pytest.raises(DataError, match=r"data\.source=.*ids\.npy.* token id 256 \(first at index 42\), outside "
                                        r"\[0, vocab size 256\); set data\.tokenizer .* or data\.vocab_size"):
        _build(source=str(tmp_path / "ids.npy"))
    assert _build(source=str(tmp_path / "ids.npy"), vocab_size=512).vocab_size == 512
    np.append(ids, 7).astype(np.uint16).tofile(tmp_path / "odd.bin")
    with pytest.raises(DataError, match=r"data\.token_dtype='uint32': .*odd\.bin.* has 202 bytes, not a multiple of 4"):
        _build(source=str(tmp_path / "odd.bin"), token_dtype="uint32")


def test_corpus_too_small_for_one_batch(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"x" * 40)  # 39 labels: 4 windows of seq_len 8
    assert _build(source=str(tmp_path / "a.txt"), batch_size=4).steps_per_epoch == 1
    with pytest.raises(DataError, match=r"data\.source=.*too small for one batch: the train split has 40 tokens, "
                                        r"4 windows .* batch_size = 5; use more data"):
        _build(source=str(tmp_path / "a.txt"), batch_size=5)


def test_vocab_size_below_the_tokenizer(tmp_path):
    with pytest.raises(DataError, match=r"data\.vocab_size=100: smaller than the tokenizer's vocabulary \(256\)"):
        _build(vocab_size=100, max_bytes=10_000)
