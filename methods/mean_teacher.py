"""Mean Teacher (Tarvainen & Valpola, 2017), as SSL4MIS ``code/train_mean_teacher_2D.py``.

Reference defaults: EMA decay 0.99 with alpha = min(1 - 1/(step + 1), 0.99); teacher input = the
unlabeled images + clamp(N(0, 0.1^2), -0.2, 0.2) noise; consistency = MSE of the student's and the
teacher's class probabilities on the unlabeled images, weight 0.1 ramped up (sigmoid) over 200 ramp
steps of 150 iterations, and 0 during the first 1000 iterations; supervised 0.5 (CE + Dice).
The teacher is never put in eval mode there: it runs with batch statistics, and its BatchNorm
buffers are not averaged (only parameters are); the same here. The student is evaluated, as there.

Mapped here: the noise is in intensity units of the image in [0, 1] (the reference's input range),
so it is scaled by the normalisation; the teacher starts as a copy of the student (the reference
starts it from another random draw, which its first update, alpha = 0, overwrites).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .augment import Intensity
from .base import Method, has_unused_decoders
from .losses import reference_supervised_loss


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float, step: int) -> None:
    """teacher <- alpha teacher + (1 - alpha) student, alpha = min(1 - 1/(step + 1), decay): the true
    average of the weights so far until the exponential one weighs more (SSL4MIS update_ema_variables)."""
    alpha = min(1 - 1 / (step + 1), decay)
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(alpha).add_(s.detach(), alpha=1 - alpha)


class MeanTeacher(Method):
    name = "mean-teacher"
    reference = "SSL4MIS code/train_mean_teacher_2D.py"

    def __init__(self, student, intensity: Intensity, consistency: float = 0.1, rampup: float = 200.0,
                 ramp_every: int = 150, ema_decay: float = 0.99, noise_std: float = 0.1, noise_clip: float = 0.2,
                 consistency_start: int = 1000):
        super().__init__(student, consistency, rampup, ramp_every, consistency_start)
        self.teacher = copy.deepcopy(student).requires_grad_(False)
        self.intensity, self.ema_decay = intensity, ema_decay
        self.noise_std, self.noise_clip = noise_std, noise_clip

    def leaves_parameters_unused(self) -> bool:
        return has_unused_decoders(self.student)

    def noised(self, images: torch.Tensor) -> torch.Tensor:
        # drawn in NCHW order (randn_like would follow a channels_last batch's memory order: other noise per pixel)
        noise = (torch.randn(images.shape, device=images.device, dtype=images.dtype) * self.noise_std).clamp(
            -self.noise_clip, self.noise_clip)
        return self.intensity.from_unit(self.intensity.to_unit(images) + noise)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        ema_update(self.teacher, self.student, self.ema_decay, step)

    def forward(self, images, masks, weight):
        n = len(masks)
        logits = self.student(images).float()
        with torch.no_grad():
            teacher_logits = self.teacher(self.noised(images[n:])).float()
        loss_x = reference_supervised_loss(logits[:n], masks)
        loss_u = F.mse_loss(torch.sigmoid(logits[n:]), torch.sigmoid(teacher_logits))
        return {"loss": loss_x + weight * loss_u, "loss_x": loss_x, "loss_u": loss_u}
