"""The co-distillation step: one pure function `(state, batch) -> (state', metrics)`, read top to bottom.

1. The teacher's pass over each micro-batch (`teacher.TEACHER_KINDS`: co-trained, frozen or
   cached) and the targets the students distil from (`teacher.TARGETS`: live, EMA or stale).
2. Each student's gradient (`student`): its rows (data, or written by itself on-policy), per
   token `(1 - a) * CE + a * KD(target, student; T)` from `losses.distillation_loss` (a control:
   plain CE), difficulty filtering, router terms. The targets are `stop_gradient`: no student loss
   reaches the teacher.
3. The teacher's own gradient (CE + router terms + an optional mutual term), pulled back through
   the VJP its pass kept.
4. optax updates per model (skipped for a non-finite gradient); the target follows the teacher.

Metrics are sums and counts (`averages`), device arrays the trainer reads at logging intervals.
"""

from distill.step.evaluate import eval_metrics, eval_step
from distill.step.state import Batch, ModelState, TrainState, forward
from distill.step.student import OBJECTIVES, StudentPlan
from distill.step.teacher import TARGETS, TEACHER_KINDS, TeacherPlan
from distill.step.train import StepPlan, train_step

__all__ = ["OBJECTIVES", "TARGETS", "TEACHER_KINDS", "Batch", "ModelState", "StepPlan", "StudentPlan", "TeacherPlan",
           "TrainState", "eval_metrics", "eval_step", "forward", "train_step"]
