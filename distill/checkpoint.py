"""orbax checkpoints of a run: the whole `TrainState` plus JSON metadata (data position, step).

One `CheckpointManager` directory (`RUN_DIR/checkpoints`, see `distill.rundir`) with a folder per
kept step, each holding two items: `state` (the state's arrays) and `meta` (JSON). Saves are
asynchronous (orbax commits a step only when all of it is written); restore reads straight into
the abstract target's structure, dtypes and shardings. This module is the only one that knows
orbax's layout: the trainer writes and resumes through `Checkpoints`, everything else reads
through `read_only`, `restore_tree`, `restore_state`, `restore_subtree` and `saved_shapes`.

Integrity: `meta` holds a checksum of every array of the state (`checksums`), taken from the
arrays being saved and committed by orbax together with them; every restore recomputes them from
what was read back and refuses a checkpoint whose arrays differ, or hold non-finite values
(`CorruptCheckpoint`). orbax's own log messages go to `RUN_DIR/orbax.log` (`library_log`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import shutil
import sys
import warnings
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax

from distill.errors import ConfigError


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, permissions); earlier ones are intact."""


class CorruptCheckpoint(RuntimeError):
    """A checkpoint read back whole, but its arrays differ from the checksums taken when it was
    saved, or hold non-finite values: its files were changed after the save (bit rot, a bad disk,
    an overwrite)."""


LIBRARY_LOGGERS = ("absl", "asyncio")
"""Loggers of orbax (absl) and of its asynchronous saves (asyncio) that `library_log` sends to a file."""


class _QuietFileHandler(logging.FileHandler):
    """A log file that stays silent when it cannot be written (the full disk it would report)."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            super().close()


@contextlib.contextmanager
def library_log(path: Path):
    """Send orbax's own log messages (absl's, and asyncio's from its background saves) and the
    errors its I/O threads print to the file `path` instead of the terminal, for the duration: a
    run's terminal shows distill's messages, and RUN_DIR/orbax.log keeps the library's tracebacks
    for diagnosis."""
    handler = _QuietFileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    previous = [(logger.propagate, logger.level) for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.WARNING)
    # tensorstore's I/O threads report a callback's error (e.g. onto the closed event loop of a failed save)
    # through these hooks; while the `with` body runs, nothing of distill's reaches them
    hooks = sys.excepthook, sys.unraisablehook
    sys.excepthook = lambda kind, value, traceback: _log_callback_error(value)
    sys.unraisablehook = lambda unraisable: _log_callback_error(unraisable.exc_value)
    try:
        yield
    finally:
        gc.collect()  # a failed save's asyncio tasks report their exceptions when collected: here, into the file
        sys.excepthook, sys.unraisablehook = hooks
        for logger, (propagate, level) in zip(loggers, previous, strict=True):
            logger.removeHandler(handler)
            logger.propagate, logger.level = propagate, level
        handler.close()


def _log_callback_error(error: BaseException | None) -> None:
    logging.getLogger("asyncio").error("error in a background callback", exc_info=error)


@contextlib.contextmanager
def _quiet_orbax():
    """orbax's warnings on a read-only manager ('read_only=True, setting create=False', ...) off."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class Checkpoints:
    def __init__(self, run_dir: Path, *, keep: int):
        self.directory = (Path(run_dir) / "checkpoints").absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._writing: int | None = None  # the step whose asynchronous save may still be running
        self._pending = False  # a save was started and has not been seen to finish
        self._failed = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Start saving `state` (a pytree of arrays) and `meta` (JSON) at `step`; returns at once.

        Raises `CheckpointWriteError` when this save, or the previous asynchronous one, fails.
        """
        previous, self._writing = self._writing, step
        try:
            self.manager.save(step, args=_save_args(state, meta), force=True)
            self._pending = True
        except Exception as error:  # the previous save's error surfaces here too
            failed = previous if previous is not None and previous not in committed_steps(self.directory) else step
            raise self._write_error(failed, error) from error

    def _write_error(self, step: int, error: Exception) -> CheckpointWriteError:
        """The error for a failed save at `step`, after removing its partial (temporary) files."""
        self._failed = True
        # the failed save's abandoned write coroutines are collected at exit, each warning it was never awaited
        warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
        for partial in self.directory.glob(f"{step}.*tmp*"):
            shutil.rmtree(partial, ignore_errors=True)
        intact = [s for s in committed_steps(self.directory) if s != step]
        kept = (f"the previous checkpoint (step {intact[-1]}) is intact and a rerun resumes from it" if intact
                else "no earlier checkpoint exists, so a rerun starts from step 0")
        reason = str(error).strip().splitlines()[-1][:500] if str(error).strip() else ""
        return CheckpointWriteError(f"the checkpoint at step {step} could not be written ({type(error).__name__}: "
                                    f"{reason}) under {self.directory}; {kept}. Free disk space (or fix "
                                    "permissions) and run the same command")

    def raise_if_failed(self) -> None:
        """`CheckpointWriteError` as soon as the asynchronous save in flight has failed (without
        waiting for one still running): the loop calls it after every step."""
        if not self._pending or self._failed or self.manager.is_saving_in_progress():
            return
        self._pending = False
        self.wait()  # finished: returns at once, or raises its error

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """The state at `step`, shaped (and sharded) like `abstract_state`, and its metadata;
        `CorruptCheckpoint` when its arrays differ from their checksums or are not finite."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        verify(restored.state, restored.meta.get("checksums"))
        return restored.state, restored.meta

    def restore_latest(self, abstract_state) -> tuple[object, dict] | None:
        """The newest checkpoint that reads back whole, or None when there is none. An unreadable
        one (a truncated or deleted file) is reported on stderr and the one before it is tried; a
        readable one of other shapes (the config's models changed) is a ConfigError naming them."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            check_shapes(self.directory / str(step), abstract_state)
            try:
                restored = self.restore(step, abstract_state)
            except CorruptCheckpoint as error:
                print(f"warning: checkpoint {self.directory / str(step)} is corrupted ({error}); "
                      f"{_fallback(steps, i)}", file=sys.stderr)
                continue
            except Exception as error:  # orbax/tensorstore raise many types for a damaged checkpoint
                print(f"warning: checkpoint {self.directory / str(step)} is unreadable "
                      f"({type(error).__name__}: {_first_line(error)[:200]}); {_fallback(steps, i)}", file=sys.stderr)
                continue
            for bad in steps[:i]:  # kept for inspection, out of the manager's way
                (self.directory / str(bad)).rename(self.directory / f"{bad}.unreadable")
            if i:
                self.manager.reload()
            return restored
        if steps:
            raise ConfigError(f"{self.directory}: no checkpoint reads back ({len(steps)} tried); move the directory "
                              "away to start afresh, or choose another run.dir")
        return None

    def wait(self) -> None:
        """Block until the pending save is committed; `CheckpointWriteError` if it failed."""
        if self._failed:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            raise self._write_error(self._writing, error) from error

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if not self._failed:
                self.manager.close()


def _fallback(steps: list[int], i: int) -> str:
    return f"resuming from step {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint"


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0]


# ----------------------------------------------------------------------------- integrity

def array_path(path) -> str:
    """'teacher.params.embed' for a leaf's key path (nnx's 'value' level dropped): the same name for
    an array of a `TrainState`, of the nested dicts orbax restores, and of a restored subtree."""
    names = (getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))) for key in path)
    return ".".join(str(name) for name in names if name != "value")


def _words(x: jax.Array) -> jax.Array:
    """Every element's bits as uint32 words (8-byte types: a trailing axis of two words)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _mix(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: every input bit moves about half the output bits."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _fingerprint(x: jax.Array) -> jax.Array:
    """uint32 [3]: two checksums of `x`'s bits and its count of non-finite values.

    Word w at flat position i adds w * (2i + 1) to the first sum (a change of one word always
    changes it: the factor is odd) and mix(w ^ i * golden) to the second (mixed, so changes to
    several words do not cancel out); sums wrap at 2^32, so the order of addition, and with it the
    array's sharding, does not matter. Computed where the array lives, shard by shard."""
    words = _words(x)
    position, stride = jnp.zeros(words.shape, jnp.uint32), 1
    for axis in reversed(range(words.ndim)):
        position = position + lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    first = jnp.sum(words * (position * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    second = jnp.sum(_mix(words ^ (position * jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
    nonfinite = jnp.sum(~jnp.isfinite(x), dtype=jnp.uint32) if jnp.issubdtype(x.dtype, jnp.inexact) \
        else jnp.uint32(0)
    return jnp.stack([first, second, nonfinite])


_fingerprints = jax.jit(lambda leaves: [_fingerprint(x) for x in leaves])


def fingerprints(tree) -> dict[str, tuple[str, int]]:
    """'teacher.params.embed' -> (its 64-bit checksum as 16 hex digits, its non-finite values), for
    every array of `tree` (jax or numpy arrays)."""
    paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(tree), strict=True) if jax.tree.leaves(tree) else ((), ())
    found = jax.device_get(_fingerprints(list(leaves)))
    return {array_path(path): (f"{int(f[0]):08x}{int(f[1]):08x}", int(f[2])) for path, f in zip(paths, found, strict=True)}


def checksums(tree) -> dict[str, str]:
    """'teacher.params.embed' -> the checksum of every array of `tree` (what `meta` records)."""
    return {path: checksum for path, (checksum, _) in fingerprints(tree).items()}


def verify(tree, expected: dict[str, str] | None, prefix: str = "") -> None:
    """`CorruptCheckpoint` when an array of `tree` (restored) differs from its checksum in `expected`
    (a checkpoint's `meta["checksums"]`, whose names start with `prefix` for a subtree; None: a
    checkpoint written before checksums, whose values alone are checked) or holds non-finite values."""
    found = fingerprints(tree)
    differ = [path for path, (checksum, _) in found.items()
              if expected is not None and expected.get(prefix + path, checksum) != checksum]
    nonfinite = {path: count for path, (_, count) in found.items() if count}
    problems = []
    if differ:
        problems.append(f"{len(differ)} of {len(found)} arrays differ from their checksums taken at save, e.g. "
                        f"{prefix}{differ[0]}")
    if nonfinite:
        first = next(iter(nonfinite))
        problems.append(f"{sum(nonfinite.values())} non-finite values in {len(nonfinite)} arrays, e.g. {prefix}{first}")
    if problems:
        raise CorruptCheckpoint("; ".join(problems))


def corrupt_error(where: str, step: int, error: CorruptCheckpoint) -> ConfigError:
    """The refusal of a corrupted checkpoint read outside training (eval, export, a teacher)."""
    return ConfigError(f"{where}: its checkpoint at step {step} is corrupted ({error}) and is not used; rerun that "
                       "run's `distill run` command: it sets the checkpoint aside and trains again from the newest "
                       "intact one")


def check_shapes(step_dir: Path, abstract_state) -> None:
    """ConfigError when the checkpoint in `step_dir` holds arrays of other shapes or dtypes than
    `abstract_state` (the config's models or optimizers changed). A checkpoint whose metadata does
    not read is left to the restore, which treats it as damaged."""
    metadata = _state_metadata(step_dir)
    if metadata is None:  # unreadable: a damaged checkpoint
        return
    saved = Counter(_signature(x) for x in jax.tree.leaves(metadata))
    needed = Counter(_signature(x) for x in jax.tree.leaves(abstract_state))
    if saved == needed or not saved:  # no arrays at all: truncated metadata, a damaged checkpoint
        return
    only_saved, only_needed = saved - needed, needed - saved
    raise ConfigError(f"checkpoint {step_dir} holds another state than this config's models and optimizers "
                      f"({sum(only_saved.values())} saved arrays have shapes it does not build, e.g. "
                      f"{sorted(only_saved)[:2]}; {sum(only_needed.values())} it needs are missing, e.g. "
                      f"{sorted(only_needed)[:2]}); a resumed run keeps every shape: undo the model or optimizer "
                      "change, or start anew with --force-new or another run.dir")


def committed_steps(directory: Path) -> list[int]:
    """Steps under a checkpoints/ directory that orbax finished (renamed from their temporary name)."""
    directory = Path(directory)
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def _signature(array) -> tuple[tuple[int, ...], str]:
    return tuple(array.shape), str(array.dtype)


def restore_target(shapes, shardings):
    """What a restore reads into: `shapes`' shapes and dtypes (`jax.eval_shape` structs) placed as
    `shardings` (a tree of the same structure) says."""
    return jax.tree.map(lambda a, sharding: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), shapes,
                        shardings)


def _save_args(state, meta: dict):
    """The state and its metadata, with the state's checksums (computed before the save returns,
    from the very arrays it writes)."""
    meta = {**meta, "checksums": checksums(state)}
    return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))


def _state_metadata(step_dir: Path):
    """The `state` item's tree of array metadata (shape, dtype) at a step, or None when it does not read."""
    try:
        with _quiet_orbax():  # its warning on every read: 'Metadata file does not exist' (the step's, not the item's)
            metadata = ocp.StandardCheckpointer().metadata(Path(step_dir).absolute() / "state")
    except Exception:  # noqa: BLE001 - any unreadable metadata: a damaged checkpoint
        return None
    return getattr(metadata, "item_metadata", metadata)


@contextlib.contextmanager
def read_only(directory: Path, step: int | None, where: str):
    """(a read-only manager of the checkpoints in `directory`, the latest step or `step`); a
    ConfigError that starts with `where` when there is none."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise ConfigError(f"{where}: the run has no {directory.name}/ directory")
    with _quiet_orbax(), ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
            read_only=True, save_interval_steps=0, create=False)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"{where}: the run has no checkpoint yet")
        yield manager, step


def restore_tree(directory: Path, step: int | None, where: str) -> tuple[int, dict]:
    """(step, the saved state as nested dicts of numpy arrays) of the latest (or given) checkpoint;
    a ConfigError for a corrupted one."""
    with read_only(directory, step, where) as (manager, step):
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                                 meta=ocp.args.JsonRestore()))
    _verify_read(restored.state, restored.meta, where, step)
    return step, restored.state


def restore_state(directory: Path, target, step: int | None, where: str):
    """(the saved state read into `target`'s structure, dtypes and shardings, its step); a
    ConfigError for a corrupted checkpoint."""
    with read_only(directory, step, where) as (manager, step):
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                 meta=ocp.args.JsonRestore()))
    _verify_read(restored.state, restored.meta, where, step)
    return restored.state, step


def _verify_read(tree, meta: dict, where: str, step: int, prefix: str = "") -> None:
    try:
        verify(tree, meta.get("checksums"), prefix)
    except CorruptCheckpoint as error:
        raise corrupt_error(where, step, error) from None


def restore_subtree(manager, step: int, path: tuple[str, ...], target: dict, where: str) -> dict:
    """The arrays under `path` of the saved state (e.g. ("teacher", "params")) and nothing else,
    read into `target` (a pure dict of `jax.ShapeDtypeStruct`s with shardings): each array lands
    in its shards on their devices, read in its saved dtype (to check it against its checksum, a
    ConfigError starting with `where` if it differs) and then cast to the target's. Returns a pure
    dict of arrays."""
    as_saved = _saved_dtypes(Path(manager.directory) / str(step), path) or {}
    item = jax.tree_util.tree_map_with_path(lambda p, leaf: {"value": jax.ShapeDtypeStruct(
        leaf.shape, as_saved.get(array_path(p), leaf.dtype), sharding=leaf.sharding)}, target)
    for key in reversed(path):
        item = {key: item}
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                     partial_restore=True), meta=ocp.args.JsonRestore()))
    tree = restored.state
    for key in path:
        tree = tree[key]
    tree = strip_value_keys(tree)
    _verify_read(tree, restored.meta, where, step, prefix="".join(f"{key}." for key in path))
    return jax.tree.map(lambda x, leaf: x if x.dtype == leaf.dtype else x.astype(leaf.dtype), tree, target)


def _saved_dtypes(step_dir: Path, path: tuple[str, ...]) -> dict[str, np.dtype] | None:
    """'a.b.c' -> saved dtype of every array under `path` of the state at a step; None when the
    metadata does not read."""
    metadata = _state_metadata(step_dir)
    if metadata is None:
        return None
    try:
        for key in path:
            metadata = metadata[key]
    except (KeyError, TypeError):
        return None
    return {array_path(p): np.dtype(leaf.dtype) for p, leaf in jax.tree_util.tree_leaves_with_path(metadata)}


def saved_shapes(directory: Path, step: int, path: tuple[str, ...]) -> dict[str, tuple[int, ...]] | None:
    """'a.b.c' -> shape of every array under `path` of the saved state at `step`, from its metadata
    alone; None when the metadata does not read (a damaged checkpoint: the restore reports it)."""
    metadata = _state_metadata(Path(directory) / str(step))
    if metadata is None:
        return None
    for key in path:
        metadata = metadata[key]
    return shapes_by_path(metadata)


def shapes_by_path(tree) -> dict[str, tuple[int, ...]]:
    """'groups.0.layers.1.attention.q' -> shape, for a nested dict of arrays (the 'value' level dropped)."""
    return {".".join(str(getattr(key, "key", key)) for key in path if getattr(key, "key", None) != "value"):
            tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def strip_value_keys(tree):
    """orbax restores nnx.State leaves as {'value': array}; pure dicts hold the arrays themselves
    (as JAX arrays: a model holding numpy arrays cannot be called outside jit)."""
    if isinstance(tree, dict):
        if set(tree) == {"value"} and not isinstance(tree["value"], dict):
            return jnp.asarray(tree["value"])
        return {k: strip_value_keys(v) for k, v in tree.items()}
    return tree


def write_state(directory: Path, step: int, state, meta: dict) -> None:
    """Write one checkpoint synchronously (e.g. a converted HF teacher as a run's step 0)."""
    with ocp.CheckpointManager(Path(directory).absolute()) as manager:
        manager.save(step, args=_save_args(state, meta))
        manager.wait_until_finished()
