"""The digits source: scikit-learn's 8x8 digits as image-and-text rows."""

from __future__ import annotations

import numpy as np
import pytest

import distill
from distill.config import load_config
from distill.data import DataConfig, DataError, build_data
from distill.data.digits import DIGIT_NAMES, PROMPT, check_image_models, name_start
from distill.errors import ConfigError
from distill.model import ModelConfig
from distill.model.config import VisionConfig

CFG = DataConfig(source="digits", seq_len=36, batch_size=8, validation_fraction=0.2)


@pytest.fixture(scope="module")
def data():
    return build_data(CFG, seed=0)


def test_split_is_by_image_disjoint_complete_and_stable(data):
    train, validation = set(data.documents["train"]), set(data.documents["validation"])
    assert not train & validation and len(train | validation) == 1797
    assert 0.15 < len(validation) / 1797 < 0.25
    assert data.documents == build_data(CFG, seed=1).documents  # a hash of the image index, like documents
    assert data.train.documents == len(train) and data.validation.documents == len(validation)


def test_rows_hold_placeholders_then_the_caption_of_the_image(data):
    from sklearn.datasets import load_digits

    digits = load_digits()
    batch = data.validation_batches(1)[0]
    assert {k: v.shape for k, v in batch.items()} == {
        "tokens": (8, 36), "labels": (8, 36), "mask": (8, 36), "segment_ids": (8, 36), "positions": (8, 36),
        "images": (8, 1, 8, 8, 1)}
    for row in range(8):
        index = int(data.documents["validation"][row].split("#")[1])
        digit = int(digits.target[index])
        np.testing.assert_allclose(batch["images"][row, 0, :, :, 0], digits.images[index] / 16.0)
        tokens = batch["tokens"][row]
        assert (tokens[:16] == 255).all() and 255 not in tokens[16:]
        caption = f"{PROMPT}{DIGIT_NAMES[digit]}\n".encode()
        length = 16 + len(caption)
        window = np.concatenate([tokens, batch["labels"][row, -1:]])
        assert bytes(window[16:length].astype(np.uint8)) == caption and not window[length:].any()
        # Trained: exactly the labels that are caption bytes (not the placeholders, not the padding).
        expected = np.zeros(36)
        expected[15:length - 1] = 1
        np.testing.assert_array_equal(batch["mask"][row], expected)
        assert bytes(batch["labels"][row, name_start(16):length - 1].astype(np.uint8)) == \
            f"{DIGIT_NAMES[digit]}\n".encode()


def test_iterator_is_deterministic_by_seed_and_resumable(data):
    a, b = data.train_iterator(), build_data(CFG, seed=0).train_iterator()
    for _ in range(3):
        x, y = next(a), next(b)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    state = a.state()
    expected = next(a)
    b.restore(state)
    np.testing.assert_array_equal(next(b)["images"], expected["images"])
    other = next(build_data(CFG, seed=1).train_iterator())
    assert not np.array_equal(other["images"], next(data.train_iterator())["images"])


def test_last_validation_batch_is_padded_with_blank_rows(data):
    batches = data.validation_batches()
    last = batches[-1]
    real = data.validation.documents % 8 or 8
    assert not last["mask"][real:].any() and not last["images"][real:].any()
    assert sum(int(b["mask"].any(axis=1).sum()) for b in batches) == data.validation.documents


@pytest.mark.parametrize("fields, message", [
    ({"seq_len": 30}, "data.seq_len=30: too short for an example"),
    ({"image_token_id": ord("t")}, "data.image_token_id=116: the captions use this byte"),
    ({"image_token_id": 300}, r"data.image_token_id=300: outside the vocabulary \(256\)"),
    ({"kind": "text"}, 'data.kind=\'text\': the "digits" source is images and text'),
])
def test_bad_digits_config(fields, message):
    with pytest.raises(DataError, match=message):
        build_data(DataConfig(**{**CFG.__dict__, **fields}), seed=0)


def test_models_must_match_the_images():
    vision = VisionConfig()
    model = ModelConfig(vision=vision)
    check_image_models(CFG, "scratch", [("teacher", model)])
    cases = [
        (ModelConfig(), "teacher.model.vision: required by data.source=digits"),
        (ModelConfig(vision=VisionConfig(patch_size=4)), "data.tokens_per_image=16: teacher.model.vision makes 4"),
        (ModelConfig(vision=VisionConfig(num_channels=3)), "teacher.model.vision.image_size=8, num_channels=3"),
        (ModelConfig(vision=VisionConfig(image_token_id=254)), "data.image_token_id=255: .* is 254"),
    ]
    for bad, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_image_models(CFG, "scratch", [("teacher", bad)])
    with pytest.raises(ConfigError, match="teacher.model.vision: a cached teacher"):
        check_image_models(DataConfig(), "cache", [("teacher", model)])


def test_experiment_config_loads():
    cfg = load_config("experiments/digits.yaml")
    assert cfg.data.source == "digits"
    assert all(m.vision is not None for m in [model for _, model in distill.resolve(cfg).models()])
