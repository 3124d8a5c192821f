"""A one-line progress display: step, tokens/s, ETA and the headline losses (stderr)."""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Prints a line per logging interval (a live line on a terminal); silent when disabled."""

    HEADLINE = ("teacher/ce", "/loss", "/alpha")

    def __init__(self, total: int, start: int = 0, *, enabled: bool = True, stream=None):
        self.total, self.start, self.enabled = total, start, enabled
        self.stream = stream or sys.stderr
        self.began = time.time()
        self.live = enabled and self.stream.isatty()

    def _emit(self, text: str) -> None:
        if not self.enabled:
            return
        if self.live:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, step: int, scalars: dict[str, float]) -> None:
        done = step - self.start
        elapsed = time.time() - self.began
        eta = elapsed / done * (self.total - step) if done else 0.0
        parts = [f"step {step}/{self.total}", f"{scalars.get('perf/tokens_per_second', 0.0):,.0f} tok/s",
                 f"ETA {_duration(eta)}"]
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
