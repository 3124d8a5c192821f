"""The "digits" source: scikit-learn's 8x8 handwritten digits as image-and-text rows.

Each of the 1,797 images of `sklearn.datasets.load_digits` (shipped inside scikit-learn: nothing is
downloaded) becomes one row: `tokens_per_image` placeholder tokens (`image_token_id`) that the
model overwrites with the image's features, then the byte text " this digit is seven\\n". The
labels of the placeholders are not trained (mask 0); the text is, so the digit's name can only be
predicted by looking at the image. Images are split between train and validation by a stable hash
of their index (as documents are), rows are padded to `seq_len` with mask 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distill.data.config import DataConfig, fail
from distill.data.packing import is_validation, padding_rows
from distill.errors import ConfigError
from distill.model.config import ModelConfig

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT = " this digit is "
IMAGE_SHAPE = (8, 8, 1)  # height, width, channels of a load_digits image
PIXEL_MAX = 16.0  # load_digits pixels are 0..16; rows carry them scaled to [0, 1]


def caption(digit: int) -> bytes:
    """The text after the placeholders of an image of `digit`."""
    return f"{PROMPT}{DIGIT_NAMES[digit]}\n".encode()


def longest_row(tokens_per_image: int) -> int:
    """Tokens of the longest example: placeholders, prompt, the longest name, newline."""
    return tokens_per_image + max(len(caption(d)) for d in range(10))


def name_start(tokens_per_image: int) -> int:
    """The first label position that is part of a digit's name (labels are the tokens shifted by one)."""
    return tokens_per_image + len(PROMPT) - 1


@dataclass(frozen=True)
class ImageRows:
    """One split of the digits task: one example per row, already padded to `seq_len + 1` tokens.

    Offers what the iterator and the validation batches need from a split (`windows`, `batch`,
    `padding`), like `packing.Stream`, with an `images` array `[rows, 1, 8, 8, 1]` in every batch.
    """

    tokens: np.ndarray  # [n, seq_len + 1] int32, padded with 0
    label_mask: np.ndarray  # [n, seq_len] float32: 1 where the label is caption text
    images: np.ndarray  # [n, 1, 8, 8, 1] float32 in [0, 1]
    digits: np.ndarray  # [n] int32: the digit each image shows
    token_count: int  # tokens of the examples, padding left out

    def __len__(self) -> int:
        return self.token_count

    @property
    def documents(self) -> int:
        return int(self.tokens.shape[0])

    def windows(self, seq_len: int) -> int:
        return int(self.tokens.shape[0])

    def batch(self, window_ids: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
        """Rows `window_ids` as a batch: the text keys `[rows, seq_len]` plus `images`."""
        ids = np.asarray(window_ids, dtype=np.int64)
        rows = len(ids)
        return {
            "tokens": self.tokens[ids, :-1],
            "labels": self.tokens[ids, 1:],
            "mask": self.label_mask[ids],
            "segment_ids": np.zeros((rows, seq_len), np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
            "images": self.images[ids],
        }

    def padding(self, rows: int, seq_len: int) -> dict[str, np.ndarray]:
        """Rows that count for nothing (mask 0, no placeholders, blank images)."""
        return {**padding_rows(rows, seq_len), "images": np.zeros((rows, 1, *IMAGE_SHAPE), np.float32)}


def _rows(images: np.ndarray, digits: np.ndarray, cfg: DataConfig) -> ImageRows:
    n, t = len(digits), cfg.tokens_per_image
    tokens = np.zeros((n, cfg.seq_len + 1), np.int32)
    label_mask = np.zeros((n, cfg.seq_len), np.float32)
    count = 0
    for row, digit in enumerate(digits):
        text = np.frombuffer(caption(int(digit)), np.uint8)
        length = t + len(text)
        tokens[row, :t] = cfg.image_token_id
        tokens[row, t:length] = text
        label_mask[row, t - 1:length - 1] = 1.0  # labels t..length-1 are the caption
        count += length
    pixels = (images.reshape(n, 1, *IMAGE_SHAPE) / PIXEL_MAX).astype(np.float32)
    return ImageRows(tokens, label_mask, pixels, digits.astype(np.int32), count)


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """(images `[1797, 8, 8]` with pixels 0..16, digits `[1797]`) from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise fail("source", "digits", "needs scikit-learn (pip install scikit-learn), which ships the "
                                       "images") from None
    bunch = load_digits()
    return np.asarray(bunch.images), np.asarray(bunch.target)


def check_digits_config(cfg: DataConfig, vocab_size: int) -> None:
    """The token layout fits: byte text, a placeholder id the text never uses, rows long enough."""
    if cfg.tokenizer != "byte":
        raise fail("tokenizer", cfg.tokenizer, 'the "digits" source writes byte text; use data.tokenizer=byte')
    if not cfg.image_token_id < vocab_size:
        raise fail("image_token_id", cfg.image_token_id, f"outside the vocabulary ({vocab_size}); pick an id "
                                                         "below it or raise data.vocab_size")
    if any(cfg.image_token_id in caption(d) for d in range(10)):
        raise fail("image_token_id", cfg.image_token_id, "the captions use this byte; pick an id >= 128 "
                                                         "(no ASCII text holds one)")
    needed = longest_row(cfg.tokens_per_image) - 1
    if cfg.seq_len < needed:
        raise fail("seq_len", cfg.seq_len, f"too short for an example ({cfg.tokens_per_image} placeholders and "
                                           f"the longest caption need {needed}); raise data.seq_len")


def digits_splits(cfg: DataConfig, vocab_size: int):
    """(train, validation, split name, documents, byte counts), as `pipeline.build_data` expects."""
    check_digits_config(cfg, vocab_size)
    images, digits = load_digit_images()
    keys = [f"digits#{i}" for i in range(len(digits))]
    held = np.array([cfg.validation_fraction > 0 and is_validation(k, cfg.validation_fraction) for k in keys])
    train, validation = _rows(images[~held], digits[~held], cfg), _rows(images[held], digits[held], cfg)
    documents = {"train": [k for k, h in zip(keys, held) if not h], "validation": [k for k, h in zip(keys, held) if h]}
    return train, validation, "document", documents, {"files": 1, "train": None, "validation": None}


def check_image_models(data: DataConfig, teacher_source: str, models: list[tuple[str, ModelConfig]]) -> None:
    """Every model can read the run's batches: with the digits source each needs a vision encoder whose
    image shape, placeholder count and placeholder id match the data; a cached teacher has no images."""
    for role, model in models:
        vision = model.vision
        if vision is not None and teacher_source == "cache":
            raise ConfigError(f"{role}.model.vision: a cached teacher (teacher.source=cache) holds logits of "
                              "text-only batches; distil image-and-text data from a live teacher "
                              "(teacher.source scratch or run) or remove the vision section")
        if data.source != "digits":
            continue
        if vision is None:
            raise ConfigError(f"{role}.model.vision: required by data.source=digits (the batches carry images); "
                              f"add a vision section with image_size {IMAGE_SHAPE[0]} and num_channels 1")
        if vision.image_shape != IMAGE_SHAPE:
            raise ConfigError(f"{role}.model.vision.image_size={vision.image_size}, num_channels="
                              f"{vision.num_channels}: the digits are {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]} with "
                              f"{IMAGE_SHAPE[2]} channel; set image_size {IMAGE_SHAPE[0]}, num_channels 1")
        if vision.tokens_per_image != data.tokens_per_image:
            raise ConfigError(f"data.tokens_per_image={data.tokens_per_image}: {role}.model.vision makes "
                              f"{vision.tokens_per_image} features per image ((image_size / patch_size)^2); "
                              "make them equal")
        if vision.image_token_id != data.image_token_id:
            raise ConfigError(f"data.image_token_id={data.image_token_id}: {role}.model.vision.image_token_id is "
                              f"{vision.image_token_id}; make them equal")
