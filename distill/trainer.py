"""`distill run`: set up (or resume) a run, loop over its steps with the hooks of `distill.hooks`,
write its summary and print the final table."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import jax
import numpy as np
import yaml

from distill import rundir
from distill.checkpoint import Checkpoints, CheckpointWriteError, check_shapes, committed_steps
from distill.config import Config
from distill.data import Data, build_data
from distill.experiment import Experiment, resolve
from distill.guards import StopSignals
from distill.hooks import (
    Checkpointing,
    Evaluation,
    FilteredRows,
    Histograms,
    MetricsLog,
    NonFiniteGuard,
    StepEnd,
    WrittenRows,
    after_step,
    validation_sums,
)
from distill.parallel import check_batch_divides, global_batch, initialize_distributed, process_row_block
from distill.progress import Progress
from distill.run_logger import RunLogger
from distill.setup import Placement, jit_eval, jit_step, placed_initial_state, placement
from teacher.cache import TeacherCache, with_entries
from teacher.sources import check_teacher_checkpoint


def run(cfg: Config, *, stop_after: int | None = None, on_changed_config: str = "refuse") -> dict:
    """Run (or resume) one experiment; returns the summary also written to `summary.json`.

    `stop_after`: stop after this many steps of this invocation with a checkpoint (status
    "stopped"), as a preemption would; running again resumes.
    `on_changed_config`: when run.dir holds a run whose config differs from `cfg` (other than in
    placement): "refuse" (the default), "resume" (continue from its latest checkpoint under `cfg`,
    which must build the same shapes; CLI --resume) or "new" (move the old run to a sibling
    `<dir>.replaced-<time>` and start afresh; CLI --force-new).
    """
    started = time.time()
    initialize_distributed(cfg.mesh.distributed)
    exp = resolve(cfg)
    placed = placement(exp)
    check_batch_divides(cfg.data.batch_size, cfg.train.grad_accum, placed.mesh, exp.mesh_rules)
    data = build_data(cfg.data, seed=cfg.train.seed)
    exp.check_tokenizer(data.vocab_size)
    saved = committed_steps(rundir.checkpoints_dir(cfg.run.path))
    if on_changed_config == "resume" and saved:  # before the run directory changes
        check_shapes(rundir.checkpoints_dir(cfg.run.path) / str(saved[-1]), placed.shapes)
    if cfg.teacher.source == "run" and (not saved or on_changed_config == "new"):  # a fresh start reads it:
        check_teacher_checkpoint(cfg.teacher.path, placed.shapes.teacher.params)  # refuse a misfit teacher now
    existing, lock = rundir.prepare(cfg, on_changed_config)  # once the config places on this mesh
    try:
        return _train(Run(exp, placed, data, existing, stop_after, started))
    finally:
        if lock:
            lock.release()


@dataclass(frozen=True)
class Run:
    """One invocation of `distill run`, set up."""

    exp: Experiment
    placed: Placement
    data: Data
    existing: bool  # the run directory holds a run to resume
    stop_after: int | None
    started: float  # wall time of the command's start

    @property
    def cfg(self) -> Config:
        return self.exp.config


class Batches:
    """This process's rows of every training step's batch (with a cached teacher's entries), as
    micro-batches on the host and as global arrays on the mesh."""

    def __init__(self, run: Run, cache: TeacherCache | None):
        placed, accum = run.placed, run.cfg.train.grad_accum
        self.rows = process_row_block(placed.micro_sharding, placed.micro_shape, 1, jax.process_index())
        per_process = self.rows.stop - self.rows.start
        self.shard = (self.rows.start // per_process, placed.micro_shape[1] // per_process)
        self.iterator = run.data.train_iterator(*self.shard)
        self.cache, self.accum, self.placed = cache, accum, placed

    def take(self, step: int) -> tuple[dict[str, np.ndarray], dict[str, jax.Array]]:
        batch = with_entries(self.cache, "train", step, next(self.iterator), self.shard)
        host = {k: v.reshape(self.accum, v.shape[0] // self.accum, *v.shape[1:]) for k, v in batch.items()}
        return host, global_batch(host, self.placed.micro_sharding, self.placed.micro_shape)


def validation_batches(run: Run, cache: TeacherCache | None):
    """A callable giving this process's validation batches as global arrays on the mesh."""
    cfg, placed = run.cfg, run.placed
    shape = (cfg.data.batch_size, cfg.data.seq_len)
    rows = process_row_block(placed.eval_sharding, shape, 0, jax.process_index())
    per_process = rows.stop - rows.start
    shard = (rows.start // per_process, shape[0] // per_process)
    batches = run.data.validation_batches(cfg.train.eval_batches or None, shard_index=shard[0], shard_count=shard[1])
    return lambda: (global_batch(with_entries(cache, "eval", i, batch, shard), placed.eval_sharding, shape)
                    for i, batch in enumerate(batches))


def _train(run: Run) -> dict:
    cfg, placed, exp = run.cfg, run.placed, run.exp
    steps, warmup, writer = cfg.train.steps, exp.teacher_warmup, jax.process_index() == 0
    cache = None if exp.teacher.source.runs else TeacherCache(cfg.teacher.path)
    batches = Batches(run, cache)
    checkpoints = Checkpoints(cfg.run.path, keep=cfg.train.keep_checkpoints)
    restored = checkpoints.restore_latest(placed.abstract_state()) if run.existing else None
    if restored is not None:
        state, meta = restored
        batches.iterator.restore(meta["data"])
        start = int(meta["step"])
    else:  # a resumed run reads its checkpoint; only a fresh one builds (or loads) its models
        state, start = placed_initial_state(exp, placed), 0
    full_step = jit_step(placed, warmup, with_students=True)
    teacher_step = jit_step(placed, warmup, with_students=False) if warmup else None
    logger = RunLogger(cfg.run.path, hparams=hparams(cfg), enabled=writer,
                       resume_step=start if restored is not None else None)
    progress = Progress(total=steps, start=start, enabled=writer)
    if start == 0:
        logger.log_text(0, "config", yaml.safe_dump(cfg.to_dict(), sort_keys=False), preformatted=True)
    signals = StopSignals()

    def stop_reason(done: int) -> str | None:
        """Why the loop stops after step `done` before the last: a signal, or `stop_after` steps run."""
        if done >= steps:
            return None
        if signals.status:
            return signals.status
        return "stopped" if run.stop_after is not None and done - start >= run.stop_after else None

    evaluation = Evaluation(validation_sums(jit_eval(placed), validation_batches(run, cache)), cfg.train.eval_every,
                            logger, progress)
    hooks = [NonFiniteGuard(["teacher"] + [s.name for s in cfg.students], state, cfg.train.log_every,
                            cfg.train.checkpoint_every, cfg.train.on_nonfinite == "stop", checkpoints, progress),
             MetricsLog(logger, progress, cfg.train.log_every, cfg.data.batch_size * cfg.data.seq_len,
                        [FilteredRows(logger, batches.rows, run.data.tokenizer),
                         WrittenRows(logger, {s.name: s.loss.on_policy.prompt_tokens for s in exp.students},
                                     run.data.tokenizer),
                         Histograms(logger)], start),
             evaluation,
             Checkpointing(checkpoints, cfg.train.checkpoint_every, batches.iterator.state, stop_reason)]
    previous = rundir.read_summary(cfg.run.path) if restored is not None else None
    trained_before = (previous or {}).get("train_seconds", 0.0)
    status, loop_started, loop_ended = "completed", time.time(), None  # re-evaluating a finished run is not training
    try:
        with signals:
            for step in range(start, steps):
                host_batch, batch = batches.take(step)
                state, metrics = (teacher_step if step < warmup else full_step)(state, batch)
                end = StepEnd(step + 1, step + 1 == steps, state, metrics, host_batch)
                stop = after_step(hooks, end) or stop_reason(end.done)
                if stop:
                    status = stop
                    if stop in StopSignals.SIGNALS.values():
                        print(f"\ndistill run: {stop} at step {end.done}: checkpoint saved; run the same command to "
                              "resume", file=sys.stderr)
                    break
            loop_ended = time.time()
            if not evaluation.latest and status == "completed":  # a finished run started again: its final state
                evaluation.latest = evaluation.evaluate(state)
            checkpoints.wait()  # a failed final save is reported here, not hidden in close()
    except CheckpointWriteError as error:
        status = "save_failed"
        print(f"\ndistill run: {error}", file=sys.stderr)
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except Exception:
        status = "failed"
        raise
    finally:
        checkpoints.close()
        progress.close()
        train_seconds = trained_before + ((loop_ended or time.time()) - loop_started if start < steps else 0.0)
        summary = rundir.summary(cfg, status, evaluation.latest, wall_seconds=time.time() - run.started,
                                 train_seconds=train_seconds, resumed_from=start)
        if writer:
            rundir.write_summary(cfg.run.path, summary)
        logger.finish(dict(evaluation.latest))
        logger.close()
    if writer:
        print(rundir.format_table(summary))
    return summary


def hparams(cfg: Config) -> dict:
    """The config flattened to dotted keys: the run's columns in TensorBoard's HParams dashboard."""
    flat = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, list) and node and isinstance(node[0], dict):
            for i, v in enumerate(node):
                walk(v, f"{prefix}{i}.")
        else:
            flat[prefix.rstrip(".")] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk(cfg.to_dict(), "")
    return flat

