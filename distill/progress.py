"""A one-line progress display: step, tokens/s, ETA and the headline losses (stderr).

The ETA knows the run's phases (the teacher-only warm-up, then the co-trained steps, which cost
more): each phase's time per step is measured on its own, leaving out the windows that compiled
its step and keeping the evaluations and checkpoints that fall between logs. A phase not reached
yet is estimated from a measured one by their relative costs (the trainer gives FLOPs). Until a
window without a compile has been timed, the ETA is `--`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Prints a line per logging interval (a live line on a terminal); silent when disabled.

    `phases`: (last step, relative cost of one of its steps) in order, e.g. `[(250, 1.0), (800, 2.3)]`
    for 250 teacher-only steps and the co-trained rest; default one phase. `clock`: seconds (a fake
    one in tests)."""

    def __init__(self, total: int, start: int = 0, *, phases: list[tuple[int, float]] | None = None,
                 enabled: bool = True, stream=None, clock: Callable[[], float] = time.monotonic):
        self.total, self.start, self.enabled, self.clock = total, start, enabled, clock
        self.phases = [(end, max(cost, 1e-12)) for end, cost in (phases or [(total, 1.0)]) if end > 0]
        self.stream = stream or sys.stderr
        self.live = enabled and self.stream.isatty()
        self.window_start = clock()
        self.window_first = start
        self.seconds = [0.0] * len(self.phases)  # measured time of each phase's steps, compile windows left out
        self.steps = [0] * len(self.phases)

    def _phase(self, step: int) -> int:
        """The phase of the step that completes at `step` (steps are counted from 1)."""
        return next((i for i, (end, _) in enumerate(self.phases) if step <= end), len(self.phases) - 1)

    def _compiled_in(self, first: int, last: int) -> bool:
        """Whether the steps `first..last` include a phase's first step of this invocation (its compile)."""
        begins = [self.start + 1] + [end + 1 for end, _ in self.phases[:-1] if end + 1 > self.start]
        return any(first <= begin <= last for begin in begins)

    def _record(self, step: int) -> None:
        """The window since the last update: its time goes to its phase unless it compiled a step."""
        now = self.clock()
        first, seconds = self.window_first + 1, now - self.window_start
        if step >= first and not self._compiled_in(first, step):
            phase = self._phase(step)
            self.seconds[phase] += seconds
            self.steps[phase] += step - first + 1
        self.window_start, self.window_first = now, step

    def eta(self, step: int) -> float | None:
        """Seconds to the last step: each phase's remaining steps at its measured time per step, or
        at the measured time per unit of cost where the phase has not been measured; None before
        any window without a compile was measured (compilation says nothing of the steps' pace)."""
        costs = [cost for _, cost in self.phases]
        measured = [i for i, n in enumerate(self.steps) if n]
        if not measured:
            return None if step < self.total else 0.0
        per_cost = sum(self.seconds[i] for i in measured) / sum(self.steps[i] * costs[i] for i in measured)
        eta, previous_end = 0.0, 0
        for i, (end, cost) in enumerate(self.phases):
            remaining = max(0, end - max(step, previous_end))
            rate = self.seconds[i] / self.steps[i] if self.steps[i] else per_cost * cost
            eta += remaining * rate
            previous_end = end
        return eta

    def _emit(self, text: str) -> None:
        if not self.enabled:
            return
        if self.live:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, step: int, scalars: dict[str, float]) -> None:
        self._record(step)
        eta = self.eta(step)
        parts = [f"step {step}/{self.total}", f"{scalars.get('perf/tokens_per_second', 0.0):,.0f} tok/s",
                 f"ETA {'--' if eta is None else _duration(eta)}"]
        for key, value in scalars.items():
            if key == "teacher/ce" or (key.startswith("student/") and key.endswith(("/loss", "/alpha"))):
                parts.append(f"{key.removeprefix('student/')} {value:.3f}")
        self._emit(" | ".join(parts))

    def note(self, step: int, metrics: dict[str, float]) -> None:
        """A permanent line with the evaluation results."""
        bpb = ", ".join(f"{k.split('/')[-2]} {v:.3f}" for k, v in metrics.items() if k.endswith("/bpb"))
        self.message(f"eval @ {step}: bpb {bpb}")

    def message(self, text: str) -> None:
        """A permanent line (evaluation results, warnings)."""
        if self.live:
            self.stream.write("\n")
        self._emit(text)
        if self.live:
            self.stream.write("\n")

    def close(self) -> None:
        if self.enabled and self.live:
            self.stream.write("\n")
            self.stream.flush()
