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
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import losses
from distill.data.iterator import shard_rows
from distill.errors import ConfigError

FORMAT = 1
FIELDS = ("indices", "log_probs", "label_log_prob", "tail_mass", "tokens", "mask")
BATCH_FIELDS = {"indices": "teacher_indices", "log_probs": "teacher_log_probs",
                "label_log_prob": "teacher_label_log_prob"}
"""Cache arrays a training or evaluation batch carries, under these batch keys."""
SAVE_EVERY_SECONDS = 30.0


def index_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32)


def _identity(cfg, k: int, eval_batches: int) -> dict:
    """What makes two caches the same: a write into a directory holding another one is refused."""
    resolved = cfg.to_dict()
    return {"format": FORMAT, "k": k, "teacher": resolved["teacher"], "teacher_model": cfg.teacher_model().to_dict(),
            "data": resolved["data"], "seed": cfg.train.seed, "steps": cfg.train.steps,
            "batch_size": cfg.data.batch_size, "seq_len": cfg.data.seq_len, "eval_batches": eval_batches}


def _write_json(path: Path, value: dict) -> None:
    """Atomically: a crash leaves the previous meta.json, never half of one."""
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(value, indent=2))
    os.replace(partial, path)


def _create(directory: Path, split: str, count: int, cfg, k: int) -> None:
    """The split's arrays, zero-filled, at their final shapes."""
    rows, seq = cfg.data.batch_size, cfg.data.seq_len
    shapes = {"indices": ((count, rows, seq, k), index_dtype(cfg.teacher_model().vocab_size)),
              "log_probs": ((count, rows, seq, k), np.float32), "label_log_prob": ((count, rows, seq), np.float32),
              "tail_mass": ((count, rows, seq), np.float32), "tokens": ((count, rows, seq), np.int32),
              "mask": ((count, rows, seq), np.uint8)}
    for name, (shape, dtype) in shapes.items():
        np.lib.format.open_memmap(directory / f"{split}.{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()


def _load(directory: Path, split: str, mode: str) -> dict[str, np.memmap]:
    """The split's arrays as memory maps (`r`: read-only, `r+`: to write into)."""
    return {name: np.load(directory / f"{split}.{name}.npy", mmap_mode=mode) for name in FIELDS}


def _entries_fn(cfg, k: int):
    """The jitted `(params, batch) -> top-k entries` of the run's teacher, on the run's mesh."""
    from flax import nnx

    from distill.model.sharding import ShardingContext
    from distill.parallel import make_mesh, param_shardings
    from distill.step import forward
    from teacher.sources import load_teacher

    model = load_teacher(cfg.teacher.source, cfg.teacher.path, cfg.teacher_model(), cfg.train.seed)
    graph, params = nnx.split(model, nnx.Param)
    context = ShardingContext(make_mesh(cfg.mesh), cfg.teacher_rules())
    params = jax.device_put(params, param_shardings(params, context.rules, context.mesh, "teacher"))

    @jax.jit
    def entries(params, batch):
        logits = forward(graph, params, batch, context).logits.astype(jnp.float32)
        sparse = losses.top_k_teacher(logits, k)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        label = jnp.take_along_axis(logits, batch["labels"][..., None], axis=-1)[..., 0] - log_z
        tail = jnp.clip(1.0 - jnp.sum(jnp.exp(sparse.log_probs), axis=-1), 0.0, 1.0)
        return {"indices": sparse.indices, "log_probs": sparse.log_probs, "label_log_prob": label, "tail_mass": tail}

    return lambda batch: entries(params, batch)


def write_cache(cfg, out: str | Path, k: int, *, progress: bool = True) -> dict:
    """Run the frozen teacher of `cfg` over the run's training batches (`train.steps` of them) and
    its validation batches (`train.eval_batches`), keeping the top `k` entries of every token.

    A student run of the same data section, seed and batch geometry reads the cache with
    `teacher.source: cache, teacher.path: OUT`. Returns meta.json's contents.
    """
    from distill.data import build_data
    from distill.progress import Progress

    if cfg.teacher.source not in ("run", "hf"):
        raise ConfigError(f"teacher.source={cfg.teacher.source!r}: a cache is written from a trained teacher; set "
                          "teacher.source to run or hf and teacher.path to its directory")
    vocab = cfg.teacher_model().vocab_size
    if not 1 <= k <= vocab:
        raise ConfigError(f"--k {k}: must be in [1, {vocab}] (the teacher's vocabulary)")
    if jax.process_count() > 1:
        raise ConfigError("distill cache runs in one process (on all its devices); start it without "
                          "mesh.distributed")
    data = build_data(cfg.data, seed=cfg.train.seed)
    validation = data.validation_batches(cfg.train.eval_batches or None)
    out = Path(out)
    identity = _identity(cfg, k, len(validation))
    meta_file = out / "meta.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        changed = sorted(key for key in identity if meta.get(key) != identity[key])
        if changed:
            raise ConfigError(f"--out {str(out)!r} holds a cache of another configuration (differs in: "
                              f"{', '.join(changed)}); choose another directory")
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {str(out)!r} exists and is not a teacher cache; choose another directory")
    else:
        out.mkdir(parents=True, exist_ok=True)
        meta = {**identity, "written": {"train": 0, "eval": 0}, "complete": False, "write_seconds": 0.0}
        for split, count in (("train", cfg.train.steps), ("eval", len(validation))):
            _create(out, split, count, cfg, k)
        _write_json(meta_file, meta)
    if meta["complete"]:
        return meta
    arrays = {split: _load(out, split, "r+") for split in ("train", "eval")}
    entries = _entries_fn(cfg, k)
    total = cfg.train.steps + len(validation)
    done = meta["written"]["train"] + meta["written"]["eval"]
    bar = Progress(total=total, start=done, enabled=progress)
    started = last_save = time.time()
    written_before = meta["write_seconds"]

    def save(split: str, count: int) -> None:
        for array in arrays[split].values():
            array.flush()
        meta["written"][split] = count
        meta["write_seconds"] = written_before + time.time() - started
        _write_json(meta_file, meta)

    iterator = data.train_iterator()
    iterator.restore({"epoch": meta["written"]["train"] // iterator.steps_per_epoch,
                      "index": meta["written"]["train"] % iterator.steps_per_epoch})  # past the cached batches
    batches = [("train", i, None) for i in range(meta["written"]["train"], cfg.train.steps)]
    batches += [("eval", i, validation[i]) for i in range(meta["written"]["eval"], len(validation))]
    for split, i, batch in batches:
        batch = next(iterator) if batch is None else batch
        for name, value in jax.device_get(entries(batch)).items():
            arrays[split][name][i] = value
        arrays[split]["tokens"][i] = batch["tokens"]
        arrays[split]["mask"][i] = batch["mask"] > 0
        done += 1
        last = i + 1 == (cfg.train.steps if split == "train" else len(validation))
        if last or time.time() - last_save > SAVE_EVERY_SECONDS:
            save(split, i + 1)
            last_save = time.time()
        if done % 10 == 0 or done == total:
            elapsed = time.time() - started
            bar.update(done, {"perf/tokens_per_second": (done - (total - len(batches))) * batch["tokens"].size
                              / max(elapsed, 1e-9)})
    bar.close()
    meta["complete"] = True
    meta["stats"] = cache_stats(arrays)
    save("eval", len(validation))
    return meta


def cache_stats(arrays: dict[str, dict[str, np.ndarray]]) -> dict:
    """Per split, over real tokens: the mean tail mass (the teacher's probability outside the top-k)
    and the teacher's cross-entropy in nats."""
    stats = {}
    for split, fields in arrays.items():
        real = np.asarray(fields["mask"]) > 0
        if real.any():
            stats[split] = {"tail_mass_mean": float(np.asarray(fields["tail_mass"])[real].mean()),
                            "teacher_ce_nats": float(-np.asarray(fields["label_log_prob"])[real].mean())}
    return stats


class TeacherCache:
    """A complete cache, opened read-only: the entries of a step's (or validation batch's) rows."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = read_meta(path)
        if self.meta.get("format") != FORMAT:
            raise ConfigError(f"teacher.path={str(path)!r}: cache format {self.meta.get('format')}, this version "
                              f"reads {FORMAT}; write it again with `distill cache`")
        if not self.meta["complete"]:
            written = self.meta["written"]
            raise ConfigError(f"teacher.path={str(path)!r}: the cache is incomplete ({written['train']} of "
                              f"{self.meta['steps']} steps, {written['eval']} of {self.meta['eval_batches']} "
                              "validation batches); run the same `distill cache` command again to finish it")
        self.k = int(self.meta["k"])
        self._arrays = {split: _load(self.path, split, "r") for split in ("train", "eval")}

    def check_run(self, cfg) -> None:
        """Refuse a run whose batches are not the cache's: other data section, seed, geometry, or more steps."""
        data = cfg.to_dict()["data"]  # batch size and sequence length included
        changed = [f"data.{key}" for key in sorted(set(data) | set(self.meta["data"]))
                   if self.meta["data"].get(key) != data.get(key)]
        changed += ["train.seed"] if self.meta["seed"] != cfg.train.seed else []
        if changed:
            raise ConfigError(f"teacher.path={str(self.path)!r}: the cache holds other batches than this run reads "
                              f"(differs in: {', '.join(changed)}); use the cache's values (its meta.json) or "
                              "write a cache for this run with `distill cache`")
        if cfg.train.steps > self.meta["steps"]:
            raise ConfigError(f"train.steps={cfg.train.steps}: the cache holds {self.meta['steps']} steps; "
                              "train at most that long, or write a longer cache")
        for i in range(len(cfg.students)):
            k = cfg.student_loss(i).teacher_top_k
            if k is not None and k > self.k:
                raise ConfigError(f"students[{i}].loss.teacher_top_k={k}: the cache holds the top {self.k}; "
                                  f"use at most {self.k}, or write a cache with a larger --k")

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
