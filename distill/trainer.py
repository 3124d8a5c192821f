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
from distill.checkpoint import Checkpoints, CheckpointWriteError, check_shapes, committed_steps, library_log
from distill.compile_cache import use_compilation_cache
from distill.config import Config
from distill.data import Data, build_data
from distill.experiment import Experiment, resolve
from distill.guards import StopSignals
from distill.hooks import (
    Checkpointing,
    Evaluation,
    FailedSave,
    FilteredRows,
    Histograms,
    MetricsLog,
    NonFiniteGuard,
    StepEnd,
    WrittenRows,
    after_step,
    validation_sums,
)
from distill.job import compiled_together, wait_for_processes
from distill.parallel import check_batch_divides, global_batch, initialize_distributed, lost_process, process_row_block
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
    use_compilation_cache(cfg.run.compilation_cache)
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
    log = rundir.LIBRARY_LOG if jax.process_index() == 0 else f"{rundir.LIBRARY_LOG}.{jax.process_index()}"
    try:
        with library_log(cfg.run.path / log):
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


class StopRequests:
    """Why the loop stops after a step before the last: a signal (SIGTERM, SIGINT), or `stop_after`
    steps run in this invocation."""

    def __init__(self, steps: int, start: int, stop_after: int | None):
        self.signals, self.steps, self.start, self.stop_after = StopSignals(), steps, start, stop_after

    def reason(self, done: int) -> str | None:
        if done >= self.steps:
            return None
        if self.signals.status:
            return self.signals.status
        return "stopped" if self.stop_after is not None and done - self.start >= self.stop_after else None


class Session:
    """One invocation's training: the state it starts from (a checkpoint, or a fresh one), the
    jitted steps, and the hooks that log, evaluate and checkpoint."""

    def __init__(self, run: Run):
        cfg, placed, exp = run.cfg, run.placed, run.exp
        self.run, self.writer = run, jax.process_index() == 0
        cache = None if exp.teacher.source.runs else TeacherCache(cfg.teacher.path)
        self.batches = Batches(run, cache)
        wait_for_processes("checkpoints")
        self.checkpoints = Checkpoints(cfg.run.path, keep=cfg.train.keep_checkpoints)
        restored = self.checkpoints.restore_latest(placed.abstract_state()) if run.existing else None
        if restored is not None:
            self.state, meta = restored
            self.batches.iterator.restore(meta["data"])
            self.start = int(meta["step"])
        else:  # a resumed run reads its checkpoint; only a fresh one builds (or loads) its models
            self.state, self.start = placed_initial_state(exp, placed), 0
        previous = rundir.read_summary(cfg.run.path) if restored is not None else None
        self.trained_before = (previous or {}).get("train_seconds", 0.0)
        self.full_step = compiled_together(jit_step(placed, exp.teacher_warmup, with_students=True), "step")
        self.teacher_step = (compiled_together(jit_step(placed, exp.teacher_warmup, with_students=False), "warm-up step")
                             if exp.teacher_warmup else None)
        self.logger = RunLogger(cfg.run.path, hparams=hparams(cfg), route=rundir.tensorboard_route,
                                enabled=self.writer, resume_step=self.start if restored is not None else None)
        self.progress = Progress(total=cfg.train.steps, start=self.start, phases=step_costs(exp), enabled=self.writer)
        if self.start == 0:
            self.logger.log_text(0, "config", yaml.safe_dump(cfg.to_dict(), sort_keys=False), preformatted=True)
        self.stops = StopRequests(cfg.train.steps, self.start, run.stop_after)
        self.reached = self.start  # steps completed so far
        self.evaluation = Evaluation(validation_sums(compiled_together(jit_eval(placed), "evaluation"),
                                                     validation_batches(run, cache)),
                                     cfg.train.eval_every, self.logger, self.progress)
        self.hooks = self._hooks()

    def _hooks(self) -> list:
        cfg, train, logger, progress = self.run.cfg, self.run.cfg.train, self.logger, self.progress
        tokenizer = self.run.data.tokenizer
        prompts = {s.name: s.loss.on_policy.prompt_tokens for s in self.run.exp.students}
        array_logs = [FilteredRows(logger, self.batches.rows, tokenizer), WrittenRows(logger, prompts, tokenizer),
                      Histograms(logger)]
        return [FailedSave(self.checkpoints),
                NonFiniteGuard(["teacher"] + [s.name for s in cfg.students], self.state, train, self.checkpoints,
                               progress, self.start),
                MetricsLog(logger, progress, train.log_every, cfg.data.batch_size * cfg.data.seq_len, array_logs,
                           self.start),
                self.evaluation,
                Checkpointing(self.checkpoints, train.checkpoint_every, self.batches.iterator.state, self.stops.reason)]

    def loop(self) -> tuple[str, float]:
        """Train from `start` to the last step, or until a hook or a stop request ends it; wait for the
        last save. Returns the status and when training ended (a finished run started again is only
        evaluated, which is not training time)."""
        with self.stops.signals:
            status = self._steps()
            ended = time.time()
            if status == "completed" and not self.evaluation.latest:
                self.evaluation.latest = self.evaluation.evaluate(self.state)
            self.checkpoints.wait()  # a failed final save is reported here, not hidden in close()
        return status, ended

    def _steps(self) -> str:
        steps, warmup = self.run.cfg.train.steps, self.run.exp.teacher_warmup
        for step in range(self.start, steps):
            host_batch, batch = self.batches.take(step)
            self.state, metrics = (self.teacher_step if step < warmup else self.full_step)(self.state, batch)
            self.reached = step + 1
            end = StepEnd(step + 1, step + 1 == steps, self.state, metrics, host_batch)
            stop = after_step(self.hooks, end) or self.stops.reason(end.done)
            if stop:
                if stop in StopSignals.SIGNALS.values():
                    print(f"\ndistill run: {stop} at step {end.done}: checkpoint saved; run the same command to "
                          "resume", file=sys.stderr)
                return stop
        return "completed"

    def summary(self, status: str, train_seconds: float) -> dict:
        """Close the checkpoints and logs; summary.json's content (written by process 0). With a
        process lost, the checkpoints are left as they are (closing them waits on the others)."""
        if status != "process_lost":
            self.checkpoints.close()
        self.progress.close()
        committed = committed_steps(self.checkpoints.directory)
        summary = rundir.summary(self.run.cfg, status, self.evaluation.latest, wall_seconds=time.time() - self.run.started,
                                 train_seconds=self.trained_before + train_seconds, resumed_from=self.start,
                                 checkpoint=committed[-1] if committed else None)
        if self.writer:
            rundir.write_summary(self.run.cfg.run.path, summary)
        self.logger.finish({**self.evaluation.latest, **rundir.control_gains(summary)})
        self.logger.close()
        return summary


FAILURES = ("failed", "nonfinite", "save_failed", "process_lost")
"""Statuses whose message, not the table of a run cut short, is the command's last word."""


def lost_message(reason: str, checkpoint: int | None) -> str:
    """What a process says when another process of its job is gone (`checkpoint`: the newest
    complete one, summary.json's)."""
    kept = f"its newest complete checkpoint is step {checkpoint}" if checkpoint is not None else \
        "it has no complete checkpoint yet"
    return (f"process {jax.process_index()} of {jax.process_count()}: another process of this job stopped "
            f"({reason}); this one stops too. The run directory is as it was: {kept}; start the same "
            f"{jax.process_count()} processes again to resume")


def _train(run: Run) -> dict:
    session = Session(run)
    status, started, ended, failure, lost = "failed", time.time(), None, None, None
    try:
        status, ended = session.loop()
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except Exception as error:
        lost = lost_process(error)
        if lost is None and not isinstance(error, CheckpointWriteError):
            raise
        status, failure = "save_failed" if lost is None else "process_lost", error
    finally:
        trained = (ended or time.time()) - started if session.start < run.cfg.train.steps else 0.0
        summary = session.summary(status, trained)
    if session.writer and status not in FAILURES and any(v is not None for v in summary["bpb"].values()):
        print(rundir.format_table(summary))  # not an empty one: a run stopped before its first evaluation
    if failure is not None:
        message = lost_message(lost, summary["checkpoint"]) if lost else f"stopped at step {session.reached}: {failure}"
        print(f"\ndistill run: {message}", file=sys.stderr)
    return summary


def step_costs(exp: Experiment) -> list[tuple[int, float]]:
    """(last step, training FLOPs of one step) of the teacher-only warm-up and the co-trained steps,
    what the progress line's ETA weighs the phases by until it has timed them."""
    teacher, students = exp.forward_flops_per_step()
    teacher_step = teacher * (3 if exp.teacher.trains else 1)
    return [(exp.teacher_warmup, teacher_step), (exp.config.train.steps, teacher_step + 3 * sum(students))]


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

