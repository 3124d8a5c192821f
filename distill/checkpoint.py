"""orbax checkpoints of a run: the whole `TrainState` plus JSON metadata (data position, step).

One `CheckpointManager` directory (`RUN_DIR/checkpoints`, see `distill.rundir`) with a folder per
kept step, each holding two items: `state` (the state's arrays) and `meta` (JSON). Saves are
asynchronous (orbax commits a step only when all of it is written); restore reads straight into
the abstract target's structure, dtypes and shardings. This module is the only one that knows
orbax's layout: the trainer writes and resumes through `Checkpoints`, everything else reads
through `read_only`, `restore_tree`, `restore_state`, `restore_subtree` and `saved_shapes`.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from distill.errors import ConfigError


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, permissions); earlier ones are intact."""


class Checkpoints:
    def __init__(self, run_dir: Path, *, keep: int):
        self.directory = (Path(run_dir) / "checkpoints").absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._writing: int | None = None  # the step whose asynchronous save may still be running
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
        except Exception as error:  # the previous save's error surfaces here too
            failed = previous if previous is not None and previous not in committed_steps(self.directory) else step
            raise self._write_error(failed, error) from error

    def _write_error(self, step: int, error: Exception) -> CheckpointWriteError:
        """The error for a failed save at `step`, after removing its partial (temporary) files."""
        self._failed = True
        for partial in self.directory.glob(f"{step}.*tmp*"):
            shutil.rmtree(partial, ignore_errors=True)
        intact = [s for s in committed_steps(self.directory) if s != step]
        kept = (f"the previous checkpoint (step {intact[-1]}) is intact and a rerun resumes from it" if intact
                else "no earlier checkpoint exists, so a rerun starts from step 0")
        reason = str(error).strip().splitlines()[-1][:500] if str(error).strip() else ""
        return CheckpointWriteError(f"the checkpoint at step {step} could not be written ({type(error).__name__}: "
                                    f"{reason}) under {self.directory}; {kept}. Free disk space (or fix "
                                    "permissions) and run the same command")

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """The state at `step`, shaped (and sharded) like `abstract_state`, and its metadata."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
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
            except Exception as error:  # orbax/tensorstore raise many types for a damaged checkpoint
                fallback = f"resuming from step {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint"
                print(f"warning: checkpoint {self.directory / str(step)} is unreadable "
                      f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); {fallback}", file=sys.stderr)
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
    return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))


def _state_metadata(step_dir: Path):
    """The `state` item's tree of array metadata (shape, dtype) at a step, or None when it does not read."""
    try:
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
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"{where}: the run has no checkpoint yet")
        yield manager, step


def restore_tree(directory: Path, step: int | None, where: str) -> tuple[int, dict]:
    """(step, the saved state as nested dicts of numpy arrays) of the latest (or given) checkpoint."""
    with read_only(directory, step, where) as (manager, step):
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return step, restored.state


def restore_state(directory: Path, target, step: int | None, where: str):
    """(the saved state read into `target`'s structure, dtypes and shardings, its step)."""
    with read_only(directory, step, where) as (manager, step):
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
    return state, step


def restore_subtree(manager, step: int, path: tuple[str, ...], target: dict) -> dict:
    """The arrays under `path` of the saved state (e.g. ("teacher", "params")) and nothing else,
    read into `target` (a pure dict of `jax.ShapeDtypeStruct`s with shardings): each array lands
    in its shards on their devices, in the target's dtype. Returns a pure dict of arrays."""
    item = jax.tree.map(lambda leaf: {"value": leaf}, target)
    for key in reversed(path):
        item = {key: item}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))).state
    for key in path:
        restored = restored[key]
    return strip_value_keys(restored)


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
