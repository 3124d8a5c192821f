"""orbax checkpoints of a run: the whole `TrainState` plus JSON metadata (data position, step).

One `CheckpointManager` directory, `RUN_DIR/checkpoints/<step>/` per kept step. Saves are
asynchronous (orbax commits a step only when all of it is written); restore reads straight into
the abstract target's structure, dtypes and shardings.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from distill.model.config import ConfigError


class Checkpoints:
    def __init__(self, run_dir: Path, *, keep: int):
        self.directory = (Path(run_dir) / "checkpoints").absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Start saving `state` (a pytree of arrays) and `meta` (JSON) at `step`; returns at once."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """The state at `step`, shaped (and sharded) like `abstract_state`, and its metadata."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def restore_latest(self, abstract_state) -> tuple[object, dict] | None:
        """The newest checkpoint that reads back whole, or None when there is none. An unreadable
        one (a truncated or deleted file) is reported on stderr and the one before it is tried."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
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
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state):
    """Shape/dtype/sharding structs of a live state: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state)
