"""The checkpoints' per-array checksums (`distill.checkpoint.checksums`) against an independent
numpy reference, and what they catch."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from distill.checkpoint import CorruptCheckpoint, checksums, verify

M32 = (1 << 32) - 1


def reference(array: np.ndarray) -> str:
    """The two sums of docs/reliability.md in Python integers, mod 2^32, over row-major positions."""
    if array.dtype == np.bool_:
        words = array.astype(np.uint64).reshape(-1)
    else:
        words = array.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[array.dtype.itemsize]).astype(np.uint64).reshape(-1)
    first = second = 0
    for i, w in enumerate(int(w) for w in words):
        first = (first + w * (2 * i + 1)) & M32
        h = (w ^ (i * 0x9E3779B9)) & M32
        h = ((h ^ (h >> 16)) * 0x85EBCA6B) & M32
        h = ((h ^ (h >> 13)) * 0xC2B2AE35) & M32
        second = (second + (h ^ (h >> 16))) & M32
    return f"{first:08x}{second:08x}"


ARRAYS = {
    "float32": np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32),
    "bfloat16": np.random.default_rng(1).standard_normal((4, 9)).astype(ml_dtypes.bfloat16),
    "int32": np.arange(-20, 40, dtype=np.int32).reshape(6, 10),
    "bool": np.random.default_rng(2).random(33) > 0.5,
    "scalar": np.float32(3.25),
}


@pytest.mark.parametrize("name", list(ARRAYS))
def test_a_checksum_equals_the_numpy_reference(name):
    array = np.asarray(ARRAYS[name])
    assert checksums({"a": {"value": jnp.asarray(array)}}) == {"a": reference(array)}


def test_any_changed_word_changes_the_checksum_and_verify_names_the_array():
    array = ARRAYS["float32"]
    saved = checksums({"w": array, "b": ARRAYS["int32"]})
    rng = np.random.default_rng(3)
    for _ in range(20):
        changed = array.copy().reshape(-1).view(np.uint32)
        changed[rng.integers(changed.size)] ^= np.uint32(1 << int(rng.integers(32)))
        with pytest.raises(CorruptCheckpoint, match=r"1 of 2 arrays differ from their checksums taken at save, e\.g\. w"):
            verify({"w": changed.view(np.float32).reshape(array.shape), "b": ARRAYS["int32"]}, saved)
    verify({"w": array, "b": ARRAYS["int32"]}, saved)  # the same arrays pass


def test_swapped_words_change_the_checksum():
    """A position-blind sum would miss two words swapped; the position weights do not."""
    array = np.array([1.0, 2.0, 3.0], np.float32)
    assert checksums({"w": array}) != checksums({"w": array[[1, 0, 2]]})
