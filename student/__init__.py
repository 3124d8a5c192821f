"""What is trained and shipped: student presets (initialisation and export arrive with the engine)."""

from student.presets import STUDENT_PRESETS, student_preset

__all__ = ["STUDENT_PRESETS", "student_preset"]
