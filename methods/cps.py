"""Cross Pseudo Supervision (Chen et al., 2021), as SSL4MIS ``code/train_cross_pseudo_supervision_2D.py``.

Reference: two networks of the same architecture, initialised by two successive random draws; on
the unlabeled images each is trained with CE against the other's argmax (detached); per network
0.5 (CE + Dice) + lambda CE_pseudo, lambda = 0.1 ramped up (sigmoid) over 200 ramp steps of 150
iterations; the loss is the sum of the two networks' losses, each with its own SGD optimizer of the
same settings (here one SGD over both parameter sets: SGD is per parameter, so the steps are the same).
Mapped here: the pseudo-label is p > 0.5 and its CE the BCE. The first network is evaluated and
checkpointed as ``model``; the second is in the method's state.
"""
from __future__ import annotations

import torch.nn.functional as F

from .base import Method, has_unused_decoders
from .losses import hard_label_and_confidence, reference_supervised_loss


class CrossPseudoSupervision(Method):
    name = "cps"
    reference = "SSL4MIS code/train_cross_pseudo_supervision_2D.py"

    def __init__(self, student, second, consistency: float = 0.1, rampup: float = 200.0, ramp_every: int = 150,
                 consistency_start: int = 0):
        super().__init__(student, consistency, rampup, ramp_every, consistency_start)
        self.second = second

    def leaves_parameters_unused(self) -> bool:
        return has_unused_decoders(self.student)

    def forward(self, images, masks, weight):
        n = len(masks)
        logits_1, logits_2 = self.student(images).float(), self.second(images).float()
        pseudo_1, _ = hard_label_and_confidence(logits_1[n:].detach())
        pseudo_2, _ = hard_label_and_confidence(logits_2[n:].detach())
        loss_x1 = reference_supervised_loss(logits_1[:n], masks)
        loss_x2 = reference_supervised_loss(logits_2[:n], masks)
        loss_cps1 = F.binary_cross_entropy_with_logits(logits_1[n:], pseudo_2)
        loss_cps2 = F.binary_cross_entropy_with_logits(logits_2[n:], pseudo_1)
        loss_x, loss_u = loss_x1 + loss_x2, loss_cps1 + loss_cps2
        loss = loss_x + weight * loss_u  # = model1_loss + model2_loss of the reference
        return {"loss": loss, "loss_x": loss_x, "loss_u": loss_u, "loss_x1": loss_x1, "loss_x2": loss_x2,
                "loss_cps1": loss_cps1, "loss_cps2": loss_cps2}
