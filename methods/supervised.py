"""The baseline: the network's main decoder on the labeled images alone, MGCC's supervised loss."""
from __future__ import annotations

import torch

from utils.losses import bce_dice_loss

from .base import Method, has_unused_decoders


class Supervised(Method):
    name = "supervised"
    uses_unlabeled = False
    reference = "MGCC train.py (official), its main decoder's loss"

    def leaves_parameters_unused(self) -> bool:
        return has_unused_decoders(self.student)

    def forward(self, images, masks, weight):
        loss_x = bce_dice_loss(self.student(images).float(), masks)  # 0.5 BCE + soft Dice (Eq. 5-6)
        return {"loss": loss_x, "loss_x": loss_x}
