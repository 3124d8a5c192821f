"""`DataConfig`: where the tokens come from and how they are cut into batches; `DataError`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distill.errors import ConfigError

KINDS = ("auto", "text", "jsonl", "tokens")


class DataError(ConfigError):
    """Bad data input or data config; the message names the field (`data.<field>`) and the fix.

    A `ConfigError` (so a `ValueError`), so the CLI reports it like any other config error.
    """


def fail(field_name: str, value, why: str) -> DataError:
    """A `DataError` reading `data.<field>=<value>: <why>`; `why` should say the fix."""
    return DataError(f"data.{field_name}={value!r}: {why}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class DataConfig:
    """The `data:` section. See docs/data.md for the sources, the split and the packing."""

    # "stdlib" (the Python standard library's own *.py files: on every machine, no download),
    # "digits" (scikit-learn's 8x8 digit images, each with the caption " this digit is <name>": an
    # image-and-text task for models with a vision section; see distill/data/digits.py),
    # a text file, a directory of text files (recursive) or a glob of them, a .jsonl file/glob,
    # or a token file (.npy, or raw .bin with `token_dtype`) / a glob of them.
    source: str = "stdlib"
    # auto | text | jsonl | tokens. auto: from the extension of the file or glob (.jsonl -> jsonl,
    # .npy/.bin -> tokens, anything else -> text); a directory and "stdlib" are text.
    kind: str = "auto"
    # JSONL: the key of each record's text (every non-blank line must be an object with it).
    text_field: str = "text"
    # "byte" (256 ids, one per byte, any bytes accepted) or a path to a Hugging Face
    # tokenizer.json (text must be UTF-8; no special tokens are added).
    tokenizer: str = "byte"
    # Raw .bin token files: the numpy dtype of one id (.npy files carry their own dtype).
    token_dtype: str = "uint16"
    # Tokens per row; each row is a window of seq_len + 1 tokens (inputs and next-token labels).
    seq_len: int = 128
    # Rows per step, across all hosts (the global batch); a host reads batch_size / shard_count.
    batch_size: int = 16
    # Share of the corpus held out for validation, split by document (file / JSONL record) with a
    # stable hash; falls back to the tail of the token stream when that cannot work (one file,
    # token files). 0 turns validation off. Must be < 1.
    validation_fraction: float = 0.05
    # Cap on the corpus size read, in bytes (text: document bytes in sorted file order, the last
    # document cut at a character boundary; tokens: bytes of ids). None reads everything
    # (the stdlib corpus is ~10-30 MB depending on the Python build).
    max_bytes: int | None = None
    # The vocabulary size reported to the model; None: the tokenizer's (256 for bytes). A larger
    # value pads the vocabulary; every token id must be below it.
    vocab_size: int | None = None
    # Token sources: the id that ends each document (it stays in the stream as the document's
    # last token); None: each token file is one document.
    token_separator: int | None = None
    # The digits source: the placeholder id written where an image goes (the models'
    # vision.image_token_id), and how many placeholders per image (their vision.tokens_per_image).
    image_token_id: int = 255
    tokens_per_image: int = 16

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source.strip():
            raise fail("source", self.source, 'must be "stdlib" or a path, directory or glob')
        if self.kind not in KINDS:
            raise fail("kind", self.kind, f"allowed values are {', '.join(KINDS)}")
        if self.source == "stdlib" and self.kind not in ("auto", "text"):
            raise fail("kind", self.kind, 'the "stdlib" source is text; use kind "auto" or "text"')
        if self.source == "digits" and self.kind != "auto":
            raise fail("kind", self.kind, 'the "digits" source is images and text; use kind "auto"')
        if not isinstance(self.text_field, str) or not self.text_field:
            raise fail("text_field", self.text_field, "must be a non-empty JSON key")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise fail("tokenizer", self.tokenizer, 'must be "byte" or a path to a tokenizer.json')
        try:
            dtype = np.dtype(self.token_dtype)
        except TypeError:
            dtype = None
        if dtype is None or dtype.kind not in "iu":
            raise fail("token_dtype", self.token_dtype, "must be a numpy integer dtype such as uint16, "
                                                        "uint32 or int32")
        if not _is_int(self.seq_len) or self.seq_len < 1:
            raise fail("seq_len", self.seq_len, "must be an integer >= 1")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise fail("batch_size", self.batch_size, "must be an integer >= 1")
        if (isinstance(self.validation_fraction, bool) or not isinstance(self.validation_fraction, (int, float))
                or not 0 <= self.validation_fraction < 1):
            raise fail("validation_fraction", self.validation_fraction, "must be in [0, 1); 0 turns validation off")
        if self.max_bytes is not None and (not _is_int(self.max_bytes) or self.max_bytes < 1):
            raise fail("max_bytes", self.max_bytes, "must be an integer >= 1, or null for no cap")
        if self.vocab_size is not None and (not _is_int(self.vocab_size) or self.vocab_size < 1):
            raise fail("vocab_size", self.vocab_size, "must be an integer >= 1, or null for the tokenizer's")
        if self.token_separator is not None and (not _is_int(self.token_separator) or self.token_separator < 0):
            raise fail("token_separator", self.token_separator, "must be a token id >= 0, or null")
        if not _is_int(self.image_token_id) or self.image_token_id < 0:
            raise fail("image_token_id", self.image_token_id, "must be a token id >= 0")
        if not _is_int(self.tokens_per_image) or self.tokens_per_image < 1:
            raise fail("tokens_per_image", self.tokens_per_image, "must be an integer >= 1")
