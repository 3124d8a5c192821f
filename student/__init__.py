"""What is trained and shipped: student presets and initialisation from a teacher."""

from student.init import default_layer_map, init_from_teacher
from student.presets import STUDENT_PRESETS, student_preset

__all__ = ["STUDENT_PRESETS", "default_layer_map", "init_from_teacher", "student_preset"]
