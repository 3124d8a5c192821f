"""What the training loop does after a step, each thing a small hook with its own schedule.

A hook is called with the step's `StepEnd` when `due(end)` says so; it may return a status that
stops the run at once (before the hooks after it). The loop runs, in order: `FailedSave` (a failed
asynchronous save stops the run), `NonFiniteGuard` (skipped updates: warn, or stop), `MetricsLog` (scalars to metrics.jsonl, TensorBoard and the
progress line, with what `ArrayLog`s make of the step's array metrics: expert-load histograms,
difficulty filtering's rows, on-policy text), `Evaluation` and `Checkpointing`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np

from distill.checkpoint import Checkpoints
from distill.config import TrainConfig
from distill.progress import Progress
from distill.run_logger import RunLogger
from distill.step import TrainState, eval_metrics


class StepEnd(NamedTuple):
    """A step the loop has just run."""

    done: int  # steps completed
    final: bool  # the run's last step
    state: TrainState
    metrics: dict[str, jax.Array]  # the step's metrics, on the device
    host_batch: dict[str, np.ndarray]  # this process's rows of the batch, [grad_accum, rows, seq]


class Hook(Protocol):
    def due(self, end: StepEnd) -> bool: ...

    def __call__(self, end: StepEnd) -> str | None: ...


def after_step(hooks: list[Hook], end: StepEnd) -> str | None:
    """Run the hooks due after a step, in order; the first status one returns stops the run there."""
    for hook in hooks:
        if hook.due(end) and (status := hook(end)):
            return status
    return None


def every(interval: int, end: StepEnd) -> bool:
    return end.done % interval == 0 or end.final


class FailedSave:
    """After every step: an asynchronous save that has failed since (disk full, quota) raises its
    `CheckpointWriteError` here, so the run stops at the next step rather than at the next save
    or the end (a look at a flag; a save still running is not waited for)."""

    def __init__(self, checkpoints: Checkpoints):
        self.checkpoints = checkpoints

    def due(self, end: StepEnd) -> bool:
        return True

    def __call__(self, end: StepEnd) -> None:
        self.checkpoints.raise_if_failed()


class NonFiniteGuard:
    """At log and checkpoint steps, what was skipped for a non-finite gradient since the last look
    (a small device read): a warning; or the status "nonfinite", which stops the run before it
    saves (the last checkpoint stays intact), with `on_nonfinite="stop"` at the first skip, and with
    "skip" once a model's skips over the last `skip_window` steps exceed `max_skipped_fraction` of
    them (a run that diverged and skips most updates)."""

    def __init__(self, names: list[str], state: TrainState, train: TrainConfig, checkpoints: Checkpoints,
                 progress: Progress, start: int):
        self.names, self.log_every, self.checkpoint_every = names, train.log_every, train.checkpoint_every
        self.stop, self.checkpoints, self.progress = train.on_nonfinite == "stop", checkpoints, progress
        self.window, self.max_fraction = train.skip_window, train.max_skipped_fraction
        self.skipped = np.asarray(jax.device_get(state.skipped))
        self.seen = [(start, self.skipped)]  # (step, skip counts) at each look, back to skip_window steps ago

    def due(self, end: StepEnd) -> bool:
        return end.done % self.log_every == 0 or every(self.checkpoint_every, end)

    def __call__(self, end: StepEnd) -> str | None:
        skipped, last = (np.asarray(x) for x in jax.device_get((end.state.skipped, end.state.last_skipped)))
        new = [f"{self.names[i]} (step {last[i]}, {skipped[i]} so far)" for i in np.flatnonzero(skipped > self.skipped)]
        self.skipped = skipped
        self.seen.append((end.done, skipped))
        if not new:
            return None
        problem = f"non-finite gradient, update skipped: {', '.join(new)}"
        if self.stop:
            self._refuse(f"{problem}; train.on_nonfinite=stop, so", end, "resume with train.on_nonfinite=skip")
            return "nonfinite"
        runaway = self._runaway(end.done, skipped)
        if runaway:
            self._refuse(f"runaway non-finite gradients: {runaway} (more than train.max_skipped_fraction="
                         f"{self.max_fraction} of train.skip_window={self.window} steps), so", end,
                         "lower optim.learning_rate, or raise train.max_skipped_fraction")
            return "nonfinite"
        self.progress.message(f"step {end.done}: warning: {problem}")
        return None

    def _runaway(self, done: int, skipped: np.ndarray) -> str:
        """'teacher skipped 9 of the last 10 steps, ...' for each model past the limit ('' for none),
        counted from the newest look at least `window` steps back (or the first)."""
        while len(self.seen) > 1 and self.seen[1][0] <= done - self.window:
            self.seen.pop(0)
        since, before = self.seen[0]
        counts = skipped - before
        over = [i for i in range(len(self.names)) if counts[i] > self.max_fraction * max(done - since, self.window)]
        return ", ".join(f"{self.names[i]} skipped {counts[i]} of the last {done - since} steps' updates" for i in over)

    def _refuse(self, problem: str, end: StepEnd, fix: str) -> None:
        print(f"distill run: {problem} the run stops at step {end.done} without saving: the last checkpoint (step "
              f"{self.checkpoints.latest_step()}) is intact. Fix the cause, or {fix}", file=sys.stderr)


class ArrayLog(Protocol):
    """Logs the array metrics it recognises (`tag`, host array) and returns the ones it leaves."""

    def __call__(self, step: int, arrays: dict[str, np.ndarray], scalars: dict[str, float],
                 host_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class FilteredRows:
    """What a student's difficulty filter did to this step's rows (this process's): a histogram of
    the row scores, and the text of the easiest row (filtered) and the hardest (kept)."""

    def __init__(self, logger: RunLogger, rows: slice, tokenizer, chars: int = 600):
        self.logger, self.rows, self.tokenizer, self.chars = logger, rows, tokenizer, chars

    def __call__(self, step, arrays, scalars, host_batch):
        for tag in [t for t in arrays if t.endswith("/filter_row_scores")]:
            scores = arrays.pop(tag)[:, self.rows]
            self.logger.log_histogram(step, tag, scores)
            flat_scores, flat_tokens = scores.reshape(-1), host_batch["tokens"].reshape(-1, host_batch["tokens"].shape[-1])
            shown = []
            for label, row in (("easiest row (among the dropped or down-weighted)", int(np.argmin(flat_scores))),
                               ("hardest row (kept)", int(np.argmax(flat_scores)))):
                text = self.tokenizer.decode(flat_tokens[row])[:self.chars].replace("`", "'")
                shown.append(f"**{label}**, score {flat_scores[row]:.3f}:\n\n```\n{text}\n```")
            self.logger.log_text(step, tag.replace("filter_row_scores", "filter_examples"), "\n\n".join(shown))
        return arrays


class WrittenRows:
    """A row each on-policy student wrote this step: its data prompt, then what it sampled."""

    def __init__(self, logger: RunLogger, prompt_tokens: dict[str, int], tokenizer, chars: int = 600):
        self.logger, self.prompt_tokens, self.tokenizer, self.chars = logger, prompt_tokens, tokenizer, chars

    def __call__(self, step, arrays, scalars, host_batch):
        for name, prompt_tokens in self.prompt_tokens.items():
            tag = f"student/{name}/on_policy_written"
            tokens = arrays.pop(tag, None)
            if tokens is None or not scalars[f"student/{name}/on_policy_writing"]:  # before on_policy.start_step
                continue
            prompt = self.tokenizer.decode(tokens[:prompt_tokens])[-self.chars:].replace("`", "'")
            written = self.tokenizer.decode(tokens[prompt_tokens:])[:self.chars].replace("`", "'")
            self.logger.log_text(step, tag, f"**prompt** (data):\n\n```\n{prompt}\n```\n\n**written by the "
                                            f"student**:\n\n```\n{written}\n```")
        return arrays


class Histograms:
    """Every other array metric (expert load per MoE layer): a histogram per layer, and its maximum
    relative to uniform as a scalar (`<tag>_max`)."""

    def __init__(self, logger: RunLogger):
        self.logger = logger

    def __call__(self, step, arrays, scalars, host_batch):
        for tag, values in arrays.items():
            for layer, load in enumerate(values if values.ndim == 2 else [values]):
                self.logger.log_histogram(step, f"{tag}/layer{layer}", load)
            if values.size:
                scalars[f"{tag}_max"] = float(values.max() * values.shape[-1])
        return {}


class MetricsLog:
    """Every `log_every` steps and at the last: the step's scalars (and `perf/...` over the window
    since the last log) to metrics.jsonl, TensorBoard and the progress line; array metrics through
    `array_logs`, in order."""

    def __init__(self, logger: RunLogger, progress: Progress, log_every: int, tokens_per_step: int,
                 array_logs: list[ArrayLog], start: int):
        self.logger, self.progress, self.log_every = logger, progress, log_every
        self.tokens_per_step, self.array_logs = tokens_per_step, array_logs
        self.window_start, self.window_first = time.time(), start  # the steps since the last log, and their time

    def due(self, end: StepEnd) -> bool:
        return every(self.log_every, end)

    def __call__(self, end: StepEnd) -> None:
        host = jax.device_get(end.metrics)
        scalars = {k: float(v) for k, v in host.items() if np.ndim(v) == 0}
        arrays = {k: np.asarray(v) for k, v in host.items() if np.ndim(v) > 0}
        elapsed, steps = time.time() - self.window_start, end.done - self.window_first
        scalars["perf/tokens_per_second"] = steps * self.tokens_per_step / max(elapsed, 1e-9)
        scalars["perf/step_seconds"] = elapsed / steps
        self.window_start, self.window_first = time.time(), end.done
        for array_log in self.array_logs:
            arrays = array_log(end.done, arrays, scalars, end.host_batch)
        self.logger.log(end.done, scalars)
        self.progress.update(end.done, scalars)


class Evaluation:
    """Every `eval_every` steps and at the last: validation metrics (`evaluate(state)`), logged and
    kept as the run's latest."""

    def __init__(self, evaluate: Callable[[TrainState], dict[str, float]], eval_every: int, logger: RunLogger,
                 progress: Progress):
        self.evaluate, self.eval_every, self.logger, self.progress = evaluate, eval_every, logger, progress
        self.latest: dict[str, float] = {}

    def due(self, end: StepEnd) -> bool:
        return every(self.eval_every, end)

    def __call__(self, end: StepEnd) -> None:
        self.latest = self.evaluate(end.state)
        self.logger.log(end.done, self.latest)
        self.progress.note(end.done, self.latest)


class Checkpointing:
    """Every `checkpoint_every` steps, at the last, and before the loop stops early (`stop_reason`
    of the step is not None: a signal, or `stop_after`): the state and where the data stands (an
    asynchronous orbax save)."""

    def __init__(self, checkpoints: Checkpoints, checkpoint_every: int, data_position: Callable[[], dict],
                 stop_reason: Callable[[int], str | None]):
        self.checkpoints, self.checkpoint_every, self.data_position = checkpoints, checkpoint_every, data_position
        self.stop_reason = stop_reason

    def due(self, end: StepEnd) -> bool:
        return every(self.checkpoint_every, end) or self.stop_reason(end.done) is not None

    def __call__(self, end: StepEnd) -> None:
        self.checkpoints.save(end.done, end.state, {"step": end.done, "data": self.data_position()})


def validation_sums(evaluate: Callable[[Any, dict], dict], batches) -> Callable[[TrainState], dict[str, float]]:
    """`state -> validation metrics`: `evaluate(state, batch)` (summed statistics, on the device)
    added up over `batches` (a callable giving the placed batches) and turned into metrics."""
    def run(state: TrainState) -> dict[str, float]:
        sums: dict[str, float] = {}
        for batch in batches():
            for k, v in jax.device_get(evaluate(state, batch)).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return eval_metrics(sums)
    return run
