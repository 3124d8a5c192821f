"""Tokenizers: bytes (any bytes, exact round trip) and a Hugging Face tokenizer.json built here."""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from distill.data import ByteTokenizer, DataConfig, DataError, HFTokenizer, build_data

CORPUS = ["the cat sat on the mat", "a dog sat on a log", "the dog and the cat", "héllo wörld"] * 5


@pytest.fixture
def tokenizer_json(tmp_path):
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_byte_tokenizer_round_trips_any_bytes():
    tok = ByteTokenizer()
    raw = bytes(range(256)) + b"\xff\xfe\x80 not utf-8 \xc3"
    ids = tok.encode(raw)
    assert ids.dtype == np.int32 and ids.tolist() == list(raw)
    assert tok.decode_bytes(ids) == raw
    assert tok.decode(tok.encode("héllo ✓")) == "héllo ✓"
    assert tok.decode(tok.encode(b"ok \xff")) == "ok \ufffd"  # text decoding replaces, never raises
    assert tok.vocab_size == 256 and tok.is_bytes


def test_byte_tokenizer_reads_files_that_are_not_utf8(tmp_path):
    raw = b"caf\xe9 latin-1 text \xff\xfe" * 20
    (tmp_path / "latin1.txt").write_bytes(raw)
    data = build_data(DataConfig(source=str(tmp_path), seq_len=8, batch_size=2, validation_fraction=0), seed=0)
    assert np.asarray(data.train.tokens).tobytes() == raw


def test_hf_tokenizer_json(tmp_path, tokenizer_json):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(CORPUS):
        (corpus / f"{i:02d}.txt").write_text(text * 3, encoding="utf-8")
    data = build_data(DataConfig(source=str(corpus), tokenizer=str(tokenizer_json), seq_len=8, batch_size=2,
                                 validation_fraction=0), seed=0)
    reference = Tokenizer.from_file(str(tokenizer_json))
    assert data.vocab_size == reference.get_vocab_size() and not data.tokenizer.is_bytes
    assert data.stats["tokenizer"] == str(tokenizer_json)
    expected = np.concatenate([reference.encode(t * 3).ids for t in CORPUS])
    np.testing.assert_array_equal(data.train.tokens, expected)
    assert len(data.train.tokens) < sum(len((t * 3).encode()) for t in CORPUS)  # merges were learned
    ids = data.tokenizer.encode("the cat sat on the log")
    assert ids.dtype == np.int32 and data.tokenizer.decode(ids) == "the cat sat on the log"
    assert data.tokenizer.encode("héllo".encode()).tolist() == data.tokenizer.encode("héllo").tolist()
    batch = next(data.train_iterator())
    assert batch["tokens"].max() < data.vocab_size


def test_hf_tokenizer_names_a_file_that_is_not_utf8(tmp_path, tokenizer_json):
    (tmp_path / "ok.txt").write_text("the cat sat on the mat " * 20)
    (tmp_path / "bad.txt").write_bytes(b"the caf\xe9 " * 20)
    with pytest.raises(DataError, match=r"bad\.txt: not valid UTF-8 \(byte 7\).*data\.tokenizer=byte"):
        build_data(DataConfig(source=str(tmp_path), tokenizer=str(tokenizer_json), seq_len=4, batch_size=1,
                              validation_fraction=0), seed=0)
    with pytest.raises(DataError, match="not valid UTF-8"):
        HFTokenizer(tokenizer_json).encode(b"\xff")


def test_hf_tokenizer_path_errors(tmp_path):
    with pytest.raises(DataError, match=r"data\.tokenizer=.*missing\.json.*no such file"):
        build_data(DataConfig(tokenizer=str(tmp_path / "missing.json")), seed=0)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match=r"data\.tokenizer=.*not a readable tokenizer\.json"):
        build_data(DataConfig(tokenizer=str(tmp_path / "broken.json")), seed=0)
