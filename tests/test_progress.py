"""The progress line's ETA follows the run's phases, on a fake clock: compile windows left out,
evaluations and checkpoints kept, a phase not reached yet estimated by its relative cost."""

from __future__ import annotations

import io

import pytest

from distill.progress import Progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(progress: Progress, clock: Clock, steps: range, seconds: dict[int, float], compile_s: float,
             eval_every: int, eval_s: float, log_every: int) -> dict[int, float]:
    """Run steps on the fake clock: each step takes `seconds[phase]`, the first step of a phase
    `compile_s` more, an evaluation after every `eval_every`-th step `eval_s`; returns the ETA
    printed at each log step."""
    etas, compiled = {}, set()
    for step in steps:
        phase = 0 if step <= progress.phases[0][0] else 1
        clock.now += seconds[phase] + (compile_s if phase not in compiled else 0.0)
        compiled.add(phase)
        if step % log_every == 0:
            progress.update(step, {})
            etas[step] = progress.eta(step)
        if step % eval_every == 0:
            clock.now += eval_s
    return etas


def test_the_eta_weighs_the_phases_and_leaves_compilation_out():
    clock = Clock()
    progress = Progress(40, phases=[(10, 1.0), (40, 2.0)], stream=io.StringIO(), clock=clock)
    etas = simulate(progress, clock, range(1, 41), {0: 1.0, 1: 2.0}, compile_s=50.0, eval_every=20, eval_s=0.0,
                    log_every=5)
    # After the warm-up's second window: 1 s per teacher-only step measured (the first window, with
    # its compile, left out); the 30 co-trained steps estimated at twice that.
    assert etas[10] == pytest.approx(30 * 2.0)
    # The co-trained phase's first window compiled its step: still estimated; then measured.
    assert etas[15] == pytest.approx(25 * 2.0)
    assert etas[20] == pytest.approx(20 * 2.0)
    assert etas[40] == 0.0


def test_evaluation_time_counts_and_a_wrong_cost_ratio_gives_way_to_measurement():
    clock = Clock()
    progress = Progress(40, phases=[(10, 1.0), (40, 1.0)], stream=io.StringIO(), clock=clock)  # costs say equal
    etas = simulate(progress, clock, range(1, 41), {0: 1.0, 1: 3.0}, compile_s=20.0, eval_every=10, eval_s=10.0,
                    log_every=5)
    assert etas[10] == pytest.approx(30 * 1.0)  # only the teacher-only phase measured yet: the costs' guess
    # From step 20 on the co-trained steps are measured: 3 s each, and the evaluation after step 20
    # (10 s) counts in the window after it: (15 + 25 + 15) s over the windows 15-20, 20-25, 25-30.
    assert etas[30] == pytest.approx(10 * (15 + 25 + 15) / 15)
    assert etas[30] > 10 * 3.0


def test_a_resumed_run_measures_its_own_steps_only():
    clock = Clock()
    progress = Progress(40, start=20, phases=[(10, 1.0), (40, 2.0)], stream=io.StringIO(), clock=clock)
    etas = simulate(progress, clock, range(21, 41), {0: 1.0, 1: 2.0}, compile_s=30.0, eval_every=100, eval_s=0.0,
                    log_every=5)
    assert etas[30] == pytest.approx(10 * 2.0)  # the first window (the resumed step's compile) left out


def test_no_eta_before_a_window_without_compilation():
    clock, stream = Clock(), io.StringIO()
    progress = Progress(20, phases=[(10, 1.0), (20, 3.0)], stream=stream, clock=clock)
    clock.now = 60.0  # the first window: mostly compilation
    progress.update(5, {})
    assert progress.eta(5) is None and "ETA --" in stream.getvalue()
    clock.now = 65.0
    progress.update(10, {})
    assert progress.eta(10) == pytest.approx(10 * 3.0)  # 1 s per unit of cost, measured on steps 6-10
