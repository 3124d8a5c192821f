"""Where soft targets come from: teacher presets (sources and modes arrive with the engine)."""

from teacher.presets import TEACHER_PRESETS, teacher_preset

__all__ = ["TEACHER_PRESETS", "teacher_preset"]
