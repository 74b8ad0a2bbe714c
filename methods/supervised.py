"""The baseline: the network's main decoder on the labeled images alone, MGCC's supervised loss."""
from __future__ import annotations

from .losses import supervised_losses

from .base import Method, has_unused_decoders


class Supervised(Method):
    name = "supervised"
    uses_unlabeled = False
    reference = "MGCC (official) train.py, its main decoder's loss; here methods/losses.py"

    def leaves_parameters_unused(self) -> bool:
        return has_unused_decoders(self.student)

    def forward(self, images, masks, weight):
        loss, loss_x, loss_u = supervised_losses(self.student, images, masks)  # 0.5 BCE + soft Dice; loss_u = 0
        return {"loss": loss, "loss_x": loss_x, "loss_u": loss_u}
