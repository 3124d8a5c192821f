"""`distill cache`: write a frozen teacher's top-k log-probabilities over a run's batches (the
format is `teacher.cache`'s)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import losses
from distill.compile_cache import use_compilation_cache
from distill.config import Config
from distill.data import build_data
from distill.errors import ConfigError
from distill.experiment import Experiment, resolve
from distill.model.sharding import ShardingContext
from distill.parallel import make_mesh, param_shardings
from distill.progress import Progress
from distill.step import forward
from teacher.cache import FORMAT, index_dtype, load_arrays
from teacher.sources import load_teacher

SAVE_EVERY_SECONDS = 30.0


def _identity(exp: Experiment, k: int, eval_batches: int) -> dict:
    """What makes two caches the same: a write into a directory holding another one is refused."""
    cfg = exp.config
    resolved = cfg.to_dict()
    return {"format": FORMAT, "k": k, "teacher": resolved["teacher"], "teacher_model": exp.teacher.model.to_dict(),
            "data": resolved["data"], "seed": cfg.train.seed, "steps": cfg.train.steps,
            "batch_size": cfg.data.batch_size, "seq_len": cfg.data.seq_len, "eval_batches": eval_batches}


def write_json_atomically(path: Path, value: dict) -> None:
    """Atomically: a crash leaves the previous meta.json, never half of one."""
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(value, indent=2))
    os.replace(partial, path)


def _create(directory: Path, split: str, count: int, exp: Experiment, k: int) -> None:
    """The split's arrays, zero-filled, at their final shapes."""
    rows, seq = exp.config.data.batch_size, exp.config.data.seq_len
    shapes = {"indices": ((count, rows, seq, k), index_dtype(exp.teacher.model.vocab_size)),
              "log_probs": ((count, rows, seq, k), np.float32), "label_log_prob": ((count, rows, seq), np.float32),
              "tail_mass": ((count, rows, seq), np.float32), "tokens": ((count, rows, seq), np.int32),
              "mask": ((count, rows, seq), np.uint8)}
    for name, (shape, dtype) in shapes.items():
        np.lib.format.open_memmap(directory / f"{split}.{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()


def _entries_fn(exp: Experiment, k: int):
    """The jitted `(params, batch) -> top-k entries` of the run's teacher, on the run's mesh."""
    model = load_teacher(exp.teacher.config, exp.teacher.model, exp.config.train.seed)
    graph, params = nnx.split(model, nnx.Param)
    context = ShardingContext(make_mesh(exp.config.mesh), exp.teacher.rules)
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


def write_cache(cfg: Config, out: str | Path, k: int, *, progress: bool = True) -> dict:
    """Run the frozen teacher of `cfg` over the run's training batches (`train.steps` of them) and
    its validation batches (`train.eval_batches`), keeping the top `k` entries of every token.

    A student run of the same data section, seed and batch geometry reads the cache with
    `teacher.source: cache, teacher.path: OUT`. Returns meta.json's contents.
    """
    if cfg.teacher.source not in ("run", "hf"):
        raise ConfigError(f"teacher.source={cfg.teacher.source!r}: a cache is written from a trained teacher; set "
                          "teacher.source to run or hf and teacher.path to its directory")
    exp = resolve(cfg)
    use_compilation_cache(cfg.run.compilation_cache)
    vocab = exp.teacher.model.vocab_size
    if not 1 <= k <= vocab:
        raise ConfigError(f"--k {k}: must be in [1, {vocab}] (the teacher's vocabulary)")
    if jax.process_count() > 1:
        raise ConfigError("distill cache runs in one process (on all its devices); start it without "
                          "mesh.distributed")
    data = build_data(cfg.data, seed=cfg.train.seed)
    validation = data.validation_batches(cfg.train.eval_batches or None)
    out = Path(out)
    identity = _identity(exp, k, len(validation))
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
            _create(out, split, count, exp, k)
        write_json_atomically(meta_file, meta)
    if meta["complete"]:
        return meta
    arrays = {split: load_arrays(out, split, "r+") for split in ("train", "eval")}
    entries = _entries_fn(exp, k)
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
        write_json_atomically(meta_file, meta)

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
