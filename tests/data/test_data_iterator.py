"""The training iterator: deterministic by seed, exactly restorable, sharded by contiguous rows."""

import json

import numpy as np
import pytest

from distill.data import DataConfig, DataError, build_data, shard_rows


def _config(tmp_path, **overrides):
    """A token corpus whose ids are their own offsets (ids distinct), 10 windows of seq_len 8."""
    path = tmp_path / "ids.npy"
    if not path.exists():
        np.save(path, np.arange(8 * 10 + 1, dtype=np.int32))
    return DataConfig(**{"source": str(path), "seq_len": 8, "batch_size": 4, "validation_fraction": 0,
                         "vocab_size": 1000, **overrides})


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return len(a) == len(b) and all(all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_same_seed_same_batches_and_different_seed_different_batches(tmp_path):
    cfg = _config(tmp_path)
    one = _take(build_data(cfg, seed=7).train_iterator(), 12)
    two = _take(build_data(cfg, seed=7).train_iterator(), 12)
    other = _take(build_data(cfg, seed=8).train_iterator(), 12)
    assert _equal(one, two)
    assert not _equal(one, other)


def test_each_epoch_is_a_fresh_permutation_of_distinct_windows(tmp_path):
    data = build_data(_config(tmp_path), seed=0)
    it = data.train_iterator()
    assert data.steps_per_epoch == 2  # 10 windows, 4 rows: 2 windows are skipped per epoch
    epochs = []
    for _ in range(3):
        firsts = np.concatenate([b["tokens"][:, 0] for b in _take(it, data.steps_per_epoch)])
        assert len(set(firsts.tolist())) == len(firsts)  # no window twice within an epoch
        assert set(firsts.tolist()) <= set(range(0, 80, 8))
        epochs.append(firsts.tolist())
    assert it.state() == {"epoch": 2, "index": 2}
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]


@pytest.mark.parametrize("steps", [0, 1, 2, 3, 5])  # start, mid-epoch, at and across epoch boundaries
def test_restore_gives_the_batches_the_original_would_have_given(tmp_path, steps):
    cfg = _config(tmp_path)
    original = build_data(cfg, seed=11).train_iterator()
    _take(original, steps)
    state = json.loads(json.dumps(original.state()))
    assert all(type(v) is int for v in state.values())
    restored = build_data(cfg, seed=11).train_iterator()
    _take(restored, 1)  # moved elsewhere first: restore must set the position, not add to it
    restored.restore(state)
    assert _equal(_take(restored, 7), _take(original, 7))


def test_restore_rejects_a_state_it_did_not_make(tmp_path):
    it = build_data(_config(tmp_path), seed=0).train_iterator()
    with pytest.raises(DataError, match="expected"):
        it.restore({"step": 3})
    with pytest.raises(DataError, match="out of range"):
        it.restore({"epoch": 0, "index": 99})


@pytest.mark.parametrize("shard_count", [2, 4])
def test_shards_concatenated_in_order_equal_the_global_batch(tmp_path, shard_count):
    cfg = _config(tmp_path)
    data = build_data(cfg, seed=5)
    whole = _take(data.train_iterator(), 5)
    shards = [_take(data.train_iterator(shard_index=h, shard_count=shard_count), 5) for h in range(shard_count)]
    for step, batch in enumerate(whole):
        for key in batch:
            assert shards[0][step][key].shape == (4 // shard_count, 8)
            np.testing.assert_array_equal(np.concatenate([s[step][key] for s in shards]), batch[key])
    # validation batches shard the same way
    vdata = build_data(_config(tmp_path, validation_fraction=0.3), seed=5)
    vwhole = vdata.validation_batches()
    assert vwhole
    for h in range(shard_count):
        part = vdata.validation_batches(shard_index=h, shard_count=shard_count)
        assert len(part) == len(vwhole)
        for b, batch in zip(part, vwhole):
            np.testing.assert_array_equal(b["tokens"], batch["tokens"][shard_rows(4, h, shard_count)])


def test_shard_slicing_logic():
    assert [shard_rows(8, h, 4) for h in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert shard_rows(8, 0, 1) == slice(0, 8)
    with pytest.raises(DataError, match=r"data\.batch_size=6: not divisible by shard_count=4"):
        shard_rows(6, 0, 4)
    with pytest.raises(DataError, match="shard_index=2"):
        shard_rows(8, 2, 2)
    with pytest.raises(DataError, match="shard_count=0"):
        shard_rows(8, 0, 0)


def test_validation_batches_cover_the_split_once_in_a_fixed_shape(tmp_path):
    data = build_data(_config(tmp_path, validation_fraction=0.3), seed=0)
    assert data.stats["split"] == "tail"
    batches = data.validation_batches()
    assert _equal(batches, data.validation_batches())
    assert len(data.validation_batches(max_batches=1)) == 1
    assert all(b["tokens"].shape == (4, 8) for b in batches)
    labels = np.concatenate([b["labels"][b["mask"] > 0] for b in batches])
    np.testing.assert_array_equal(labels, np.arange(len(data.train) + 1, 81))  # each held-out label once
    assert build_data(_config(tmp_path), seed=0).validation_batches() == []
